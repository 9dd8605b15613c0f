"""The web app behind `igpt serve RUN`: a page to complete an image with a run's model, and its JSON API.

Routes: `GET /` (the page: HTML, CSS and JavaScript inline, nothing from the network), `GET /api/info`,
`GET /api/test/{i}.png` (a test image, enlarged), and `POST /api/complete` (a multipart form; the answer is a
stream of JSON lines, one per completed row, so the page can draw completions as they are sampled). Sampling
runs in a worker thread (Starlette iterates a synchronous stream in its thread pool), so a slow request never
blocks the others. Bad input gets a 4xx with {"error": message}.

Bounded: at most MAX_CONCURRENT completions run at once (more get 503 with Retry-After), a request body must
keep arriving (a pause of BODY_TIMEOUT seconds gets 408), a connection must finish sending its headers
within HEADER_TIMEOUT seconds (or is closed), and a refused upload is answered and its connection closed at
once, without reading the rest of the body.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import io
import ipaddress
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from igpt.data.decode import printable_text
from igpt.data.images import default_scale, mark_hidden, png_bytes
from igpt.data.palette import decode, from_sequence, quantize, to_channels, to_sequence
from igpt.data.prepared import PreparedData
from igpt.errors import IgptError
from igpt.generation.complete import check_sampling_options, complete, generate_steps
from igpt.runs import Run
from igpt.settings import build_config

from .page import PAGE
from .requests import (
    CLOSE,
    FORM_TYPES,
    LOOPBACK_NAMES,
    BadRequest,
    bounded_body,
    float_field,
    int_field,
    json_form,
    parse_form,
    same_origin_only,
)

MAX_SAMPLES = 16
MAX_TEMPERATURE = 5.0
MAX_CONCURRENT = 2
"""Completions sampled at once; one per core of a 2-core machine keeps memory flat and each one quick."""
HEADER_TIMEOUT = 10.0
"""Seconds a connection has to send its request headers."""


MAX_UPLOAD_PIXELS = 16_000_000
"""The largest upload serve decodes, in pixels (checked from the header before decoding): a 4000 x 4000
photo; a few concurrent ones stay within a few hundred MB."""


def png_data_url(img: np.ndarray, scale: int) -> str:
    """(H, W, 1 or 3) uint8 -> an enlarged PNG as a data: URL, for the streamed messages."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(img, scale)).decode()


