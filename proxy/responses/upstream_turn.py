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
    if prepared.profile.describe_tools and settings.get("tools"):
        settings, messages = prompt_shape.described(settings, messages)
    return render.chat_body_bytes(settings, messages, stream=stream)


async def open_chat(
    upstream: Route,
    prepared: Prepared,
    *,
    stream: bool,
    extra: list[dict[str, Any]] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Any:
    """Send the chat request, dropping the oldest turns while the upstream says the
    context is exceeded (``truncation: "auto"`` only)."""
    history = fit_history(prepared)
    while True:
        body = chat_body(prepared, history, stream=stream, extra=extra, overrides=overrides)
        try:
            return await upstream.open("POST", CHAT_PATH, body=body, route=ROUTE)
        except UpstreamStatus as exc:
            can_shorten = exc.context_overflow and prepared.request.truncation == "auto"
            if not (can_shorten and history):
                raise
            history = history[len(history) // 2 + (len(history) % 2) :]


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
    resp = await open_chat(upstream, prepared, stream=True, extra=extra, overrides=overrides)
    async with contextlib.aclosing(chat_upstream.read_chunks(upstream, resp)) as chunks:
        async for chunk in chunks:
            yield chunk
