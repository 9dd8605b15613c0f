"""The `igpt` command line: one parser with a subcommand per stage. Each stage lives in its own module; this
file only parses arguments, dispatches, and turns `IgptError` into one clear line on stderr."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .errors import IgptError


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
    return v


def add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="images -> palette -> token set (meta.json, tokens, labels, palette)")
    p.add_argument("dataset", help="fashion-mnist, mnist, cifar10, cifar100, folder, npz or digits")
    p.add_argument("--out", required=True, help="directory to write the prepared set to")
    p.add_argument("--data-dir", help="where the source lives (a directory, or the .npz file)")
    p.add_argument("--resolution", type=_positive_int, help="square side in pixels (default: the source's)")
    p.add_argument("--clusters", type=_positive_int, help="palette size K (default 16 grey, 512 colour)")
    p.add_argument("--order", default="raster", help="raster or snake")
    p.add_argument("--palette", help="reuse a palette (.npy, ours or OpenAI's kmeans_centers.npy)")
    p.add_argument("--limit", type=_positive_int, help="keep only the first N images of each split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--test-fraction", type=float, default=0.1, help="test share for folder/npz without a split"
    )
    p.add_argument("--strict", action="store_true", help="fail on an unreadable image instead of skipping it")
    p.add_argument("--force", action="store_true", help="replace an --out prepared with other settings")
    p.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> None:
    from .prepare import PrepareConfig, prepare, summary_lines

    cfg = PrepareConfig(
        dataset=args.dataset, data_dir=args.data_dir, resolution=args.resolution, clusters=args.clusters,
        order=args.order, palette=args.palette, limit=args.limit, seed=args.seed,
        test_fraction=args.test_fraction, strict=args.strict,
    )  # fmt: skip
    meta = prepare(cfg, args.out, force=args.force)
    print("\n".join(summary_lines(meta, args.out)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="igpt", description="Image GPT: generative pretraining from pixels, in plain PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"igpt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_prepare(sub)
    for mod in ("pretrain", "probe", "finetune", "sample", "convert", "quickstart", "serve"):
        try:
            module = __import__(f"igpt.main_{mod}", fromlist=["add_parser"])
        except ModuleNotFoundError:
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of `igpt` and `python -m igpt`."""
    parser = build_parser()
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
        print("igpt: error: out of memory; try a smaller --batch-size or --limit", file=sys.stderr)
        sys.exit(1)
