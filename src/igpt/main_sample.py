"""`igpt sample RUN --out FILE.png`: unconditional samples, or completions of test images or of given image
files (keep the top rows, sample the rest), as a PNG grid plus the tokens as .npy."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_run, read_run_json
from .data import PreparedData
from .errors import IgptError
from .palette import decode, from_sequence, quantize, to_channels, to_sequence
from .sampling import check_sampling_options, complete, default_scale, grid_image, mark_hidden, save_png


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=8, help="BERT runs: mask-predict rounds")
    p.add_argument("--checkpoint", help="which checkpoint (default: the latest)")
    p.add_argument("--scale", type=int, help="enlargement of each cell (default: about 96 px per image)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.set_defaults(func=run)


def load_images(files: list[str], resolution: int, channels: int) -> np.ndarray:
    """Image files -> uint8 (N, R, R, C), centre-cropped and box-resized like `igpt prepare folder`."""
    from .sources import load_image

    out = []
    for f in files:
        if not Path(f).is_file():
            raise IgptError(f"image file {f} does not exist")
        try:
            out.append(to_channels(load_image(Path(f), resolution)[None], channels)[0])
        except IgptError:
            raise
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files
            raise IgptError(f"cannot read image {f} ({e.__class__.__name__})") from None
    return np.stack(out)


def run(args: argparse.Namespace) -> None:
    check_sampling_options(args.temperature, args.top_k, args.top_p)
    if args.num < 1 or args.count < 1 or args.rounds < 1:
        raise IgptError("--num, --count and --rounds must be at least 1")
    if args.device not in ("cpu", "cuda"):
        raise IgptError(f"--device must be cpu or cuda, got '{args.device}'")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise IgptError("--device cuda, but no CUDA GPU is available")
    info = read_run_json(args.run)
    if not (Path(args.run) / "palette.npy").is_file():
        raise IgptError(f"{args.run} has no palette.npy, so its tokens cannot be decoded into images")
    palette = np.load(Path(args.run) / "palette.npy")
    meta = info["data"]["meta"]
    R, order = int(meta["resolution"]), meta.get("order", "raster")
    keep_rows = R // 2 if args.keep_rows is None else args.keep_rows
    if not 0 <= keep_rows <= R:
        raise IgptError(f"--keep-rows must be in [0, {R}], got {keep_rows}")
    model = load_run(args.run, args.checkpoint).to(args.device)
    if keep_rows == 0:
        seqs = torch.zeros(1, R * R, dtype=torch.long)
        originals = None
    elif args.image_files:
        imgs = load_images(args.image_files, R, palette.shape[1])
        seqs = torch.from_numpy(to_sequence(quantize(imgs, palette), order).astype(np.int64))
        originals = imgs
    else:
        data_dir = info["data"].get("dir")
        if not data_dir or not (Path(data_dir) / "meta.json").is_file():
            raise IgptError(f"the run's data directory {data_dir} is not available; pass --image-files")
        data = PreparedData(data_dir)
        n_test = data.meta["n_test"]
        try:
            idx = (
                [int(i) for i in args.images.split(",")]
                if args.images
                else list(range(min(args.count, n_test)))
            )
        except ValueError:
            raise IgptError(f"--images must be comma-separated integers, got '{args.images}'") from None
        bad = [i for i in idx if not 0 <= i < n_test]
        if bad:
            raise IgptError(f"image indices {bad} are out of range: the test split has {n_test} images")
        seqs = torch.from_numpy(np.asarray(data.tokens("test")[idx], dtype=np.int64))
        originals = data.images("test", idx)
    num = args.num if keep_rows else args.num * args.count
    t0 = time.perf_counter()
    out = complete(
        model,
        seqs.to(args.device),
        keep_rows * R,
        num,
        args.temperature,
        args.top_k,
        args.top_p,
        args.seed,
        args.rounds,
    ).cpu()
    secs = time.perf_counter() - t0
    new_tokens = out.shape[0] * out.shape[1] * (R * R - keep_rows * R)
    samples = decode(from_sequence(out.numpy(), R, order), palette)  # (B, num, R, R, C)
    if originals is None:
        per_row = min(num, 8)
        flat = list(samples[0])
        rows = [flat[i : i + per_row] for i in range(0, len(flat), per_row)]
    else:
        kept = decode(from_sequence(seqs.numpy(), R, order), palette)
        rows = [[originals[i], mark_hidden(kept[i], keep_rows), *samples[i]] for i in range(len(samples))]
    save_png(grid_image(rows, args.scale or default_scale(R)), args.out)
    npy = Path(args.out).with_suffix(".npy")
    tmp = npy.with_name(f".{npy.name}.tmp-{os.getpid()}.npy")
    np.save(tmp, from_sequence(out.numpy(), R, order).astype(np.int16))
    os.replace(tmp, npy)
    kind = "mask-predict" if not model.causal else "AR with KV cache"
    print(f"wrote {args.out} ({len(rows)} rows) and {npy} (tokens, grid order); {new_tokens:,} tokens sampled "
          f"in {secs:.2f} s ({new_tokens / max(secs, 1e-9):,.0f} tokens/s, {kind})", file=sys.stdout)  # fmt: skip
