"""Structured outputs on ``/v1/chat/completions``: a request whose ``response_format``
asks for JSON is checked before it goes upstream (``plan``), its format sent as the
upstream kind takes it, and its answer read and validated (``settle``): cleaned of
fences and prose, asked for once more with the validation errors when it does not
validate (``models.schema_retry``), and reported (``X-LMBridge-Schema``, the log line,
``lmbridge_schema_answers``). The checks themselves are pure, in ``structured.py``.

A stream asked for JSON is answered once the answer is checked: the upstream call is a
whole completion, sent to the client as the chunks of a stream (docs/compatibility.md,
"Structured outputs").
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.chat_upstream import CHAT_PATH, request_bytes
from proxy.errors import BadRequest, SchemaMismatch, UpstreamError
from proxy.event_stream import EventStream
from proxy.jsontext import dumps_bytes, loads
from proxy.keys import CATALOG, CONFIG, METRICS, REQUEST_ID, SCHEMA
from proxy.model_records import ModelInfo
from proxy.queues import note_wait
from proxy.structured import (
    AnswerSchema,
    Outcome,
    SchemaProblem,
    Verdict,
    completion_chunks,
    feedback,
    first_message,
    plan_answer,
    summed_usage,
)
from proxy.upstreams import Route

log = logging.getLogger("lmbridge.schema")


@dataclass(frozen=True, slots=True)
class SchemaPlan:
    """What one request asked for, and how it is answered."""

    schema: AnswerSchema
    retry: bool  # ask once more when the answer does not validate
    stream: bool  # the client asked for a stream: it gets the checked answer as one
    include_usage: bool


def plan(
    request: web.Request,
    body: dict[str, Any],
    model: ModelInfo,
    switches: Mapping[str, bool],
) -> SchemaPlan | None:
    """The plan of a request that asks for JSON (None: it does not), with its body made
    ready for the upstream in place; a 400 for a schema answers cannot be checked with."""
    listed = request.app[CATALOG].cached
    try:
        schema = plan_answer(body, lmstudio=listed is not None and listed.dialect != "openai")
    except SchemaProblem as exc:
        raise BadRequest(str(exc), param=exc.param) from None
    if schema is None:
        return None
    settings = request.app[CONFIG].models.settings_for(model.id)
    retry = bool(settings.schema_retry) and switches.get("schema_retry", True)
    stream = body.get("stream") is True
    options = body.pop("stream_options", None) if stream else None
    body.pop("stream", None)
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return SchemaPlan(schema, retry, stream, include_usage)


async def settle(
    request: web.Request,
    plan: SchemaPlan,
    body: dict[str, Any],
    content: bytes,
    model: str,
    route: Route,
    normalise: Any,
    headers: dict[str, str],
) -> bytes:
    """The answer's body as the client gets it: its JSON cleaned, or the answer asked
    for once more; SchemaMismatch when that one does not validate either.
    ``normalise`` reads a body's text calls and thinking (what passthrough does first);
    ``headers`` go upstream with the second call, as with the first."""
    completion = _completion(content)
    message = first_message(completion)
    if message is None or message.get("tool_calls"):
        return content  # not an answer in JSON: a tool call, or no message at all
    answer = message.get("content")
    verdict = plan.schema.check(answer)
    outcome: Outcome = "valid"
    if not verdict.valid and plan.retry:
        log.info(
            "the answer did not match the schema (%d error(s)); asking once more",
            len(verdict.errors),
            extra={"fields": {"request_id": request[REQUEST_ID], "model": model}},
        )
        again = await _ask_again(request, body, answer, verdict, route, normalise, headers)
        again["usage"] = summed_usage(completion.get("usage"), again.get("usage"))
        completion, message = again, first_message(again)
        answer = message.get("content") if message is not None else None
        verdict = plan.schema.check(answer)
        if not verdict.valid:
            _report(request, model, "invalid")
            raise SchemaMismatch(
                "The model's answer did not match the JSON schema of response_format, also "
                f"when asked again with the errors: {verdict.summary()}",
                param="response_format",
            )
        outcome = "valid_after_retry"
        content = b""  # another answer: written below
    elif not verdict.valid:
        outcome = "invalid"
    _report(request, model, outcome)
    if message is not None and verdict.text is not None and verdict.text != answer:
        message["content"] = verdict.text
        content = b""
    return content or dumps_bytes(completion)


async def send_as_stream(
    request: web.Request, plan: SchemaPlan, content: bytes
) -> web.StreamResponse:
    """The checked answer as the stream the client asked for."""
    completion = _completion(content)
    stream = EventStream(request, "chat")
    await stream.send(completion_chunks(completion, include_usage=plan.include_usage))
    return await stream.finish()


async def _ask_again(
    request: web.Request,
    body: dict[str, Any],
    answer: Any,
    verdict: Verdict,
    route: Route,
    normalise: Any,
    headers: dict[str, str],
) -> dict[str, Any]:
    """The request once more, with the answer and its errors: a call of its own, in a
    slot of the model taken like the first (its place in line kept)."""
    follow = {**body, "messages": [*body["messages"], *feedback(answer, verdict)]}
    raw = request_bytes(follow, stream=False)
    async with route:
        resp = await route.open("POST", CHAT_PATH, body=raw, headers=headers, route=CHAT_PATH)
        content = await route.read_body(resp)
    note_wait(request, route)
    return _completion(normalise(content))


def _completion(content: bytes) -> dict[str, Any]:
    try:
        completion = loads(content)
    except ValueError:
        completion = None
    if not isinstance(completion, dict):
        raise UpstreamError("The upstream answered a request for JSON with a body not JSON.")
    return completion


def _report(request: web.Request, model: str, outcome: Outcome) -> None:
    request[SCHEMA] = "invalid" if outcome == "invalid" else "valid"
    request.app[METRICS].schema_answers.labels(model, outcome).inc()
