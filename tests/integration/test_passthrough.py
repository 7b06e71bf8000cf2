"""Pass-through routes against the scripted fake upstream."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest

from tests.fake_upstream import CHAT, Reply, chat_completion, chunk

MESSAGES = [{"role": "user", "content": "hi"}]


async def test_chat_body_is_forwarded_unchanged(proxy, fake_upstream):
    """Unknown fields reach the upstream and the original bytes are sent when nothing
    needs rewriting."""
    raw = (
        b'{"model": "test-model",  "messages": [{"role":"user","content":"hi"}],'
        b' "x_vendor": {"a": 1}}'
    )
    resp = await proxy.post(CHAT, data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == 200
    seen = fake_upstream.requests_to(CHAT)[0]
    assert seen.body["x_vendor"] == {"a": 1}
    assert seen.headers["Content-Length"] == str(len(raw))


async def test_completions_and_embeddings_pass_through(proxy, fake_upstream):
    """/v1/completions and /v1/embeddings answer through the proxy."""
    resp = await proxy.post("/v1/completions", json={"model": "test-model", "prompt": "Hi"})
    assert resp.status == 200
    assert (await resp.json())["object"] == "text_completion"
    resp = await proxy.post("/v1/embeddings", json={"model": "test-model", "input": ["a"]})
    assert resp.status == 200
    assert (await resp.json())["data"][0]["embedding"] == [0.1, 0.2, 0.3]


async def test_upstream_headers_that_matter_come_back(proxy, fake_upstream):
    """Content type and rate-limit headers are passed back; a request id is added."""
    fake_upstream.add_reply(
        CHAT,
        Reply(
            json=chat_completion(),
            headers={"x-ratelimit-remaining-requests": "7", "X-Internal": "no"},
        ),
    )
    resp = await proxy.post(CHAT, json={"model": "test-model", "messages": MESSAGES})
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.headers["x-ratelimit-remaining-requests"] == "7"
    assert "X-Internal" not in resp.headers
    assert resp.headers["X-Request-ID"].startswith("req_")


async def test_upstream_is_asked_for_uncompressed_bodies(proxy, fake_upstream):
    """Bodies are relayed byte for byte: the upstream is asked not to compress them."""
    resp = await proxy.post(CHAT, json={"model": "test-model", "messages": MESSAGES})
    assert resp.status == 200
    assert fake_upstream.requests_to(CHAT)[0].headers["Accept-Encoding"] == "identity"


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_compressed_answer_reaches_the_client_decoded(proxy, fake_upstream, encoding):
    """An upstream that compresses anyway still gives the client plain JSON, on the
    pass-through and on /v1/responses, which reads the completion itself."""
    compress = gzip.compress if encoding == "gzip" else zlib.compress
    packed = compress(json.dumps(chat_completion("Squeezed.")).encode())
    reply = Reply(body=packed, headers={"Content-Encoding": encoding})
    fake_upstream.add_reply(CHAT, reply, times=2)
    resp = await proxy.post(CHAT, json={"model": "test-model", "messages": MESSAGES})
    assert resp.status == 200
    assert "Content-Encoding" not in resp.headers
    assert (await resp.json())["choices"][0]["message"]["content"] == "Squeezed."
    resp = await proxy.post("/v1/responses", json={"model": "test-model", "input": "hi"})
    assert resp.status == 200
    assert (await resp.json())["output"][0]["content"][0]["text"] == "Squeezed."


async def test_a_compressed_stream_is_relayed_decoded(proxy, fake_upstream):
    """A stream compressed anyway reaches the client as plain server-sent events."""
    events = [json.dumps(chunk(content=part)) for part in ("Hel", "lo")]
    raw = "".join(f"data: {e}\n\n" for e in events).encode() + b"data: [DONE]\n\n"
    packed = gzip.compress(raw)
    reply = Reply(
        stream=[packed[:10], 0.01, packed[10:]], done=False, headers={"Content-Encoding": "gzip"}
    )
    fake_upstream.add_reply(CHAT, reply)
    resp = await proxy.post(
        CHAT, json={"model": "test-model", "messages": MESSAGES, "stream": True}
    )
    assert resp.status == 200
    assert "Content-Encoding" not in resp.headers
    assert await resp.read() == raw


@pytest.mark.parametrize(
    ("encoding", "body", "says"),
    [
        ("br", b"\x1b\x00", "Content-Encoding 'br'"),
        ("gzip", b"not gzip at all", "gzip body that does not decompress"),
    ],
)
async def test_a_body_lmbridge_cannot_decode_is_a_clear_502(
    proxy, fake_upstream, encoding, body, says
):
    fake_upstream.add_reply(CHAT, Reply(body=body, headers={"Content-Encoding": encoding}))
    resp = await proxy.post(CHAT, json={"model": "test-model", "messages": MESSAGES})
    assert resp.status == 502
    error = (await resp.json())["error"]
    assert says in error["message"]
    assert error["type"] and error["code"]


async def test_request_id_is_taken_from_the_client(proxy, fake_upstream):
    """A client's X-Request-ID is returned and forwarded upstream."""
    resp = await proxy.post(
        CHAT,
        json={"model": "test-model", "messages": MESSAGES},
        headers={"X-Request-ID": "abc-123"},
    )
    assert resp.headers["X-Request-ID"] == "abc-123"
    assert fake_upstream.requests_to(CHAT)[0].headers["X-Request-ID"] == "abc-123"


