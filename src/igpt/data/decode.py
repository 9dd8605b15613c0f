"""Reading files a user hands over, safely: one image within a pixel limit checked before decoding
(`load_image`), a pickled batch through an allow-list of plain data (`unpickle`), and the declared shapes of
an .npz checked against memory before it is read (`npz_headers`, `check_declared`). Names from disk are made
printable before they reach a message (`safe_name`)."""

from __future__ import annotations

import os
import pickle
import re
import signal
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from igpt.errors import IgptError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
"""The file name endings a folder source reads as images."""


def _numeric_scalar(dtype: Any, data: Any = None) -> Any:
    """numpy's scalar reconstructor, for booleans, integers and floats only: any other dtype (objects,
    strings, records) is refused as the rest of a pickle outside the allow-list is."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or not isinstance(data, bytes):
        raise pickle.UnpicklingError(f"refusing to load a numpy scalar of dtype {dtype!r}")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays: the CIFAR batches are pickles, and a pickle can run
    arbitrary code, so anything outside this allow-list is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    SCALARS = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}
    """numpy scalars (a label list written as `list(labels_array)` holds them): allowed of plain numeric
    dtypes only (`_numeric_scalar`)."""

    def find_class(self, module: str, name: str):  # noqa: D102 - see class docstring
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if (module, name) in self.SCALARS:
            return _numeric_scalar
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def unpickle(path: Path) -> dict:
    """A pickled batch file (CIFAR's, downsampled ImageNet's) through the allow-list unpickler, its keys as
    text; one line for anything that is not such a batch."""
    if not path.is_file():
        raise IgptError(f"missing file {path}")
    try:
        with open(path, "rb") as f:
            d = _SafeUnpickler(f, encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any failure here means "not a CIFAR batch"
        raise IgptError(f"{path} is not a CIFAR python batch ({e.__class__.__name__}: {e})") from None
    if not isinstance(d, dict):
        raise IgptError(f"{path} is not a CIFAR python batch (not a dictionary)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


# The largest image igpt decodes, in pixels (Pillow's own decompression-bomb limit, made an error): a small
# compressed file can hold a huge image, and decoding it would take gigabytes.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000


def max_image_pixels() -> int:
    """The decoding limit: IGPT_MAX_IMAGE_PIXELS from the environment, else DEFAULT_MAX_IMAGE_PIXELS."""
    text = os.environ.get("IGPT_MAX_IMAGE_PIXELS", "")
    try:
        return int(text) if text else DEFAULT_MAX_IMAGE_PIXELS
    except ValueError:
        raise IgptError(f"IGPT_MAX_IMAGE_PIXELS must be an integer, got {text!r}") from None


def _to_8bit(im):
    """A Pillow image in 8-bit L or RGB. 16- and 32-bit grey images are scaled (65535 -> 255), not clipped."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or (im.mode == "I" and a.max(initial=0) > 255):
            a = a / 257.0
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
    return im.convert("L" if im.mode in ("1", "L", "LA") else "RGB")


