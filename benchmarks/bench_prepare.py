"""Benchmark of `igpt prepare` speed (prints figures; not a test).

1. All of Fashion-MNIST (70,000 28x28 grey images) at K=16, when the Debian files are present.
2. 50,000 32x32 RGB crops cut from scikit-learn's bundled sample photos, at K=512, palette fit included.
3. With --jpegs N: a generated folder of N JPEGs of ImageNet-like sizes (about 400x350, varied; crops of the
   sample photos in 100 class folders), prepared at --size (32) with --clusters (512) colours by the streamed
   folder reader: each phase and the whole prepare with 1 and 2 workers and their ratio, peak RSS of the
   preparing process at N/4 and N images, an estimate for ImageNet's 1.28M images from the measured rates,
   the time to resume after a SIGKILL at about half way, and whether the outputs are byte-identical across
   worker counts and after the resume. Each prepare runs in its own process, so RSS is its own.

Run:  .venv/bin/python benchmarks/bench_prepare.py [--jpegs 50000] [--size 64 --clusters 64] [--skip-small]
      [--no-kill] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from igpt.data.preparation import PrepareConfig, prepare_config


def photo_crops(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """n random square crops (side 32 to 160 pixels, box-resized to `size`) of sklearn's sample photos."""
    from sklearn.datasets import load_sample_images

    from igpt.data.palette import resize_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    sides = rng.choice([32, 64, 96, 128, 160], n)
    for s in np.unique(sides):
        idx = np.flatnonzero(sides == s)
        crops = []
        for _ in idx:
            ph = photos[rng.integers(len(photos))]
            y, x = rng.integers(0, ph.shape[0] - s), rng.integers(0, ph.shape[1] - s)
            crops.append(ph[y : y + s, x : x + s])
        out[idx] = resize_images(np.stack(crops), size)
    return out


def timed(cfg: PrepareConfig, out: str) -> tuple[float, dict]:
    t = time.perf_counter()
    meta = prepare_config(cfg, out)
    return time.perf_counter() - t, meta


def _write_jpegs(job: tuple[str, int, int]) -> None:
    """Write JPEGs number start..start+count-1 into 100 class folders under root (a worker's share)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    root, start, count = job
    photos = load_sample_images().images
    rng = np.random.default_rng(start)
    for i in range(start, start + count):
        ph = photos[i % len(photos)]
        w, h = int(rng.integers(330, 470)), int(rng.integers(290, 410))  # about 400x350, varied
        y, x = rng.integers(0, ph.shape[0] - h), rng.integers(0, ph.shape[1] - w)
        crop = ph[y : y + h, x : x + w]
        d = Path(root) / f"class_{i % 100:03d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(crop).save(d / f"{i:07d}.jpg", quality=90)


def make_jpeg_folder(root: Path, n: int) -> Path:
    """n generated JPEGs (written in parallel; skipped when the folder already holds them)."""
    if root.is_dir() and sum(1 for _ in root.rglob("*.jpg")) == n:
        return root
    import multiprocessing as mp

    step = 500
    with mp.get_context("spawn").Pool(os.cpu_count() or 1) as pool:
        pool.map(_write_jpegs, [(str(root), s, min(step, n - s)) for s in range(0, n, step)])
    return root


PREPARE = (
    "import json, resource, sys; from igpt.data.preparation import prepare; "
    "m = prepare('folder', out=sys.argv[1], data_dir=sys.argv[2], resolution=int(sys.argv[4]), "
    "clusters=int(sys.argv[5]), workers=int(sys.argv[3]), progress=False); "
    "print(json.dumps({'seconds': m['seconds'], 'n': m['n_train'] + m['n_val'] + m['n_test'], "
    "'skipped': m['skipped_files'], 'rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
    "'worker_rss_mib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))"
)


SHAPE = ["32", "512"]
"""--size and --clusters of the JPEG benchmark's prepares (set from the command line)."""


def run_prepare(out: Path, src: Path, workers: int) -> dict:
    t = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-c", PREPARE, str(out), str(src), str(workers), *SHAPE],
        capture_output=True,
        text=True,
        check=True,
    )
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["wall"] = time.perf_counter() - t
    return res


def identical(a: Path, b: Path) -> bool:
    names = [p.name for p in sorted(a.glob("*.npy"))]
    return bool(names) and all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


IMAGENET = 1_281_167
"""ImageNet's training images: the estimate's size."""


def imagenet_estimate(r: dict) -> str:
    """Minutes a prepare of ImageNet's training images would take at the rates of the run `r` (an estimate:
    decoding and quantizing scale with the images; the palette is fitted on a fixed-size sample)."""
    s, n = r["seconds"], r["n"]
    per_image = (s["decode"] + s["quantize"]) / n
    total = IMAGENET * per_image + s["palette"] + s["list"] * IMAGENET / n
    return f"{total / 60:,.0f} min ({IMAGENET * per_image / 60:,.0f} decoding and quantizing)"


