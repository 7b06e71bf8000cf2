"""Structured outputs on /v1/chat/completions, through the real openai SDK: answers
asked for with a JSON schema come back clean and valid, are asked for once more with
the validation errors, or fail with a clear error, never a parse exception."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI
from pydantic import BaseModel

from proxy.keys import METRICS
from tests.fake_upstream import CHAT, Reply, chat_completion, chunk

MESSAGES = [{"role": "user", "content": "Who wrote the first program?"}]
ADA = '{"name": "Ada Lovelace", "born": 1815}'


class Person(BaseModel):
    name: str
    born: int


@pytest.fixture
async def client(proxy):
    """The openai SDK, pointed at the proxy, retrying as it does by default."""
    async with AsyncOpenAI(
        base_url=str(proxy.make_url("/v1")), api_key="unused", max_retries=2
    ) as client:
        yield client


def answers(fake_upstream: Any, *contents: str) -> None:
    for content in contents:
        fake_upstream.add_reply(CHAT, Reply(json=chat_completion(content)))


def outcomes(proxy: Any, outcome: str) -> float | None:
    return proxy.server.app[METRICS].registry.get_sample_value(
        "lmbridge_schema_answers_total", {"model": "test-model", "outcome": outcome}
    )


async def parse(client: AsyncOpenAI) -> Any:
    return await client.chat.completions.with_raw_response.parse(
        model="test-model", messages=MESSAGES, response_format=Person
    )


async def test_a_valid_answer_parses_and_is_reported_valid(client, proxy, fake_upstream):
    """chat.completions.parse with a pydantic model: the object, X-LMBridge-Schema: valid,
    one upstream call whose response_format is the SDK's json_schema, unchanged."""
    answers(fake_upstream, ADA)
    raw = await parse(client)
    assert raw.headers["X-LMBridge-Schema"] == "valid"
    assert raw.parse().choices[0].message.parsed == Person(name="Ada Lovelace", born=1815)
    (seen,) = fake_upstream.requests_to(CHAT)
    sent = seen.body["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["strict"] is True
    assert sent["json_schema"]["schema"]["required"] == ["name", "born"]
    assert outcomes(proxy, "valid") == 1


@pytest.mark.parametrize(
    "content",
    [
        f"```json\n{ADA}\n```",
        f"Sure! Here is the JSON you asked for:\n\n{ADA}",
        f"<think>The user wants {{a person}}.</think>\n```json\n{ADA}\n```",
    ],
)
async def test_json_in_fences_or_after_prose_comes_back_clean(client, fake_upstream, content):
    """Fenced, after prose, after thinking in tags: the content is the JSON alone."""
    answers(fake_upstream, content)
    raw = await parse(client)
    message = raw.parse().choices[0].message
    assert message.content == ADA
    assert message.parsed == Person(name="Ada Lovelace", born=1815)
    assert raw.headers["X-LMBridge-Schema"] == "valid"
    assert len(fake_upstream.requests_to(CHAT)) == 1


async def test_an_invalid_answer_is_asked_for_once_more_with_the_errors(
    client, proxy, fake_upstream
):
    """Garbage first: the upstream gets the answer back with the errors, the client the
    second (valid) answer, its usage the sum of both calls."""
    answers(fake_upstream, '{"name": "Ada Lovelace", "born": "1815"}', ADA)
    raw = await parse(client)
    completion = raw.parse()
    assert completion.choices[0].message.parsed == Person(name="Ada Lovelace", born=1815)
    assert raw.headers["X-LMBridge-Schema"] == "valid"
    first, second = fake_upstream.requests_to(CHAT)
    assert second.body["messages"][: len(MESSAGES)] == MESSAGES
    assistant, user = second.body["messages"][len(MESSAGES) :]
    assert assistant == {"role": "assistant", "content": '{"name": "Ada Lovelace", "born": "1815"}'}
    assert "at $.born: '1815' is not of type 'integer'" in user["content"]
    assert second.body["response_format"] == first.body["response_format"]
    assert second.headers["X-Request-ID"] == first.headers["X-Request-ID"]
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.total_tokens) == (10, 14)
    assert outcomes(proxy, "valid_after_retry") == 1