async def test_list_models(proxy, fake_upstream):
    """/v1/models lists the upstream's models in the OpenAI shape."""
    fake_upstream.models = ["a-model", "b-model"]
    resp = await proxy.get("/v1/models")
    body = await resp.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["a-model", "b-model"]
    assert all(m["object"] == "model" for m in body["data"])


async def test_get_one_model_and_unknown_model(proxy, fake_upstream):
    """/v1/models/{id} finds ids with slashes; an unknown id is 404 model_not_found."""
    fake_upstream.models = ["qwen/qwen3-4b"]
    resp = await proxy.get("/v1/models/qwen/qwen3-4b")
    assert resp.status == 200
    assert (await resp.json())["id"] == "qwen/qwen3-4b"
    resp = await proxy.get("/v1/models/nope")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "model_not_found"


async def test_unknown_model_lists_available_models(proxy, fake_upstream):
    """A request for a model the upstream lacks gets 404 naming the available ones,
    and never reaches the upstream."""
    fake_upstream.models = ["qwen3-4b", "gemma-3"]
    resp = await proxy.post(CHAT, json={"model": "gpt-9", "messages": MESSAGES})
    assert resp.status == 404
    error = (await resp.json())["error"]
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert "qwen3-4b" in error["message"] and "gemma-3" in error["message"]
    assert fake_upstream.requests_to(CHAT) == []


async def test_alias_is_rewritten_to_the_upstream_id(make_proxy, fake_upstream):
    """A configured alias is replaced by the upstream id before forwarding."""
    fake_upstream.models = ["qwen/qwen3-4b"]
    proxy = await make_proxy(models__aliases={"gpt-4o-mini": "qwen/qwen3-4b"})
    seed = 123456789012345678901234567890  # beyond 64 bits: must not become a float
    resp = await proxy.post(
        CHAT,
        json={"model": "gpt-4o-mini", "messages": MESSAGES, "temperature": 0.5, "seed": seed},
    )
    assert resp.status == 200
    seen = fake_upstream.requests_to(CHAT)[0].body
    assert seen["model"] == "qwen/qwen3-4b"
    assert seen["temperature"] == 0.5
    assert seen["seed"] == seed and isinstance(seen["seed"], int)
    listed = await (await proxy.get("/v1/models")).json()
    assert {"id": "gpt-4o-mini", "alias_for": "qwen/qwen3-4b"}.items() <= next(
        m for m in listed["data"] if m["id"] == "gpt-4o-mini"
    ).items()


