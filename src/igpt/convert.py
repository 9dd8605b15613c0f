"""Hugging Face ImageGPT interop: load a transformers checkpoint into an igpt run, and export a run to one.

The mapping (d = n_embd; Hugging Face's Conv1D stores weights as (in, out), our nn.Linear as (out, in)):

| ours | Hugging Face |
|---|---|
| wte.weight (K+1, d), row K = SOS | transformer.wte.weight (K+1, d), row K = SOS |
| wpe.weight (T, d) | transformer.wpe.weight |
| h.i.ln_1.weight, h.i.ln_2.weight, ln_f.weight | transformer.h.i.ln_1.weight, ... (no norm biases) |
| h.i.attn.c_attn.weight (3d, d) | transformer.h.i.attn.c_attn.weight (d, 3d), transposed; q, k, v columns |
| h.i.attn.c_proj / mlp.c_fc / mlp.c_proj | the same names, transposed; `.bias` kept (zeros if we have none) |
| lm_head.weight (K, d) | lm_head.weight (K, d) (no SOS row, no bias) |

transformers is not a dependency: files are read and written with safetensors and JSON only.
"""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from igpt.checks import is_whole
from igpt.data.palette import load_palette
from igpt.errors import IgptError
from igpt.files import atomic_directory, save_tensors
from igpt.runs import Run
from igpt.training.checkpoint import save_checkpoint

from .model.gpt import IGPT, IGPTConfig
from .model.objectives import DEFAULT_OBJECTIVE, objective

_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def hf_to_igpt_state(sd: dict[str, torch.Tensor], cfg: IGPTConfig) -> dict[str, torch.Tensor]:
    """Map a Hugging Face ImageGPT state dict (with or without the `transformer.` prefix) to ours."""
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    out = {"wte.weight": sd["wte.weight"], "wpe.weight": sd["wpe.weight"], "ln_f.weight": sd["ln_f.weight"]}
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        out[p + "ln_1.weight"] = sd[p + "ln_1.weight"]
        out[p + "ln_2.weight"] = sd[p + "ln_2.weight"]
        for name in _LINEARS:
            out[p + name + ".weight"] = sd[p + name + ".weight"].T.contiguous()
            if cfg.bias:
                out[p + name + ".bias"] = sd[p + name + ".bias"]
    out["lm_head.weight"] = (
        sd["lm_head.weight"] if "lm_head.weight" in sd else torch.zeros(cfg.vocab_size, cfg.n_embd)
    )
    return out


def igpt_to_hf_state(sd: dict[str, torch.Tensor], cfg: IGPTConfig) -> dict[str, torch.Tensor]:
    """Map our state dict to ImageGPTForCausalImageModeling's (biases written as zeros when we have none)."""
    out = {f"transformer.{k}": sd[k] for k in ("wte.weight", "wpe.weight", "ln_f.weight")}
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        out[f"transformer.{p}ln_1.weight"] = sd[p + "ln_1.weight"]
        out[f"transformer.{p}ln_2.weight"] = sd[p + "ln_2.weight"]
        for name in _LINEARS:
            w = sd[p + name + ".weight"]
            out[f"transformer.{p}{name}.weight"] = w.T.contiguous()
            out[f"transformer.{p}{name}.bias"] = sd.get(
                p + name + ".bias", torch.zeros(w.shape[0], dtype=w.dtype)
            )
    out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def _read_hf_weights(hf: Path) -> dict[str, torch.Tensor]:
    st, bin_ = hf / "model.safetensors", hf / "pytorch_model.bin"
    try:
        if st.is_file():
            return load_file(st)
        if bin_.is_file():
            with (
                warnings.catch_warnings()
            ):  # torch's notes on the pickle protocol are not the user's business
                warnings.simplefilter("ignore", UserWarning)
                sd = torch.load(bin_, map_location="cpu", weights_only=True)  # refuses anything but tensors
            if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
                raise IgptError(f"{bin_} does not hold a dictionary of tensors")
            return sd
    except pickle.UnpicklingError:
        raise IgptError(
            f"{bin_} holds objects other than tensors, which igpt never unpickles; refused (convert the "
            "checkpoint to model.safetensors with a tool you trust)"
        ) from None
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise IgptError(f"cannot read the weights in {hf} ({e.__class__.__name__}: {first[:200]})") from None
    raise IgptError(f"{hf} has neither model.safetensors nor pytorch_model.bin")


