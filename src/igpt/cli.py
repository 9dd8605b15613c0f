"""The `igpt` command line: one parser with a subcommand per stage. Each command parses its flags, calls its
one library function (`igpt.prepare`, `igpt.pretrain`, ...) and prints a summary; `IgptError` becomes one
clear line on stderr. Nothing in the library imports this module."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from . import __version__
from .errors import IgptError
from .settings import field_docs, first_sentence, flag_name

Sub = argparse._SubParsersAction


class Parser(argparse.ArgumentParser):
    """argparse with igpt's error format: one line on stderr (`igpt: error: ...`), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"igpt: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


def settings(args: argparse.Namespace, *skip: str) -> dict[str, Any]:
    """The parsed flags as keyword arguments for a library call, without the parser's own entries."""
    drop = {"func", "command", "debug", "no_progress", *skip}
    return {k: v for k, v in vars(args).items() if k not in drop}


# ---------------------------------------------------------------------------------------------- flags
def integer(text: str) -> int:
    """An argparse type: an integer (its name makes argparse say 'invalid integer value')."""
    return int(text)


def number(text: str) -> float:
    """An argparse type: a decimal number such as 0.5 or 2e-3."""
    return float(text)


def integers(text: str) -> list[int]:
    """An argparse type: comma-separated integers, such as 500,1000."""
    return [int(s) for s in text.split(",") if s.strip()]