async def test_a_body_too_deep_to_write_back_is_400(make_proxy, fake_upstream):
    """Nested ~1,000 deep: readable, but re-serialising it for the alias rewrite exceeds
    Python's recursion limit. A 400 that says so, never a 500."""
    fake_upstream.models = ["qwen/qwen3-4b"]
    proxy = await make_proxy(models__aliases={"gpt-4o-mini": "qwen/qwen3-4b"})
    deep = b"[" * 1000 + b"]" * 1000
    body = b'{"model": "gpt-4o-mini", "messages": [], "extra": ' + deep + b"}"
    resp = await proxy.post(CHAT, data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["code"] == "nested_too_deeply"
    assert fake_upstream.requests_to(CHAT) == []


async def test_missing_model_uses_the_only_model(proxy, fake_upstream):
    """Without `model`, the one model the upstream has is used."""
    resp = await proxy.post(CHAT, json={"messages": MESSAGES})
    assert resp.status == 200
    assert fake_upstream.requests_to(CHAT)[0].body["model"] == "test-model"


async def test_missing_model_uses_the_configured_default(make_proxy, fake_upstream):
    """Without `model`, models.default wins."""
    fake_upstream.models = ["a", "b"]
    proxy = await make_proxy(models__default="b")
    resp = await proxy.post(CHAT, json={"messages": MESSAGES})
    assert resp.status == 200
    assert fake_upstream.requests_to(CHAT)[0].body["model"] == "b"


async def test_missing_model_ambiguous_is_400(proxy, fake_upstream):
    """Without `model` and with several candidates, 400 lists the choices."""
    fake_upstream.models = ["a", "b"]
    resp = await proxy.post(CHAT, json={"messages": MESSAGES})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == "model"
    assert error["code"] == "model_required"
    assert "a, b" in error["message"]


async def test_lmstudio_native_list_picks_the_loaded_model(proxy, fake_upstream):
    """On LM Studio, state comes from /api/v0/models and the one loaded LLM is the default;
    embedding requests pick the embedding model."""
    fake_upstream.lmstudio_v0 = {
        "object": "list",
        "data": [
            {
                "id": "qwen3-4b",
                "object": "model",
                "type": "llm",
                "state": "loaded",
                "max_context_length": 32768,
            },
            {"id": "gemma-3", "object": "model", "type": "vlm", "state": "not-loaded"},
            {"id": "nomic-embed", "object": "model", "type": "embeddings", "state": "loaded"},
        ],
    }
    resp = await proxy.post(CHAT, json={"messages": MESSAGES})
    assert resp.status == 200
    assert fake_upstream.requests_to(CHAT)[0].body["model"] == "qwen3-4b"
    resp = await proxy.post("/v1/embeddings", json={"input": "x"})
    assert resp.status == 200
    assert fake_upstream.requests_to("/v1/embeddings")[0].body["model"] == "nomic-embed"
    listed = await (await proxy.get("/v1/models")).json()
    assert {m["id"]: m["state"] for m in listed["data"]} == {
        "qwen3-4b": "loaded",
        "gemma-3": "not-loaded",
        "nomic-embed": "loaded",
    }


async def test_model_list_is_cached(proxy, fake_upstream):
    """While the cache is fresh, validation makes no upstream call."""
    for _ in range(5):
        resp = await proxy.post(CHAT, json={"model": "test-model", "messages": MESSAGES})
        assert resp.status == 200
    list_calls = [s for s in fake_upstream.seen if s.method == "GET"]
    # One read of the list, after probing LM Studio's and Ollama's native paths once.
    assert [s.path for s in list_calls] == [
        "/api/v1/models",
        "/api/v0/models",
        "/api/tags",
        "/v1/models",
    ]


async def test_new_model_is_found_without_waiting_for_the_ttl(proxy, fake_upstream):
    """A model loaded upstream after the list was cached is found by one refresh on a miss."""
    await proxy.get("/v1/models")
    fake_upstream.models = ["test-model", "new-model"]
    # The refresh-on-miss is rate limited: pretend the cache is older than that.
    from proxy.keys import CATALOG

    catalog = proxy.app[CATALOG]
    object.__setattr__(catalog.cached, "fetched_at", catalog.cached.fetched_at - 10)
    resp = await proxy.post(CHAT, json={"model": "new-model", "messages": MESSAGES})
    assert resp.status == 200


async def test_upstream_4xx_passes_through_with_its_status(proxy, fake_upstream):
    """The upstream's own 400 comes back with its status and message."""
    fake_upstream.add_reply(
        CHAT,
        Reply(
            status=400,
            json={
                "error": {
                    "code": 400,
                    "message": "Expected 'messages' to be an array",
                    "type": "invalid_request_error",
                }
            },
        ),
    )
    resp = await proxy.post(CHAT, json={"model": "test-model", "messages": MESSAGES})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["message"] == "Expected 'messages' to be an array"
    assert error["type"] == "invalid_request_error"


async def test_upstream_plain_text_error_gets_the_openai_shape(proxy, fake_upstream):
    """A plain-text error body (llama-cpp-python's 500) is wrapped in the OpenAI shape."""
    fake_upstream.add_reply(
        CHAT, Reply(status=500, body=b"Internal Server Error", content_type="text/plain")
    )
    resp = await proxy.post(CHAT, json={"model": "test-model", "messages": MESSAGES})
    assert resp.status == 500
    assert resp.content_type == "application/json"
    error = (await resp.json())["error"]
    assert "Internal Server Error" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        (b"{not json", None, "not valid JSON"),
        (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, "nested too deeply"),
        (b'{"model": "test-model", "messages": [], "temperature": NaN}', None, "not valid JSON"),
        (b"", None, "empty"),
        (b"[1, 2]", None, "must be a JSON object"),
        (b'"text"', None, "must be a JSON object"),
        (b'{"model": 5, "messages": []}', "model", "'model' must be a string"),
        (b'{"model": "test-model", "messages": "hi"}', "messages", "'messages' must be an array"),
        (b'{"model": "test-model"}', "messages", "Missing required parameter: 'messages'"),
        (
            b'{"model": "test-model", "messages": [], "stream": "yes"}',
            "stream",
            "'stream' must be a boolean",
        ),
        (
            b'{"model": "test-model", "messages": [], "stream_options": 1}',
            "stream_options",
            "'stream_options' must be an object",
        ),
        ('{"model": "x"}'.encode("utf-16"), None, "UTF-8"),
    ],
)
async def test_malformed_requests_are_400_with_param(proxy, fake_upstream, body, param, fragment):
    """Bad JSON and wrong types get 400 in the OpenAI shape naming the parameter."""
    resp = await proxy.post(CHAT, data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == param
    assert fragment in error["message"]
    assert error["type"] == "invalid_request_error"
    assert fake_upstream.requests_to(CHAT) == []


@pytest.mark.parametrize(
    ("path", "field"),
    [
        (CHAT, b'"temperature"'),
        (CHAT, b'"messages": [{"role": "user", "content": "hi"}], "seed"'),
        ("/v1/responses", b'"input": "hi", "metadata": {"n": [1]}, "seed"'),
        ("/v1/responses", b'"input": "hi", "max_output_tokens"'),
        ("/v1/completions", b'"prompt": "hi", "seed"'),
        ("/v1/embeddings", b'"input": "hi", "dimensions"'),
    ],
)
async def test_an_integer_of_more_than_4300_digits_is_400_not_json(
    proxy, fake_upstream, path, field
):
    """An integer longer than Python converts is a 400 "not valid JSON" on every JSON
    route, in the OpenAI error shape, and nothing reaches the upstream."""
    body = b'{"model": "test-model", ' + field + b": " + b"7" * 5000 + b"}"
    resp = await proxy.post(path, data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert "not valid JSON: integer has more than 4300 digits" in error["message"]
    assert [s.path for s in fake_upstream.seen if s.method == "POST"] == []


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"model": "test-model"}, "prompt"),
        ("/v1/completions", {"model": "test-model", "prompt": 3}, "prompt"),
        ("/v1/embeddings", {"model": "test-model"}, "input"),
        ("/v1/embeddings", {"model": "test-model", "input": {"a": 1}}, "input"),
    ],
)
async def test_required_fields_of_other_routes(proxy, path, body, param):
    """/v1/completions needs `prompt`, /v1/embeddings needs `input`."""
    resp = await proxy.post(path, json=body)
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == param


