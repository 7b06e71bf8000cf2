"""The OpenAI Agents SDK against the daemon (a separate process) and a scripted model that
writes its thinking in <think> tags and its tool calls as text, the way many local models
do: the agent's function tool runs and the reasoning arrives apart from the answer, on the
Responses API and on chat completions, whole and streamed."""

from __future__ import annotations

import json

import openai
import pytest

from tests.fake_upstream import CHAT, Reply, chat_completion, chunk

pytestmark = pytest.mark.e2e

agents = pytest.importorskip("agents")

THOUGHT = "The user wants Oslo's weather; I will call the tool."
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
WRITTEN = f"<think>{THOUGHT}</think>\n\n{CALL}"


@pytest.fixture
async def daemon(start_daemon, fake_upstream):
    return await start_daemon("--upstream", fake_upstream.url)


def weather_agent(model, calls: list[str]):
    agents.set_tracing_disabled(True)

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Weather for a city."""
        calls.append(city)
        return f"Sunny in {city}"

    return agents.Agent(name="weather", instructions="Use tools.", model=model, tools=[get_weather])


def streamed_reply(text: str, step: int = 7) -> Reply:
    pieces = [chunk(text[i : i + step]) for i in range(0, len(text), step)]
    return Reply(stream=[chunk(role="assistant", content=""), *pieces, chunk(finish="stop")])


def tool_result_sent(fake_upstream) -> dict:
    """The tool's result as the model saw it in the last upstream request."""
    messages = fake_upstream.requests_to(CHAT)[-1].body["messages"]
    return next(m for m in messages if m["role"] == "tool")


async def run_agent(daemon, fake_upstream, model_class, streamed: bool):
    """The weather agent asked once, against a model that thinks in tags and writes its
    call as text, then answers: the run's result, its tool run once for Oslo."""
    if streamed:
        fake_upstream.add_reply(CHAT, streamed_reply(WRITTEN))
        fake_upstream.add_reply(CHAT, streamed_reply("It is sunny in Oslo."))
    else:
        fake_upstream.add_reply(CHAT, Reply(json=chat_completion(WRITTEN)))
        fake_upstream.add_reply(CHAT, Reply(json=chat_completion("It is sunny in Oslo.")))
    calls: list[str] = []
    async with openai.AsyncOpenAI(base_url=daemon.base_url, api_key="x", max_retries=0) as c:
        agent = weather_agent(model_class(model="test-model", openai_client=c), calls)
        if streamed:
            result = agents.Runner.run_streamed(agent, "Weather in Oslo?")
            async for _ in result.stream_events():
                pass
        else:
            result = await agents.Runner.run(agent, "Weather in Oslo?")
    assert result.final_output == "It is sunny in Oslo."
    assert calls == ["Oslo"]
    return result


@pytest.mark.parametrize("streamed", [False, True])
async def test_agent_on_responses_runs_a_call_written_as_text(daemon, fake_upstream, streamed):
    result = await run_agent(daemon, fake_upstream, agents.OpenAIResponsesModel, streamed)
    reasoning = [i for i in result.new_items if isinstance(i, agents.ReasoningItem)]
    # lmbridge's reasoning item carries the text as reasoning_text content.
    assert [c.text for i in reasoning for c in i.raw_item.content or []] == [THOUGHT]
    messages = [i for i in result.new_items if isinstance(i, agents.MessageOutputItem)]
    assert all("<think>" not in agents.ItemHelpers.text_message_output(m) for m in messages)
    assert tool_result_sent(fake_upstream)["content"] == "Sunny in Oslo"


@pytest.mark.parametrize("streamed", [False, True])
async def test_agent_on_chat_completions_runs_a_call_written_as_text(
    daemon, fake_upstream, streamed
):
    result = await run_agent(daemon, fake_upstream, agents.OpenAIChatCompletionsModel, streamed)
    first = fake_upstream.requests_to(CHAT)[0].body
    assert [t["function"]["name"] for t in first["tools"]] == ["get_weather"]
    result_message = tool_result_sent(fake_upstream)
    assert result_message["content"] == "Sunny in Oslo"
    # The call went back to the model as the structured call lmbridge made of the text.
    messages = fake_upstream.requests_to(CHAT)[-1].body["messages"]
    (assistant,) = [m for m in messages if m["role"] == "assistant"]
    (sent_call,) = assistant["tool_calls"]
    assert sent_call["function"]["name"] == "get_weather"
    assert json.loads(sent_call["function"]["arguments"]) == {"city": "Oslo"}
    assert sent_call["id"] == result_message["tool_call_id"]
    # The SDK makes a reasoning item of reasoning_content, which lmbridge split from the text.
    reasoning = [i for i in result.new_items if isinstance(i, agents.ReasoningItem)]
    assert [s.text for i in reasoning for s in i.raw_item.summary] == [THOUGHT]
    assert "<tool_call>" not in (assistant.get("content") or "")
