"""The quickstart's `report.html`: one self-contained page (images embedded as data URIs, no scripts, no
network) with the settings, the loss curve, probe accuracy against layer beside the baselines, the low-data
table, the completion grid, and timings."""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path
from typing import Any

from .files import write_text_atomic
from .probing import save_figure
from .runs import read_metrics

# Published scikit-learn results on Fashion-MNIST (28x28 pixels; the dataset's benchmark table), drawn as
# reference lines beside our probes.
CLASSICAL_BASELINES = {"LogisticRegression": 0.842, "MLPClassifier": 0.871, "SVC (RBF)": 0.897}

CSS = """
body { font-family: system-ui, sans-serif; max-width: 980px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; } td, th { border: 1px solid #ccc; padding: 3px 9px; }
th { background: #f3f3f3; text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.cards { display: flex; gap: 1em; flex-wrap: wrap; } .card { border: 1px solid #ccc; border-radius: 6px;
padding: 0.6em 1em; min-width: 170px; } .card b { font-size: 1.6em; display: block; }
.notice { background: #fff4d6; border: 1px solid #e0c060; padding: 0.5em 1em; }
img { max-width: 100%; } .muted { color: #666; font-size: 0.9em; }
"""


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return f"<p class=muted>({html.escape(alt)}: not produced)</p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(head: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"<td class=n>{v:.4f}</td>" if v == v else "<td class=n>-</td>"
        if isinstance(v, int):
            return f"<td class=n>{v:,}</td>"
        return f"<td>{html.escape(str(v))}</td>"

    h = "".join(f"<th>{html.escape(x)}</th>" for x in head)
    body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def loss_curve(run: Path, out: Path) -> None:
    """Training loss (per logged step) and validation NLL against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run)
    num = (int, float)
    tr = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), num)]
    va = [(r["step"], r["val_nll"]) for r in rows if isinstance(r.get("val_nll"), num)]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    if tr:
        ax.plot(*zip(*tr, strict=True), lw=1, alpha=0.8, label="training loss")
    if va:
        ax.plot(*zip(*va, strict=True), "o-", label="validation NLL (validation split)")
    ax.set_xlabel("step")
    ax.set_ylabel("nats per token")
    ax.set_title("AR pretraining")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, out)


def write_report(out: Path) -> Path:
    """Assemble OUT/report.html from what the quickstart's stages left in OUT; returns its path."""
    run = out / "run"
    qs = _read(out / "quickstart.json")
    info = _read(run / "run.json")
    summ = _read(run / "summary.json")
    full = _read(run / "probe_full.json")
    ft = _read(out / "finetune" / "finetune.json")
    scratch = _read(out / "finetune_scratch" / "finetune.json")
    meta = _read(out / "data" / "meta.json")
    plan = qs.get("plan", {})
    model = info.get("model", {})
    loss_curve(run, out / "loss.png")

    parts = [
        f"<h1>igpt quickstart: {html.escape(meta.get('dataset', '?'))}</h1>",
        f"<p class=muted>Generated {time.strftime('%Y-%m-%d %H:%M')} from {html.escape(str(out))}</p>",
    ]
    if qs.get("notice"):
        parts.append(f"<p class=notice>{html.escape(qs['notice'])}</p>")
    raw = full.get("raw_pixel_accuracy")
    best = full.get("linear_best_accuracy", full.get("best_accuracy"))
    paper = full.get("paper_probe") or {}
    pool = full.get("pool", "mean")
    att = full.get("attentive")
    cards = [
        (
            f"best-layer probe ({pool} pooling, linear)",
            f"{best:.4f}" if best is not None else "-",
            f"layer {full.get('best_layer', '-')}, chosen on validation; test accuracy",
        ),
        *(
            [
                (
                    "attentive probe",
                    f"{att['test_accuracy']:.4f}",
                    f"layer(s) {att['layers']}, epoch {att['best_epoch']} chosen on validation; test",
                )
            ]
            if att
            else []
        ),
        *(
            [
                (
                    "fine-tuned",
                    f"{ft['test_accuracy']:.4f}",
                    f"joint loss, epoch {ft.get('best_epoch')} chosen on validation; test accuracy",
                )
            ]
            if ft
            else []
        ),
        *(
            [
                (
                    "trained from scratch (control)",
                    f"{scratch['test_accuracy']:.4f}",
                    "same architecture, recipe, labels and minutes, random initial weights; test accuracy",
                )
            ]
            if scratch
            else []
        ),
        (
            "the paper's probe (mean pooling, linear)",
            f"{paper['best_accuracy']:.4f}" if "best_accuracy" in paper else "-",
            f"layer {paper.get('best_layer', '-')}, chosen on validation; test accuracy",
        ),
        (
            "raw pixels, same probe",
            f"{raw:.4f}" if raw is not None else "-",
            f"{meta.get('resolution', 0) ** 2} pixels; features {full.get('feature_dim', '')}-d",
        ),
        (
            "validation NLL",
            f"{summ.get('val_nll', float('nan')):.4f}",
            f"{summ.get('val_bits_per_token', float('nan')):.3f} bits per token; test NLL "
            f"{summ.get('test_nll', float('nan')):.4f}",
        ),
        ("training speed", f"{summ.get('tokens_per_second', 0):,.0f}", "tokens per second"),
    ]
    parts.append(
        "<div class=cards>"
        + "".join(
            f"<div class=card>{html.escape(a)}<b>{b}</b><span class=muted>{html.escape(c)}</span></div>"
            for a, b, c in cards
        )
        + "</div>"
    )

    parts.append("<h2>Settings</h2>")
    parts.append(
        _table(
            ["setting", "value"],
            [
                [
                    "dataset",
                    f"{meta.get('dataset')} ({meta.get('n_train', 0):,} train / "
                    f"{meta.get('n_val', 0):,} validation / {meta.get('n_test', 0):,} test images)",
                ],
                [
                    "pixels",
                    f"{meta.get('resolution')}x{meta.get('resolution')}, {meta.get('clusters')} grey levels "
                    f"(quantization RMSE {meta.get('quantization_rmse', float('nan')):.2f} on 0-255)",
                ],
                [
                    "model",
                    f"{model.get('n_layer')} layers x {model.get('n_embd')} wide, "
                    f"{model.get('n_head')} heads, "
                    f"{summ.get('params', 0):,} parameters, objective {model.get('objective')}",
                ],
                [
                    "pretraining",
                    f"{info.get('train', {}).get('minutes', plan.get('minutes')):g} min"
                    + (f" (of the job's {plan.get('minutes'):g})" if qs.get("budget") else "")
                    + f": {summ.get('steps', 0):,} steps of batch "
                    f"{plan.get('batch_size')}, peak lr {plan.get('lr')}, "
                    f"{summ.get('tokens_seen', 0):,} tokens "
                    f"({summ.get('epochs', 0):.2f} epochs), "
                    + (
                        "through torch.compile"
                        if summ.get("compiled", plan.get("compile"))
                        else "eager PyTorch"
                    ),
                ],
                ["probe", f"{full.get('classifier', '-')}; pooling: {full.get('pool', '-')}"],
            ],
        )
    )

    parts.append("<h2>Pretraining loss</h2>" + _img(out / "loss.png", "loss curve"))
    parts.append("<h2>Linear probe, every layer</h2>")
    parts.append(_img(run / "probe_full.png", "probe accuracy against layer"))
    if full:
        rows = [
            [f"layer {k}", v, full["val_accuracy"].get(k, float("nan")), f"{full['lambda'].get(k, 0):g}"]
            for k, v in full["layers"].items()
        ]
        rows.append(["raw pixels", full["raw_pixel_accuracy"], float("nan"), ""])
        if meta.get("dataset") == "fashion-mnist":
            rows += [
                [f"{k} on 28x28 pixels (published)", v, float("nan"), ""]
                for k, v in CLASSICAL_BASELINES.items()
            ]
        parts.append(_table(["features", "test accuracy", "validation accuracy", "L2"], rows))
        parts.append(
            f"<p class=muted>{full.get('n_train', 0):,} training and {full.get('n_test', 0):,} test "
            "images; the best layer is chosen on validation accuracy.</p>"
        )
        if full.get("chosen"):
            c = full["chosen"]
            parts.append(
                f"<p>Of every probe run, the best on validation: <b>{html.escape(c['probe'])}</b>, "
                f"validation {c['val_accuracy']:.4f}, test {c['test_accuracy']:.4f}.</p>"
            )

    low = sorted(run.glob("probe_*_per_class.json"), key=lambda p: int(p.name.split("_")[1]))
    if low:
        parts.append("<h2>Low-data probes</h2>")
        rows = []
        for p in low:
            r = _read(p)
            rows.append(
                [
                    r["labels_per_class"],
                    r["seeds"],
                    f"{r['mean_accuracy']:.4f} ± {r['std_accuracy']:.4f}",
                    f"{r['raw_pixel_accuracy']:.4f} ± {r['raw_pixel_std']:.4f}",
                    f"{r['best_accuracy']:.4f} ± {r.get('best_std', r['std_accuracy']):.4f}",
                    f"{r.get('best_pool', r.get('pool'))} pooling, layer {r['best_layer']}",
                ]
            )
        head = ["labels per class", "subsets", "probe, each subset's own choice (what one user gets)"]
        shared = ["raw pixels", "probe at the choice shared by all subsets", "that choice (CV over all)"]
        parts.append(_table([*head, *shared], rows))
        parts.append(
            "<p class=muted>Mean ± std of test accuracy over the subsets; pooling, layer and L2 strength are "
            "chosen by cross-validation inside the labelled subsets, never on test.</p>"
        )

    parts.append(
        "<h2>Completions</h2><p>Each row: the original test image, the kept top half (hidden part "
        "hatched), then samples of the bottom half at temperature 1.</p>"
    )
    parts.append(_img(out / "completions.png", "completion grid"))

    parts.append("<h2>Timings</h2>")
    secs = qs.get("seconds", {})
    budget = qs.get("budget") or {}
    planned = dict(budget.get("predicted", {}))
    if budget:
        planned["pretrain"] = 60 * budget["pretrain_minutes"]
        parts.append(
            f"<p>Budget {budget['minutes']:g} minutes for the whole job: the stages after pretraining were "
            "predicted on this machine before pretraining started (margin included), and pretraining got "
            "the rest.</p>"
        )

    def plan_of(stage: str) -> str:
        if stage in planned:
            return f"{planned[stage]:.0f}"
        return "(in finetune)" if stage == "finetune_scratch" and "finetune" in planned else "-"

    rows = [[k, plan_of(k), f"{float(v):.1f}"] for k, v in secs.items()]
    total = f"{sum(secs.values()):.1f}"
    rows.append(["total", f"{60 * budget['minutes']:.0f}" if budget else "-", total])
    parts.append(_table(["stage", "planned seconds", "seconds"], rows))
    if summ.get("precision_reason") or info.get("train", {}).get("precision_reason"):
        why = info.get("train", {}).get("precision_reason", "")
        parts.append(f"<p>Pretraining precision: {html.escape(why)}.</p>")
    parts.append(
        f"<p>Training throughput {summ.get('tokens_per_second', 0):,.0f} tokens/s on "
        f"{summ.get('device', 'cpu')} ({summ.get('precision', 'fp32')}); peak memory "
        f"{qs.get('peak_rss_mib', 0):,.0f} MiB.</p>"
    )

    page = (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>igpt quickstart report</title>"
        f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>"
    )
    path = out / "report.html"
    write_text_atomic(path, page)
    return path
