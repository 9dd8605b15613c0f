"""What serve checks of a request before any work: its body read within a size and a time limit, its form
or JSON fields parsed and bounded, and its Host and Origin (`same_origin_only`), each refusal a
`BadRequest` with its status and one line."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np

BODY_TIMEOUT = 10.0
"""Seconds a request body may pause between chunks."""


class BadRequest(Exception):
    """A request the server refuses: an HTTP status and a message for the user."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def int_field(form: Any, name: str, default: int) -> int:
    v = form.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except (TypeError, ValueError):
        raise BadRequest(400, f"{name} must be an integer, got '{str(v)[:40]}'") from None


def float_field(form: Any, name: str, default: float) -> float:
    v = form.get(name)
    if v is None or v == "":
        return default
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise BadRequest(400, f"{name} must be a number, got '{str(v)[:40]}'") from None
    if not np.isfinite(x):
        raise BadRequest(400, f"{name} must be finite")
    return x


CLOSE = {"Connection": "close"}


FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded", "application/json", "")


async def bounded_body(request: Any, limit: int, max_upload: int, timeout: float | None = None) -> bytes:
    """The request body, read as it arrives and refused (413) as soon as it passes `limit` bytes, so a body
    without Content-Length (chunked) cannot fill the memory or the disk before the refusal; a body that stops
    arriving for `timeout` seconds is refused with 408. Both refusals close the connection."""
    timeout = BODY_TIMEOUT if timeout is None else timeout
    chunks, total = [], 0
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), timeout)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise BadRequest(408, f"the request body stopped arriving for {timeout:g} s", CLOSE) from None
        total += len(chunk)
        if total > limit:
            raise BadRequest(413, f"the upload is larger than the {max_upload // 1024} KiB limit", CLOSE)
        chunks.append(chunk)
    return b"".join(chunks)


def json_form(body: bytes) -> dict[str, str]:
    """A JSON request body ({"source": "test", "index": 3, ...}) as the form's fields."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):  # deeply nested arrays exhaust the parser's recursion
        raise BadRequest(400, "the body is not valid JSON") from None
    if not isinstance(obj, dict) or len(obj) > 20:
        raise BadRequest(400, "a JSON body must be an object of at most 20 fields (source, index, ...)")
    if "file" in obj:
        raise BadRequest(400, "upload a file with a multipart form, not JSON")
    bad = [k for k, v in obj.items() if not isinstance(v, str | int | float) or isinstance(v, bool)]
    if bad:
        raise BadRequest(400, f"field {str(bad[0])[:40]} must be a number or a string")
    return {str(k): str(v) for k, v in obj.items()}


def body_request(request: Any, body: bytes) -> Any:
    """A request like `request` whose body is the bytes already read (for Starlette's form parser)."""
    from starlette.requests import Request

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, receive)


async def parse_form(request: Any, body: bytes) -> Any:
    """The multipart (or URL-encoded) form of an already read body, with a message that names what is wrong
    with it: too many fields or files, or not a form at all."""
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    try:
        return await body_request(request, body).form(max_files=1, max_fields=20, max_part_size=64 * 1024)
    except (MultiPartException, HTTPException) as e:  # inside an app, Starlette wraps the first in the second
        text = str(getattr(e, "detail", None) or e)
        if "Too many files" in text:
            raise BadRequest(400, "send at most one file") from None
        if "Too many fields" in text:
            raise BadRequest(400, "the form has more than 20 fields") from None
        if "exceeded maximum size" in text or "Part exceeded" in text:
            raise BadRequest(400, "a form field (or its name) is larger than 64 KiB") from None
        raise BadRequest(400, f"the multipart form is malformed ({text[:80]})") from None
    except Exception:  # noqa: BLE001 - other malformed bodies
        raise BadRequest(400, "expected a multipart form (source, index or file, keep_rows, ...)") from None


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def same_origin_only(app: Any, hosts: tuple[str, ...] | None) -> Any:
    """`app` behind two checks that keep other web pages out of the local API: the Host header must name
    one of `hosts` (the names this server listens on; None accepts any, for a server bound to all
    addresses), which defeats DNS rebinding, and a request that carries an Origin must come from this
    server's own origin (a page elsewhere that calls the API is refused with 403)."""
    from starlette.responses import JSONResponse

    async def checked(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = {k.lower(): v.decode("latin-1") for k, v in scope["headers"]}
            host = headers.get(b"host", "").strip().lower()
            name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
            origin = headers.get(b"origin")
            why = None
            if hosts is not None and name not in hosts:
                why = f"this server does not answer to the host name {host[:60]!r}"
            elif origin is not None and origin.strip().lower() != f"http://{host}":
                why = "cross-origin requests are refused; open the page this server serves"
            if why:
                await JSONResponse({"error": why}, status_code=403)(scope, receive, send)
                return
        await app(scope, receive, send)

    return checked
