"""The feature store: pooled features written into the run (RUN/features/KEY/), so that a probe whose
training features do not fit in memory fits them from disk (`RowChunks`), and the processes of a torchrun
probe each compute a share of the rows (`StoreCache`, which answers the probe as `FeatureCache` does).

KEY digests what features depend on: the weights' bytes, the pass's settings (precision, resolution,
order) and `VERSION`. Opening the store removes the run's stores under other keys (older weights), so the
run's disk holds one model's features. Inside, an entry is one pass: the sorted rows of one split and every
(pooling, layer) array it computed, named by a digest of the split's tokens, the rows and the arrays. It is
written under a temporary name, its space reserved before the pass (a full disk is one line, before any
work), and renamed into place only once every process has written its rows: a pass that died leaves no
entry a rerun would trust, only a temporary directory the next run removes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from igpt.data.prepared import PreparedData
from igpt.errors import IgptError
from igpt.files import clean_stale, disk_errors, fsync_dir, write_json_atomic
from igpt.model.gpt import IGPT

from .chunks import RowChunks, chunk_rows
from .features import feature_dtype, grid_side, merged_wants, pooled_batches

VERSION = 1
"""Raised when what a stored feature means changes (the pooling's arithmetic, the file layout)."""
STORE = "features"
MARK = "store.json"
"""Written first into every store directory: what its key covers. Only directories holding it are ever
removed as another key's store (never a directory igpt did not write)."""
TIMEOUT = timedelta(hours=12)
"""How long a torchrun probe's other processes wait for rank 0 between passes (its fits run meanwhile)."""


def weights_digest(model: IGPT) -> str:
    """sha256 of the model's parameters and buffers: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def tokens_digest(tokens: np.ndarray, rows: int = 65_536) -> str:
    """sha256 of a split's token array (its shape and bytes), read a block of rows at a time."""
    h = hashlib.sha256(f"{tokens.dtype}:{tokens.shape};".encode())
    for s in range(0, len(tokens), rows):
        h.update(np.ascontiguousarray(tokens[s : s + rows]))
    return h.hexdigest()


@dataclass
class Entry:
    """One complete pass in the store: the sorted `rows` of `split` and the (pooling, layer) arrays held,
    each with whether it is bfloat16 (stored as uint16 words)."""

    path: Path
    split: str
    tokens: str
    rows: np.ndarray
    arrays: dict[tuple[str, int], bool]

    def holds(self, split: str, tokens: str, rows: np.ndarray, wants: dict[str, list[int]]) -> bool:
        if (split, tokens) != (self.split, self.tokens):
            return False
        if any((p, i) not in self.arrays for p, ls in wants.items() for i in ls):
            return False
        return bool(np.isin(rows, self.rows, assume_unique=True).all())

    def read(self, pool: str, layer: int, rows: np.ndarray) -> RowChunks:
        """The features of `rows` (sorted, all held) at (`pool`, `layer`), read from disk as asked, in
        chunks of `chunk_rows` rows."""
        arr = NpyRows(self.path / array_name(pool, layer))
        same = len(rows) == len(self.rows)
        index = None if same else np.searchsorted(self.rows, rows)
        return RowChunks(arr, chunk_rows(arr.shape[1]), index=index, bf16=self.arrays[(pool, layer)])


class NpyRows:
    """A 2-D .npy file read a block of rows at a time with positioned reads, not a memory map: the pages
    read stay in the kernel's page cache (given back under pressure) instead of counting in this process's
    resident memory, which a fit from disk must keep small. Indexes as `RowChunks` asks: a slice, or
    positions (read in order, run by run, and returned in the order asked)."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read(f)
            self.offset = f.tell()
        if len(shape) != 2:
            raise IgptError(f"{path} is not a 2-D feature array")
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), 2
        self.row_bytes = self.shape[1] * self.dtype.itemsize

    def __getitem__(self, rows: slice | np.ndarray) -> np.ndarray:
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.shape[0])
            if step != 1:
                raise ValueError("NpyRows reads contiguous slices")
            runs = [(start, max(start, stop))]
        else:
            pos = np.asarray(rows, dtype=np.int64)
            if len(pos) and (np.diff(pos) < 0).any():  # read in file order, hand back in the order asked
                order = np.argsort(pos, kind="stable")
                back = np.empty_like(order)
                back[order] = np.arange(len(order))
                return self[pos[order]][back]
            cut = np.flatnonzero(np.diff(pos) != 1) + 1
            runs = [(int(r[0]), int(r[-1]) + 1) for r in np.split(pos, cut) if len(r)]
        n = sum(b - a for a, b in runs)
        out = np.empty((n, self.shape[1]), dtype=self.dtype)
        buf = out.reshape(-1).view(np.uint8)
        at = 0
        with open(self.path, "rb") as f:
            for a, b in runs:
                size = (b - a) * self.row_bytes
                got = os.preadv(
                    f.fileno(), [memoryview(buf[at : at + size])], self.offset + a * self.row_bytes
                )
                if got != size:
                    raise IgptError(f"{self.path} is shorter than its header says; probe again to rebuild it")
                at += size
        return out


def array_name(pool: str, layer: int) -> str:
    return f"{pool}-{layer}.npy"


class FeatureStore:
    """The run's feature store for one model's weights and pass settings (see the module's docstring). Only
    `main` (rank 0) creates, removes and commits; every process writes its rows of a pass."""

    def __init__(self, run_dir: Path, model: IGPT, settings: dict[str, Any], main: bool = True):
        about = {"version": VERSION, "weights": weights_digest(model), **settings}
        key = hashlib.sha256(json.dumps(about, sort_keys=True).encode()).hexdigest()[:24]
        self.top = Path(run_dir) / STORE
        self.root = self.top / key
        self.main = main
        self._tokens: dict[str, str] = {}
        if main:
            with disk_errors(self.root / MARK):
                self.root.mkdir(parents=True, exist_ok=True)
                if not (self.root / MARK).is_file():
                    write_json_atomic(self.root / MARK, about)
            for other in self.top.iterdir():  # another key's store: older weights, never read again
                if other != self.root and other.is_dir() and (other / MARK).is_file():
                    shutil.rmtree(other, ignore_errors=True)
            clean_stale(self.root, ".tmp-")

    def tokens(self, data: PreparedData, split: str) -> str:
        if split not in self._tokens:
            self._tokens[split] = tokens_digest(data.tokens(split))
        return self._tokens[split]

    def find(self, split: str, tokens: str, rows: np.ndarray, wants: dict[str, list[int]]) -> Entry | None:
        """A complete entry holding every (pooling, layer) of `wants` for all of `rows`, or None."""
        for path in sorted(self.root.glob(f"{split}-*")):
            entry = self._entry(path)
            if entry is not None and entry.holds(split, tokens, rows, wants):
                return entry
        return None

    def _entry(self, path: Path) -> Entry | None:
        try:
            meta = json.loads((path / "entry.json").read_text())
            rows = np.load(path / "rows.npy", mmap_mode="r")
            arrays = {(p, int(i)): bool(bf16) for p, i, bf16 in meta["arrays"]}
            if any(not (path / array_name(*k)).is_file() for k in arrays) or meta.get("version") != VERSION:
                return None
            return Entry(path, meta["split"], meta["tokens"], rows, arrays)
        except (OSError, ValueError, KeyError, TypeError):
            return None  # damaged: never trusted, and replaced by a new pass

    def begin(
        self, split: str, tokens: str, rows: np.ndarray, widths: dict[tuple[str, int], int], bf16: bool
    ) -> Path:
        """Rank 0: a temporary entry directory with the rows and every array's file, its space reserved
        (a full disk raises one line here, before the pass)."""
        h = hashlib.sha256(f"{split}:{tokens}:{sorted(widths)}".encode())
        h.update(np.ascontiguousarray(rows, dtype=np.int64))
        name = f"{split}-{h.hexdigest()[:20]}"
        tmp = self.root / f".tmp-{os.getpid()}-{name}"
        need = sum(len(rows) * w * (2 if wide_or(bf16, w) else 4) for w in widths.values())
        try:
            with disk_errors(tmp / "x", need):
                tmp.mkdir()
                np.save(tmp / "rows.npy", np.ascontiguousarray(rows, dtype=np.int64))
                for (p, i), w in widths.items():
                    dtype = np.dtype(np.uint16 if wide_or(bf16, w) else np.float32)
                    with open(tmp / array_name(p, i), "wb") as f:
                        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False}
                        np.lib.format.write_array_header_1_0(f, {**header, "shape": (len(rows), w)})
                        os.posix_fallocate(f.fileno(), 0, f.tell() + len(rows) * w * dtype.itemsize)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp

    def commit(
        self, tmp: Path, split: str, tokens: str, widths: dict[tuple[str, int], int], bf16: bool
    ) -> Entry:
        """Rank 0, once every process wrote its rows: the entry's record, then the rename that makes it
        visible."""
        arrays = [[p, i, wide_or(bf16, w)] for (p, i), w in widths.items()]
        with disk_errors(tmp / "entry.json"):
            for f in tmp.iterdir():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
            meta = {"version": VERSION, "split": split, "tokens": tokens, "arrays": arrays}
            write_json_atomic(tmp / "entry.json", meta)
        final = self.root / tmp.name.split("-", 2)[2]
        if final.exists():  # an identical pass committed meanwhile: keep one
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(self.root)
        entry = self._entry(final)
        assert entry is not None
        return entry


def wide_or(bf16: bool, width: int) -> bool:
    """Whether features of `width` are stored in bfloat16: a bf16 probe's, or wider than the in-memory
    cache keeps in float32 (`feature_dtype`)."""
    return bf16 or feature_dtype(width) == torch.bfloat16


class EntryWriter:
    """Writes blocks of pooled features into their rows of a temporary entry's files, with positioned
    writes (no memory map: written pages do not count in the process's memory, and a full disk is an
    error, not a SIGBUS)."""

    def __init__(self, tmp: Path, bf16: bool):
        self.tmp, self.bf16 = tmp, bf16
        self.files: dict[tuple[str, int], tuple[Any, int]] = {}

    def write(self, first: int, block: dict[tuple[str, int], torch.Tensor]) -> None:
        """Rows `first`, `first + 1`, ... of each (pooling, layer) array."""
        for key, f in block.items():
            if key not in self.files:
                fh = open(self.tmp / array_name(*key), "rb+")  # noqa: SIM115 - closed in close()
                np.lib.format.read_magic(fh)
                np.lib.format.read_array_header_1_0(fh)
                self.files[key] = (fh, fh.tell())
            fh, header = self.files[key]
            if wide_or(self.bf16, f.shape[1]):
                raw = f.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
            else:
                raw = f.float().contiguous().numpy()
            with disk_errors(self.tmp / array_name(*key)):
                os.pwrite(fh.fileno(), raw.tobytes(), header + first * raw.shape[1] * raw.itemsize)

    def close(self) -> None:
        for fh, _ in self.files.values():
            fh.close()


class StoreCache:
    """The probe's features through the store, answering as `FeatureCache` does (`__call__`, `sibling`,
    `drop`): a request the store holds is read from it; otherwise one pass computes it, every process of a
    torchrun probe its share of the rows. Rank 0 runs the probe and asks; the other ranks `serve` its asks.
    With `on_disk`, requests of training rows are answered as `RowChunks` (the fits read them from disk);
    everything else is read into memory."""

    def __init__(
        self,
        model: IGPT,
        data: PreparedData,
        layers: list[int],
        store: FeatureStore,
        world: int = 1,
        rank: int = 0,
        on_disk: bool = False,
        quiet: bool = False,
        **kw: Any,
    ):
        self.model, self.data, self.layers, self.store = model, data, layers, store
        self.world, self.rank, self.on_disk, self.quiet = world, rank, on_disk, quiet
        self.pool: str = kw.pop("pool", "mean")
        self.bf16 = kw.get("precision") == "bf16"
        self.kw = kw

    def sibling(self, pool: str) -> StoreCache:
        view = StoreCache.__new__(StoreCache)
        view.__dict__.update(self.__dict__)
        view.pool = pool
        return view

    def drop(self, split: str, pool: str, keep: list[int] | None = None) -> None:
        """Nothing to let go: the store is on disk, and what was read into memory is the caller's."""

    def __call__(
        self,
        split: str,
        rows: np.ndarray,
        label: str,
        mean: bool = False,
        also: dict[str, list[int]] | None = None,
        layers: list[int] | None = None,
    ) -> dict[int, torch.Tensor | RowChunks]:
        """As `FeatureCache.__call__`: features of the sorted `rows` at the default pooling (or the mean),
        one pass computing the missing ones with `also` and the mean of every layer."""
        pool = "mean" if mean else self.pool
        layers = list(self.layers if layers is None else layers)
        wants = merged_wants({pool: layers}, also)
        rows = np.asarray(rows, dtype=np.int64)
        tokens = self.store.tokens(self.data, split)
        entry = self.store.find(split, tokens, rows, wants)
        if entry is None:
            wants = merged_wants(wants, {"mean": self.layers})
            entry = self._pass(split, tokens, rows, wants, label)
        disk = self.on_disk and split == "train"
        out: dict[int, torch.Tensor | RowChunks] = {}
        for i in layers:
            chunks = entry.read(pool, i, rows)
            out[i] = chunks if disk else chunks.held()
        return out

    def _pass(
        self, split: str, tokens: str, rows: np.ndarray, wants: dict[str, list[int]], label: str
    ) -> Entry:
        """Rank 0: one pass over `rows`, shared with the other ranks, committed as an entry."""
        d = self.model.config.n_embd
        widths = {(p, i): grid_side(p) ** 2 * d for p, ls in wants.items() for i in ls}
        tmp = self.store.begin(split, tokens, rows, widths, self.bf16)
        try:
            if self.world > 1:
                dist.broadcast_object_list([("pass", split, rows, wants, str(tmp), label)], src=0)
            try:
                self._write_share(split, rows, wants, tmp, label)
            finally:  # the ranks meet here even when this one failed, then hear its error (`finish`)
                if self.world > 1:
                    dist.barrier()
            return self.store.commit(tmp, split, tokens, widths, self.bf16)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _write_share(
        self, split: str, rows: np.ndarray, wants: dict[str, list[int]], tmp: Path, label: str
    ) -> None:
        """This process's contiguous share of `rows`, computed and written into the entry's files."""
        a, b = share(len(rows), self.world, self.rank)
        tokens = self.data.tokens(split)
        progress = None if self.quiet or not label or self.rank else label
        writer = EntryWriter(tmp, self.bf16)
        try:
            for s, _, pooled in pooled_batches(
                self.model, tokens[rows[a:b]], wants, progress=progress, **self.kw
            ):
                writer.write(
                    a + s, {(p, i): f for p, by_layer in pooled.items() for i, f in by_layer.items()}
                )
        finally:
            writer.close()

    def serve(self) -> None:
        """Ranks other than 0: do your share of each pass rank 0 asks for, until it says it is done (or
        failed: its error is raised here too, so every rank exits with it)."""
        while True:
            msg: list[Any] = [None]
            dist.broadcast_object_list(msg, src=0)
            kind, *rest = msg[0]
            if kind == "stop":
                if rest[0]:
                    raise IgptError(rest[0])
                return
            split, rows, wants, tmp, label = rest
            self._write_share(split, rows, wants, Path(tmp), label)
            dist.barrier()

    def finish(self, error: str | None = None) -> None:
        """Rank 0: tell the other ranks the probe is over (with its error, if it failed)."""
        if self.world > 1:
            dist.broadcast_object_list([("stop", error)], src=0)


def share(n: int, world: int, rank: int) -> tuple[int, int]:
    """The contiguous rows [a, b) of `n` that process `rank` of `world` computes."""
    return n * rank // world, n * (rank + 1) // world


def note_on_disk(need: int, where: Path) -> None:
    """The line a probe that fits from disk prints."""
    print(
        f"igpt: note: the training features do not fit in memory; the fits read them from the feature "
        f"store in {where} (up to {need / 2**30:.1f} GiB on disk)",
        file=sys.stderr,
    )
