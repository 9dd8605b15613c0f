"""`igpt convert`: Hugging Face ImageGPT checkpoints in (`--from-hf`) and out (`--to-hf`)."""

from __future__ import annotations

import argparse

from .errors import IgptError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="load or export Hugging Face ImageGPT checkpoints")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--from-hf", metavar="HFDIR", help="a transformers ImageGPT directory to turn into a run")
    g.add_argument("--to-hf", metavar="RUN", help="an igpt AR run to export as a transformers directory")
    p.add_argument(
        "--out", required=True, help="the run directory (--from-hf) or HF directory (--to-hf) to write"
    )
    p.add_argument("--palette", help="with --from-hf: the palette (OpenAI's kmeans_centers.npy) when the "
                   "directory has no preprocessor_config.json clusters")  # fmt: skip
    p.add_argument("--checkpoint", help="with --to-hf: which checkpoint (default: the latest)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from .convert import from_hf, to_hf

    if args.from_hf:
        if args.checkpoint:
            raise IgptError("--checkpoint goes with --to-hf")
        out = from_hf(args.from_hf, args.out, args.palette)
        print(f"converted {args.from_hf} -> igpt run {out}")
    else:
        if args.palette:
            raise IgptError("--palette goes with --from-hf (an exported run carries its own palette)")
        out = to_hf(args.to_hf, args.out, args.checkpoint)
        print(f"exported {args.to_hf} -> Hugging Face directory {out}")
