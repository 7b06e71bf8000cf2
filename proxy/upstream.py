"""The one HTTP client to the upstream model server.

Every call to the upstream goes through ``UpstreamClient``: the pass-through
routes, the model list, and (later) the Responses service and tool loops. It
owns the pooled ``ClientSession``, the timeouts, the retries and the circuit
breaker, and it converts aiohttp and timeout exceptions into the
``proxy.errors`` tree at the point where the I/O happens.

Retries happen only inside ``open()``, i.e. before the upstream's response
headers are handed to a caller, so nothing has reached the client yet; a
stream that has started is never retried. A call that is not idempotent (a
relayed POST: lmbridge does not know what it does) is retried only when no
connection could be made, i.e. when the request surely never reached the upstream.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
import zlib
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from proxy.breaker import CircuitBreaker, CircuitState
from proxy.config import UpstreamConfig
from proxy.errors import (
    CircuitOpen,
    UpstreamError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.jsontext import dumps_bytes, loads
from proxy.metrics import Metrics
from proxy.redact import redact_url

log = logging.getLogger("lmbridge.upstream")

RETRY_STATUSES = frozenset({502, 503, 504})
KEEPALIVE = 4.0  # seconds an idle pooled connection is kept
# Request bodies above this are streamed upstream (aiohttp's own threshold for warning).
LARGE_UPLOAD = 1 << 20


class _Retryable(Exception):
    """An attempt that may be retried; carries the error to raise if it was the last."""

    def __init__(
        self,
        error: UpstreamError,
        reason: str,
        *,
        trips_breaker: bool = True,
        unsent: bool = False,
    ) -> None:
        super().__init__(error.message)
        self.error = error
        self.reason = reason
        # No connection was made: the request never reached the upstream, so even a
        # call that is not idempotent may be sent again.
        self.unsent = unsent
        # A refused connection means nothing listens: the server is stopped, not
        # flapping, and the refusal already fails fast. It must not open the circuit
        # (whose Retry-After would make clients wait for a server nobody started).
        self.trips_breaker = trips_breaker


def start_hint(url: str) -> str:
    return (
        f"Cannot reach the upstream model server at {url}. Start LM Studio's server with "
        "`lms server start` (or your llama.cpp/Ollama/vLLM server), point lmbridge at the "
        "right one with `lmbridge serve --upstream URL`, or run a small model inside "
        "lmbridge with `lmbridge serve --embedded`."
    )


CONTEXT_HINT = (
    "Load the model with a longer context (LM Studio: `lms load <model> --context-length N`) "
    "or send less input."
)


def new_session(config: UpstreamConfig) -> aiohttp.ClientSession:
    """The pooled session for one upstream; opened and closed with the app."""
    connector = aiohttp.TCPConnector(
        limit=config.max_connections,
        limit_per_host=config.max_connections,
        ttl_dns_cache=300,
        # Shorter than the idle timeout of the servers behind lmbridge (llama.cpp's and
        # uvicorn's, so vLLM's, are 5 s): a pooled connection is dropped before the
        # server closes it, so that a request never goes out on a connection closing
        # under it, which a relayed POST could not be sent again over.
        keepalive_timeout=KEEPALIVE,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout),
        auto_decompress=False,
        raise_for_status=False,
        skip_auto_headers=("User-Agent",),
        # Model servers set no cookies; skipping the jar saves work on every request.
        cookie_jar=aiohttp.DummyCookieJar(),
    )


class UpstreamClient:
    def __init__(
        self,
        config: UpstreamConfig,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        *,
        breaker: CircuitBreaker | None = None,
        context_hint: str = CONTEXT_HINT,
    ) -> None:
        self.config = config
        # What the operator can change when a prompt does not fit the model's context.
        self.context_hint = context_hint
        self.base_url = config.url
        # As logs, metric labels, /readyz and error messages show it: without a password.
        self.shown_url = redact_url(config.url)
        self.session = session
        self.metrics = metrics
        self.breaker = breaker or CircuitBreaker(
            config.circuit_failure_threshold,
            config.circuit_cooldown,
            on_change=self._circuit_changed,
        )
        metrics.circuit_state.labels(config.name).set(self.breaker.state.value)
        # The socket read timeout covers the wait for the headers (first byte); once
        # they are in, _arm_idle_timeout switches the same timer to idle_timeout.
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.connect_timeout, sock_read=config.first_byte_timeout
        )
        # Bodies are relayed as they come; compressing them on the loopback would only
        # cost both sides CPU.
        self._base_headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if config.api_key is not None:
            self._base_headers["Authorization"] = f"Bearer {config.api_key.get_secret_value()}"

    def _circuit_changed(self, state: CircuitState) -> None:
        self.metrics.circuit_state.labels(self.config.name).set(state.value)
        if state is CircuitState.OPEN:
            log.warning(
                "circuit open for %s after %d failures; failing fast for %.0fs",
                self.shown_url,
                self.breaker.failures,
                self.breaker.cooldown,
            )
        else:
            log.info("circuit %s for %s", state.name.lower().replace("_", "-"), self.shown_url)

    # --- requests ---------------------------------------------------------

    async def open(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        route: str = "other",
        idempotent: bool = True,
        retries: bool = True,
    ) -> aiohttp.ClientResponse:
        """Send a request; return the response once a 2xx status and headers arrived.

        The caller reads the body (``read_body`` / ``iter_chunks``), which
        releases the connection. Error statuses raise ``UpstreamStatus`` with
        the upstream's body; transport failures raise the matching
        ``UpstreamError``. The circuit breaker judges the call as a whole, its
        retries included: one call is at most one failure. ``idempotent=False``:
        retried only when no connection could be made; ``retries=False``: not retried
        (another upstream can take the call at once).
        """
        if not self.breaker.before_request():
            raise self._circuit_open()
        send_headers = {**self._base_headers, **headers} if headers else self._base_headers
        try:
            resp = await self._send(method, path, body, send_headers, route, idempotent, retries)
        except _Retryable as exc:
            if exc.trips_breaker:
                self.breaker.record_failure()
            else:
                self.breaker.release_probe()
            raise exc.error from exc
        except UpstreamTimeout:
            self.breaker.record_failure()
            raise
        except UpstreamStatus:
            self.breaker.record_success()  # a 4xx: the upstream is up and answering
            raise
        except BaseException:
            self.breaker.release_probe()
            raise
        self.breaker.record_success()
        return resp

    async def _send(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        route: str,
        idempotent: bool,
        retries: bool,
    ) -> aiohttp.ClientResponse:
        """The attempts of one call; the last failure is raised as ``_Retryable``."""
        url = self.base_url + path
        try:
            return await self._attempt(method, url, body, headers, route)
        except _Retryable as exc:
            if not retries or self.config.retry_attempts <= 1 or not (idempotent or exc.unsent):
                raise
            replay: _Retryable | None = exc

        def may_retry(exc: BaseException) -> bool:
            return isinstance(exc, _Retryable) and (idempotent or exc.unsent)

        # Only a failure pays for the retry machinery; its first attempt replays
        # the failure above so that tenacity counts and spaces the attempts.
        def count_retry(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            reason = exc.reason if isinstance(exc, _Retryable) else "other"
            self.metrics.retries.labels(reason).inc()
            log.info(
                "retrying %s %s after %s (attempt %d failed)",
                method,
                path,
                reason,
                state.attempt_number,
            )

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.config.retry_attempts),
            wait=wait_random_exponential(
                multiplier=self.config.retry_backoff, max=self.config.retry_backoff_max
            ),
            retry=retry_if_exception(may_retry),
            before_sleep=count_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                if replay is not None:
                    failed, replay = replay, None
                    raise failed
                return await self._attempt(method, url, body, headers, route)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempt(
        self, method: str, url: str, body: bytes | None, headers: dict[str, str], route: str
    ) -> aiohttp.ClientResponse:
        started = time.perf_counter()
        # A large body goes out 64 KB at a time, the event loop served in between; as
        # bytes it would be copied to the socket's buffer in one go.
        data = io.BytesIO(body) if body is not None and len(body) > LARGE_UPLOAD else body
        try:
            resp = await self.session.request(
                method,
                url,
                data=data,
                headers=headers,
                timeout=self._timeout,
                # A redirect could name any host: lmbridge only ever talks to the
                # configured upstream (docs/operations.md, "Security model").
                allow_redirects=False,
            )
        except aiohttp.SocketTimeoutError as exc:
            self._count_failure("first_byte_timeout")
            raise UpstreamTimeout(
                f"The upstream at {self.shown_url} did not answer within "
                f"{self.config.first_byte_timeout:g}s (upstream.first_byte_timeout)."
            ) from exc
        except aiohttp.ClientConnectionError as exc:
            refused = isinstance(exc, aiohttp.ClientConnectorError) and isinstance(
                exc.os_error, ConnectionRefusedError
            )
            self._count_failure("refused" if refused else "connect")
            raise _Retryable(
                UpstreamUnavailable(_connect_message(self.shown_url, exc)),
                "connect",
                trips_breaker=not refused,
                unsent=isinstance(
                    exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError
                ),
            ) from exc
        self.metrics.observe_upstream(route, time.perf_counter() - started)
        if resp.status in RETRY_STATUSES:
            raw = await self._read_error(resp)
            self._count_failure(f"status_{resp.status}")
            raise _Retryable(_status_error(resp, raw), f"status_{resp.status}")
        if resp.status >= 400:
            raw = await self._read_error(resp)
            error = _status_error(resp, raw)
            if error.context_overflow:
                error.extend_message(self._context_note(error))
            raise error
        self._arm_idle_timeout(resp)
        return resp

    def _context_note(self, error: UpstreamStatus) -> str:
        body = error.body()["error"]
        needed, available = body.get("n_prompt_tokens"), body.get("n_ctx")
        size = ""
        if isinstance(needed, int) and isinstance(available, int):
            size = f" The request has {needed} tokens; the model's context holds {available}."
        return f"{size} {self.context_hint}"

    def _arm_idle_timeout(self, resp: aiohttp.ClientResponse) -> None:
        """From now on, each silence longer than idle_timeout fails the body read.

        aiohttp's own per-read timer on the connection does this at no cost per
        chunk; until now it held first_byte_timeout, the limit for the headers.
        """
        connection = resp.connection
        if connection is not None and connection.protocol is not None:
            connection.protocol.read_timeout = self.config.idle_timeout
            connection.protocol.start_timeout()

    def _circuit_open(self) -> CircuitOpen:
        if self.breaker.state is CircuitState.HALF_OPEN:
            wait = 1.0
            when = "a probe request is checking now whether it is back; try again in a moment"
        else:
            wait = self.breaker.retry_after()
            when = f"lmbridge fails fast for {wait:.0f}s more, then tries it again"
        error = CircuitOpen(
            f"The upstream at {self.shown_url} failed {self.breaker.failure_threshold} times in a "
            f"row; {when}. Check that the model server is running (LM Studio: "
            "`lms server start`)."
        )
        error.retry_after = wait
        return error

    def _count_failure(self, reason: str) -> None:
        self.metrics.upstream_failures.labels(reason).inc()

    def _failed(self, reason: str) -> None:
        """A body that broke off after ``open()`` succeeded: the call failed after all."""
        self._count_failure(reason)
        self.breaker.record_failure()

    async def _read_error(self, resp: aiohttp.ClientResponse) -> bytes:
        try:
            async with asyncio.timeout(self.config.idle_timeout):
                return await resp.read()
        except (TimeoutError, aiohttp.ClientError):
            return b""
        finally:
            resp.release()

    # --- bodies -----------------------------------------------------------

    async def read_body(self, resp: aiohttp.ClientResponse) -> bytes:
        """The whole body of a response from ``open()``, decoded if the upstream
        compressed it although asked not to."""
        try:
            raw = await resp.read()
        except aiohttp.ClientError as exc:
            raise self._body_error(exc) from exc
        finally:
            resp.release()
        encoding = resp.headers.get("Content-Encoding")
        if encoding is None or encoding == "identity":
            return raw
        return self._decoded(raw, encoding)

    def _decoded(self, raw: bytes, encoding: str) -> bytes:
        self._check_encoding(encoding)
        # wbits 32 + 15: a gzip or a zlib header, whichever is there.
        return self._inflate(zlib.decompressobj(47), raw, encoding)

    def _check_encoding(self, encoding: str) -> None:
        if encoding.lower() not in ("gzip", "x-gzip", "deflate"):
            raise UpstreamUnavailable(
                f"The upstream at {self.shown_url} answered with Content-Encoding {encoding!r}, "
                "which lmbridge does not decode (it asks for identity)."
            )

    def _inflate(self, decoder: Any, data: bytes, encoding: str) -> bytes:
        try:
            return bytes(decoder.decompress(data))
        except zlib.error as exc:
            raise UpstreamUnavailable(
                f"The upstream at {self.shown_url} sent a {encoding} body that does not "
                f"decompress: {exc}"
            ) from None

    async def iter_chunks(self, resp: aiohttp.ClientResponse) -> AsyncGenerator[bytes, None]:
        """Body chunks as they arrive. Stopping early closes the connection, which is
        what tells the upstream to stop generating."""
        content = resp.content
        complete = False
        encoding = resp.headers.get("Content-Encoding") or "identity"
        decoder = None
        try:
            if encoding != "identity":
                self._check_encoding(encoding)
                decoder = zlib.decompressobj(47)
            while True:
                try:
                    chunk = await content.readany()
                except aiohttp.ClientError as exc:
                    raise self._body_error(exc) from exc
                if not chunk:
                    complete = True
                    return
                if decoder is not None:
                    chunk = self._inflate(decoder, chunk, encoding)
                    if not chunk:
                        continue
                yield chunk
        finally:
            if complete:
                resp.release()
            else:
                resp.close()

    def _body_error(self, exc: aiohttp.ClientError) -> UpstreamError:
        if isinstance(exc, aiohttp.ServerTimeoutError):
            self._failed("idle_timeout")
            return UpstreamTimeout(
                f"The upstream at {self.shown_url} sent nothing for "
                f"{self.config.idle_timeout:g}s (upstream.idle_timeout)."
            )
        self._failed("body")
        return UpstreamUnavailable(
            f"The upstream at {self.shown_url} broke off its answer: {_exc_text(exc)}"
        )

    # --- JSON helpers for lmbridge's own calls ----------------------------

    async def get_json(self, path: str, *, route: str = "models") -> Any:
        resp = await self.open("GET", path, route=route)
        return self._json(path, await self.read_body(resp))

    async def post_json(self, path: str, body: Any, *, route: str = "models") -> Any:
        """A POST of lmbridge's own (a model load): sent again only when no connection
        could be made, since a load that reached the upstream may be under way."""
        resp = await self.open("POST", path, body=dumps_bytes(body), route=route, idempotent=False)
        return self._json(path, await self.read_body(resp))

    def _json(self, path: str, raw: bytes) -> Any:
        try:
            return loads(raw)
        except ValueError as exc:
            raise UpstreamError(
                f"The upstream at {self.shown_url} answered {path} with something that is not JSON."
            ) from exc


def _status_error(resp: aiohttp.ClientResponse, raw: bytes) -> UpstreamStatus:
    return UpstreamStatus(
        resp.status,
        raw,
        resp.headers.get("Content-Type"),
        headers=tuple(resp.headers.items()),
    )


def _exc_text(exc: BaseException) -> str:
    text = str(exc).strip()
    return text or type(exc).__name__


def _connect_message(url: str, exc: aiohttp.ClientConnectionError) -> str:
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return f"{start_hint(url)} (connection timed out)"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return (
            f"The upstream at {url} closed the connection without answering. "
            "Check that it is an OpenAI-compatible server and that it is healthy."
        )
    return f"{start_hint(url)} ({_exc_text(exc)})"
