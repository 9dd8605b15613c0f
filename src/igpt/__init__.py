"""igpt: Image GPT (Chen et al., ICML 2020) in plain PyTorch: prepare token sets, pretrain AR or BERT
transformers on pixels, probe and fine-tune their features, and complete images."""

__version__ = "0.1.0"

__all__ = ["__version__", "complete", "load_run"]


def load_run(run: str, checkpoint: str | None = None):
    """The model of a run directory with its latest (or the named) checkpoint's weights, in eval mode on CPU."""
    from .checkpoint import load_run as _load_run

    return _load_run(run, checkpoint)


def complete(model, tokens, keep: int, num: int = 1, **kwargs):
    """Keep the first `keep` tokens of each (B, T) sequence and sample the rest `num` times -> (B, num, T).
    AR runs sample with the key/value cache; BERT runs use mask-predict. See `igpt.sampling.complete`."""
    from .sampling import complete as _complete

    return _complete(model, tokens, keep, num, **kwargs)