def hf_config_to_igpt(c: dict, bias: bool) -> IGPTConfig:
    """Our config from a Hugging Face ImageGPT config.json; refuses settings we do not implement."""
    if c.get("model_type", "imagegpt") != "imagegpt":
        raise IgptError(f"config.json describes a '{c.get('model_type')}' model, not imagegpt")
    if c.get("activation_function", "quick_gelu") != "quick_gelu":
        raise IgptError(f"activation {c['activation_function']} is not iGPT's quick_gelu")
    for key, want in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("tie_word_embeddings", False),
        ("add_cross_attention", False),
    ):
        if c.get(key, want) != want:
            raise IgptError(f"config.json sets {key}={c[key]}, which igpt does not implement")
    d = _whole(c, "n_embd", 512)
    if c.get("n_inner") not in (None, 4 * d):
        raise IgptError(f"config.json sets n_inner={c['n_inner']}; igpt's MLP is 4 x n_embd")
    vocab = _whole(c, "vocab_size", 513)
    if vocab < 3:
        raise IgptError(f"config.json sets vocab_size={vocab}; ImageGPT's vocabulary is colours plus SOS")
    return IGPTConfig(
        vocab_size=vocab - 1,
        n_positions=_whole(c, "n_positions", 1024),
        n_layer=_whole(c, "n_layer", 24),
        n_embd=d,
        n_head=_whole(c, "n_head", 8),
        bias=bias,
        objective=DEFAULT_OBJECTIVE,
        norm_eps=c.get("layer_norm_epsilon", 1e-5),
    )


def _whole(c: dict, key: str, default: int) -> int:
    """config.json's `key` as a positive whole number (its default when absent); one line otherwise."""
    v = c.get(key, default)
    if not is_whole(v, 1):
        raise IgptError(f"config.json's {key} must be a positive whole number, got {v!r}")
    return v


