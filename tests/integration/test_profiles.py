"""Model profiles through the daemon: what the fake upstream received and what the client
got, for reasoning in a chain, tools described on the Responses API, merged system
messages, and a template that opens the thinking block itself."""

from __future__ import annotations

from typing import Any

from tests.fake_upstream import CHAT, Reply, chat_completion
from tests.unit.test_profiles import QWEN3_THINKING

NO_TOOLS = {"chat_template_caps": {"supports_tools": False}}


def thinking(reasoning: str, content: str) -> dict[str, Any]:
    reply = chat_completion(content)
    reply["choices"][0]["message"]["reasoning_content"] = reasoning
    return reply


async def two_turns(proxy: Any, fake_upstream: Any, **extra: Any) -> list[list[dict[str, Any]]]:
    """A chain of two turns; the messages the upstream received each time."""
    fake_upstream.add_reply(CHAT, Reply(json=thinking("The user greets.", "Hello!")))
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("Fine.")))
    first = await proxy.post("/v1/responses", json={"model": "test-model", "input": "Hi", **extra})
    assert first.status == 200, await first.text()
    body = await first.json()
    assert [i["type"] for i in body["output"]] == ["reasoning", "message"]
    second = await proxy.post(
        "/v1/responses",
        json={
            "model": "test-model",
            "input": "How are you?",
            "previous_response_id": body["id"],
            **extra,
        },
    )
    assert second.status == 200, await second.text()
    return [s.body["messages"] for s in fake_upstream.requests_to(CHAT)]


async def test_reasoning_is_not_sent_back_by_default(proxy, fake_upstream):
    """A model whose template is not known to read reasoning: the next turn carries the
    answer only; the stored response keeps its reasoning item."""
    _, second = await two_turns(proxy, fake_upstream)
    assert second[1] == {"role": "assistant", "content": "Hello!"}


async def test_reasoning_is_sent_back_when_the_profile_keeps_it(make_proxy, fake_upstream):
    """reasoning_in_history = "keep": the assistant message of the earlier turn carries
    its reasoning, and the third turn renders the history as the second did."""
    proxy = await make_proxy(models__reasoning_in_history="keep")
    first, second = await two_turns(proxy, fake_upstream)
    assert second[1] == {
        "role": "assistant",
        "content": "Hello!",
        "reasoning_content": "The user greets.",
    }
    assert second[: len(first)] == first


async def test_reasoning_of_a_gpt_oss_model_is_kept(make_proxy, fake_upstream):
    """gpt-oss is known by name to need its analysis back."""
    fake_upstream.models = ["openai/gpt-oss-20b"]
    proxy = await make_proxy()
    fake_upstream.add_reply(CHAT, Reply(json=thinking("Think.", "A")))
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("B")))
    first = await (
        await proxy.post("/v1/responses", json={"model": "openai/gpt-oss-20b", "input": "x"})
    ).json()
    resp = await proxy.post(
        "/v1/responses",
        json={"model": "openai/gpt-oss-20b", "input": "y", "previous_response_id": first["id"]},
    )
    assert resp.status == 200
    sent = fake_upstream.requests_to(CHAT)[1].body["messages"]
    assert sent[1]["reasoning_content"] == "Think."


async def test_tools_described_on_the_responses_api(proxy, fake_upstream):
    """A template that cannot render tools (llama.cpp's supports_tools: false): the
    function tools go into the system message, the upstream gets no tools field, and the
    call the model writes as text comes back as a function_call item, with no warning."""
    fake_upstream.llama_props = NO_TOOLS
    answer = '<tool_call>\n{"name": "f", "arguments": {"x": 2}}\n</tool_call>'
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion(answer)))
    tool = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    resp = await proxy.post(
        "/v1/responses",
        json={"model": "test-model", "input": "hi", "instructions": "Be brief.", "tools": [tool]},
    )
    assert resp.status == 200, await resp.text()
    assert "X-LMBridge-Warning" not in resp.headers
    body = await resp.json()
    assert [(i["type"], i.get("name")) for i in body["output"]] == [("function_call", "f")]
    sent = fake_upstream.requests_to(CHAT)[0].body
    assert "tools" not in sent and "tool_choice" not in sent
    system = sent["messages"][0]
    assert system["role"] == "system"
    assert system["content"].startswith("Be brief.\n\n# Tools")
    assert '"name": "f"' in system["content"]


async def test_tools_sent_as_they_are_when_the_request_says_so(proxy, fake_upstream):
    """ "lmbridge": {"describe_tools": false} leaves the tools field as it is."""
    fake_upstream.llama_props = NO_TOOLS
    tool = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    resp = await proxy.post(
        "/v1/responses",
        json={
            "model": "test-model",
            "input": "hi",
            "tools": [tool],
            "lmbridge": {"describe_tools": False},
        },
    )
    assert resp.status == 200
    assert "cannot render tools" in resp.headers["X-LMBridge-Warning"]
    assert fake_upstream.requests_to(CHAT)[0].body["tools"][0]["function"]["name"] == "f"


async def test_leading_system_messages_become_one(proxy, fake_upstream):
    """Codex's instructions and two developer messages: one system message upstream,
    first, on the first turn and (the same) on the next."""
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("ok")), times=2)
    developer = [
        {"type": "message", "role": "developer", "content": "Sandbox: read-only."},
        {"type": "message", "role": "developer", "content": "Cwd: /tmp."},
        {"type": "message", "role": "user", "content": "ls"},
    ]
    first = await proxy.post(
        "/v1/responses",
        json={"model": "test-model", "instructions": "You are Codex.", "input": developer},
    )
    assert first.status == 200, await first.text()
    first_id = (await first.json())["id"]
    second = await proxy.post(
        "/v1/responses",
        json={
            "model": "test-model",
            "instructions": "You are Codex.",
            "input": "again",
            "previous_response_id": first_id,
        },
    )
    assert second.status == 200
    one, two = (s.body["messages"] for s in fake_upstream.requests_to(CHAT))
    merged = {"role": "system", "content": "You are Codex.\n\nSandbox: read-only.\n\nCwd: /tmp."}
    assert one[0] == merged and [m["role"] for m in one] == ["system", "user"]
    assert two[: len(one) + 1] == [*one, {"role": "assistant", "content": "ok"}]


async def test_a_template_that_opens_the_thinking_block(proxy, fake_upstream):
    """llama.cpp's template opens <think> in the generation prompt: the answer starts
    inside the block and only </think> appears; lmbridge reads it as reasoning, and
    /v1/models shows the profile."""
    fake_upstream.llama_props = {
        "chat_template": QWEN3_THINKING,
        "chat_template_caps": {"supports_tools": True},
    }
    reply = chat_completion("The user greets.\n</think>\n\nHello!")
    fake_upstream.add_reply(CHAT, Reply(json=reply))
    resp = await proxy.post(
        CHAT, json={"model": "test-model", "messages": [{"role": "user", "content": "Hi"}]}
    )
    assert resp.status == 200
    message = (await resp.json())["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("The user greets.", "Hello!")
    models = await (await proxy.get("/v1/models")).json()
    profile = models["data"][0]["profile"]
    assert profile["think_opened"] is True
    assert profile["reasoning_in_history"] == "keep"  # the template reads reasoning_content
    assert profile["think_tags"] == ["<think>,</think>"]