async def test_body_over_the_limit_is_413(make_proxy):
    """A body larger than server.max_body_size gets 413 in the OpenAI shape."""
    proxy = await make_proxy(server__max_body_size=1000)
    big = json.dumps({"model": "test-model", "messages": [{"role": "user", "content": "x" * 2000}]})
    resp = await proxy.post(CHAT, data=big, headers={"Content-Type": "application/json"})
    assert resp.status == 413
    error = (await resp.json())["error"]
    assert error["code"] == "request_too_large"
    assert "1000" in error["message"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/nope", 404),
        ("GET", "/", 404),
        ("GET", "/v1/chat/completions", 405),
        ("DELETE", "/v1/models", 405),
    ],
)
async def test_unknown_routes_and_methods(make_proxy, fake_upstream, method, path, status):
    """Without the relay, unknown routes are 404 and wrong methods 405, both in the OpenAI
    shape, and nothing reaches the upstream."""
    proxy = await make_proxy(server__relay_unknown_routes=False)
    resp = await proxy.request(method, path)
    assert resp.status == status
    body = await resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert [s.path for s in fake_upstream.seen if s.path == path] == []


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
NO_TOOLS = {"chat_template_caps": {"supports_tools": False, "supports_tool_calls": False}}


async def test_tools_for_a_template_that_drops_them_get_a_warning(proxy, fake_upstream, caplog):
    """llama.cpp says the model's template cannot render tools: a request that offers
    tools as they are (not described in the system message) is still served, with
    X-LMBridge-Warning saying the model never sees them, on both APIs, plain and
    streamed; the log says it once per model."""
    fake_upstream.llama_props = NO_TOOLS
    messages = [{"role": "user", "content": "hi"}]
    # The tools are described in the system message unless the request says no.
    as_sent = {"describe_tools": False}
    requests = [
        ("/v1/chat/completions", {"messages": messages, "tools": [TOOL], "lmbridge": as_sent}),
        (
            "/v1/chat/completions",
            {"messages": messages, "tools": [TOOL], "stream": True, "lmbridge": as_sent},
        ),
        (
            "/v1/responses",
            {"input": "hi", "tools": [{"type": "function", "name": "f"}], "lmbridge": as_sent},
        ),
        (
            "/v1/responses",
            {
                "input": "hi",
                "tools": [{"type": "function", "name": "f"}],
                "stream": True,
                "lmbridge": as_sent,
            },
        ),
    ]
    for path, body in requests:
        resp = await proxy.post(path, json={"model": "test-model", **body})
        assert resp.status == 200, await resp.text()
        await resp.read()
        warning = resp.headers["X-LMBridge-Warning"]
        assert "test-model cannot render tools" in warning
    warned = [r for r in caplog.records if "cannot render tools" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelname == "WARNING"
    models = await (await proxy.get("/v1/models")).json()
    assert models["data"][0]["supports_tools"] is False
    # Without tools, or where the template renders them, nothing is said.
    plain = await proxy.post(CHAT, json={"model": "test-model", "messages": messages})
    assert "X-LMBridge-Warning" not in plain.headers


async def test_no_tools_warning_where_the_upstream_does_not_say(proxy, fake_upstream):
    """A server that is not llama.cpp (LM Studio, vLLM, Ollama) is not asked for /props,
    and a request with tools gets no warning."""
    body = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "tools": [TOOL]}
    resp = await proxy.post(CHAT, json=body)
    assert resp.status == 200
    assert "X-LMBridge-Warning" not in resp.headers
    assert not fake_upstream.requests_to("/props")  # not owned by llama.cpp: not asked


