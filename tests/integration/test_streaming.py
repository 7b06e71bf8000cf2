"""Streamed chat completions: relayed as they arrive, unchanged, and always well-ended."""

from __future__ import annotations

import asyncio
import json

from proxy.chat_stream import StreamObserver
from tests.fake_upstream import CHAT, Reply, chunk, text_stream

REQUEST = {"model": "test-model", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


def data_lines(raw: bytes) -> list[bytes]:
    return [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")]


async def test_stream_is_relayed_byte_for_byte(proxy, fake_upstream):
    """Each upstream event reaches the client unchanged, followed by [DONE]."""
    events = text_stream("Hel", "lo", usage=True)
    fake_upstream.add_reply(CHAT, Reply(stream=events))
    asked = {**REQUEST, "stream_options": {"include_usage": True}}
    resp = await proxy.post(CHAT, json=asked)
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    raw = await resp.read()
    expected = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    assert raw == expected + b"data: [DONE]\n\n"
    assert fake_upstream.requests_to(CHAT)[-1].body == {**asked, "model": "test-model"}


async def test_usage_a_client_did_not_ask_for_is_counted_and_kept_from_it(proxy, fake_upstream):
    """A stream whose client asked no usage: lmbridge asks for it upstream (usage
    accounting counts every stream's tokens) and the client gets every other event
    unchanged, without the usage chunk, as from OpenAI."""
    events = text_stream("Hel", "lo", usage=True)
    fake_upstream.add_reply(CHAT, Reply(stream=events))
    resp = await proxy.post(CHAT, json=REQUEST)
    raw = await resp.read()
    sent = [e for e in events if e.get("choices")]
    expected = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in sent)
    assert raw == expected + b"data: [DONE]\n\n"
    upstream_body = fake_upstream.requests_to(CHAT)[-1].body
    assert upstream_body["stream_options"] == {"include_usage": True}
    usage = next(e["usage"] for e in events if e.get("usage"))
    tokens = 'lmbridge_tokens_total{direction="in",model="test-model"}'
    metrics = await (await proxy.get("/metrics")).text()
    assert f"{tokens} {float(usage['prompt_tokens'])}" in metrics


async def test_events_are_relayed_as_they_arrive(proxy, fake_upstream):
    """The first event reaches the client while the upstream still holds the rest."""
    release = asyncio.Event()
    fake_upstream.add_reply(
        CHAT, Reply(stream=[chunk("first"), release, chunk("second"), chunk(finish="stop")])
    )
    resp = await proxy.post(CHAT, json=REQUEST)
    first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
    assert b'"first"' in first
    release.set()
    rest = await resp.read()
    assert b'"second"' in rest and rest.endswith(b"data: [DONE]\n\n")


async def test_client_disconnect_cancels_the_upstream_request(proxy, fake_upstream):
    """When the client goes away mid-stream, the upstream connection is closed at once."""
    fake_upstream.add_reply(CHAT, Reply(stream=[chunk("a")], stall=True))
    resp = await proxy.post(CHAT, json=REQUEST)
    await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
    resp.close()
    await asyncio.wait_for(fake_upstream.cancelled.wait(), 5)


async def test_stream_cut_before_finish_ends_with_an_error_event(proxy, fake_upstream):
    """A stream broken off mid-answer ends with an OpenAI-shaped error event, not silence."""
    fake_upstream.add_reply(CHAT, Reply(stream=[chunk("partial")], cut=True))
    resp = await proxy.post(CHAT, json=REQUEST)
    assert resp.status == 200
    lines = data_lines(await resp.read())
    assert b'"partial"' in lines[0]
    error = json.loads(lines[-1])["error"]
    assert error["code"] == "upstream_unavailable"
    assert "interrupted" in error["message"]


async def test_stream_cut_after_finish_gets_done(proxy, fake_upstream):
    """A stream that finished its answer but closed without [DONE] gets one."""
    fake_upstream.add_reply(CHAT, Reply(stream=text_stream("ok"), done=False))
    resp = await proxy.post(CHAT, json=REQUEST)
    raw = await resp.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    assert b'"error"' not in raw


async def test_interrupted_stream_without_finish_reason_is_relayed(proxy, fake_upstream):
    """llama.cpp's interrupted stream ([DONE] with no finish_reason) passes as it is."""
    fake_upstream.add_reply(
        CHAT, Reply(stream=[chunk(role="assistant", content=""), chunk("half")])
    )
    resp = await proxy.post(CHAT, json=REQUEST)
    lines = data_lines(await resp.read())
    assert lines[-1] == b"[DONE]"
    assert lines.count(b"[DONE]") == 1
    assert all(b'"error"' not in line for line in lines)


async def test_tool_call_deltas_that_repeat_id_and_name_pass_unchanged(proxy, fake_upstream):
    """llama-cpp-python repeats id, type and name in every tool-call delta: relayed as sent."""
    call = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    deltas = []
    for piece in ('{"city"', ': "Paris"}'):
        c = json.loads(json.dumps(call))
        c["function"]["arguments"] = piece
        deltas.append(chunk(tool_calls=[c]))
    events = [chunk(role="assistant"), *deltas, chunk(finish="tool_calls")]
    fake_upstream.add_reply(CHAT, Reply(stream=events))
    resp = await proxy.post(CHAT, json=REQUEST)
    lines = data_lines(await resp.read())
    assert [json.loads(line) for line in lines[:-1]] == events


async def test_crlf_framed_stream_passes_unchanged(proxy, fake_upstream):
    """Upstreams that frame events with CRLF are relayed unchanged and terminated once."""
    raw_events = [b"data: " + json.dumps(e).encode() + b"\r\n\r\n" for e in text_stream("x")]
    fake_upstream.add_reply(CHAT, Reply(stream=[*raw_events, b"data: [DONE]\r\n\r\n"], done=False))
    resp = await proxy.post(CHAT, json=REQUEST)
    raw = await resp.read()
    assert raw == b"".join(raw_events) + b"data: [DONE]\r\n\r\n"


async def test_idle_upstream_stream_times_out(make_proxy, fake_upstream):
    """An upstream that goes silent mid-stream longer than idle_timeout ends the stream
    with an upstream_timeout error event."""
    proxy = await make_proxy(upstream__idle_timeout=0.2)
    fake_upstream.add_reply(CHAT, Reply(stream=[chunk("a")], stall=True))
    resp = await proxy.post(CHAT, json=REQUEST)
    lines = data_lines(await asyncio.wait_for(resp.read(), 5))
    assert json.loads(lines[-1])["error"]["code"] == "upstream_timeout"
    await asyncio.wait_for(fake_upstream.cancelled.wait(), 5)


async def test_usage_and_first_token_time_reach_metrics(proxy, fake_upstream):
    """Token counts from the usage chunk and the time to first token are recorded."""
    fake_upstream.add_reply(CHAT, Reply(stream=text_stream("a", "b", usage=True)))
    resp = await proxy.post(CHAT, json=REQUEST)
    await resp.read()
    metrics = await (await proxy.get("/metrics")).text()
    assert 'lmbridge_tokens_total{direction="out",model="test-model"} 2.0' in metrics
    assert 'lmbridge_tokens_total{direction="in",model="test-model"} 5.0' in metrics
    assert 'lmbridge_time_to_first_token_seconds_count{model="test-model"} 1.0' in metrics


async def test_an_error_event_inside_a_stream_is_relayed_and_counted(proxy, fake_upstream, caplog):
    """An upstream that reports a failure inside its 200 stream (llama.cpp does, when a
    generation fails) reaches the client unchanged; the operator sees it in the metrics
    and the log, which names the error's type and code but never its message."""
    error = {
        "error": {
            "message": "the prompt says: my secret",
            "type": "server_error",
            "code": "generation_failed",
        }
    }
    fake_upstream.add_reply(CHAT, Reply(stream=[chunk("partial"), error]))
    resp = await proxy.post(CHAT, json=REQUEST)
    assert resp.status == 200
    lines = data_lines(await resp.read())
    assert json.loads(lines[1]) == error
    metrics = await (await proxy.get("/metrics")).text()
    assert 'lmbridge_upstream_failures_total{reason="stream_error"} 1.0' in metrics
    assert "error inside its stream (server_error, generation_failed)" in caplog.text
    assert "my secret" not in caplog.text


async def test_a_failure_after_the_stream_began_ends_it_with_an_error_event(
    proxy, fake_upstream, monkeypatch, caplog
):
    """Once the status and first events are out, an error (here a bug, injected: nothing
    else fails there) cannot become an error response: the stream ends with an error
    event the SDKs raise, instead of leaving the client waiting, and the log has it."""
    calls = 0
    feed = StreamObserver.feed

    def failing_feed(self: StreamObserver, chunk: bytes) -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("injected")
        return feed(self, chunk)

    monkeypatch.setattr(StreamObserver, "feed", failing_feed)
    release = asyncio.Event()
    fake_upstream.add_reply(
        CHAT, Reply(stream=[chunk("a"), release, chunk("b"), chunk(finish="stop")])
    )
    resp = await proxy.post(CHAT, json=REQUEST)
    assert resp.status == 200
    await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
    release.set()
    lines = data_lines(await asyncio.wait_for(resp.read(), 5))
    error = json.loads(lines[-1])["error"]
    assert error["code"] == "internal_error"
    assert "request id" in error["message"]
    assert "RuntimeError: injected" in caplog.text
