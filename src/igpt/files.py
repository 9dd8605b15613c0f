"""Atomic file writing: every file and directory igpt produces is written under a temporary name beside its
destination and renamed into place, so a reader (or a resumed run) never sees half of one, and a failure
leaves the previous version, or nothing, behind."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .errors import IgptError


def is_disk_full(err: BaseException) -> bool:
    """True for the errors a full disk (or an exhausted quota) raises: OSError ENOSPC/EDQUOT, and the
    safetensors writer's own error, which carries only the message."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return "No space left on device" in str(err) or "Disk quota exceeded" in str(err)


def disk_full_error(path: str | Path, needed: int | None = None) -> IgptError:
    """The one message for a full disk: where, and how much the write needed when that is known."""
    size = f" ({needed / 2**20:,.1f} MB needed)" if needed else ""
    return IgptError(f"no space left on the device of {Path(path).parent}{size}; free some space and retry")


@contextmanager
def disk_errors(path: str | Path, needed: int | None = None) -> Iterator[None]:
    """Turn a full disk inside the block into `disk_full_error`; other errors pass unchanged."""
    try:
        yield
    except Exception as e:
        if is_disk_full(e):
            raise disk_full_error(path, needed) from None
        raise


def umask() -> int:
    """This process's file-creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | Path, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, so writers that look at it still work); on success
    it replaces `path` with the mode a plain `open` would give it (0666 less the umask, not mkstemp's 0600),
    on any failure it is deleted, and a full disk becomes one clear IgptError. Temporary files of processes
    that died here (a SIGKILL) are removed first."""
    path = Path(path)
    with disk_errors(path, needed):
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(path.parent, f".{path.stem}.tmp-", files=True)
        fd, name = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.stem}.tmp-{os.getpid()}-", suffix=path.suffix
        )
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            if tmp.exists():
                tmp.chmod(0o666 & ~umask())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def save_tensors(tensors: dict[str, Any], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, leaving the file with the mode a plain `open` gives (0666 less the umask)
    instead of safetensors' 0600, like every other file of a run, so a shared run reads for its group."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)
    os.chmod(path, 0o666 & ~umask())


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries to disk (after a rename into it); best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


@contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary sibling of `out` to fill; on success it replaces `out` (an existing one is
    moved aside first, then removed), on any failure it is deleted. Readers never see a half-written
    directory."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out.parent, f".{out.name}.tmp-")
    clean_stale(out.parent, f".{out.name}.old-")
    with disk_errors(out / "x"):
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-"))
        try:
            tmp.chmod(0o777 & ~umask())
            yield tmp
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.time_ns()}")
                out.rename(old)
                tmp.rename(out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextmanager
def exclusive(target: str | Path, doing: str) -> Iterator[None]:
    """Hold an exclusive lock on writing `target` (a flock on the hidden sibling `.NAME.lock`) for the body:
    a second igpt process writing the same output is refused at once, in one line, instead of both racing
    and one result being lost. The kernel drops the lock when a process dies, so a kill leaves no stale
    lock; the file is removed on release (a waiter that locked the removed file sees it and is refused)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.parent / f".{target.name}.lock"
    fd = lock_or_refuse(lock, f"another igpt process is {doing} {target}; wait for it to finish")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def lock_or_refuse(lock: Path, refusal: str) -> int:
    """An exclusive, non-blocking flock on the file `lock` (created if need be), returned as its open
    descriptor (closing it releases the lock); IgptError(`refusal`) when another process holds it, or held
    it and removed the file meanwhile (the lock taken would then guard nothing)."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != os.stat(lock).st_ino:
            raise BlockingIOError
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        raise IgptError(refusal) from None
    return fd


def clean_stale(parent: Path, prefix: str, files: bool = False) -> None:
    """Remove `prefix{pid}-*` temporary directories (or, with `files`, files) in `parent` whose process is
    gone (a killed prepare, fine-tune or probe), so they do not pile up; those of live processes stay."""
    for p in parent.glob(f"{prefix}*"):
        pid = p.name[len(prefix) :].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if files:
            if p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid > 2**22:  # past Linux's largest pid: an older name with a timestamp in its place
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class NpyWriter:
    """Writes an .npy file of a known shape row block by row block with plain file writes: unlike a memory
    map, the written pages are not counted in this process's resident memory, which stays flat however many
    rows the file gets."""

    def __init__(self, path: Path, dtype: Any, shape: tuple[int, ...]):
        self.path, self.dtype, self.shape, self.rows = path, np.dtype(dtype), shape, 0

    def __enter__(self) -> NpyWriter:
        self.f = open(self.path, "wb")  # noqa: SIM115 - closed in __exit__
        descr = np.lib.format.dtype_to_descr(self.dtype)
        header = {"descr": descr, "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_1_0(self.f, header)
        return self

    def write(self, block: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(block, dtype=self.dtype).tobytes())
        self.rows += len(block)

    def __exit__(self, *exc: object) -> None:
        self.f.close()
        if exc[0] is None and self.rows != self.shape[0]:
            raise RuntimeError(f"{self.path}: wrote {self.rows} rows of {self.shape[0]}")