async def test_tools_described_for_a_template_that_drops_them(proxy, fake_upstream):
    """A template without tools: the function tools go into the system message (no
    tools field upstream, no warning), an earlier call and its result become text, and
    the call the model writes as text comes back as tool_calls."""
    fake_upstream.llama_props = NO_TOOLS
    answer = '<tool_call>\n{"name": "f", "arguments": {"x": 2}}\n</tool_call>'
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion(answer)))
    earlier = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [earlier]},
        {"role": "tool", "tool_call_id": "call_1", "content": "1"},
    ]
    body = {"model": "test-model", "messages": messages, "tools": [TOOL], "tool_choice": "auto"}
    resp = await proxy.post(CHAT, json=body)
    assert "X-LMBridge-Warning" not in resp.headers
    message = (await resp.json())["choices"][0]["message"]
    assert message["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"x": 2}'}
    sent = fake_upstream.requests_to(CHAT)[0].body
    assert "tools" not in sent and "tool_choice" not in sent
    system, _, assistant, result = sent["messages"]
    assert system["content"].startswith("Be brief.\n\n# Tools")
    assert '"name": "f"' in system["content"] and "<tool_call>" in system["content"]
    assert assistant == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>',
    }
    assert result == {"role": "user", "content": "<tool_response>\n1\n</tool_response>"}
