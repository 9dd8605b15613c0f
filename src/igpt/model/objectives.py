"""The pretraining objectives, one table: what each one's attention, inputs and loss are, how it completes
an image and how its features are read. Every other module asks this table (`objective(name)`) instead of
testing an objective's name, so adding one (say, a next-patch or prefix objective) means one new row here
plus the code paths its flags select.

- AR (the paper's main model): causal attention (`is_causal=True`), the next-token loss over every position,
  completion left to right with the key/value cache, features read causally.
- BERT: bidirectional attention (`is_causal=False`), a share of positions (`--mask-ratio`, 15%) replaced by
  a learned mask token and the loss on those alone, completion by iterative mask-predict, features read with
  no mask or averaged over several masks (`igpt probe --mask-ensemble`).
"""

from __future__ import annotations

from dataclasses import dataclass

from igpt.errors import IgptError


@dataclass(frozen=True)
class Objective:
    """One pretraining objective."""

    name: str
    """The value of `--objective` and of run.json's `model.objective`."""
    description: str
    """One line for `--help` and the report."""
    causal: bool
    """Attention: causal (each position sees those before it) or bidirectional."""
    masks_inputs: bool
    """Training replaces a share of the input positions by a learned mask token (the model then owns a
    `mask_token` parameter) and scores those positions alone; otherwise every position is scored."""
    completion: str
    """How `igpt sample` completes an image: "autoregressive" (left to right, key/value cache) or
    "mask-predict" (every hidden position at once, the most confident kept, in rounds)."""
    exports_to_hf: bool
    """Whether Hugging Face's ImageGPT (a causal model) can hold it (`igpt convert --to-hf`)."""


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("ar", "next-token prediction, causal attention", True, False, "autoregressive", True),
        Objective(
            "bert",
            "masked-token prediction (15% masked), bidirectional attention",
            False,
            True,
            "mask-predict",
            False,
        ),
    )
}
DEFAULT_OBJECTIVE = "ar"


def objective(name: str) -> Objective:
    """The objective called `name`; one line naming the known ones otherwise."""
    try:
        return OBJECTIVES[name]
    except (KeyError, TypeError):
        raise IgptError(f"objective must be one of {', '.join(OBJECTIVES)}, got {name!r}") from None
