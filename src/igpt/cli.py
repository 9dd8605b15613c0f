"""The `igpt` command line: one parser with a subcommand per stage. Each command parses its flags, calls its
one library function (`igpt.prepare`, `igpt.pretrain`, ...) and prints a summary; `IgptError` becomes one
clear line on stderr. Nothing in the library imports this module."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from . import __version__
from .errors import IgptError

Sub = argparse._SubParsersAction


class Parser(argparse.ArgumentParser):
    """argparse with igpt's error format: one line on stderr (`igpt: error: ...`), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"igpt: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def settings(args: argparse.Namespace, *skip: str) -> dict[str, Any]:
    """The parsed flags as keyword arguments for a library call, without the parser's own entries."""
    drop = {"func", "command", "debug", "no_progress", *skip}
    return {k: v for k, v in vars(args).items() if k not in drop}


# ---------------------------------------------------------------------------------------------- prepare
def add_prepare(sub: Sub) -> None:
    p = sub.add_parser("prepare", help="images -> palette -> token set (meta.json, tokens, labels, palette)")
    p.add_argument(
        "dataset",
        help="fashion-mnist, mnist, cifar10, cifar100, folder, npz, digits, or the downsampled ImageNet "
        "files: imagenet16, imagenet32, imagenet64 (downsampled-imagenet reads the side from the data)",
    )
    p.add_argument("--out", required=True, help="directory to write the prepared set to")
    p.add_argument("--data-dir", help="where the source lives (a directory, or the .npz file)")
    p.add_argument("--resolution", type=positive_int, help="square side in pixels (default: the source's)")
    p.add_argument("--clusters", type=positive_int, help="palette size K (default 16 grey, 512 colour)")
    p.add_argument("--order", default="raster", help="raster or snake")
    p.add_argument("--palette", help="reuse a palette (.npy, ours or OpenAI's kmeans_centers.npy)")
    p.add_argument("--limit", type=positive_int, help="keep only the first N images of each split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--test-fraction", type=float, default=0.1, help="test share for folder/npz without a split"
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=5000 / 60000,
        help="validation share held out of the training split (default: 5,000 of Fashion-MNIST's 60,000)",
    )
    p.add_argument("--strict", action="store_true", help="fail on an unreadable image instead of skipping it")
    p.add_argument(
        "--workers",
        type=positive_int,
        help="processes decoding a folder's images (default: the cores this process may use); the output "
        "is the same for any number",
    )
    p.add_argument("--force", action="store_true", help="replace an --out prepared with other settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> None:
    from .preparation import prepare, summary_lines

    meta = prepare(progress=not args.no_progress, **settings(args))
    print("\n".join(summary_lines(meta, args.out)))


# ---------------------------------------------------------------------------------------------- pretrain
def add_pretrain(sub: Sub) -> None:
    from .model import PRESETS

    p = sub.add_parser("pretrain", help="pretrain an iGPT model (AR or BERT) on a prepared set")
    p.add_argument("--data", help="prepared directory (from igpt prepare); optional with --resume")
    p.add_argument("--out", required=True, help="run directory to create (or continue with --resume)")
    p.add_argument("--preset", help=f"model shape: {', '.join(PRESETS)} (default tiny)")
    p.add_argument("--objective", help="ar (default) or bert")
    p.add_argument("--n-layer", type=int, help="override the preset's depth")
    p.add_argument("--n-embd", type=int, help="override the preset's width")
    p.add_argument("--n-head", type=int, help="override the preset's heads")
    p.add_argument("--bias", action="store_true", default=None, help="biases in linear layers (HF format)")
    p.add_argument(
        "--prefix-causal",
        action="store_true",
        default=None,
        help="AR, prefix-causal: a random prefix attends both ways; features are read bidirectionally",
    )
    p.add_argument("--steps", type=int, help="optimizer steps (default 2000 without --minutes)")
    p.add_argument("--minutes", type=float, help="wall-clock budget")
    p.add_argument("--batch-size", type=int, help="global batch in images (default 32)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per step and process (default 1)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 2e-3)")
    p.add_argument(
        "--optimizer", help="adamw (default) or muon (Muon for the blocks' matrices, AdamW for the rest)"
    )
    p.add_argument("--schedule", help="cosine (default), linear or wsd (warm-up, stable, decay)")
    p.add_argument("--warmup", type=float, help="warm-up share of the budget (default 0.05)")
    p.add_argument("--cooldown", type=float, help="wsd: decay share at the end of the budget (default 0.2)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--mask-ratio", type=float, help="BERT mask share (default 0.15)")
    p.add_argument("--flip", action="store_true", default=None, help="random horizontal flips")
    p.add_argument("--shift", type=int, help="random translations of up to N pixels each way (default 0)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument(
        "--precision",
        help="fp32 (default), bf16 (CUDA, or CPUs with AMX) or auto (bf16 where the hardware has it)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the training step (CPU or CUDA; eager if compiling fails)",
    )
    p.add_argument("--fsdp", action="store_true", default=None, help="shard per block with FSDP (torchrun)")
    p.add_argument("--eval-interval", type=int, help="validate and checkpoint every N steps (default 250)")
    p.add_argument(
        "--eval-images",
        type=int,
        help="validation images for val_nll, test images for test_nll (default 1000)",
    )
    p.add_argument("--log-interval", type=int)
    p.add_argument("--keep-steps", help="comma-separated steps whose checkpoints are kept")
    p.add_argument("--keep-every", type=int, help="keep every checkpoint at multiples of N steps")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> None:
    from .training import pretrain

    given = {k: v for k, v in settings(args).items() if v is not None}
    pretrain(**given, progress=not args.no_progress)


# ---------------------------------------------------------------------------------------------- probe
def add_probe(sub: Sub) -> None:
    from .probing import HEADS, POOLS

    p = sub.add_parser("probe", help="linear probes of every layer, low-data probes, loss against probe")
    p.add_argument("run", help="run directory")
    p.add_argument(
        "--layers", default="all", help="all, best (from an earlier probe) or i,j,... (default all)"
    )
    p.add_argument("--labels-per-class", type=int, help="low-data mode: N labelled images per class")
    p.add_argument(
        "--seeds", type=int, default=5, help="low-data mode: random subsets to average (default 5)"
    )
    p.add_argument("--mask-ensemble", type=int, default=0, help="BERT runs: vote over M random masks")
    p.add_argument("--train-limit", type=int, help="use only the first N training images")
    p.add_argument("--test-limit", type=int, help="use only the first N test images")
    p.add_argument(
        "--checkpoints",
        choices=["latest", "all"],
        default="latest",
        help="all: probe every kept checkpoint at its best layer, against its val_nll",
    )
    p.add_argument("--checkpoint", help="probe this checkpoint instead of the latest")
    p.add_argument(
        "--pool",
        choices=POOLS,
        default="mean",
        help="mean over positions (the paper's), or means over a coarse grid: grid (2x2, 4x wider), "
        "grid3 (3x3), grid4 (4x4)",
    )
    p.add_argument("--concat", help="also probe these layers' features concatenated, e.g. 2,3,4")
    p.add_argument(
        "--head",
        choices=HEADS,
        default="linear",
        help="linear (the paper's), or attentive: learned queries over token states (beside the linear)",
    )
    p.add_argument(
        "--attentive-layers",
        default="best",
        help="attentive head: best (the linear probe's, on validation) or i,j,... (states averaged)",
    )
    p.add_argument(
        "--attentive-epochs", type=int, default=10, help="attentive head: most epochs (default 10)"
    )
    p.add_argument("--data", help="prepared directory to probe on (default: the run's own)")
    p.add_argument("--batch-size", type=int, default=128, help="images per feature batch")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the feature pass (eager if it fails)"
    )
    p.add_argument(
        "--precision",
        default="fp32",
        help="feature pass: fp32 (default), bf16, or auto (bf16 on AMX CPUs, GPUs)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_probe)


def run_probe(args: argparse.Namespace) -> None:
    from .pipeline import probe_line
    from .probing import probe

    res = probe(progress=not args.no_progress, **settings(args))
    if args.checkpoints == "all":
        for r in res["checkpoints"]:
            print(
                f"{r['checkpoint']}: val_nll {r['val_nll']:.4f} -> best layer {r['best_layer']} "
                f"accuracy {r['best_accuracy']:.4f}"
            )
        print(f"wrote {args.run}/probe_checkpoints.json and probe_checkpoints.png")
    else:
        print(f"{probe_line(res)}; wrote {args.run}/probe.json and probe.png")


# ---------------------------------------------------------------------------------------------- finetune
def add_finetune(sub: Sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a pretrained run with a linear head (L_CLF + L_GEN)")
    p.add_argument("run", help="pretrained run directory")
    p.add_argument("--out", required=True, help="directory for the fine-tuned model and finetune.json")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--minutes", type=float, help="stop after this many minutes (keeping the best epoch)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the pretraining lr / 10)")
    p.add_argument("--gen-weight", type=float, default=1.0, help="weight of L_GEN beside L_CLF (default 1)")
    p.add_argument("--labels-per-class", type=int, help="fine-tune on N labelled images per class")
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="with --labels-per-class: fine-tune on K seeded subsets (the low-data probes' subsets) and "
        "report mean and std (default 1)",
    )
    p.add_argument(
        "--init",
        choices=["pretrained", "scratch"],
        default="pretrained",
        help="pretrained weights (default), or scratch: the same architecture and recipe from random "
        "weights, the control",
    )
    p.add_argument(
        "--pool",
        choices=["mean", "grid", "grid3"],
        default="mean",
        help="the head's input: the mean of the final normed states (the paper's, default) or a 2x2/3x3 grid",
    )
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="random shifts, and flips where mirrored images stay valid (default on)",
    )
    p.add_argument(
        "--head-init",
        choices=["probe", "zero"],
        default="probe",
        help="start the head from a linear probe of the final layer (default) or from zero",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--patience", type=int, default=2, help="epochs without validation gain before stopping")
    p.add_argument("--train-limit", type=int, help="use only the first N training images")
    p.add_argument("--test-limit", type=int, help="use only the first N test images")
    p.add_argument("--data", help="prepared directory (default: the run's own)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_finetune)


def run_finetune(args: argparse.Namespace) -> None:
    from .finetuning import finetune

    res = finetune(progress=not args.no_progress, **settings(args))
    if "std_accuracy" in res:
        print(
            f"{res['init']} init: test accuracy {res['mean_accuracy']:.4f} +- {res['std_accuracy']:.4f} over "
            f"{len(res['accuracies'])} subsets (best epochs {res['best_epochs']}); "
            f"wrote {args.out}/finetune.json"
        )
        return
    print(
        f"{res['init']} init: test accuracy {res['test_accuracy']:.4f} (best epoch {res['best_epoch']}); "
        f"wrote {args.out}/finetune.json"
    )


# ---------------------------------------------------------------------------------------------- sample
def add_sample(sub: Sub) -> None:
    p = sub.add_parser("sample", help="sample images or complete the bottom of test images")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", required=True, help="PNG grid to write (tokens go to the same name with .npy)")
    p.add_argument("--num", type=int, default=4, help="samples per image (default 4)")
    p.add_argument(
        "--keep-rows", type=int, help="rows kept from each image; 0 = unconditional (default: half)"
    )
    p.add_argument("--images", help="test image indices, e.g. 0,5,9 (default: the first --count)")
    p.add_argument("--count", type=int, default=4, help="how many test images when --images is not given")
    p.add_argument("--image-files", nargs="+", help="complete these image files instead of test images")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default 1.0, the paper's)")
    p.add_argument("--top-k", type=int, help="keep the K likeliest tokens (0: off)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=8, help="BERT runs: mask-predict rounds")
    p.add_argument("--checkpoint", help="which checkpoint (default: the latest)")
    p.add_argument("--scale", type=int, help="enlargement of each cell (default: about 96 px per image)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.set_defaults(func=run_sample)


def run_sample(args: argparse.Namespace) -> None:
    from .sampling import sample

    r = sample(**settings(args))
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
    from .convert import convert_from_hf, convert_to_hf

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
    from .pipeline import DEFAULT, FASHION_DIR

    p = sub.add_parser("quickstart", help="the whole pipeline on Fashion-MNIST, ending in report.html")
    p.add_argument(
        "--out", default="runs/quickstart", help="directory for everything (default runs/quickstart)"
    )
    p.add_argument(
        "--minutes",
        type=float,
        help=f"the whole job's budget; pretraining gets what the other stages are predicted to leave "
        f"(default {DEFAULT.minutes:g})",
    )
    p.add_argument(
        "--pretrain-minutes",
        type=float,
        help="pretrain for exactly this long instead of sharing out --minutes",
    )
    p.add_argument("--smoke", action="store_true", help="a tiny model on a subset: the pipeline in ~1 minute")
    p.add_argument("--dataset", choices=["fashion-mnist", "digits"], help="default fashion-mnist")
    p.add_argument("--data-dir", help=f"where the Fashion-MNIST IDX files are (default {FASHION_DIR})")
    p.add_argument("--preset", help=f"model shape (default {DEFAULT.preset})")
    p.add_argument("--resolution", type=int, help=f"image side (default {DEFAULT.resolution})")
    p.add_argument(
        "--finetune-minutes",
        type=float,
        help="also fine-tune the model for M minutes (joint loss, early-stopped on validation; default off)",
    )
    p.add_argument(
        "--attentive",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also train the attentive probe on the best layer (default off)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile pretraining and the feature pass (default on; off with --smoke)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_quickstart)


def run_quickstart(args: argparse.Namespace) -> None:
    from .pipeline import quickstart

    quickstart(progress=not args.no_progress, **settings(args))


# ---------------------------------------------------------------------------------------------- serve
def add_serve(sub: Sub) -> None:
    p = sub.add_parser("serve", help="a local web page to complete images with a run's model")
    p.add_argument("run", help="run directory")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--checkpoint", help="which checkpoint (default: the latest)")
    p.add_argument(
        "--max-upload-kb", type=int, default=2048, help="largest accepted upload (default 2048 KiB)"
    )
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> None:
    from .serve import serve

    serve(**settings(args))


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
        print("igpt: error: out of memory; use a smaller batch size or fewer images", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # the file system's word (permission, full disk, ...), as one line
        if debug:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"igpt: error: {e.strerror or e}{where}", file=sys.stderr)
        sys.exit(1)