async def test_garbage_twice_is_a_clear_error_not_a_parse_exception(client, proxy, fake_upstream):
    """Still invalid when asked again: the SDK raises APIStatusError 502 schema_mismatch
    naming the errors, and does not retry on its own (X-Should-Retry: false)."""
    answers(fake_upstream, "I am not sure who that was.", "Still not sure, sorry.")
    with pytest.raises(openai.APIStatusError) as caught:
        await parse(client)
    error = caught.value
    assert error.status_code == 502
    assert error.response.headers["X-LMBridge-Schema"] == "invalid"
    assert error.response.headers["X-Should-Retry"] == "false"
    body = error.response.json()["error"]
    assert body["code"] == "schema_mismatch"
    assert body["type"] == "upstream_error"
    assert body["param"] == "response_format"
    assert "also when asked again" in body["message"]
    assert "The answer is not JSON: Expecting value at line 1 column 1." in body["message"]
    assert len(fake_upstream.requests_to(CHAT)) == 2
    assert outcomes(proxy, "invalid") == 1


async def test_with_retry_off_the_answer_comes_as_it_is_marked_invalid(make_proxy, fake_upstream):
    """models.schema_retry = false: one call, the answer as it came, the header says
    invalid."""
    proxy = await make_proxy(models__schema_retry=False)
    answers(fake_upstream, "not json")
    resp = await proxy.post(
        CHAT, json={"model": "test-model", "messages": MESSAGES, "response_format": fmt()}
    )
    assert resp.status == 200
    assert resp.headers["X-LMBridge-Schema"] == "invalid"
    assert (await resp.json())["choices"][0]["message"]["content"] == "not json"
    assert len(fake_upstream.requests_to(CHAT)) == 1


async def test_a_model_table_and_the_request_switch_turn_retry_off(make_proxy, fake_upstream):
    """[models."test-*"] schema_retry = false, and "lmbridge": {"schema_retry": false}."""
    for overrides, switches in (
        ({"models__test-*": {"schema_retry": False}}, None),
        ({}, {"schema_retry": False}),
    ):
        fake_upstream.seen.clear()
        proxy = await make_proxy(**overrides)
        answers(fake_upstream, "not json")
        body: dict[str, Any] = {
            "model": "test-model",
            "messages": MESSAGES,
            "response_format": fmt(),
        }
        if switches is not None:
            body["lmbridge"] = switches
        resp = await proxy.post(CHAT, json=body)
        assert resp.headers["X-LMBridge-Schema"] == "invalid"
        (seen,) = fake_upstream.requests_to(CHAT)
        assert "lmbridge" not in seen.body


def fmt(schema: Any = None) -> dict[str, Any]:
    schema = schema if schema is not None else Person.model_json_schema()
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}


@pytest.mark.parametrize(
    ("response_format", "param"),
    [
        (fmt({"type": "thing"}), "response_format.json_schema.schema"),
        (fmt({"$ref": "http://127.0.0.1:1/schema.json"}), "response_format.json_schema.schema"),
        ({"type": "json_schema", "json_schema": None}, "response_format.json_schema"),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}},
            "response_format.json_schema.schema",
        ),
    ],
)
async def test_a_schema_that_is_not_one_is_a_400_before_any_upstream_call(
    proxy, fake_upstream, response_format, param
):
    """An invalid schema: 400 invalid_request_error naming the param; nothing sent."""
    resp = await proxy.post(
        CHAT, json={"model": "test-model", "messages": MESSAGES, "response_format": response_format}
    )
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert fake_upstream.requests_to(CHAT) == []


async def test_lm_studio_gets_json_schema_for_json_object(make_proxy, fake_upstream):
    """LM Studio refuses json_object: it gets json_schema with any object; the answer is
    checked to be an object."""
    fake_upstream.lmstudio_v1 = {
        "models": [{"type": "llm", "key": "test-model", "loaded_instances": [{"id": "test-model"}]}]
    }
    proxy = await make_proxy()
    answers(fake_upstream, '```json\n{"ok": true}\n```')
    resp = await proxy.post(
        CHAT,
        json={
            "model": "test-model",
            "messages": MESSAGES,
            "response_format": {"type": "json_object"},
        },
    )
    assert resp.headers["X-LMBridge-Schema"] == "valid"
    assert (await resp.json())["choices"][0]["message"]["content"] == '{"ok": true}'
    (seen,) = fake_upstream.requests_to(CHAT)
    assert seen.body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "json_object", "schema": {"type": "object"}},
    }


