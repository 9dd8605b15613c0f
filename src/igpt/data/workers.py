"""The streamed prepare's worker processes: what they run (decode a chunk of files and store it; quantize
stored chunks into token rows), and the pool they run in. Workers import numpy and Pillow only (never torch,
whose import alone takes seconds), ignore Ctrl-C (the parent is interrupted, says so in one line and ends
them), and hand back small results: chunks go to the store's files, not through the parent's memory, and
at most a few jobs are in flight, so the parent's memory stays flat however many images there are."""

from __future__ import annotations

import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from igpt.files import atomic_file

from .decode import decode_files, ignore_interrupts
from .palette import decode, quantize, to_channels, to_sequence


def save_chunk(
    path: Path, images: np.ndarray, ok: np.ndarray, labels: np.ndarray, colour: bool, notes: list[str]
) -> None:
    """A finished chunk as one .npz, whole (a temporary file renamed into place)."""
    with atomic_file(path, needed=images.nbytes) as tmp:
        with open(tmp, "wb") as f:
            note_array = np.array(notes, dtype=str) if notes else np.zeros(0, dtype="<U1")
            np.savez(f, images=images, ok=ok, labels=labels, colour=np.array(colour), notes=note_array)


def decode_and_store(job: tuple[list[str], int, bool, str, list[int]]) -> tuple[int, bool, list[str]]:
    """A worker's job: decode a chunk's files (`decode_files`) and store them with their labels at the path
    given; returns (images, whether any was in colour, skip notes)."""
    files, size, strict, path, labels = job
    images, ok, colour, notes = decode_files((files, size, strict))
    save_chunk(Path(path), images, ok, np.asarray(labels, np.int64), colour, notes)
    return len(images), colour, notes


def read_stored(parts: list[tuple[str, np.ndarray]]) -> np.ndarray:
    """The images at `parts` ((chunk file, rows in it), in order), concatenated."""
    out = []
    for path, rows in parts:
        with np.load(path, allow_pickle=False) as z:
            out.append(z["images"][rows])
    return np.concatenate(out) if out else np.zeros((0,), np.uint8)


QuantizeJob = tuple[list[tuple[str, np.ndarray]], np.ndarray, bool, str, str, bool, str | None]
"""(stored parts, palette, colour, order, token dtype, error wanted, shared colour table or None)."""


def quantize_stored(job: QuantizeJob) -> tuple[np.ndarray, float]:
    """A worker's job: stored images (`read_stored`) to token rows in `order` and `dtype`, quantized with
    `palette` (`quantize`, the same on any worker); with `error`, also their summed squared error against
    the palette's colours (the quantization RMSE's numerator). An RGB palette's colour table is the file
    `table`, shared by every worker (`colour_table`), so a colour met by one is not matched again by another
    (each worker writes only the tokens that `nearest` gives anyone: the order of writes does not matter)."""
    parts, palette, colour, order, dtype, error, table = job
    imgs = read_stored(parts)
    c = palette.shape[1]
    imgs = stored_channels(imgs, c, colour)
    grid = quantize(imgs, palette, lut=_open_table(table) if c == 3 and table else None)
    err = float(((decode(grid, palette).astype(np.float64) - imgs) ** 2).sum()) if error else 0.0
    return to_sequence(grid, order).astype(dtype), err


def _worker_start() -> None:
    """A worker's first steps: Ctrl-C ignored (`ignore_interrupts`), numpy's BLAS on one thread."""
    ignore_interrupts()
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)  # kept for the worker's life


def colour_table(path: Path) -> str:
    """A new colour table file for one palette (2^24 int32 entries, all -1: no colour matched yet), which
    every worker maps shared (`quantize`'s `lut`). The caller removes it."""
    with open(path, "wb") as f:
        block = np.full(1 << 20, -1, dtype=np.int32).tobytes()
        for _ in range(16):
            f.write(block)
    return str(path)


_TABLES: dict[str, np.ndarray] = {}


def _open_table(path: str) -> np.ndarray:
    """The shared colour table at `path`, mapped once per process (one at a time)."""
    if path not in _TABLES:
        _TABLES.clear()
        _TABLES[path] = np.memmap(path, dtype=np.int32, mode="r+", shape=(1 << 24,))
    return _TABLES[path]


def run_jobs(fn: Callable[[Any], Any], jobs: Iterable[Any], workers: int) -> Iterator[Any]:
    """`fn` of each job, in order: in this process with one worker, else in a pool of spawned workers with
    at most 2 x `workers` jobs in flight (results that arrive early wait, but never more than that). Each
    worker, and this process with one, runs numpy's BLAS on one thread: `workers` is the cores used."""
    if workers <= 1:
        from threadpoolctl import threadpool_limits

        try:
            with threadpool_limits(1):
                yield from map(fn, jobs)
        finally:
            _TABLES.clear()  # this process goes on (to pretraining, in a quickstart): let the table go
        return
    import multiprocessing as mp

    # spawn: workers import only numpy and Pillow, and never inherit torch's threads. An ignored SIGINT is
    # inherited through exec and the initializer keeps it so, from the workers' first instruction
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        pool = mp.get_context("spawn").Pool(workers, initializer=_worker_start)
    finally:
        signal.signal(signal.SIGINT, previous)
    with pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.apply_async(fn, (job,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def stored_channels(images: np.ndarray, channels: int, colour: bool) -> np.ndarray:
    """Stored (N, R, R, 3) images as `channels` channels: a grey set (stored repeated) gives its one channel
    back unchanged; colour becomes luma for a one-channel palette."""
    if channels == 1 and not colour:
        return images[..., :1]
    return to_channels(images, channels)