def _expected_hf_shapes(cfg: IGPTConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """The shape each Hugging Face tensor must have under `cfg`, with the config field that sizes it."""
    d, K = cfg.n_embd, cfg.vocab_size
    want = {
        "wte.weight": ((K + 1, d), "vocab_size or n_embd"),
        "wpe.weight": ((cfg.n_positions, d), "n_positions or n_embd"),
        "ln_f.weight": ((d,), "n_embd"),
        "lm_head.weight": ((K, d), "vocab_size or n_embd"),
    }
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        want[p + "ln_1.weight"] = want[p + "ln_2.weight"] = ((d,), "n_embd")
        for name, (n_in, n_out) in zip(_LINEARS, ((d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)), strict=True):
            want[p + name + ".weight"] = ((n_in, n_out), "n_embd or n_inner")  # Conv1D: (in, out)
            want[p + name + ".bias"] = ((n_out,), "n_embd or n_inner")
    return want


def check_hf_shapes(sd: dict[str, torch.Tensor], cfg: IGPTConfig, where: Path) -> None:
    """Compare a Hugging Face state dict with what config.json describes before any model is built, naming
    the first tensor and config field that disagree (a layer count off by one included)."""
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    for key, (shape, field) in _expected_hf_shapes(cfg).items():
        if key not in sd:
            if key == "lm_head.weight" or key.endswith(".bias"):
                continue  # an ImageGPTModel has no head; biases are optional
            raise IgptError(f"{where}'s weights lack {key}: config.json's n_layer or the checkpoint is wrong")
        if tuple(sd[key].shape) != shape:
            raise IgptError(
                f"{where}: config.json disagrees with the weights: {key} is {tuple(sd[key].shape)}, the "
                f"config's {field} make it {shape}"
            )
    extra = sorted(k for k in sd if k.startswith(f"h.{cfg.n_layer}."))
    if extra:
        raise IgptError(
            f"{where}: the weights hold more blocks than config.json's n_layer={cfg.n_layer} ({extra[0]})"
        )


def from_hf(hf_dir: str | Path, out: str | Path, palette: str | None = None) -> Path:
    """Convert a transformers ImageGPT directory into an igpt run directory (written atomically)."""
    hf, out = Path(hf_dir), Path(out)
    if not (hf / "config.json").is_file():
        raise IgptError(f"{hf} is not a Hugging Face model directory (no config.json)")
    if out.exists() and any(out.iterdir()):
        raise IgptError(f"{out} exists and is not empty; choose another --out")
    try:
        c = json.loads((hf / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise IgptError(f"{hf / 'config.json'} is not valid JSON ({e})") from None
    if not isinstance(c, dict):
        raise IgptError(f"{hf / 'config.json'} is not a JSON object")
    hf_config_to_igpt(c, bias=False).check_fits_in_memory()  # before reading or allocating any weights
    sd = _read_hf_weights(hf)
    biases = [v for k, v in sd.items() if k.endswith(".bias") and ".attn.bias" not in k]
    # OpenAI's converted weights carry all-zero biases: drop them, as the original model has none
    cfg = hf_config_to_igpt(c, bias=any(bool(b.abs().max() > 0) for b in biases))
    check_hf_shapes(sd, cfg, hf)
    state = hf_to_igpt_state(sd, cfg)
    model = IGPT(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise IgptError(f"weights do not fit the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if "lm_head.weight" not in sd:
        print(
            "igpt: warning: no lm_head in the checkpoint (an ImageGPTModel); the output head is zero, so the "
            "run probes but does not sample",
            flush=True,
        )
    pal = _palette_for(hf, palette, cfg.vocab_size)
    res = int(round(cfg.n_positions**0.5))
    if res * res != cfg.n_positions:
        raise IgptError(f"n_positions {cfg.n_positions} is not a square image")
    meta = {
        "dataset": "huggingface",
        "resolution": res,
        "channels": int(pal.shape[1]),
        "clusters": cfg.vocab_size,
        "order": "raster",
        "num_classes": 0,
        "class_names": [],
        "source": str(hf.resolve()),
    }
    with atomic_directory(out) as tmp:
        Run.create(
            tmp, "converted", cfg, data_meta=meta, palette=pal, seed=None, converted_from=str(hf.resolve())
        )
        save_checkpoint(
            tmp,
            0,
            model.state_dict(),
            {},
            {"step": 0, "tokens_seen": 0, "elapsed_seconds": 0.0, "converted_from": str(hf.resolve())},
            keep={0},
        )
    return out


def _palette_for(hf: Path, palette: str | None, k: int) -> np.ndarray:
    if palette:
        pal = load_palette(palette)
    else:
        pal = _clusters_palette(hf / "preprocessor_config.json")
    if len(pal) != k:
        raise IgptError(f"the palette has {len(pal)} colours but the model predicts {k}")
    return pal.astype(np.float32)


def _clusters_palette(pre: Path) -> np.ndarray:
    """The palette (0-255) from preprocessor_config.json's `clusters`: a (K, 3) list of numbers in [-1, 1]."""
    clusters = None
    if pre.is_file():
        try:
            obj = json.loads(pre.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise IgptError(f"{pre} is not valid JSON ({e.__class__.__name__})") from None
        if not isinstance(obj, dict):
            raise IgptError(f"{pre} is not a JSON object")
        clusters = obj.get("clusters")
    if clusters is None:
        raise IgptError(
            f"{pre.parent} has no palette (no clusters in preprocessor_config.json); pass --palette "
            "kmeans_centers.npy"
        )
    try:
        c = np.asarray(clusters, dtype=np.float32)
    except (TypeError, ValueError):
        c = None
    if c is None or c.ndim != 2 or c.shape[1] != 3 or len(c) < 2:
        raise IgptError(f"{pre}: 'clusters' must be a list of at least two [r, g, b] triples of numbers")
    if not np.isfinite(c).all() or c.min() < -1.0001 or c.max() > 1.0001:
        raise IgptError(f"{pre}: 'clusters' must hold finite values in [-1, 1] (ImageGPT's scale)")
    return np.clip(127.5 * (c + 1.0), 0, 255)


def to_hf(run: str | Path, out: str | Path, checkpoint: str | None = None) -> Path:
    """Export an AR run as a transformers ImageGPT directory: config.json, model.safetensors and
    preprocessor_config.json carrying the palette (grey palettes become grey RGB clusters)."""
    r = Run.open(run)
    cfg = r.model_config
    if not objective(cfg.objective).exports_to_hf:
        raise IgptError(
            f"a {cfg.objective.upper()} run has no Hugging Face counterpart (ImageGPT is causal); "
            "only AR runs export"
        )
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise IgptError(f"{out} exists and is not empty; choose another --out")
    model = r.load_model(checkpoint)
    sd = igpt_to_hf_state(model.state_dict(), cfg)
    pal = r.palette()
    if pal.shape[1] == 1:
        pal = np.repeat(pal, 3, axis=1)
    res = int(round(cfg.n_positions**0.5))
    config = {
        "architectures": ["ImageGPTForCausalImageModeling"],
        "model_type": "imagegpt",
        "vocab_size": cfg.vocab_size + 1,
        "n_positions": cfg.n_positions,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "quick_gelu",
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "tie_word_embeddings": False,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "torch_dtype": "float32",
    }
    pre = {
        "image_processor_type": "ImageGPTImageProcessor",
        "clusters": (pal / 127.5 - 1.0).tolist(),
        "do_color_quantize": True,
        "do_normalize": True,
        "do_resize": True,
        "resample": 2,
        "size": {"height": res, "width": res},
    }
    with atomic_directory(out) as tmp:
        save_tensors(sd, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "preprocessor_config.json").write_text(json.dumps(pre) + "\n")
    return out


def convert_from_hf(hf_dir: str | Path, out: str | Path, *, palette: str | None = None) -> dict[str, Any]:
    """The convert stage, in: a transformers ImageGPT directory (config.json plus model.safetensors or
    pytorch_model.bin, read without unpickling code) becomes the igpt run `out`. `palette` is OpenAI's
    kmeans_centers.npy (or ours) where the directory's preprocessor_config.json has no clusters. Returns the
    new run's run.json."""
    written = from_hf(hf_dir, out, palette)
    return Run.open(written).info


def convert_to_hf(run: str | Path, out: str | Path, *, checkpoint: str | None = None) -> dict[str, Any]:
    """The convert stage, out: an AR run (its latest or the named checkpoint) becomes a transformers
    ImageGPT directory `out` (config.json, model.safetensors, preprocessor_config.json with the palette).
    Returns the written config.json."""
    written = to_hf(run, out, checkpoint)
    return json.loads((Path(written) / "config.json").read_text())
