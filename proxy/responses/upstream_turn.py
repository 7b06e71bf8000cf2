"""A turn sent upstream: the chat request rendered from a prepared turn, fitted to the
model's context (``truncation: "auto"``: the oldest turns are dropped first, by the
token estimate and again while the upstream says the context is exceeded), then read
whole or chunk by chunk."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import Any

from proxy import chat_upstream
from proxy.errors import UpstreamStatus
from proxy.jsontext import dumps
from proxy.responses import prompt_shape, render
from proxy.responses.runs import Prepared
from proxy.upstreams import Route

log = logging.getLogger("lmbridge.responses")

CHAT_PATH = chat_upstream.CHAT_PATH
ROUTE = "/v1/responses"


def chat_body(
    prepared: Prepared,
    history: list[str],
    *,
    stream: bool,
    extra: list[dict[str, Any]] | None = None,
    overrides: dict[str, Any] | None = None,
    describe: bool = True,
) -> bytes:
    messages = render.join_message_arrays(
        [
            dumps(prepared.system),
            *history,
            dumps([*prepared.new_messages, *(extra or ())]),
        ]
    )
    settings = {**prepared.settings, **overrides} if overrides else prepared.settings
    messages = prompt_shape.merge_leading_system(messages)
    if describe and prepared.profile.describe_tools and settings.get("tools"):
        settings, messages = prompt_shape.described(settings, messages)
    return render.chat_body_bytes(settings, messages, stream=stream)


class _Attempt:
    """What a turn sends upstream, narrowed while the upstream says the context is
    exceeded: first without the tools described in the system message (a template that
    cannot render tools then drops them, as it would without lmbridge), then without the
    oldest turns (``truncation: "auto"`` only)."""

    def __init__(self, prepared: Prepared, overrides: dict[str, Any] | None) -> None:
        self.prepared = prepared
        self.history = fit_history(prepared)
        settings = {**prepared.settings, **overrides} if overrides else prepared.settings
        self.describe = prepared.profile.describe_tools and bool(settings.get("tools"))

    def narrowed(self, exc: UpstreamStatus) -> bool:
        """Whether there is a smaller request to try after ``exc``."""
        if not exc.context_overflow:
            return False
        if self.describe:
            log.warning(
                "the tools described for model %s do not fit its context: sent without "
                "them (its template drops them; the model does not see them)",
                self.prepared.model.id,
            )
            self.describe = False
            return True
        if self.prepared.request.truncation != "auto" or not self.history:
            return False
        self.history = self.history[len(self.history) // 2 + (len(self.history) % 2) :]
        return True


async def open_chat(
    upstream: Route,
    prepared: Prepared,
    *,
    stream: bool,
    extra: list[dict[str, Any]] | None = None,
    overrides: dict[str, Any] | None = None,
    attempt: _Attempt | None = None,
) -> Any:
    """Send the chat request, narrowed while the upstream says the context is exceeded."""
    attempt = attempt or _Attempt(prepared, overrides)
    while True:
        body = chat_body(
            prepared,
            attempt.history,
            stream=stream,
            extra=extra,
            overrides=overrides,
            describe=attempt.describe,
        )
        try:
            return await upstream.open("POST", CHAT_PATH, body=body, route=ROUTE)
        except UpstreamStatus as exc:
            if not attempt.narrowed(exc):
                raise


def fit_history(prepared: Prepared) -> list[str]:
    history = prepared.history
    context = prepared.model.context_length
    if prepared.request.truncation != "auto" or context is None or not history:
        return history
    fixed = render.estimate_tokens(dumps(prepared.system + prepared.new_messages))
    budget = context - (prepared.request.max_output_tokens or min(1024, context // 4)) - fixed
    tokens = list(prepared.history_tokens)
    start = 0
    while start < len(history) and sum(tokens[start:]) > budget:
        start += 1
    if start:
        log.info("truncation: dropped the %d oldest turn(s) to fit %d tokens", start, context)
    return history[start:]


async def complete_chat(
    upstream: Route,
    prepared: Prepared,
    extra: list[dict[str, Any]] | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    resp = await open_chat(upstream, prepared, stream=False, extra=extra, overrides=overrides)
    return await chat_upstream.read_completion(upstream, resp)


async def stream_chat(
    upstream: Route,
    prepared: Prepared,
    extra: list[dict[str, Any]] | None = None,
    overrides: dict[str, Any] | None = None,
) -> AsyncGenerator[dict[str, Any], None]:
    attempt = _Attempt(prepared, overrides)
    while True:
        resp = await open_chat(
            upstream, prepared, stream=True, extra=extra, overrides=overrides, attempt=attempt
        )
        async with contextlib.aclosing(chat_upstream.read_chunks(upstream, resp)) as chunks:
            try:
                # A stream may open with 200 and report the context exceeded in its first
                # event (llama.cpp): nothing was read yet, so it is narrowed like a status.
                first = await anext(chunks)
            except StopAsyncIteration:
                return
            except UpstreamStatus as exc:
                if attempt.narrowed(exc):
                    continue
                raise
            yield first
            async for chunk in chunks:
                yield chunk
            return
