"""`lorakit ui [--host 127.0.0.1] [--port 7860] [--root DIR]`: serve the web app for the runs under DIR.

Runs, their configs and logs live under DIR/.lorakit-ui; relative paths in a run's settings are relative to DIR
(the server works there, as the runs do). Every request needs the token printed at start (in the address to open).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
from pathlib import Path

from lorakit.errors import LorakitError, guarded

EXTRA = "lorakit ui needs the ui extra: pip install 'lorakit[ui]'"


def main(argv: list[str] | None = None, prog: str = "lorakit ui") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this "
                        "machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--root", default=".", help="folder of the runs and the files the app may show "
                        "(default: the current folder)")
    parser.add_argument("--token", default=None, help="the access token every request must carry (default: a "
                        "random one, printed in the address to open)")
    args = parser.parse_args(argv)
    return guarded(prog, argv or [], lambda: serve(args))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from lorakit.ui.app import LOOPBACK_HOSTS, create_app
    except ImportError as error:
        raise LorakitError(f"{EXTRA} ({error.name} is missing)") from None
    root = Path(args.root).resolve()
    if not root.is_dir():
        raise LorakitError(f"--root {args.root}: no such folder")
    if not 0 < args.port < 65536:
        raise LorakitError(f"--port {args.port}: expected 1 to 65535")
    loopback = is_loopback(args.host)
    # A token even on loopback: other users of the machine reach 127.0.0.1 too.
    token = args.token or secrets.token_urlsafe(24)
    os.chdir(root)  # relative paths of the form mean what they mean to the runs, which start here
    app = create_app(root, token=token, hosts=LOOPBACK_HOSTS if loopback else None)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"lorakit ui: http://{shown}:{args.port}/?token={token}"
          + f"  (runs under {root / '.lorakit-ui'}; Ctrl-C stops the server, not the runs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=2)
    return 0
