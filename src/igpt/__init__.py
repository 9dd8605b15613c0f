"""igpt: Image GPT (Chen et al., ICML 2020) in plain PyTorch: prepare token sets, pretrain AR or BERT
transformers on pixels, probe and fine-tune their features, and complete images."""

__version__ = "0.1.0"

__all__ = ["__version__", "load_run"]


def load_run(run: str, checkpoint: str | None = None):
    """The model of a run directory with its latest (or the named) checkpoint's weights, in eval mode on CPU."""
    from .checkpoint import load_run as _load_run

    return _load_run(run, checkpoint)
