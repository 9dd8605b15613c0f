"""The quickstart's `report.html`: one self-contained page (images embedded as data URIs, no scripts, no
network) with the settings, the loss curve, probe accuracy against layer beside the baselines, the low-data
table, the completion grid, and timings."""

from __future__ import annotations

import base64
import html
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from igpt.files import write_text_atomic
from igpt.probes.plots import save_figure
from igpt.probes.variants import VARIANTS
from igpt.results import FinetuneResult, LowDataResult, PretrainSummary, ProbeResult
from igpt.runs import FULL_PROBE, Run, is_run, read_json, read_metrics

from .plans import RECORD, finetune_name

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


@dataclass
class Inputs:
    """What the quickstart's stages left in OUT, read once: each section of the page draws on these."""

    out: Path
    run: Run | None
    qs: dict[str, Any]
    """quickstart.json: the plan, the stages' seconds, the budget (the quickstart's own record)."""
    summ: PretrainSummary
    full: ProbeResult | None
    low: list[LowDataResult]
    ft: FinetuneResult | None
    """The fine-tuned run's result (None when not run)."""
    scratch: FinetuneResult | None
    """The from-scratch control's result (None when not run)."""
    low_ft: dict[int, tuple[FinetuneResult | None, FinetuneResult | None]]
    """Labels per class -> (fine-tuned, from scratch) on the low-data subsets, where run."""

    @classmethod
    def read(cls, out: Path) -> Inputs:
        run = Run.open(out / "run") if is_run(out / "run") else None

        def finetuned(name: str) -> FinetuneResult | None:
            return Run.open(out / name).finetuned() if is_run(out / name) else None

        return cls(
            out=out,
            run=run,
            qs=read_json(out / RECORD) or {},
            summ=(run.pretrain_summary() if run else None) or PretrainSummary(),
            full=run.full_probe() if run else None,
            low=run.low_data_probes() if run else [],
            ft=finetuned("finetune"),
            scratch=finetuned("finetune_scratch"),
            low_ft={
                r.labels_per_class: (
                    finetuned(finetune_name("pretrained", r.labels_per_class)),
                    finetuned(finetune_name("scratch", r.labels_per_class)),
                )
                for r in (run.low_data_probes() if run else [])
            },
        )

    @property
    def info(self) -> dict[str, Any]:
        return self.run.info if self.run else {}

    @property
    def meta(self) -> dict[str, Any]:
        """The prepared set's meta.json as the run recorded it."""
        return self.run.data_meta if self.run else {}


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
    x = Inputs.read(out)
    if x.run is not None:
        loss_curve(x.run.path, out / "loss.png")
    meta = x.meta
    parts = [
        f"<h1>igpt quickstart: {html.escape(meta.get('dataset', '?'))}</h1>",
        f"<p class=muted>Generated {time.strftime('%Y-%m-%d %H:%M')} from {html.escape(str(out))}</p>",
    ]
    if x.qs.get("notice"):
        parts.append(f"<p class=notice>{html.escape(x.qs['notice'])}</p>")
    for section in (headline, settings, probes, low_data, completions, timings):
        parts.extend(section(x))
    page = (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>igpt quickstart report</title>"
        f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>"
    )
    path = out / "report.html"
    write_text_atomic(path, page)
    return path


def _card(title: str, value: Any, note: str) -> tuple[str, str, str]:
    return title, value if isinstance(value, str) else (f"{value:.4f}" if value is not None else "-"), note