def _base_type(hint: Any) -> Any:
    """The type of an annotation without its None: `int | None` -> int."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None))
    return hint


def _text(value: Any) -> str:
    """A default as the help shows it: 2e-3 rather than 0.002000."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_config_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    skip: Iterable[str] = (),
    positional: Iterable[str] = (),
    required: Iterable[str] = (),
    given_only: bool = False,
) -> list[str]:
    """Add one flag per field of the dataclass `cls` to `parser` and return the fields added.

    `positional` fields become positional arguments, `required` ones required flags, `skip` ones are left
    out (the command supplies them itself). With `given_only`, a flag that is not given is absent from the
    parsed namespace (argparse.SUPPRESS), so the stage can tell a value given from a default (a resume keeps
    the run's own settings); the help still shows the config's default."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    skip, positional, required = set(skip), set(positional), set(required)
    added = []
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        base = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        doc = first_sentence(docs.get(f.name, "")).replace("%", "%%")  # argparse %-formats help text
        kw: dict[str, Any] = {}
        if "choices" in f.metadata:  # shown, and checked by the config (so the refusal is the config's line)
            kw["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
        if f.name in positional:
            parser.add_argument(f.name, help=doc, type=_CONVERTERS.get(base, str), **kw)
            added.append(f.name)
            continue
        shown = "" if default in (None, [], "") or base is bool else f" (default {_text(default)})"
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is list and typing.get_args(base) == (int,):
            kw["type"] = integers
            kw["metavar"] = "N,N,..."
        elif typing.get_origin(base) is list:
            kw["nargs"] = "+"
        else:
            kw["type"] = _CONVERTERS.get(base, str)
        kw["default"] = argparse.SUPPRESS if given_only else default
        if f.name in required:
            kw["required"] = True
            kw.pop("default")
        parser.add_argument(flag_name(f.name), help=(doc + shown) or None, **kw)
        added.append(f.name)
    return added


def config_kwargs(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The parsed values of `cls`'s fields (those present in `args`), as keyword arguments."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


integers.__name__ = "comma-separated integers"

_CONVERTERS = {int: integer, float: number, str: str}


# ---------------------------------------------------------------------------------------------- prepare
def add_prepare(sub: Sub) -> None:
    from igpt.data.preparation import PrepareConfig
    from igpt.data.sources import source_lines

    p = sub.add_parser(
        "prepare",
        help="images -> palette -> token set (meta.json, tokens, labels, palette)",
        epilog="datasets:\n" + "\n".join(f"  {line}" for line in source_lines()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_flags(p, PrepareConfig, positional=["dataset"])
    p.add_argument("--out", required=True, help="directory to write the prepared set to")
    p.add_argument("--force", action="store_true", help="replace an --out prepared with other settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> None:
    from igpt.data.preparation import PrepareConfig, prepare, summary_lines

    cfg = PrepareConfig(**config_kwargs(args, PrepareConfig))
    meta = prepare(cfg, args.out, force=args.force, progress=not args.no_progress)
    print("\n".join(summary_lines(meta, args.out)))


# ---------------------------------------------------------------------------------------------- pretrain
def add_pretrain(sub: Sub) -> None:
    from igpt.training.config import ModelChoice, TrainConfig

    p = sub.add_parser("pretrain", help="pretrain an iGPT model (AR or BERT) on a prepared set")
    p.add_argument("--out", required=True, help="run directory to create (or continue with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # flags not given stay unset, so that a resume keeps the run's own settings
    add_config_flags(p, ModelChoice, given_only=True)
    add_config_flags(p, TrainConfig, skip=["precision_reason"], given_only=True)
    p.set_defaults(func=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> None:
    from igpt.training.pretrain import pretrain

    pretrain(
        out=args.out, resume=args.resume, progress=not args.no_progress, **settings(args, "out", "resume")
    )


# ---------------------------------------------------------------------------------------------- probe
def add_probe(sub: Sub) -> None:
    from igpt.probes.setup import ProbeConfig

    p = sub.add_parser("probe", help="linear probes of every layer, low-data probes, loss against probe")
    add_config_flags(p, ProbeConfig, positional=["run"])
    p.set_defaults(func=run_probe)


def run_probe(args: argparse.Namespace) -> None:
    from igpt.probes.probing import ProbeConfig, probe
    from igpt.results import probe_line

    from .runs import CHECKPOINTS_PROBE, LATEST_PROBE, Run

    res = probe(ProbeConfig(**config_kwargs(args, ProbeConfig)))
    if not res:  # a torchrun rank other than 0: rank 0 writes and reports
        return
    if args.checkpoints == "all":
        for r in res["checkpoints"]:
            print(
                f"{r['checkpoint']}: val_nll {r['val_nll']:.4f} -> best layer {r['best_layer']} "
                f"accuracy {r['best_accuracy']:.4f}"
            )
        print(f"wrote {Run.open(args.run).probe_file(CHECKPOINTS_PROBE)} and its plot")
    else:
        print(f"{probe_line(res)}; wrote {Run.open(args.run).probe_file(LATEST_PROBE)} and its plot")


# ---------------------------------------------------------------------------------------------- finetune
def add_finetune(sub: Sub) -> None:
    from igpt.finetuning.config import FinetuneConfig

    p = sub.add_parser("finetune", help="fine-tune a pretrained run with a linear head (L_CLF + L_GEN)")
    add_config_flags(p, FinetuneConfig, positional=["run"], required=["out"])
    p.set_defaults(func=run_finetune)


def run_finetune(args: argparse.Namespace) -> None:
    from igpt.finetuning.config import FinetuneConfig
    from igpt.finetuning.finetune import finetune

    from .results import FinetuneResult
    from .runs import FINETUNE

    res = finetune(FinetuneConfig(**config_kwargs(args, FinetuneConfig)))
    if not res:  # a torchrun rank other than 0: rank 0 writes and reports
        return
    r = FinetuneResult.from_json(res)
    parts = [s.get("seconds_split", {}) for s in res.get("subsets", [res])]
    split = {k: sum(p.get(k, 0.0) for p in parts) for k in ("set_up", "training", "test")}
    budget = f" of {res['minutes']:g}" if res.get("minutes") else ""
    print(
        f"igpt finetune: {res.get('seconds_total', 0) / 60:.1f}{budget} min: "
        f"set-up {split['set_up'] / 60:.1f}, "
        f"training {split['training'] / 60:.1f}, test {split['test'] / 60:.1f}"
    )
    if r.std_accuracy is not None:
        print(
            f"{r.init} init: test accuracy {r.mean_accuracy:.4f} +- {r.std_accuracy:.4f} over "
            f"{len(r.accuracies or [])} subsets (best epochs {r.best_epochs}); "
            f"wrote {Path(args.out) / FINETUNE}"
        )
        return
    print(
        f"{r.init} init: test accuracy {r.test_accuracy:.4f} (best epoch {r.best_epoch}); "
        f"wrote {Path(args.out) / FINETUNE}"
    )


# ---------------------------------------------------------------------------------------------- sample
def add_sample(sub: Sub) -> None:
    from igpt.generation.sample import SampleConfig

    p = sub.add_parser("sample", help="sample images or complete the bottom of test images")
    add_config_flags(p, SampleConfig, positional=["run"], required=["out"])
    p.set_defaults(func=run_sample)


def run_sample(args: argparse.Namespace) -> None:
    from igpt.generation.sample import SampleConfig, sample

    r = sample(SampleConfig(**config_kwargs(args, SampleConfig)))
    print(
        f"wrote {r['png']} ({r['rows']} rows) and {r['tokens']} (tokens, grid order); {r['new_tokens']:,} "
        f"tokens sampled in {r['seconds']:.2f} s ({r['tokens_per_second']:,.0f} tokens/s, {r['method']})"
    )


# ---------------------------------------------------------------------------------------------- convert
def add_convert(sub: Sub) -> None:
    p = sub.add_parser("convert", help="load or export Hugging Face ImageGPT checkpoints")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--from-hf", metavar="HFDIR", help="a transformers ImageGPT directory to turn into a run")
    g.add_argument("--to-hf", metavar="RUN", help="an igpt AR run to export as a transformers directory")
    p.add_argument("--out", required=True, help="the run directory (--from-hf) or HF directory (--to-hf)")
    p.add_argument(
        "--palette",
        help="with --from-hf: the palette (OpenAI's kmeans_centers.npy) when the directory has no "
        "preprocessor_config.json clusters",
    )
    p.add_argument("--checkpoint", help="with --to-hf: which checkpoint (default: the latest)")
    p.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> None:
    from igpt.convert import convert_from_hf, convert_to_hf

    if args.from_hf:
        if args.checkpoint:
            raise IgptError("--checkpoint goes with --to-hf")
        convert_from_hf(args.from_hf, args.out, palette=args.palette)
        print(f"converted {args.from_hf} -> igpt run {args.out}")
    else:
        if args.palette:
            raise IgptError("--palette goes with --from-hf (an exported run carries its own palette)")
        convert_to_hf(args.to_hf, args.out, checkpoint=args.checkpoint)
        print(f"exported {args.to_hf} -> Hugging Face directory {args.out}")


# ---------------------------------------------------------------------------------------------- quickstart
def add_quickstart(sub: Sub) -> None:
    from igpt.pipeline.plans import QuickstartOptions

    p = sub.add_parser("quickstart", help="the whole pipeline on Fashion-MNIST, ending in report.html")
    add_config_flags(p, QuickstartOptions)
    p.set_defaults(func=run_quickstart)


def run_quickstart(args: argparse.Namespace) -> None:
    from igpt.pipeline.plans import QuickstartOptions
    from igpt.pipeline.quickstart import quickstart

    quickstart(QuickstartOptions(**config_kwargs(args, QuickstartOptions)))


# ---------------------------------------------------------------------------------------------- serve
def add_serve(sub: Sub) -> None:
    from igpt.serving.app import ServeConfig

    p = sub.add_parser("serve", help="a local web page to complete images with a run's model")
    add_config_flags(p, ServeConfig, positional=["run"])
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> None:
    from igpt.serving.app import ServeConfig, serve

    serve(ServeConfig(**config_kwargs(args, ServeConfig)))


# ---------------------------------------------------------------------------------------------- plan
def add_plan(sub: Sub) -> None:
    from igpt.pipeline.scale import PlanConfig

    p = sub.add_parser(
        "plan",
        help="what the paper's protocol needs at scale (memory, disk, time per stage), without running it",
    )
    add_config_flags(p, PlanConfig)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> None:
    from igpt.pipeline.scale import PlanConfig, plan, plan_lines

    res = plan(**config_kwargs(args, PlanConfig))
    print(json.dumps(res, indent=1) if args.json else "\n".join(plan_lines(res)))


# ---------------------------------------------------------------------------------------------- main
COMMANDS: list[Callable[[Sub], None]] = [
    add_prepare,
    add_pretrain,
    add_probe,
    add_finetune,
    add_sample,
    add_convert,
    add_quickstart,
    add_serve,
    add_plan,
]


def build_parser() -> argparse.ArgumentParser:
    """The whole `igpt` parser."""
    parser = Parser(
        prog="igpt", description="Image GPT: generative pretraining from pixels, in plain PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"igpt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of `igpt` and `python -m igpt`."""
    try:  # building the parser imports torch: a Ctrl-C there is an interruption too, not a traceback
        parser = build_parser()
    except KeyboardInterrupt:
        print("igpt: interrupted", file=sys.stderr)
        sys.exit(130)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        sys.exit(2)
    debug = args.debug or os.environ.get("IGPT_DEBUG") == "1"
    try:
        args.func(args)
    except IgptError as e:
        if debug:
            raise
        print(f"igpt: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("igpt: interrupted", file=sys.stderr)
        sys.exit(130)
    except MemoryError:
        if debug:
            raise
        print("igpt: error: out of memory; use a smaller batch size or fewer images", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # the file system's word (permission, full disk, ...), as one line
        if debug:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"igpt: error: {e.strerror or e}{where}", file=sys.stderr)
        sys.exit(1)
