"""`bdh explore`: a local web app to watch BDH read and write, served by Starlette and uvicorn.

Read a text and see, per position, the next-token distribution, the loss and how many neurons
fire; the active neurons of a position, a neuron's strongest positions and its edges in the
neuron graph G = E D_x; the strongest synapses of sigma (the paper's Eq. 16) as the text is read,
one synapse's growth, and concept synapses of the shipped contrast sets; a continuation streamed
token by token from the carried state; two checkpoints side by side. Every asset is in static/
(no network needed). starlette and uvicorn are the `explore` extra:
`pip install -c constraints.txt -e '.[explore]'`.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
import threading
import webbrowser
from pathlib import Path
from typing import Sequence

from bdh.errors import UserError

MAX_MODELS = 2


def require_web():
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("bdh explore needs starlette and uvicorn: pip install -c constraints.txt -e '.[explore]'") \
            from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or a one-line error."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror or err}; choose another --port "
                        "(0 picks a free one)") from None
    return sock


def load_explorers(paths: Sequence[str | Path], device) -> list:
    from bdh.explore.explorer import Explorer

    if not 1 <= len(paths) <= MAX_MODELS:
        raise UserError(f"give one or two checkpoints (--ckpt A [--ckpt B]), got {len(paths)}")
    return [Explorer.load(path, device=device) for path in paths]


def serve(paths: Sequence[str | Path], host: str = "127.0.0.1", port: int = 8765, open_browser: bool = True,
          device="cpu", limits=None, log=print) -> None:
    """Load the checkpoints, listen on host:port and serve until Ctrl-C."""
    require_web()
    import uvicorn

    from bdh.explore.server import Limits, create_app

    explorers = load_explorers(paths, device)
    app = create_app(explorers, limits or Limits(), local_only=is_loopback(host))
    sock = bind(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{bound}/"
    if not is_loopback(host):
        print(f"bdh explore: warning: listening on {host}, reachable from other machines; "
              "there is no authentication", file=sys.stderr)
    log(f"bdh explore: serving {', '.join(e.name for e in explorers)} at {url} (Ctrl-C stops)")
    sys.stdout.flush()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    if open_browser:
        def opener():
            while not server.started and not server.should_exit:
                threading.Event().wait(0.1)
            if server.started:
                webbrowser.open(url)

        threading.Thread(target=opener, daemon=True).start()
    server.run(sockets=[sock])
