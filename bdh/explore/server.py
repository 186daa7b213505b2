"""The web app of `bdh explore`: a Starlette app serving the page (static/) and a JSON API.

Every API call is a POST of one JSON object naming the model (its index on the command line) and
the text; the answer is JSON, or for /api/generate newline-delimited JSON, one line per token.
Bounds: the text (characters), the tokens to generate and the requests in flight at once are
limited (`Limits`); a request beyond a bound, or a malformed one, gets a 4xx answer with
{"error": "..."} and the server goes on serving. The model work runs in worker threads, one
request per model at a time (Explorer.lock), so a request's answer does not depend on the others.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from bdh.errors import UserError
from bdh.explore.explorer import Explorer

STATIC = Path(__file__).parent / "static"
SITES = ("x", "y")
MISSING = object()


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how many may run at once."""

    max_chars: int = 4000  # characters of text per request
    max_new_tokens: int = 500  # tokens per /api/generate
    max_concurrent: int = 4  # API requests in flight at once (a generation counts until its last token)

    def __post_init__(self):
        for name in ("max_chars", "max_new_tokens", "max_concurrent"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")

    @property
    def max_body(self) -> int:
        """Bytes of a request body: the text at 4 UTF-8 bytes a character (escaped: 12), plus the fields."""
        return 12 * self.max_chars + 4096


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Slots:
    """At most `size` requests in flight; one more is refused (429) rather than queued."""

    def __init__(self, size: int):
        self.size, self.used = size, 0
        self._lock = threading.Lock()

    def take(self) -> None:
        with self._lock:
            if self.used >= self.size:
                raise ApiError(429, f"the server is busy: at most {self.size} requests at a time "
                                    "(bdh explore --max-concurrent); try again when one has finished")
            self.used += 1

    def give(self) -> None:
        with self._lock:
            self.used -= 1


# reading a request ---------------------------------------------------------------------------
async def read_body(request: Request, limits: Limits) -> dict:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":  # a web page elsewhere cannot send this without the browser asking first (CORS)
        raise ApiError(415, f"send the request as JSON (Content-Type: application/json), not {kind or 'nothing'}")
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limits.max_body:
        raise ApiError(413, f"request body of {int(size):,} bytes is over the limit of {limits.max_body:,}")
    raw = b""
    async for piece in request.stream():
        raw += piece
        if len(raw) > limits.max_body:
            raise ApiError(413, f"request body is over the limit of {limits.max_body:,} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body must be one JSON object, e.g. {\"model\": 0, \"text\": \"...\"}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def field(body: dict, name: str, kind: type, default: Any = MISSING, lo: float | None = None,
          hi: float | None = None, choices: Sequence | None = None):
    """body[name] checked: its type (an int is a float too; a bool is not an int), range and choices."""
    value = body.get(name, default)
    if value is MISSING:
        raise ApiError(422, f"missing field {name!r}")
    if value is None and default is None:
        return None
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ApiError(422, f"field {name!r} must be {_kind_name(kind)}, got {json.dumps(value)[:40]}")
    if choices is not None and value not in choices:
        raise ApiError(422, f"field {name!r} must be one of {', '.join(map(str, choices))}, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ApiError(422, f"field {name!r} must lie in [{lo}, {hi}], got {value}")
    return value


def _kind_name(kind: type) -> str:
    return {int: "an integer", float: "a number", str: "a string"}.get(kind, kind.__name__)


class App:
    """The explorers (one per --ckpt), the limits, the request slots, and the routes over them."""

    def __init__(self, explorers: Sequence[Explorer], limits: Limits = Limits()):
        if not explorers:
            raise UserError("explore needs at least one model")
        self.explorers, self.limits, self.slots = list(explorers), limits, Slots(limits.max_concurrent)

    async def _request(self, request: Request) -> tuple[Explorer, dict, str]:
        body = await read_body(request, self.limits)
        which = field(body, "model", int, 0)
        if not 0 <= which < len(self.explorers):
            raise ApiError(404, f"no model {which}: this server has models 0..{len(self.explorers) - 1}")
        text = field(body, "text", str)
        if len(text) > self.limits.max_chars:
            raise ApiError(413, f"the text has {len(text):,} characters; the limit is {self.limits.max_chars:,} "
                                "(bdh explore --max-chars)")
        if not text:
            raise ApiError(422, "the text is empty: give at least one character")
        return self.explorers[which], body, text

    def answer(self, work: Callable[[Explorer, dict, str], Any]):
        """A POST endpoint: parse, take a slot, run work(explorer, body, text) in a thread, answer JSON."""
        async def endpoint(request: Request):
            explorer, body, text = await self._request(request)
            self.slots.take()
            try:
                return JSONResponse(await run_in_threadpool(work, explorer, body, text))
            finally:
                self.slots.give()
        return endpoint

    async def generate(self, request: Request):
        explorer, body, text = await self._request(request)
        steps = field(body, "max_new_tokens", int, min(100, self.limits.max_new_tokens), 1, self.limits.max_new_tokens)
        temperature = field(body, "temperature", float, 1.0, 0.0, 100.0)
        top_k = field(body, "top_k", int, None, 1)
        seed = field(body, "seed", int, 0, 0, 2 ** 63 - 1)
        self.slots.take()
        try:
            events = await run_in_threadpool(explorer.generate, text, steps, temperature, top_k, seed)
        except BaseException:
            self.slots.give()
            raise

        async def lines():
            try:
                while True:
                    event = await run_in_threadpool(next, events, None)
                    if event is None:
                        break
                    yield json.dumps(event) + "\n"
            except UserError as err:
                yield json.dumps({"error": str(err)}) + "\n"
            finally:  # also when the client goes away mid-stream
                self.slots.give()
                try:
                    events.close()
                except ValueError:  # a step is running in its thread; the generator is dropped after it
                    pass

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def models(self, request: Request):
        return JSONResponse({"models": [e.info() for e in self.explorers], "limits": vars(self.limits)})

    def starlette(self) -> Starlette:
        def neuron(e: Explorer, b: dict, text: str):
            e.check_neuron(field(b, "layer", int), field(b, "head", int), field(b, "neuron", int))
            return e.neuron(text, b["layer"], b["head"], b["neuron"], field(b, "site", str, "y", choices=SITES))

        def trace(e: Explorer, b: dict, text: str):
            return e.trace(text, *(field(b, name, int) for name in ("layer", "head", "i", "j")))

        def concepts(e: Explorer, b: dict, text: str):
            names = e.info()["contrast_sets"]
            return e.concepts(text, field(b, "concept", str, "money_en", choices=names),
                              field(b, "control", str, "weather_en", choices=names))

        routes = [
            Route("/", lambda request: FileResponse(STATIC / "index.html")),
            Route("/api/models", self.models),
            Route("/api/read", self.answer(lambda e, b, text: e.read(text, field(b, "top", int, 5, 1, 20))),
                  methods=["POST"]),
            Route("/api/position", self.answer(lambda e, b, text: e.position(text, field(b, "position", int))),
                  methods=["POST"]),
            Route("/api/neuron", self.answer(neuron), methods=["POST"]),
            Route("/api/synapses", self.answer(
                lambda e, b, text: e.synapses(text, field(b, "position", int), field(b, "k", int, 15, 1, 100))),
                methods=["POST"]),
            Route("/api/trace", self.answer(trace), methods=["POST"]),
            Route("/api/concepts", self.answer(concepts), methods=["POST"]),
            Route("/api/generate", self.generate, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]
        handlers = {ApiError: _api_error, UserError: _user_error, HTTPException: _http_error, Exception: _server_error}
        return Starlette(routes=routes, exception_handlers=handlers)


def create_app(explorers: Sequence[Explorer], limits: Limits = Limits(), local_only: bool = False):
    """The ASGI app for these models (serve it with uvicorn, test it with starlette's TestClient).

    local_only: answer only requests addressed to this machine by name (Host: 127.0.0.1, localhost
    or ::1), so that a web page elsewhere cannot reach the app by pointing a DNS name at 127.0.0.1.
    """
    app = App(explorers, limits).starlette()
    return LocalHostOnly(app) if local_only else app


class LocalHostOnly:
    """ASGI middleware: refuse (400) a request whose Host header names another machine."""

    HOSTS = ("127.0.0.1", "localhost", "::1")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            name = host if host.endswith("]") else host.rsplit(":", 1)[0]
            if name.strip("[]") not in self.HOSTS:
                refuse = JSONResponse({"error": f"this server answers requests to {', '.join(self.HOSTS)} only, "
                                                f"not {host or 'no host'}"}, status_code=400)
                await refuse(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _api_error(request: Request, err: ApiError):
    return JSONResponse({"error": err.message}, status_code=err.status)


async def _user_error(request: Request, err: UserError):
    return JSONResponse({"error": " ".join(str(err).split())}, status_code=422)


async def _http_error(request: Request, err: HTTPException):
    return JSONResponse({"error": err.detail}, status_code=err.status_code)


async def _server_error(request: Request, err: Exception):
    return JSONResponse({"error": f"internal error: {type(err).__name__}: {err}"}, status_code=500)