def jpeg_benchmark(n: int, keep: str | None, kill: bool = True) -> None:
    tmp = Path(keep or tempfile.mkdtemp(prefix="bench_jpegs_"))
    t = time.perf_counter()
    src = make_jpeg_folder(tmp / f"jpegs{n}", n)
    print(f"{n:,} JPEGs of about 400x350 in {src} ({time.perf_counter() - t:.0f} s to make or find)")
    quarter = make_jpeg_folder(tmp / f"jpegs{n // 4}", n // 4)
    res = {}
    for workers in (1, 2):
        out = tmp / f"out_w{workers}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        r = run_prepare(out, src, workers)
        rate = r["n"] / r["seconds"]["decode"]
        res[workers] = r
        print(
            f"workers {workers}: {r['wall']:.1f} s in all, decode {r['seconds']['decode']:.1f} s = "
            f"{rate:,.0f} images/s ({rate / workers:,.0f} per worker); phases {r['seconds']}; peak RSS "
            f"{r['rss_mib']:.0f} MiB (largest worker {r['worker_rss_mib']:.0f} MiB)"
        )
    same = identical(tmp / "out_w1", tmp / "out_w2")
    ratios = {
        k: res[1]["seconds"][k] / max(res[2]["seconds"][k], 1e-9) for k in ("decode", "palette", "quantize")
    }
    whole = res[1]["seconds"]["total"] / res[2]["seconds"]["total"]
    print(
        f"2 workers against 1: the whole prepare {whole:.2f}x (decode {ratios['decode']:.2f}x, palette "
        f"{ratios['palette']:.2f}x, quantize {ratios['quantize']:.2f}x); identical outputs: {same}"
    )
    for w in (1, 2):
        print(
            f"estimate for ImageNet's {IMAGENET:,} training images at {SHAPE[0]}x{SHAPE[0]}, {w} worker(s): "
            f"{imagenet_estimate(res[w])}"
        )
    out_q = tmp / "out_quarter"
    subprocess.run(["rm", "-rf", str(out_q)], check=True)
    rq = run_prepare(out_q, quarter, 2)
    print(
        f"peak RSS, 2 workers: {rq['rss_mib']:.0f} MiB at {rq['n']:,} images, {res[2]['rss_mib']:.0f} MiB at "
        f"{res[2]['n']:,} ({res[2]['rss_mib'] / rq['rss_mib'] - 1:+.1%})"
    )
    if not kill:
        return
    # SIGKILL at about half way, then the same command again
    out_k = tmp / "out_killed"
    subprocess.run(["rm", "-rf", str(out_k), str(tmp / ".out_killed.partial")], check=True)
    chunks = -(-int(n * 0.9) // 1024) + -(-int(n * 0.1) // 1024)
    p = subprocess.Popen(
        [sys.executable, "-c", PREPARE, str(out_k), str(src), "2", *SHAPE],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    partial = tmp / ".out_killed.partial"
    while p.poll() is None and len(list(partial.glob("*.npz"))) < chunks // 2:
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    done = len(list(partial.glob("*.npz")))
    rk = run_prepare(out_k, src, 2)
    print(
        f"killed with {done} of about {chunks} chunks done; the rerun took {rk['wall']:.1f} s (decode "
        f"{rk['seconds']['decode']:.1f} s, against {res[2]['seconds']['decode']:.1f} s for all); "
        f"identical to the straight run: {identical(out_k, tmp / 'out_w2')}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jpegs", type=int, default=0, help="also benchmark a generated folder of N JPEGs")
    ap.add_argument("--skip-small", action="store_true", help="skip benchmarks 1 and 2")
    ap.add_argument("--keep", help="directory for the generated JPEGs and outputs (reused when present)")
    ap.add_argument("--size", type=int, default=32, help="the JPEG benchmark's resolution")
    ap.add_argument("--clusters", type=int, default=512, help="the JPEG benchmark's palette size")
    ap.add_argument("--no-kill", action="store_true", help="skip the JPEG benchmark's kill-and-resume")
    a = ap.parse_args()
    SHAPE[:] = [str(a.size), str(a.clusters)]
    if a.jpegs:
        jpeg_benchmark(a.jpegs, a.keep, kill=not a.no_kill)
    if a.skip_small:
        return
    tmp = tempfile.mkdtemp(prefix="bench_prepare_")
    if os.path.isdir("/usr/share/datasets/fashion-mnist"):
        s, meta = timed(PrepareConfig("fashion-mnist", resolution=28, clusters=16), f"{tmp}/fm")
        print(
            f"fashion-mnist 70,000 x 28x28 grey, K=16: {s:.2f} s (target 10 s), "
            f"quantization RMSE {meta['quantization_rmse']:.3f}, phases {meta['seconds']}"
        )
    else:
        print("fashion-mnist: Debian files absent, skipped")
    x = photo_crops(55_000)
    np.savez(f"{tmp}/crops.npz", x_train=x[:50_000], x_test=x[50_000:])
    s, meta = timed(PrepareConfig("npz", data_dir=f"{tmp}/crops.npz", clusters=512), f"{tmp}/rgb")
    print(
        f"photo crops 50,000 train + 5,000 test x 32x32 RGB, K=512 (fit included): {s:.2f} s (target 60 s), "
        f"quantization RMSE {meta['quantization_rmse']:.3f}, phases {meta['seconds']}"
    )


if __name__ == "__main__":
    main()