async def test_other_upstreams_get_json_object_as_it_came(proxy, fake_upstream):
    """llama.cpp and OpenAI-style servers take json_object: it goes unchanged."""
    answers(fake_upstream, '{"ok": true}')
    resp = await proxy.post(
        CHAT,
        json={
            "model": "test-model",
            "messages": MESSAGES,
            "response_format": {"type": "json_object"},
        },
    )
    assert resp.headers["X-LMBridge-Schema"] == "valid"
    (seen,) = fake_upstream.requests_to(CHAT)
    assert seen.body["response_format"] == {"type": "json_object"}


async def test_a_stream_gets_the_checked_answer(client, proxy, fake_upstream):
    """chat.completions.stream with a pydantic model: the upstream is asked for a whole
    completion (retried here), the client gets a stream of the clean, valid answer with
    its usage and the header."""
    answers(fake_upstream, "no idea", f"```json\n{ADA}\n```")
    async with client.chat.completions.stream(
        model="test-model",
        messages=MESSAGES,
        response_format=Person,
        stream_options={"include_usage": True},
    ) as stream:
        assert stream._response.headers["X-LMBridge-Schema"] == "valid"  # no public accessor
        final = await stream.get_final_completion()
    assert final.choices[0].message.parsed == Person(name="Ada Lovelace", born=1815)
    assert final.choices[0].message.content == ADA
    assert final.usage is not None and final.usage.total_tokens == 14
    first, second = fake_upstream.requests_to(CHAT)
    assert "stream" not in first.body and "stream_options" not in first.body
    assert "stream" not in second.body


async def test_a_stream_still_invalid_is_an_error_before_it_begins(client, fake_upstream):
    """Streamed and still invalid: the same 502 schema_mismatch, as an HTTP error."""
    answers(fake_upstream, "no", "no again")
    with pytest.raises(openai.APIStatusError) as caught:
        async with client.chat.completions.stream(
            model="test-model", messages=MESSAGES, response_format=Person
        ) as stream:
            await stream.get_final_completion()
    assert caught.value.status_code == 502
    assert len(fake_upstream.requests_to(CHAT)) == 2


async def test_the_retry_takes_a_slot_of_the_model(make_proxy, fake_upstream):
    """With a limit on the model, the second call waits for a slot like the first: two
    waits counted, no slot left held."""
    proxy = await make_proxy(models__max_concurrent=1)
    answers(fake_upstream, "nope", ADA)
    resp = await proxy.post(
        CHAT, json={"model": "test-model", "messages": MESSAGES, "response_format": fmt()}
    )
    assert resp.status == 200
    registry = proxy.server.app[METRICS].registry
    waits = registry.get_sample_value(
        "lmbridge_model_queue_wait_seconds_count", {"model": "test-model"}
    )
    assert waits == 2
    running = registry.get_sample_value("lmbridge_model_requests_running", {"model": "test-model"})
    assert running == 0


async def test_a_tool_call_answer_is_not_checked(proxy, fake_upstream):
    """The model called a tool instead of answering: nothing to validate, no header."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    completion = chat_completion(None)
    completion["choices"][0]["message"]["tool_calls"] = [call]
    fake_upstream.add_reply(CHAT, Reply(json=completion))
    resp = await proxy.post(
        CHAT, json={"model": "test-model", "messages": MESSAGES, "response_format": fmt()}
    )
    assert resp.status == 200
    assert "X-LMBridge-Schema" not in resp.headers
    assert (await resp.json())["choices"][0]["message"]["tool_calls"][0]["id"] == "c1"


async def test_a_request_without_a_schema_streams_through_unchanged(proxy, fake_upstream):
    """No response_format: the stream is relayed as before, no header."""
    fake_upstream.add_reply(
        CHAT, Reply(stream=[chunk(role="assistant", content="hi"), chunk(finish="stop")])
    )
    resp = await proxy.post(
        CHAT, json={"model": "test-model", "messages": MESSAGES, "stream": True}
    )
    assert "X-LMBridge-Schema" not in resp.headers
    assert b'"content":"hi"' in (await resp.read()).replace(b" ", b"")
    assert json.loads(json.dumps(fake_upstream.requests_to(CHAT)[0].body))["stream"] is True


# --- the Responses API ------------------------------------------------------


async def test_responses_parse_gets_a_clean_valid_object(client, proxy, fake_upstream):
    """responses.parse with text_format: a fenced answer comes back as the parsed
    object, with X-LMBridge-Schema: valid."""
    answers(fake_upstream, f"```json\n{ADA}\n```")
    raw = await client.responses.with_raw_response.parse(
        model="test-model", input="Who wrote the first program?", text_format=Person
    )
    assert raw.headers["X-LMBridge-Schema"] == "valid"
    response = raw.parse()
    assert response.output_parsed == Person(name="Ada Lovelace", born=1815)
    assert response.output_text == ADA
    assert outcomes(proxy, "valid") == 1


async def test_responses_ask_once_more_and_store_the_final_answer_only(
    client, proxy, fake_upstream
):
    """An invalid answer: the upstream gets the errors, the response (and what is
    stored) holds the second answer alone, its usage both calls'."""
    answers(fake_upstream, '{"name": "Ada"}', ADA)
    response = await client.responses.parse(
        model="test-model", input="Who wrote the first program?", text_format=Person
    )
    assert response.output_parsed == Person(name="Ada Lovelace", born=1815)
    assert response.usage is not None and response.usage.total_tokens == 14
    _, second = fake_upstream.requests_to(CHAT)
    feedback_message = second.body["messages"][-1]
    assert feedback_message["role"] == "user"
    assert "'born' is a required property" in feedback_message["content"]
    stored = await client.responses.retrieve(response.id)
    assert [item.type for item in stored.output] == ["message"]
    assert stored.output_text == ADA
    assert outcomes(proxy, "valid_after_retry") == 1


