"""A fault-injecting reverse proxy for S3 on loopback (sandbox, chaos runs and tests only).

`S3FaultProxy` sits between S3 clients and an S3 server (the sandbox's moto server) and,
at seeded per-kind rates, damages requests the way real object stores and networks do:

- ``error``: HTTP 500 ``InternalError`` or 503 ``ServiceUnavailable`` with S3's XML error
  body; the request never reaches the server.
- ``slowdown``: HTTP 503 with ``<Code>SlowDown</Code>`` (S3's throttling); not forwarded.
- ``reset``: the request is forwarded (it takes effect), then the connection is reset
  (RST) half way through the response bytes (status line, headers or body).
- ``truncate``: forwarded; the response announces its full ``Content-Length`` N but
  only part of the body is sent before the connection is closed. Responses without a
  body (HEAD, an empty PUT answer) get a ``reset`` instead, counted as one.

Not among the uniform kinds, only when asked for by rate: ``corrupt`` forwards and flips
one byte of a response body, length kept (what a checksum must catch; S3 over TLS does not
do this, so chaos runs leave it out).

    with S3FaultProxy(moto_endpoint, rates={"error": 0.05, "truncate": 0.05}, seed=7) as proxy:
        client = boto3.client("s3", endpoint_url=proxy.endpoint)
        ...
        proxy.counts   # {"requests": 120, "error": 6, "slowdown": 0, "reset": 0, "truncate": 5, "held": 0}

`match(info)` limits faults to some requests (e.g. GETs of checkpoint files). Hooks see
every request first: a hook returning a `concurrent.futures.Future` holds the request
until the future resolves to ``"forward"`` or ``"drop"`` (close the client's connection
without forwarding); chaos runs use this to kill a trainer while one of its uploads or
downloads is provably in flight. The decisions come from one `random.Random(seed)` used
only on the proxy's event loop, so a sequence of requests meets the same faults each run.

A minimal HTTP/1.1 implementation on asyncio streams (keep-alive and chunked bodies
from clients, ``Expect: 100-continue``, one upstream connection per request), so that
every byte of the response is under the proxy's control.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import socket
import struct
import threading
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

log = logging.getLogger(__name__)

FAULT_KINDS = ("error", "slowdown", "reset", "truncate")
ALL_KINDS = (*FAULT_KINDS, "corrupt")
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)
MAX_HEAD_BYTES = 64 * 1024
HOLD_TIMEOUT = 60.0  # a hook that never answers must not wedge the client forever
UPSTREAM_TIMEOUT = 120.0
_REASONS = {
    200: "OK",
    204: "No Content",
    206: "Partial Content",
    304: "Not Modified",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    409: "Conflict",
    412: "Precondition Failed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class RequestInfo:
    """What a hook or a `match` filter sees of one request (path-style addressing)."""

    method: str
    path: str  # percent-decoded URL path, e.g. /bucket/jobs/a/checkpoints/checkpoint-5/optimizer.pt
    query: str
    bucket: str | None
    key: str | None


@dataclass(frozen=True)
class InjectedFault:
    kind: str
    method: str
    path: str
    status: int | None = None


class _Closed(Exception):
    """The client went away; stop serving this connection."""


def uniform_rates(total: float, kinds: tuple[str, ...] = FAULT_KINDS) -> dict[str, float]:
    """`total` fault probability per request, split evenly over `kinds`."""
    if not 0.0 <= total <= 1.0:
        raise ValueError(f"fault rate must be within [0, 1], got {total}")
    return {kind: total / len(kinds) for kind in kinds}


def _check_rates(rates: Mapping[str, float]) -> dict[str, float]:
    unknown = set(rates) - set(ALL_KINDS)
    if unknown:
        raise ValueError(f"unknown fault kind(s) {sorted(unknown)}; known: {', '.join(ALL_KINDS)}")
    clean = {kind: float(rates.get(kind, 0.0)) for kind in ALL_KINDS}
    if any(r < 0 for r in clean.values()) or sum(clean.values()) > 1.0 + 1e-9:
        raise ValueError(f"fault rates must be >= 0 and sum to at most 1, got {clean}")
    return clean


def _error_xml(code: str, message: str, resource: str) -> bytes:
    request_id = uuid.uuid4().hex[:16].upper()
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message><Resource>{resource}</Resource>"
        f"<RequestId>{request_id}</RequestId><HostId>sandbox-fault-proxy</HostId></Error>"
    ).encode()


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    name = name.lower()
    return next((v for k, v in headers if k.lower() == name), None)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return bytes(body)
        body += await reader.readexactly(size)
        await reader.readexactly(2)


def _decode_chunked(data: bytes) -> bytes:
    body, pos = bytearray(), 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end].split(b";", 1)[0].strip() or b"0", 16)
        pos = end + 2
        if size == 0:
            return bytes(body)
        body += data[pos : pos + size]
        pos += size + 2


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return lines[0], headers


class S3FaultProxy:
    """A loopback reverse proxy in front of `upstream` (http://host:port) that injects S3 faults.

    Thread-safe: runs its own event loop in a daemon thread; `rates`, `match`, hooks and the
    counters can be used from any thread.
    """

    def __init__(
        self,
        upstream: str,
        *,
        rates: Mapping[str, float] | None = None,
        seed: int = 0,
        match: Callable[[RequestInfo], bool] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.host, self.port = host, port
        self._rates = _check_rates(rates or {})
        self._rng = random.Random(seed)
        self.match = match
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._injected: deque[InjectedFault] = deque(maxlen=2000)
        self._hooks: list[Callable[[RequestInfo], concurrent.futures.Future | None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    # -- configuration and counters --------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def rates(self) -> dict[str, float]:
        with self._lock:
            return dict(self._rates)

    def set_rates(self, rates: Mapping[str, float]) -> None:
        """Replace the per-kind rates (missing kinds: 0)."""
        clean = _check_rates(rates)
        with self._lock:
            self._rates = clean

    @property
    def counts(self) -> dict[str, int]:
        """Requests seen, faults injected per kind, requests held by hooks."""
        with self._lock:
            return {
                "requests": self._counts["requests"],
                **{k: self._counts[k] for k in ALL_KINDS},
                "held": self._counts["held"],
            }

    @property
    def injected(self) -> list[InjectedFault]:
        """The most recent injected faults (up to 2000), oldest first."""
        with self._lock:
            return list(self._injected)

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self._injected.clear()

    def add_hook(self, hook: Callable[[RequestInfo], concurrent.futures.Future | None]) -> Callable[[], None]:
        """Call `hook(info)` on the proxy's loop for every request (keep it quick); returns a remover.

        A returned Future holds the request until it resolves to "forward" or "drop".
        """
        with self._lock:
            self._hooks.append(hook)

        def remove() -> None:
            with self._lock:
                if hook in self._hooks:
                    self._hooks.remove(hook)

        return remove

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> S3FaultProxy:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._serve, self.host, self.port, limit=MAX_HEAD_BYTES)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # reported to start()
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        ready.wait(30)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None or loop.is_closed():
            return

        async def close() -> None:
            server.close()
            for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                task.cancel()

        try:
            asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._server = None

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- serving -----------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._one_request(reader, writer):
                pass
        except (_Closed, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except asyncio.CancelledError:  # the proxy is stopping
            pass
        except Exception:  # a proxy bug must not look like an injected fault silently
            log.exception("s3 fault proxy: request handling failed")
        finally:
            if not writer.is_closing():
                writer.close()

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False when the connection is done."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise
            return False  # the client closed an idle keep-alive connection
        request_line, headers = _parse_head(head[:-4])
        method, target, _version = request_line.split(" ", 2)
        if (_header(headers, "expect") or "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        if "chunked" in (_header(headers, "transfer-encoding") or "").lower():
            body = await _read_chunked(reader)
        else:
            body = await reader.readexactly(int(_header(headers, "content-length") or 0))
        keep_alive = (_header(headers, "connection") or "").lower() != "close"
        info = self._info(method, target)

        with self._lock:
            self._counts["requests"] += 1
            hooks = list(self._hooks)
        for hook in hooks:
            held = hook(info)
            if held is None:
                continue
            with self._lock:
                self._counts["held"] += 1
            try:
                action = await asyncio.wait_for(asyncio.wrap_future(held), HOLD_TIMEOUT)
            except (TimeoutError, concurrent.futures.CancelledError):
                action = "forward"
            if action == "drop":
                self._reset(writer)
                return False

        kind = self._draw(info)
        if kind in ("error", "slowdown"):
            status, data = self._error_response(kind, method, info)
            self._record(kind, info, status)
            writer.write(data)
            await writer.drain()
            return keep_alive

        status, resp_headers, resp_body = await self._forward(method, target, headers, body)
        if kind == "corrupt" and resp_body:
            at = self._rng.randrange(len(resp_body))
            resp_body = resp_body[:at] + bytes([resp_body[at] ^ 0xFF]) + resp_body[at + 1 :]
            self._record("corrupt", info, status)
        data = self._response_bytes(method, status, resp_headers, resp_body)
        if kind == "truncate" and resp_body:
            cut = len(data) - len(resp_body) + self._rng.randrange(len(resp_body))
            self._record("truncate", info, status)
            writer.write(data[:cut])
            await writer.drain()
            writer.close()  # FIN after a short body: the client sees fewer bytes than announced
            return False
        if kind in ("reset", "truncate"):
            self._record("reset", info, status)
            writer.write(data[: max(1, len(data) // 2)])
            await writer.drain()
            self._reset(writer)
            return False
        writer.write(data)
        await writer.drain()
        return keep_alive

    def _info(self, method: str, target: str) -> RequestInfo:
        parts = urlsplit(target)
        path = unquote(parts.path)
        bucket, _, key = path.lstrip("/").partition("/")
        return RequestInfo(method.upper(), path, parts.query, bucket or None, key or None)

    def _draw(self, info: RequestInfo) -> str | None:
        with self._lock:
            rates = self._rates
            match = self.match
        if not any(rates.values()) or (match is not None and not match(info)):
            return None
        u = self._rng.random()
        for kind in ALL_KINDS:
            if u < rates[kind]:
                return kind
            u -= rates[kind]
        return None

    def _record(self, kind: str, info: RequestInfo, status: int | None) -> None:
        with self._lock:
            self._counts[kind] += 1
            self._injected.append(InjectedFault(kind, info.method, info.path, status))
        log.debug("s3 fault proxy: %s on %s %s", kind, info.method, info.path)

    def _error_response(self, kind: str, method: str, info: RequestInfo) -> tuple[int, bytes]:
        if kind == "slowdown":
            status, code, message = 503, "SlowDown", "Please reduce your request rate."
        elif self._rng.random() < 0.5:
            status, code, message = 500, "InternalError", "We encountered an internal error. Please try again."
        else:
            status, code, message = 503, "ServiceUnavailable", "Service is unable to handle request."
        body = b"" if method == "HEAD" else _error_xml(code, message, info.path)
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nx-amz-request-id: fault-{kind}\r\n\r\n"
        )
        return status, head.encode() + body

    def _response_bytes(self, method: str, status: int, headers: list[tuple[str, str]], body: bytes) -> bytes:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
        bodiless = method == "HEAD" or status in (204, 304) or status < 200
        for name, value in headers:
            low = name.lower()
            if low in HOP_BY_HOP or (low == "content-length" and not bodiless):
                continue
            lines.append(f"{name}: {value}")
        if not bodiless:
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if bodiless else body)

    async def _forward(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.upstream_host, self.upstream_port), UPSTREAM_TIMEOUT
        )
        try:
            lines = [f"{method} {target} HTTP/1.1"]
            lines += [f"{k}: {v}" for k, v in headers if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"]
            if body or method in ("PUT", "POST"):
                lines.append(f"Content-Length: {len(body)}")
            lines.append("Connection: close")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), UPSTREAM_TIMEOUT)
        finally:
            writer.close()
        while True:
            head, _, rest = data.partition(b"\r\n\r\n")
            status_line, resp_headers = _parse_head(head)
            status = int(status_line.split(" ", 2)[1])
            if 100 <= status < 200:  # an interim response: the real one follows
                data = rest
                continue
            break
        if method == "HEAD" or status in (204, 304):
            return status, resp_headers, b""
        if "chunked" in (_header(resp_headers, "transfer-encoding") or "").lower():
            rest = _decode_chunked(rest)
        else:
            length = _header(resp_headers, "content-length")
            if length is not None:
                rest = rest[: int(length)]
        return status, resp_headers, rest

    @staticmethod
    def _reset(writer: asyncio.StreamWriter) -> None:
        """Close with RST (SO_LINGER 0): the client sees 'connection reset by peer'."""
        sock = writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        transport = writer.transport
        transport.abort()


def checkpoint_file(info: RequestInfo) -> tuple[str, int, str] | None:
    """(job prefix, step, file) when `info` addresses a file inside `.../checkpoints/checkpoint-<step>/`."""
    if not info.key:
        return None
    head, sep, tail = info.key.rpartition("/checkpoints/checkpoint-")
    if not sep:
        if not info.key.startswith("checkpoints/checkpoint-"):
            return None
        head, tail = "", info.key[len("checkpoints/checkpoint-") :]
    digits, slash, name = tail.partition("/")
    if not slash or not digits.isdigit() or not name:
        return None
    return (f"{info.bucket}/{head}/" if head else f"{info.bucket}/"), int(digits), name


__all__ = [
    "ALL_KINDS",
    "FAULT_KINDS",
    "InjectedFault",
    "RequestInfo",
    "S3FaultProxy",
    "checkpoint_file",
    "uniform_rates",
]


def _main(argv: list[str] | None = None) -> int:  # pragma: no cover - a manual tool
    import argparse
    import time

    parser = argparse.ArgumentParser(description="Run the S3 fault proxy in front of an S3 endpoint.")
    parser.add_argument("upstream")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rate", type=float, default=0.1, help="total fault rate, split over the kinds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with S3FaultProxy(args.upstream, rates=uniform_rates(args.rate), seed=args.seed, port=args.port) as proxy:
        print(f"S3 fault proxy at {proxy.endpoint} -> {args.upstream} (rate {args.rate})", flush=True)
        try:
            while True:
                time.sleep(5)
                print(proxy.counts, flush=True)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