def headline(x: Inputs) -> list[str]:
    """The cards: best probe, attentive and fine-tuned heads when run, the paper's probe, raw pixels, loss,
    speed."""
    full, summ, ft, scratch = x.full or ProbeResult(), x.summ, x.ft, x.scratch
    paper = full.paper_probe or {}
    nan = float("nan")
    layer = "-" if full.best_layer is None else full.best_layer
    cards = [
        _card(
            f"best-layer probe ({full.pool} pooling, linear)",
            full.linear_best,
            f"layer {layer}, chosen on validation; test accuracy",
        )
    ]
    if full.fine_probe:
        f = full.fine_probe
        note = f"layer {f['layer']} (the best layer above), {f['feature_dim']}-d features; test accuracy"
        cards.append(_card(f"finer-grid probe ({f['pool']} pooling, linear)", f["test_accuracy"], note))
    for variant in VARIANTS:  # the extra probes that ran (igpt.probes.variants)
        r = full.variant(variant.key)
        if r and variant.summary is not None:
            cards.append(_card(variant.title, variant.score(r), variant.summary(r)))
    if ft:
        note = f"joint loss{ft.recipe()}, epoch {ft.best_epoch} chosen on validation; test accuracy"
        cards.append(_card("fine-tuned", ft.test_accuracy, note))
    if scratch:
        note = (
            f"same architecture, head, labels and minutes from random weights, at its own best "
            f"rate{scratch.recipe()}; test accuracy"
        )
        cards.append(_card("trained from scratch (control)", scratch.test_accuracy, note))
    cards += [
        _card(
            "the paper's probe (mean pooling, linear)",
            paper.get("best_accuracy"),
            f"layer {paper.get('best_layer', '-')}, chosen on validation; test accuracy",
        ),
        _card(
            "raw pixels, same probe",
            full.raw_pixel_accuracy,
            f"{x.meta.get('resolution', 0) ** 2} pixels; features {full.feature_dim or ''}-d",
        ),
        _card(
            "validation NLL",
            f"{summ.val_nll if summ.val_nll is not None else nan:.4f}",
            f"{summ.val_bits_per_token if summ.val_bits_per_token is not None else nan:.3f} bits per token; "
            f"test NLL {summ.test_nll if summ.test_nll is not None else nan:.4f}",
        ),
        _card("training speed", f"{summ.tokens_per_second:,.0f}", "tokens per second"),
    ]
    return [
        "<div class=cards>"
        + "".join(
            f"<div class=card>{html.escape(a)}<b>{b}</b><span class=muted>{html.escape(c)}</span></div>"
            for a, b, c in cards
        )
        + "</div>"
    ]


def settings(x: Inputs) -> list[str]:
    """The settings table: data, pixels, model, pretraining budget and probe."""
    meta, summ, plan = x.meta, x.summ, x.qs.get("plan", {})
    model = x.run.model_config if x.run else None
    train = x.info.get("train") or {}
    pretraining = (
        f"{train.get('minutes', plan.get('minutes')):g} min"
        + (f" (of the job's {plan.get('minutes'):g})" if x.qs.get("budget") else "")
        + f": {summ.steps:,} steps of batch {plan.get('batch_size')}, peak lr {plan.get('lr')}, "
        f"{summ.tokens_seen:,} tokens ({summ.epochs:.2f} epochs), "
        + ("through torch.compile" if summ.compiled else "eager PyTorch")
    )
    rows = [
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
            f"{model.n_layer} layers x {model.n_embd} wide, {model.n_head} heads, "
            f"{summ.params:,} parameters, objective {model.objective}"
            if model
            else "-",
        ],
        ["pretraining", pretraining],
        ["probe", f"{x.full.classifier}; pooling: {x.full.pool}" if x.full else "-"],
    ]
    return ["<h2>Settings</h2>", _table(["setting", "value"], rows)]


def probes(x: Inputs) -> list[str]:
    """The loss curve, and the full probe's plot and per-layer table beside the baselines."""
    full = x.full
    parts = ["<h2>Pretraining loss</h2>" + _img(x.out / "loss.png", "loss curve")]
    parts.append("<h2>Linear probe, every layer</h2>")
    plot = x.run.probe_file(FULL_PROBE, ".png") if x.run else x.out / "missing.png"
    parts.append(_img(plot, "probe accuracy against layer"))
    if not full:
        return parts
    rows = [
        [f"layer {k}", v, full.val_accuracy.get(k, float("nan")), f"{full.lambdas.get(k, 0):g}"]
        for k, v in full.layers.items()
    ]
    if full.fine_probe:
        f = full.fine_probe
        rows.append(
            [
                f"layer {f['layer']}, {f['pool']} pooling",
                f["test_accuracy"],
                f["val_accuracy"],
                f"{f['lambda']:g}",
            ]
        )
    rows.append(["raw pixels", full.raw_pixel_accuracy, float("nan"), ""])
    if x.meta.get("dataset") == "fashion-mnist":
        rows += [
            [f"{k} on 28x28 pixels (published)", v, float("nan"), ""] for k, v in CLASSICAL_BASELINES.items()
        ]
    parts.append(_table(["features", "test accuracy", "validation accuracy", "L2"], rows))
    parts.append(
        f"<p class=muted>{full.n_train:,} training and {full.n_test:,} test "
        "images; the best layer is chosen on validation accuracy.</p>"
    )
    if full.chosen:
        c = full.chosen
        parts.append(
            f"<p>Of every probe run, the best on validation: <b>{html.escape(c['probe'])}</b>, "
            f"validation {c['val_accuracy']:.4f}, test {c['test_accuracy']:.4f}.</p>"
        )
    return parts