def load_image(path: Path | BinaryIO, size: int | None, max_pixels: int | None = None) -> np.ndarray:
    """One image (a path or an open binary file) as uint8 (H, W, C), centre-cropped to a square and
    box-resized to `size` when given. The one bounded decoder: an image of more than `max_image_pixels()`
    pixels is refused before it is decoded, with IgptError. EXIF orientation is applied (a phone photo
    stored sideways comes out as it was taken). A JPEG much larger than `size` is decoded at 1/2, 1/4 or 1/8
    scale (Pillow's draft mode) before the box resize: a fraction of the work of a full decode."""
    import warnings

    from PIL import Image, ImageOps

    limit = max_image_pixels() if max_pixels is None else max_pixels
    Image.MAX_IMAGE_PIXELS = limit  # Pillow warns above this and refuses above twice this: both refuse here
    name = path if isinstance(path, (str, Path)) else "the uploaded image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # reads the header only; the size is checked before decoding
                if size is not None and im.format == "JPEG":
                    w, h = im.size
                    s = min(w, h)
                    # the smallest scale that keeps at least 2x the target side (so the box resize still
                    # averages), of the side the crop will take
                    im.draft(im.mode, (max(1, w * 2 * size // s), max(1, h * 2 * size // s)))
                im.load()
                im = ImageOps.exif_transpose(im)
                im = _to_8bit(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise IgptError(
            f"{safe_name(name)} has {size}, over the limit of {limit:,} (a decompression bomb?); "
            "set IGPT_MAX_IMAGE_PIXELS to allow larger images"
        ) from None
    if size is not None:
        w, h = im.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.resize((size, size), Image.BOX, box=(left, top, left + s, top + s))
    a = np.asarray(im, dtype=np.uint8)
    return a[..., None] if a.ndim == 2 else a


def printable_text(name: str) -> str:
    """A file name as valid Unicode text: bytes that are not UTF-8 (kept by Python as lone surrogates, which
    no JSON or HTTP writer can encode) become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def safe_name(name: object) -> str:
    """A file name fit for one line of a message: control characters (newlines too) escaped."""
    text = str(name)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of every array of an .npz, read from the members' headers alone: a small compressed
    file may declare arrays of gigabytes, which `check_declared` refuses before anything is decompressed."""
    import zipfile

    out = {}
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with z.open(info) as f:
                    major, _ = np.lib.format.read_magic(f)
                    read = (
                        np.lib.format.read_array_header_1_0
                        if major == 1
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read(f)
                out[info.filename[:-4]] = (tuple(shape), np.dtype(dtype))
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise IgptError(f"cannot read {path} as an npz archive ({e.__class__.__name__}: {e})") from None
    return out


def check_declared(
    path: Path, headers: dict[str, tuple[tuple[int, ...], np.dtype]], share: float = 0.5
) -> None:
    """Refuse, in one line and before reading, an .npz whose arrays would take more than `share` of the
    memory available."""
    from igpt.hardware import available_memory

    total = sum(int(np.prod(shape, dtype=np.float64)) * dtype.itemsize for shape, dtype in headers.values())
    budget = share * available_memory()
    if total > budget:
        raise IgptError(
            f"{path} declares {total / 2**30:,.1f} GiB of arrays, more than the {budget / 2**30:,.1f} GiB "
            "this machine can spare; split it into smaller files"
        )


# ---------------------------------------------------------------------------------------------- decoding
def decode_files(job: tuple[list[str], int, bool]) -> tuple[np.ndarray, np.ndarray, bool, list[str]]:
    """A worker's job: decode, crop and box-resize files to (n, R, R, 3) uint8 (grey is repeated over the
    channels). Returns (images, ok mask, whether any was in colour, skip notes). Runs in a worker process."""
    files, size, strict = job
    out = np.zeros((len(files), size, size, 3), np.uint8)
    ok = np.zeros(len(files), bool)
    colour, notes = False, []
    for i, f in enumerate(files):
        path = Path(f)
        if path.suffix.lower() not in IMAGE_EXTENSIONS and not strict:
            notes.append(f"not an image file extension\t{safe_name(path)}")
            continue
        try:
            a = load_image(path, size)
        except IgptError as e:
            if strict:
                raise
            notes.append(f"over the pixel limit\t{safe_name(path)} ({e})")
            continue
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files
            if strict:
                raise IgptError(f"cannot read image {safe_name(path)}: {safe_name(e)}") from None
            notes.append(f"unreadable ({e.__class__.__name__})\t{safe_name(path)}")
            continue
        colour |= a.shape[2] == 3
        out[i] = a if a.shape[2] == 3 else np.repeat(a, 3, axis=2)
        ok[i] = True
    return out, ok, colour, notes


def ignore_interrupts() -> None:
    """A decoding worker's start: SIGINT (the terminal's Ctrl-C reaches every process of the group) is left
    to the parent, so an interrupted prepare prints no worker tracebacks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
