"""`igpt serve RUN`: a local web page where a user picks a test image or uploads one, chooses how many rows to
keep, the temperature and the number of samples, and watches the completions appear row by row."""

from __future__ import annotations

import argparse
import errno
import socket

from .errors import IgptError


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    p.set_defaults(func=run)


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


def run(args: argparse.Namespace) -> None:
    if args.max_upload_kb < 1:
        raise IgptError("--max-upload-kb must be at least 1")
    check_port(args.host, args.port)
    try:
        import uvicorn
    except ModuleNotFoundError:
        raise IgptError(
            "igpt serve needs uvicorn and starlette: pip install uvicorn starlette python-multipart"
        ) from None
    from .serve import Completer, create_app

    app = create_app(Completer(args.run, args.checkpoint), args.max_upload_kb * 1024)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"igpt serve: http://{shown}:{args.port}/  (Ctrl-C to stop)", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"igpt serve: note: bound to {args.host}, reachable from other machines", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
