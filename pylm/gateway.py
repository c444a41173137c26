"""An HTTP gateway to the servers of a cluster: ``POST /<server>/<function>``
with the payload as the body calls that server by name and answers with
its result, raw bytes both ways (``application/octet-stream``).

Built on Starlette (routing, requests, responses) and served by uvicorn:
both maintained, small, and ASGI, so that every HTTP request is a coroutine
on one event loop and calls the cluster through pylm's
:class:`~pylm.standalone.AsyncClient` (many calls in flight at once, each
to the live instance with the fewest). The gateway follows the registry:
which servers exist, their kind and functions come from there, without a
round trip to etcd per request.

Errors are RFC 9457 problem details (``application/problem+json``) with the
status that fits: a bad name 400, an unknown server or function 404, a body
too large 413, a kind of server the gateway does not call yet 501, a remote
error 502 (with the remote type and message), no live instance 503, no
answer in time 504. ``GET /healthz`` says whether the gateway serves and
reaches etcd; ``GET /openapi.json`` describes the live cluster's functions;
``GET /metrics`` is the process's Prometheus metrics (its clients' calls by
server, function and outcome among them). Given bearer tokens, calls and
the description need one (401 without, 403 with another); ``/healthz`` and
``/metrics`` stay open. Served by :class:`HTTPServer`, the gateway registers
in the registry as a server of kind ``gateway``, so ``pylm sd`` scrapes it.

Run it with ``pylm gateway`` or embed :class:`Gateway`'s ``app`` in any ASGI
server.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import hmac
import itertools
import json
import logging
import socket
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pylm.calls import DEFAULT_TIMEOUT
from pylm.errors import (
    CurveRefused,
    InstanceLost,
    InvalidName,
    NoInstance,
    PayloadTooLarge,
    PylmError,
    RegistryError,
    RemoteError,
    RequestTimeout,
    UnknownFunction,
    UnknownServer,
)
from pylm.jobs_async import AsyncJobs
from pylm.names import check_name
from pylm.protocol import DEFAULT_MAX_PAYLOAD
from pylm.transport import is_wildcard, public_host

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    from pylm.registry import InstanceRecord, Registry
    from pylm.standalone import AsyncClient

__all__ = [
    "CALLABLE_KINDS",
    "FORGET_AFTER",
    "KIND",
    "MAX_JOBS",
    "NDJSON",
    "PIPELINE_KINDS",
    "POOL",
    "STREAM_IN_FLIGHT",
    "Gateway",
    "HTTPServer",
    "openapi",
    "read_jobs",
    "read_tokens",
]

log = logging.getLogger("pylm.gateway")

KIND = "gateway"  # the kind the gateway registers as

# The kinds of server the gateway calls: standalone servers through an
# AsyncClient; pipelines (from the stage named: its job's results through to
# the last stage) through an AsyncLoopClient, masters through the parallel
# AsyncClient, each with POOL calls at once at most per server.
PIPELINE_KINDS = ("chained", "chained-last", "hub", "sink")
CALLABLE_KINDS = ("standalone", "master", *PIPELINE_KINDS)
POOL = 64
FORGET_AFTER = 60.0  # s a server is gone from the registry before its clients close
COOKIE = "pylm_token"  # the console's token, in a browser (see Gateway._console)
NDJSON = "application/x-ndjson"  # many jobs in one request, a line each, results streamed
STREAM_IN_FLIGHT = 64  # jobs of one such request out at once
MAX_JOBS = 100_000  # jobs in one request
# The problems of typed errors: the first class that matches gives the status.
_STATUSES: tuple[tuple[type[PylmError], int, str], ...] = (
    (UnknownFunction, 404, "Unknown function"),
    (UnknownServer, 404, "Unknown server"),
    (PayloadTooLarge, 413, "Payload too large"),
    (NoInstance, 503, "No live instance"),
    (RegistryError, 503, "Registry unavailable"),
    (CurveRefused, 502, "CURVE refused"),
    (RequestTimeout, 504, "No answer in time"),
)
_PROBLEM = "application/problem+json"


class Gateway:
    """The gateway's ASGI application (:attr:`app`) over ``registry`` (a
    :class:`~pylm.registry.Registry` or its address; None: from
    ``PYLM_REGISTRY``). Each call waits ``timeout`` seconds at most; bodies
    over ``max_body`` bytes are refused (413). :meth:`close` ends it.

    The clients of a server that has left the registry are closed once it
    has been gone :attr:`forget_after` seconds (:data:`FORGET_AFTER`, or
    twice the timeout if longer): a server that restarts keeps them."""

    def __init__(
        self,
        registry: Registry | str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_body: int = DEFAULT_MAX_PAYLOAD,
        tokens: frozenset[str] | None = None,
    ) -> None:
        from prometheus_client import make_asgi_app
        from starlette.applications import Starlette
        from starlette.routing import Mount, Route

        from pylm.registry import Registry

        self.timeout = timeout
        self.max_body = max_body
        self.forget_after = max(FORGET_AFTER, 2 * timeout)
        self._gone: dict[str, float] = {}  # servers with clients, not listed: since when
        self._checked = 0.0  # when the clients of servers gone were last looked for
        self._closing: set[asyncio.Future[Any]] = set()  # clients of servers gone, closing
        self._busy: collections.Counter[str] = collections.Counter()  # calls in progress
        self._tokens = tokens  # None: no authentication
        self._owns_registry = not isinstance(registry, Registry)
        self.registry = registry if isinstance(registry, Registry) else Registry(registry)
        self._records: list[InstanceRecord] = []
        self._changed: asyncio.Event | None = None  # set when the listing changes (console)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._following = self.registry.follow(None, self._on_instances)
        self._clients: dict[str, AsyncClient] = {}
        self._opening: dict[str, asyncio.Future[AsyncClient]] = {}
        self._pools: dict[str, AsyncJobs[Any]] = {}  # pipelines' and masters' clients
        from pylm.console import Views

        self._views = Views(self.registry, lambda: self._records)
        # The console's views wait on the servers' endpoints (1 s at most):
        # threads of their own, not the loop's default ones the clients use.
        self._console_threads = concurrent.futures.ThreadPoolExecutor(2, "pylm-console")
        self.app: Starlette = Starlette(
            routes=[
                Route("/", self._console, methods=["GET"]),
                Route("/console/cluster.json", self._cluster, methods=["GET"]),
                Route("/console/events", self._events, methods=["GET"]),
                Route("/console/errors/{server}", self._errors, methods=["GET"]),
                Route("/healthz", self._healthz, methods=["GET"]),
                Route("/openapi.json", self._openapi, methods=["GET"]),
                Mount("/metrics", app=make_asgi_app()),
                Route("/{server}/{function}", self._call, methods=["POST"]),
            ]
        )

    def _on_instances(self, records: list[InstanceRecord]) -> None:
        """From the registry's thread: the instances listed now."""
        self._records = records
        loop, changed = self._loop, self._changed
        if loop is None:
            return
        try:
            if changed is not None:
                loop.call_soon_threadsafe(changed.set)
            loop.call_soon_threadsafe(lambda: self._forget_gone(now_or_never=True))
        except RuntimeError:  # the loop closed: the gateway has stopped
            pass

    def servers(self) -> dict[str, list[InstanceRecord]]:
        """The registered servers, by name (the latest listing)."""
        found: dict[str, list[InstanceRecord]] = {}
        for record in self._records:
            found.setdefault(record.name, []).append(record)
        return found

    # ------------------------------------------------------------------ HTTP

    async def _call(self, request: Request) -> Response:
        from starlette.responses import Response

        refused = self._refused(request)
        if refused is not None:
            return refused
        server, function = request.path_params["server"], request.path_params["function"]
        try:
            check_name(server)
        except InvalidName as exc:
            return _problem(400, "Bad name", str(exc))
        if not function.isidentifier() or function.startswith("_"):
            return _problem(400, "Bad name", f"function {function[:140]!r} is not a valid name")
        records = self.servers().get(server)
        if not records:
            return _problem(404, "Unknown server", f"no server named {server!r} is registered")
        kind = records[0].kind
        if kind not in CALLABLE_KINDS:
            return _problem(
                501,
                "Kind not served",
                f"server {server!r} is a {kind} server: the gateway calls"
                f" {', '.join(CALLABLE_KINDS)} servers",
            )
        # A master's and a hub's functions are their workers': the call tells.
        if kind not in ("master", "hub") and not any(function in r.functions for r in records):
            return _problem(
                404, "Unknown function", f"server {server!r} has no function {function!r}"
            )
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return _problem(413, "Payload too large", _too_large(int(length), self.max_body))
        parts, size = [], 0
        async for chunk in request.stream():
            parts.append(chunk)
            size += len(chunk)
            if size > self.max_body:
                return _problem(413, "Payload too large", _too_large(size, self.max_body))
        body = b"".join(parts)
        del parts  # the body once, not twice, while the request lasts
        if request.headers.get("content-type", "").startswith(NDJSON):
            try:
                payloads = read_jobs(body)
            except ValueError as exc:
                return _problem(400, "Bad jobs", str(exc))
            return self._stream(server, kind, function, payloads)
        try:
            results = await self._results(server, kind, function, body)
        except PylmError as exc:
            status, title, detail, extra = _problem_of(exc)
            return _problem(status, title, detail, **extra)
        if len(results) != 1:
            return _problem(
                502,
                "Not one result",
                f"{server}.{function} gave {len(results)} results; the gateway answers a job"
                " that gives one",
            )
        return Response(results[0], media_type="application/octet-stream")

    async def _results(self, server: str, kind: str, function: str, body: bytes) -> list[bytes]:
        """The results of one job (a standalone call gives one); raises its
        typed error, a timeout with no instance reachable as NoInstance."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._forget_gone()
        self._busy[server] += 1  # its clients are not closed while calls use them
        try:
            return await self._job(server, kind, function, body)
        finally:
            self._busy[server] -= 1
            if not self._busy[server]:
                del self._busy[server]
                if server in self._gone:  # its last call: it may be forgotten now
                    self._forget_gone(now_or_never=True)

    async def _job(self, server: str, kind: str, function: str, body: bytes) -> list[bytes]:
        """:meth:`_results`, through the server's pool or its AsyncClient."""
        if kind != "standalone":
            pool = self._pools.get(server)
            if pool is None:
                pool = self._pools[server] = _jobs_client(server, kind, self.registry, self.timeout)
            return await pool.call(function, body)  # with the calls made at once, in one run
        client = await self._client(server)
        try:
            return [await client.job(function, body, timeout=self.timeout)]
        except RequestTimeout as exc:
            if isinstance(exc, (InstanceLost, CurveRefused)) or client.live_instances:
                raise
            raise NoInstance(f"{exc} (no instance of {server!r} is reachable)") from exc

    def _stream(self, server: str, kind: str, function: str, payloads: list[bytes]) -> Response:
        """Many jobs from one request: a line of NDJSON per job as it ends,
        in any order, each with its index: its result, or its problem."""
        from starlette.responses import StreamingResponse

        async def one(index: int, payload: bytes) -> bytes:
            try:
                results = await self._results(server, kind, function, payload)
            except PylmError as exc:
                status, title, detail, extra = _problem_of(exc)
                problem = {"status": status, "title": title, "detail": detail, **extra}
                return _line({"index": index, "problem": problem})
            except Exception as exc:  # the gateway's own failure: this job's line says so
                log.exception("job %d of a batch to %s.%s failed", index, server, function)
                detail = f"{type(exc).__name__} in the gateway (its log has the traceback)"
                problem = {"status": 500, "title": "Gateway error", "detail": detail}
                return _line({"index": index, "problem": problem})
            if len(results) != 1:
                detail = f"the job gave {len(results)} results"
                problem = {"status": 502, "title": "Not one result", "detail": detail}
                return _line({"index": index, "problem": problem})
            return _line({"index": index, "result": base64.b64encode(results[0]).decode()})

        async def lines() -> Any:
            # At most STREAM_IN_FLIGHT jobs out; a payload is let go once sent.
            left = enumerate(payloads)
            out: set[asyncio.Future[bytes]] = set()
            try:
                while True:
                    for index, payload in itertools.islice(left, STREAM_IN_FLIGHT - len(out)):
                        payloads[index] = b""
                        out.add(asyncio.ensure_future(one(index, payload)))
                    if not out:
                        return
                    done, out = await asyncio.wait(out, return_when=asyncio.FIRST_COMPLETED)
                    for finished in done:
                        yield finished.result()
            finally:
                for task in out:
                    task.cancel()

        return StreamingResponse(lines(), media_type=NDJSON)

    async def _client(self, server: str) -> AsyncClient:
        """The client of ``server``, made once (off the event loop: finding
        its instances reads the registry); kept even if the request that
        asked first went away meanwhile."""
        client = self._clients.get(server)
        if client is not None:
            return client
        opening = self._opening.get(server)
        if opening is None:
            from pylm.standalone import AsyncClient

            def made(future: asyncio.Future[AsyncClient]) -> None:
                self._opening.pop(server, None)
                if not future.cancelled() and future.exception() is None:
                    self._clients[server] = future.result()

            opening = self._opening[server] = asyncio.get_running_loop().run_in_executor(
                None,
                lambda: AsyncClient(server, registry=self.registry, timeout=self.timeout, wait=0),
            )
            opening.add_done_callback(made)
        return await asyncio.shield(opening)

    async def _console(self, request: Request) -> Response:
        """The console's page. With tokens, ``/?token=TOKEN`` once gives the
        browser a cookie holding it (and goes on to the page without it in
        the address): a page cannot put a bearer token on its event stream."""
        from starlette.responses import HTMLResponse, RedirectResponse

        from pylm.console import PAGE

        given = request.query_params.get("token")
        if self._tokens is not None and given is not None:
            if not self._known(given):
                return _problem(403, "Forbidden", "the token is not one of this gateway's")
            kept = [item for item in request.query_params.multi_items() if item[0] != "token"]
            rest = urllib.parse.urlencode(kept)
            # Relative: the page behind a proxy that serves it under a prefix too.
            moved = RedirectResponse("./" + (f"?{rest}" if rest else ""), status_code=303)
            moved.set_cookie(  # Lax: a link to the console from a chat or an alert works
                COOKIE,
                given,
                httponly=True,
                samesite="lax",
                secure=request.url.scheme == "https",
            )
            return moved
        refused = self._refused(request, cookie=True)
        if refused is not None:
            return refused
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def _cluster(self, request: Request) -> Response:
        from starlette.responses import JSONResponse

        refused = self._refused(request, cookie=True)
        if refused is not None:
            return refused
        loop = asyncio.get_running_loop()
        return JSONResponse(await loop.run_in_executor(self._console_threads, self._views.view))

    async def _errors(self, request: Request) -> Response:
        """A server's last errors, newest first (from its instances' processes)."""
        from starlette.responses import JSONResponse

        refused = self._refused(request, cookie=True)
        if refused is not None:
            return refused
        server = request.path_params["server"]
        try:
            check_name(server)
        except InvalidName as exc:
            return _problem(400, "Bad name", str(exc))
        if server not in self.servers():
            return _problem(404, "Unknown server", f"no server named {server!r} is registered")
        loop = asyncio.get_running_loop()
        errors = await loop.run_in_executor(self._console_threads, self._views.errors, server)
        return JSONResponse(errors)

    async def _events(self, request: Request) -> Response:
        """A view of the cluster a second, and one at once when the registry
        changes, as server-sent events, until the page goes."""
        from starlette.responses import StreamingResponse

        refused = self._refused(request, cookie=True)
        if refused is not None:
            return refused
        loop = asyncio.get_running_loop()
        if self._changed is None:
            self._loop, self._changed = loop, asyncio.Event()
        changed = self._changed

        async def stream() -> Any:
            while not await request.is_disconnected():
                yield await loop.run_in_executor(self._console_threads, self._views.event)
                try:
                    await asyncio.wait_for(changed.wait(), 1.0)
                    changed.clear()
                except TimeoutError:
                    pass

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    async def _healthz(self, request: Request) -> Response:
        from starlette.responses import JSONResponse

        reachable = self.registry.reachable
        return JSONResponse(
            {"status": "ok" if reachable else "degraded", "registry": reachable},
            status_code=200 if reachable else 503,
        )

    async def _openapi(self, request: Request) -> Response:
        from starlette.responses import JSONResponse

        refused = self._refused(request)
        if refused is not None:
            return refused
        return JSONResponse(openapi(self.servers()))

    def _refused(self, request: Request, cookie: bool = False) -> Response | None:
        """A 401 or 403 problem when tokens are required and ``request`` has
        none or another; None when it may go on. ``cookie``: the console's
        cookie (see :meth:`_console`) stands for a bearer token."""
        if self._tokens is None:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            kept = request.cookies.get(COOKIE) if cookie else None
            if kept is None:
                detail = "this gateway needs a bearer token"
                if cookie:
                    detail += "; in a browser, open /?token=TOKEN once"
                response = _problem(401, "Unauthorized", detail)
                response.headers["WWW-Authenticate"] = 'Bearer realm="pylm"'
                return response
            token = kept
        if not self._known(token.strip()):
            return _problem(403, "Forbidden", "the bearer token is not one of this gateway's")
        return None

    def _known(self, token: str) -> bool:
        """Whether ``token`` is one of the gateway's: compared with each, in
        constant time (no early exit tells a prefix)."""
        given = token.encode("utf-8", "surrogateescape")
        tokens = self._tokens or ()
        return any([hmac.compare_digest(given, known.encode("utf-8")) for known in tokens])

    # ------------------------------------------------------------------ lifecycle

    def _forget_gone(self, *, now_or_never: bool = False) -> None:
        """Close the clients of the servers gone from the registry for
        :attr:`forget_after` seconds that no call uses. Looked for at calls
        (every few seconds at most), when the listing changes, and
        ``forget_after`` seconds after a server was first seen gone
        (``now_or_never``: whatever the time since the last look)."""
        now = time.monotonic()
        if not now_or_never and now - self._checked < min(5.0, self.forget_after / 2):
            return
        self._checked = now
        listed = self.servers()
        loop = asyncio.get_running_loop()
        for server in {*self._clients, *self._pools}:
            if server in listed:
                self._gone.pop(server, None)
                continue
            if server not in self._gone:
                self._gone[server] = now
                again = self.forget_after + 0.1
                loop.call_later(again, lambda: self._forget_gone(now_or_never=True))
                continue
            if now - self._gone[server] < self.forget_after or self._busy.get(server):
                continue
            del self._gone[server]
            client, pool = self._clients.pop(server, None), self._pools.pop(server, None)
            log.info("closing the clients of %r: gone from the registry", server)
            closing: list[asyncio.Future[None]] = []
            if client is not None:
                closing.append(asyncio.ensure_future(client.close()))
            if pool is not None:
                closing.append(asyncio.ensure_future(pool.close()))
            for future in closing:
                self._closing.add(future)
                future.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close the clients and stop following the registry (closing it
        when the gateway opened it)."""
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        self._console_threads.shutdown(wait=False, cancel_futures=True)
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await pool.close()
        self._following.cancel()
        if self._owns_registry:
            await asyncio.get_running_loop().run_in_executor(None, self.registry.close)


class HTTPServer:
    """Serves a :class:`Gateway` over HTTP/1.1 with uvicorn, on ``host`` and
    ``port`` (0: one the system picks; bound when made, so :attr:`url` is
    known at once); over TLS given a ``certfile`` and its ``keyfile`` (PEM).
    :meth:`run` serves until SIGINT or SIGTERM (in the main thread) or
    :meth:`stop`, then closes the gateway."""

    def __init__(
        self,
        gateway: Gateway,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        name: str | None = KIND,
        ttl: float = 10.0,
        certfile: str | Path | None = None,
        keyfile: str | Path | None = None,
    ) -> None:
        import uvicorn

        if (certfile is None) != (keyfile is None):
            raise ValueError("TLS needs both a certificate file and its key file")

        self.gateway = gateway
        self._socket = socket.socket(
            socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM
        )
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit it: an answer's head and body, written
        # apart, must not wait for the client's delayed ACK (Nagle: ~40 ms).
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._socket.bind((host, port))
        self.host, self.port = host, self._socket.getsockname()[1]
        where = f"[{host}]" if ":" in host else host
        self.scheme = "http" if certfile is None else "https"
        self.url = f"{self.scheme}://{where}:{self.port}"
        config = uvicorn.Config(
            gateway.app,
            lifespan="off",
            access_log=False,
            log_config=None,
            timeout_graceful_shutdown=2,  # an open console stream ends no later
            ssl_certfile=None if certfile is None else str(certfile),
            ssl_keyfile=None if keyfile is None else str(keyfile),
        )
        if certfile is not None:
            config.load()  # the files are read now: a bad one fails here, not when serving
        self._server = uvicorn.Server(config)
        self.name, self.ttl = name, ttl  # registered as this server name (None: not at all)

    def run(self) -> None:
        """Register (as :attr:`name`), serve, then deregister and close;
        only close if :meth:`stop` came first."""
        if self._server.should_exit:
            self._socket.close()
            return
        registration = None
        if self.name is not None:
            from pylm.registry import InstanceRecord

            if is_wildcard(self.host):  # the address that reaches the registry
                where = public_host(self.gateway.registry.config.endpoints)
            else:
                where = f"[{self.host}]" if ":" in self.host else self.host
            record = InstanceRecord(
                self.name,
                KIND,
                {"http": f"tcp://{where}:{self.port}"},
                metrics=f"{self.scheme}://{where}:{self.port}/metrics",
            )
            registration = self.gateway.registry.register(record, self.ttl)
        try:
            asyncio.run(self._serve())
        finally:
            if registration is not None:
                registration.close()

    async def _serve(self) -> None:
        try:
            await self._server.serve(sockets=[self._socket])
        finally:
            self._socket.close()
            await self.gateway.close()

    def stop(self) -> None:
        """Have :meth:`run` return (from any thread)."""
        self._server.should_exit = True


def openapi(servers: Mapping[str, list[InstanceRecord]]) -> dict[str, Any]:
    """An OpenAPI 3.1 description of the servers' functions the gateway calls."""
    paths: dict[str, Any] = {}
    # A master's (or hub's) functions are its workers': their records name it.
    of_workers: dict[str, set[str]] = {}
    for records in servers.values():
        for record in records:
            master = servers.get(record.master or "")
            if master and master[0].kind in ("master", "hub"):
                of_workers.setdefault(master[0].name, set()).update(record.functions)
    for name, records in sorted(servers.items()):
        if records[0].kind not in CALLABLE_KINDS:
            continue
        functions = {f for record in records for f in record.functions}
        for function in sorted(functions | of_workers.get(name, set())):
            paths[f"/{name}/{function}"] = {
                "post": {
                    "summary": f"Call {function} on {name}",
                    "operationId": f"{name}.{function}",
                    "requestBody": {
                        "required": True,
                        "content": {"application/octet-stream": {"schema": {"type": "string"}}},
                    },
                    "responses": {
                        "200": {
                            "description": "the function's result",
                            "content": {"application/octet-stream": {"schema": {"type": "string"}}},
                        },
                        "default": {
                            "description": "a problem (RFC 9457)",
                            "content": {_PROBLEM: {"schema": {"type": "object"}}},
                        },
                    },
                }
            }
    return {
        "openapi": "3.1.0",
        "info": {"title": "pylm gateway", "version": "1"},
        "paths": paths,
    }


