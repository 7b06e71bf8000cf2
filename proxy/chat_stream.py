"""What the relay needs to know about a chat/completions SSE stream it passes on.

``StreamObserver`` is fed the same bytes that are written to the client and
notes, without changing them: when the first data event came, whether a
``finish_reason`` and a ``[DONE]`` were seen, and the usage chunk. It parses
JSON only for the few events that can carry usage, so that a 20-chunk stream
costs a handful of microseconds. No I/O.
"""

from __future__ import annotations

import re
from typing import Any

from proxy.jsontext import loads
from proxy.sse import SSEEvent, SSEParser

_FINISH = re.compile(rb'"finish_reason"\s*:\s*"')
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')


def usage_counts(body: bytes) -> tuple[int, int]:
    """Prompt and completion tokens of a chat or completions body, without parsing it.

    The keys are looked for after the last ``"usage"``; inside JSON strings quotes are
    escaped, so generated text cannot imitate them."""
    start = body.rfind(b'"usage"')
    if start < 0:
        return 0, 0
    prompt = _PROMPT_TOKENS.search(body, start)
    completion = _COMPLETION_TOKENS.search(body, start)
    return (
        int(prompt.group(1)) if prompt else 0,
        int(completion.group(1)) if completion else 0,
    )


_USAGE = re.compile(rb'"usage"\s*:\s*\{')


class StreamObserver:
    __slots__ = ("_parser", "data_events", "done", "finished", "upstream_error", "usage")

    def __init__(self) -> None:
        self._parser = SSEParser()
        self.data_events = 0
        self.done = False
        self.finished = False
        self.usage: dict[str, Any] | None = None
        self.upstream_error: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> int:
        """Note the events completed by this chunk; returns how many data events (not
        counting ``[DONE]``) it completed."""
        before = self.data_events
        for event in self._parser.feed(chunk):
            self._note(event)
        return self.data_events - before

    def finish(self) -> None:
        for event in self._parser.finish():
            self._note(event)

    def _note(self, event: SSEEvent) -> None:
        data = event.data
        if event.is_done:
            self.done = True
            return
        self.data_events += 1
        if _FINISH.search(data):
            self.finished = True
        if _USAGE.search(data) or b'"error"' in data:
            try:
                parsed = loads(data)
            except ValueError:
                return
            if isinstance(parsed, dict):
                if isinstance(parsed.get("usage"), dict):
                    self.usage = parsed["usage"]
                if isinstance(parsed.get("error"), dict | str):
                    self.upstream_error = {"error": parsed["error"]}


def ask_for_usage(body: dict[str, Any]) -> bool:
    """A streamed chat or text completion request whose client did not ask for usage
    gets it asked for upstream (usage accounting counts every stream's tokens); whether
    it was, so that the usage chunk is kept from the client (``UsageFilter``)."""
    if body.get("stream") is not True:
        return False
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    body["stream_options"] = {**(options if isinstance(options, dict) else {})}
    body["stream_options"]["include_usage"] = True
    return True


class UsageFilter:
    """The bytes of a stream without its usage-only events (``"choices": []`` with a
    ``usage``), for a client that did not ask for them. Events pass whole: the part of a
    read after its last complete event waits for the next read. A stream framed with
    CR LF is left as it is (its usage event then reaches the client, which the OpenAI
    SDKs accept)."""

    __slots__ = ("_off", "_rest")

    def __init__(self) -> None:
        self._rest = b""
        self._off = False

    def feed(self, chunk: bytes) -> bytes:
        if self._off:
            return chunk
        if b"\r" in chunk:
            self._off = True
            rest, self._rest = self._rest, b""
            return rest + chunk
        data = self._rest + chunk if self._rest else chunk
        end = data.rfind(b"\n\n") + 2
        if end == 1:
            self._rest = data
            return b""
        whole, self._rest = (data, b"") if end == len(data) else (data[:end], data[end:])
        if b'"usage"' not in whole:
            return whole
        events = whole.split(b"\n\n")
        kept = [e for e in events if not _usage_only(e)]
        return whole if len(kept) == len(events) else b"\n\n".join(kept)

    def finish(self) -> bytes:
        rest, self._rest = self._rest, b""
        return b"" if _usage_only(rest) else rest


def _usage_only(event: bytes) -> bool:
    return b'"usage"' in event and (b'"choices":[]' in event or b'"choices": []' in event)