async def test_responses_still_invalid_is_a_clear_error(client, fake_upstream):
    """Garbage twice: APIStatusError 502 schema_mismatch, not a parse exception; the
    response is stored failed."""
    answers(fake_upstream, "hmm", "hmm again")
    with pytest.raises(openai.APIStatusError) as caught:
        await client.responses.parse(
            model="test-model", input="Who wrote the first program?", text_format=Person
        )
    assert caught.value.status_code == 502
    body = caught.value.response.json()["error"]
    assert body["code"] == "schema_mismatch"
    assert "stored with status 'failed'" in body["message"]
    assert caught.value.response.headers["X-LMBridge-Schema"] == "invalid"
    assert len(fake_upstream.requests_to(CHAT)) == 2


async def test_responses_stream_parses_the_checked_answer(client, fake_upstream):
    """responses.stream with text_format: the final response parses, the upstream was
    asked for a whole completion."""
    answers(fake_upstream, "no", ADA)
    async with client.responses.stream(
        model="test-model", input="Who wrote the first program?", text_format=Person
    ) as stream:
        final = await stream.get_final_response()
    assert final.output_parsed == Person(name="Ada Lovelace", born=1815)
    assert all("stream" not in seen.body for seen in fake_upstream.requests_to(CHAT))


async def test_responses_with_retry_off_return_the_answer_marked_invalid(proxy, fake_upstream):
    """ "lmbridge": {"schema_retry": false}: one call, the answer as written, the header."""
    answers(fake_upstream, "not json")
    resp = await proxy.post(
        "/v1/responses",
        json={
            "model": "test-model",
            "input": "hi",
            "text": {"format": {"type": "json_schema", "name": "p", "schema": PERSON_SCHEMA}},
            "lmbridge": {"schema_retry": False},
        },
    )
    assert resp.status == 200
    assert resp.headers["X-LMBridge-Schema"] == "invalid"
    assert (await resp.json())["output"][0]["content"][0]["text"] == "not json"
    assert len(fake_upstream.requests_to(CHAT)) == 1


PERSON_SCHEMA = Person.model_json_schema()


async def test_responses_refuse_a_schema_that_is_not_one(proxy, fake_upstream):
    """An invalid text.format.schema: 400 with its param, before any upstream call."""
    resp = await proxy.post(
        "/v1/responses",
        json={
            "model": "test-model",
            "input": "hi",
            "text": {"format": {"type": "json_schema", "name": "p", "schema": {"type": 1}}},
        },
    )
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "text.format.schema"
    assert fake_upstream.requests_to(CHAT) == []


async def test_responses_stream_still_invalid_fails_the_response(client, fake_upstream):
    """Streamed, garbage twice: the stream ends with response.failed (schema_mismatch),
    which the SDK's stream helper reports; no parse exception."""
    answers(fake_upstream, "no", "no again")
    async with client.responses.stream(
        model="test-model", input="Who wrote the first program?", text_format=Person
    ) as stream:
        events = [event async for event in stream]
    failed = events[-1]
    assert failed.type == "response.failed"
    assert failed.response.error is not None
    assert "did not match the JSON schema" in failed.response.error.message