def _jobs_client(server: str, kind: str, registry: Registry, timeout: float) -> AsyncJobs[Any]:
    """The asyncio client of a pipeline (from the stage ``server``) or a
    master: :data:`POOL` runs at once, each one job of a call."""
    if kind == "master":
        from pylm.parallel import AsyncClient as MasterClient

        return MasterClient(server, registry=registry, timeout=timeout, wait=0, runs=POOL)
    from pylm.chained import AsyncLoopClient

    return AsyncLoopClient(server, registry=registry, timeout=timeout, wait=0, runs=POOL)


def _problem_of(exc: PylmError) -> tuple[int, str, str, dict[str, str]]:
    """The status, title, detail and extra fields of the problem a job's
    typed error makes."""
    if isinstance(exc, RemoteError):
        detail = f"{exc.remote_type}: {exc.remote_message}"
        extra = {"remote_type": exc.remote_type, "remote_message": exc.remote_message}
        return 502, "Remote error", detail, extra
    for kind, status, title in _STATUSES:
        if isinstance(exc, kind):
            return status, title, str(exc), {}
    return 502, "Bad answer", str(exc), {}


def read_jobs(body: bytes) -> list[bytes]:
    """The payloads of an NDJSON request: a JSON object a line, its payload
    as ``"payload"`` (base64) or ``"text"`` (UTF-8); ValueError naming the
    line that is not."""
    payloads = []
    for number, line in enumerate(body.splitlines(), 1):
        if not line.strip():
            continue
        try:
            job = json.loads(line)
            if not isinstance(job, dict) or len(job) != 1 or not {"payload", "text"} & set(job):
                raise ValueError('an object with "payload" (base64) or "text"')
            if "text" in job:
                if not isinstance(job["text"], str):
                    raise ValueError('"text" must be a string')
                payloads.append(job["text"].encode("utf-8"))
            else:
                payloads.append(base64.b64decode(job["payload"], validate=True))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"line {number} is not a job: {exc}") from None
    if len(payloads) > MAX_JOBS:
        raise ValueError(f"{len(payloads)} jobs, more than {MAX_JOBS} in one request")
    return payloads


def _line(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode() + b"\n"


def read_tokens(path: str | Path) -> frozenset[str]:
    """The bearer tokens in file ``path``: one a line, blank lines and
    lines starting with ``#`` skipped; :class:`ValueError` if it has none."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    tokens = frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))
    if not tokens:
        raise ValueError(f"{path}: no token in it (one a line)")
    return tokens


def _too_large(size: int, limit: int) -> str:
    return f"the body has {size} bytes, more than the gateway's limit of {limit}"


def _problem(status: int, title: str, detail: str, **extra: str) -> Response:
    """An RFC 9457 problem details response."""
    from starlette.responses import JSONResponse

    return JSONResponse(
        {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra},
        status_code=status,
        media_type=_PROBLEM,
    )