def low_data(x: Inputs) -> list[str]:
    """The low-data table: each subset's own choice first (what one user gets), the shared choice beside."""
    parts: list[str] = []
    if x.low:
        parts.append("<h2>Low-data probes</h2>")
        rows = []
        tuned = any(a or b for a, b in x.low_ft.values())
        for r in x.low:
            best_std = r.best_std if r.best_std is not None else r.std_accuracy
            row = [
                r.labels_per_class,
                r.seeds,
                f"{r.mean_accuracy:.4f} ± {r.std_accuracy:.4f}",
                f"{r.raw_pixel_accuracy:.4f} ± {r.raw_pixel_std:.4f}",
                f"{r.best_accuracy:.4f} ± {best_std:.4f}",
                f"{r.best_pool or r.pool} pooling, layer {r.best_layer}",
            ]
            if tuned:
                row += [_mean_std(f) for f in x.low_ft.get(r.labels_per_class, (None, None))]
            rows.append(row)
        head = ["labels per class", "subsets", "probe, each subset's own choice (what one user gets)"]
        shared = ["raw pixels", "probe at the choice shared by all subsets", "that choice (CV over all)"]
        ft_head = ["fine-tuned (same subsets)", "from scratch (same subsets)"] if tuned else []
        parts.append(_table([*head, *shared, *ft_head], rows))
        parts.append(
            "<p class=muted>Mean ± std of test accuracy over the subsets; the layer (of the finest pooling "
            "compared) and the L2 strength are chosen by cross-validation's log-loss inside the labelled "
            "subsets, never on test."
            + (
                " Fine-tuning early-stops on a seeded draw of at most N validation images per class, the "
                "labels such a user would hold."
                if tuned
                else ""
            )
            + "</p>"
        )

    return parts


def _mean_std(r: FinetuneResult | None) -> str:
    if r is None:
        return "-"
    return f"{r.test_accuracy:.4f}" + (f" ± {r.std_accuracy:.4f}" if r.std_accuracy is not None else "")


def completions(x: Inputs) -> list[str]:
    """The completion grid."""
    out = x.out
    parts: list[str] = []
    parts.append(
        "<h2>Completions</h2><p>Each row: the original test image, the kept top half (hidden part "
        "hatched), then samples of the bottom half at temperature 1.</p>"
    )
    parts.append(_img(out / "completions.png", "completion grid"))

    return parts


def timings(x: Inputs) -> list[str]:
    """Stage seconds against the budget's plan, the precision and its reason, throughput and memory."""
    qs, summ, info = x.qs, x.summ, x.info
    parts: list[str] = []
    parts.append("<h2>Timings</h2>")
    secs = qs.get("seconds", {})
    budget = qs.get("budget") or {}
    planned = dict(budget.get("predicted", {}))
    if budget:
        planned["pretrain"] = 60 * budget["pretrain_minutes"]
        again = budget.get("replanned")
        parts.append(
            f"<p>Budget {budget['minutes']:g} minutes for the whole job: the stages after pretraining were "
            "predicted on this machine before pretraining started (margin included), and pretraining got "
            "the rest."
            + (
                f" After {again['at_minutes']:g} minutes of pretraining the machine was timed again, and "
                f"pretraining's share went from {again['from_minutes']:g} to {budget['pretrain_minutes']:g} "
                "minutes."
                if again
                else ""
            )
            + "</p>"
        )

    def plan_of(stage: str) -> str:
        if stage in planned:
            return f"{planned[stage]:.0f}"
        return "(in finetune)" if stage == "finetune_scratch" and "finetune" in planned else "-"

    rows = [[k, plan_of(k), f"{float(v):.1f}"] for k, v in secs.items()]
    total = f"{sum(secs.values()):.1f}"
    rows.append(["total", f"{60 * budget['minutes']:.0f}" if budget else "-", total])
    parts.append(_table(["stage", "planned seconds", "seconds"], rows))
    why = (info.get("train") or {}).get("precision_reason", "")
    if why:
        parts.append(f"<p>Pretraining precision: {html.escape(why)}.</p>")
    if x.full is not None and x.full.precision:
        parts.append(
            f"<p>Probe precision: {html.escape(x.full.precision)} for the feature pass and the full "
            "probe's fits (the low-data probes fit in fp32).</p>"
        )
    parts.append(
        f"<p>Training throughput {summ.tokens_per_second:,.0f} tokens/s on "
        f"{summ.device} ({summ.precision}); peak memory "
        f"{qs.get('peak_rss_mib', 0):,.0f} MiB.</p>"
    )

    return parts