class Completer:
    """A run's model, palette and test images, ready to complete images."""

    def __init__(self, run: str | Path, checkpoint: str | None = None):
        r = Run.open(run)
        self.palette = r.palette()
        self.R, self.order = r.resolution, r.order
        self.channels = int(self.palette.shape[1])
        self.model = r.load_model(checkpoint)
        self.scale = default_scale(self.R)
        self.data: PreparedData | None = None
        data_dir = r.data_dir
        if data_dir and (Path(data_dir) / "meta.json").is_file():
            self.data = PreparedData(data_dir)
        self.run = str(run)
        self.slots = threading.BoundedSemaphore(MAX_CONCURRENT)

    def take_slot(self) -> None:
        """One of the MAX_CONCURRENT slots, taken before any work of a request (an upload's decoding
        included); 503 when every slot is taken. `guarded` (or `release`) gives it back."""
        if not self.slots.acquire(blocking=False):
            raise BadRequest(
                503,
                f"{MAX_CONCURRENT} completions are already running; retry in a few seconds",
                {"Retry-After": "5"},
            )

    def release(self) -> None:
        self.slots.release()

    def guarded(self, messages: Iterator[dict[str, Any]]) -> Iterator[str]:
        """The JSON lines of one completion, holding the slot taken by `take_slot` until it ends (or its
        client leaves and the stream is closed)."""

        def lines() -> Iterator[str]:
            try:
                for m in messages:
                    yield json.dumps(m) + "\n"
            finally:
                self.slots.release()

        return lines()

    @property
    def n_test(self) -> int:
        return int(self.data.meta["n_test"]) if self.data is not None else 0

    def info(self, max_upload: int) -> dict[str, Any]:
        return {
            "run": self.run,
            "resolution": self.R,
            "channels": self.channels,
            "clusters": len(self.palette),
            "objective": self.model.config.objective,
            "n_test": self.n_test,
            "max_upload_bytes": max_upload,
            "max_samples": MAX_SAMPLES,
            "class_names": (
                [printable_text(str(n)) for n in self.data.meta.get("class_names") or []]
                if self.data
                else None
            ),
        }

    def test_tokens(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (T,), image (R, R, C)) of a test image."""
        if self.data is None:
            raise BadRequest(404, "this run's prepared data is not available; upload an image instead")
        if not 0 <= index < self.n_test:
            raise BadRequest(400, f"test image index must be in [0, {self.n_test - 1}], got {index}")
        tokens = np.asarray(self.data.tokens("test")[index], dtype=np.int64)
        return tokens, self.data.images("test", [index])[0]

    def upload_tokens(self, raw: bytes) -> tuple[np.ndarray, np.ndarray]:
        """An uploaded file -> (tokens, the resized image): centre-cropped, box-resized, quantized with the
        run's palette, exactly as `igpt prepare folder` treats images."""
        from igpt.data.decode import load_image, max_image_pixels

        try:
            limit = min(MAX_UPLOAD_PIXELS, max_image_pixels())  # IGPT_MAX_IMAGE_PIXELS may lower it further
            img = load_image(io.BytesIO(raw), self.R, max_pixels=limit)
        except IgptError as e:  # over the pixel limit: say so, not "not an image"
            raise BadRequest(413, str(e)) from None
        except Exception:  # noqa: BLE001 - Pillow raises many types for files it cannot read
            raise BadRequest(415, "the file is not an image Pillow can read (try PNG or JPEG)") from None
        img = to_channels(img[None], self.channels)[0]
        tokens = to_sequence(quantize(img[None], self.palette), self.order)[0].astype(np.int64)
        return tokens, img

    def stream(
        self,
        tokens: np.ndarray,
        original: np.ndarray,
        keep_rows: int,
        num: int,
        temperature: float,
        seed: int,
    ) -> Iterator[dict[str, Any]]:
        """Messages for the page: first the original and its kept part, then the samples after every completed
        row (AR; rows still to come are hatched), and a last one with `done` and the timing."""
        R, t0 = self.R, time.perf_counter()
        kept = decode(from_sequence(tokens[None], R, self.order), self.palette)[0]
        yield {
            "original": png_data_url(original, self.scale),
            "kept": png_data_url(mark_hidden(kept, keep_rows), self.scale),
            "rows": R,
            "keep_rows": keep_rows,
        }
        prefix = torch.from_numpy(tokens[None]).repeat(num, 1)
        if not self.model.causal:  # BERT: mask-predict fills every hidden position at once
            out = complete(self.model, prefix[:1], keep_rows * R, num, temperature, seed=seed)[0]
            yield self._samples(out.numpy(), R)
        elif keep_rows < R:
            gen = torch.Generator().manual_seed(seed)
            steps = generate_steps(
                self.model, prefix[:, : keep_rows * R], R * R - keep_rows * R, temperature, generator=gen
            )
            for buf, filled in steps:
                if filled % R == 0:
                    yield self._samples(buf.numpy(), filled // R)
        else:
            yield self._samples(prefix.numpy(), R)
        secs = time.perf_counter() - t0
        yield {"done": True, "seconds": round(secs, 3), "tokens": num * (R - keep_rows) * R}

    def _samples(self, seqs: np.ndarray, rows_done: int) -> dict[str, Any]:
        imgs = decode(from_sequence(seqs, self.R, self.order), self.palette)
        if rows_done < self.R:
            imgs = [mark_hidden(im, rows_done) for im in imgs]
        return {"rows_done": rows_done, "samples": [png_data_url(im, self.scale) for im in imgs]}


async def read_form(request: Any, max_upload: int) -> Any:
    """A completion request's fields: its multipart form or JSON object, the body read within the upload
    limit (refused early from a Content-Length over it)."""
    limit = max_upload + 64 * 1024  # the file plus the form's other fields
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise BadRequest(413, f"the upload is larger than the {max_upload // 1024} KiB limit", CLOSE)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in FORM_TYPES:
        raise BadRequest(415, f"send a multipart form or JSON, not {kind[:60]}")
    body = await bounded_body(request, limit, max_upload)
    return json_form(body) if kind == "application/json" else await parse_form(request, body)


def completion_settings(form: Any, R: int) -> tuple[int, int, float, int, str]:
    """(keep_rows, num, temperature, seed, source) of a completion request, each checked against its bound."""
    keep_rows = int_field(form, "keep_rows", R // 2)
    if not 0 <= keep_rows <= R:
        raise BadRequest(400, f"keep_rows must be in [0, {R}], got {keep_rows}")
    num = int_field(form, "num", 4)
    if not 1 <= num <= MAX_SAMPLES:
        raise BadRequest(400, f"num must be in [1, {MAX_SAMPLES}], got {num}")
    temperature = float_field(form, "temperature", 1.0)
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise BadRequest(400, f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {temperature:g}")
    seed = int_field(form, "seed", 0)
    try:
        check_sampling_options(temperature, None, None, seed)
    except IgptError as e:
        raise BadRequest(400, str(e).replace("--", "")) from None
    source = form.get("source", "test")
    if source not in ("test", "upload"):
        raise BadRequest(400, f"source must be test or upload, got '{str(source)[:40]}'")
    return keep_rows, num, temperature, seed, source


async def completion_inputs(completer: Completer, form: Any, source: str, max_upload: int) -> tuple:
    """The tokens and image to complete: a test image, or the uploaded file decoded off the event loop."""
    from starlette.concurrency import run_in_threadpool

    if source == "test":
        return completer.test_tokens(int_field(form, "index", 0))
    f = form.get("file")
    if f is None or isinstance(f, str):
        raise BadRequest(400, "source is upload but no file was sent")
    raw = await f.read(max_upload + 1)
    if len(raw) > max_upload:
        raise BadRequest(413, f"the upload is larger than the {max_upload // 1024} KiB limit")
    if not raw:
        raise BadRequest(400, "the uploaded file is empty")
    return await run_in_threadpool(completer.upload_tokens, raw)


def create_app(completer: Completer, max_upload: int = 2 * 1024 * 1024, hosts: tuple[str, ...] | None = None):
    """The Starlette application serving `completer`; uploads larger than `max_upload` bytes are refused.
    Requests must name one of `hosts` (when given) and, with an Origin, come from the page itself
    (`same_origin_only`)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    def error(e: BadRequest) -> JSONResponse:
        return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(PAGE)

    async def info(request: Request) -> JSONResponse:
        return JSONResponse(completer.info(max_upload))

    async def test_image(request: Request) -> Response:
        try:
            index = int_field(request.path_params, "index", 0)
            _, img = completer.test_tokens(index)
        except BadRequest as e:
            return error(e)
        return Response(await run_in_threadpool(png_bytes, img, completer.scale), media_type="image/png")

    async def complete_route(request: Request) -> Response:
        try:
            form = await read_form(request, max_upload)
            keep_rows, num, temperature, seed, source = completion_settings(form, completer.R)
            completer.take_slot()  # decoding an upload counts against the cap as its completion does
            try:
                tokens, img = await completion_inputs(completer, form, source, max_upload)
                lines = completer.guarded(completer.stream(tokens, img, keep_rows, num, temperature, seed))
            except BaseException:
                completer.release()
                raise
        except BadRequest as e:
            return error(e)
        return StreamingResponse(lines, media_type="application/x-ndjson")

    routes = [
        Route("/", page),
        Route("/api/info", info),
        Route("/api/test/{index}.png", test_image),
        Route("/api/complete", complete_route, methods=["POST"]),
    ]
    return same_origin_only(Starlette(routes=routes), hosts)


def check_port(host: str, port: int) -> None:
    """Fail with one clear line when the address cannot be bound, before loading anything."""
    if not 0 < port < 65536:
        raise IgptError(f"--port must be in [1, 65535], got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise IgptError(f"--host {host} is not an address of this machine") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            why = (
                "is in use; pass --port" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
            )
            raise IgptError(f"{host}:{port} {why}") from None


@dataclass
class ServeConfig:
    """Every setting of `igpt serve`."""

    run: str
    """The run directory whose model completes the images."""
    host: str = "127.0.0.1"
    """Address to bind (127.0.0.1: this machine only)."""
    port: int = 8000
    """Port to listen on."""
    checkpoint: str | None = None
    """Which checkpoint (default: the latest)."""
    max_upload_kb: int = 2048
    """Largest accepted upload in KiB."""

    def __post_init__(self) -> None:
        if self.max_upload_kb < 1:
            raise IgptError("--max-upload-kb must be at least 1")


def serve(run: str | Path | ServeConfig, **settings: Any) -> None:
    """Serve the completion page for `run` at http://host:port/ until interrupted. It binds this machine
    only unless `host` says otherwise. Takes a `ServeConfig`, or the run and its fields by name."""
    cfg = (
        run if isinstance(run, ServeConfig) else build_config(ServeConfig, "serve", run=str(run), **settings)
    )
    run, host, port, checkpoint, max_upload_kb = (
        cfg.run,
        cfg.host,
        cfg.port,
        cfg.checkpoint,
        cfg.max_upload_kb,
    )
    check_port(host, port)
    hosts = (*LOOPBACK_NAMES, host.lower()) if is_loopback(host) else None
    if hosts is None and host not in ("0.0.0.0", "::"):
        hosts = (host.lower(), f"[{host.lower()}]")  # a named address: that name only
    app = create_app(Completer(run, checkpoint), max_upload_kb * 1024, hosts)
    shown = f"[{host}]" if ":" in host else host
    print(f"igpt serve: http://{shown}:{port}/  (Ctrl-C to stop)", flush=True)
    if not is_loopback(host):
        print(f"igpt serve: note: bound to {host}, reachable from other machines", flush=True)
    make_server(app, host, port).run()


def make_server(app: Any, host: str, port: int) -> Any:
    """The uvicorn server for `app`: h11 with the header deadline, idle keep-alive connections closed after
    5 s, and no more than 64 connections at once (more are answered 503)."""
    import uvicorn

    return uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            http=_header_deadline_protocol(),
            timeout_keep_alive=5,
            limit_concurrency=64,
        )
    )


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _header_deadline_protocol() -> type:
    """uvicorn's h11 protocol with a deadline for the request headers: a connection that has not sent a
    whole request head within HEADER_TIMEOUT seconds of opening (or of its last response) is closed, so
    half-sent requests cannot pile up open connections."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._deadline = self.loop.call_later(HEADER_TIMEOUT, self._too_slow)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and self._deadline is not None:  # a whole request head arrived
                self._deadline.cancel()
                self._deadline = None

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            super().connection_lost(exc)

        def _too_slow(self) -> None:
            self._deadline = None
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

    return Protocol
