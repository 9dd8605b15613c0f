"""The probes' plots: accuracy against layer beside the raw-pixel baseline, and best-layer accuracy against
validation loss across checkpoints. matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

from pathlib import Path

from igpt.files import atomic_file


def save_figure(fig, path: Path) -> None:
    """Lay out, write atomically and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def plot_layers(
    path: Path,
    layers: dict[str, float],
    raw: float,
    title: str,
    extra: dict[str, float],
    pool: str = "mean",
    paper: dict[str, float] | None = None,
) -> None:
    """Accuracy against layer (with `paper`, the paper's mean-pooled probe beside it), with the raw-pixel
    baseline (and any named reference) as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    xs = [int(k) for k in layers]
    ax.plot(xs, [layers[k] for k in layers], "o-", label=f"linear probe, {pool} pooling")
    if paper and pool != "mean":
        ax.plot(xs, [paper[k] for k in layers], "s--", color="tab:orange", label="the paper's: mean pooling")
    ax.axhline(raw, color="tab:red", ls="--", label=f"raw pixels ({raw:.3f})")
    for (name, v), c in zip(extra.items(), ("tab:green", "tab:purple", "tab:gray"), strict=False):
        ax.axhline(v, color=c, ls=":", label=f"{name} ({v:.3f})")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_checkpoints(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    xs, ys = [r["val_nll"] for r in rows], [r["best_accuracy"] for r in rows]
    ax.plot(xs, ys, "o-")
    for r in rows:
        ax.annotate(
            str(r["step"]),
            (r["val_nll"], r["best_accuracy"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xlabel("validation NLL (nats per token)")
    ax.set_ylabel("best-layer probe accuracy")
    ax.set_title("Better generative loss, better features (labels: step)")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    save_figure(fig, path)
