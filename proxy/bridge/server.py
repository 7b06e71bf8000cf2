"""The MCP server of `lmbridge mcp`: its tools, and the transports it runs on.

Tool names are fixed (users' prompts and configurations name them). Every failure a
tool meets (daemon down, unknown model, bad argument) is an MCP tool error with one
readable line; the server itself keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import Field

from proxy import __version__
from proxy.bridge import text
from proxy.bridge.client import DaemonClient, DaemonError, DaemonUnreachable
from proxy.bridge.delegate import Delegations

INSTRUCTIONS = """\
lmbridge runs language models on this machine (LM Studio, llama.cpp, Ollama, vLLM).
Use it to hand work to a local model: `chat` for one question, `respond` for a
conversation that keeps its history (pass the returned response_id as
previous_response_id), `delegate` for a task the local model carries out on its own
with the MCP servers configured in lmbridge (files, memory, git, ...). `list_models`
tells which models exist; `health` whether everything is up."""

DELEGATE_INSTRUCTIONS = (
    "You carry out a task on your own. Use the tools when they help, check what they "
    "return, and finish with a short answer that gives the result."
)
HEARTBEAT = 5.0  # seconds between progress notifications while a task runs quietly

READ_ONLY = ToolAnnotations(readOnlyHint=True, openWorldHint=False)


@dataclass(frozen=True, slots=True)
class Settings:
    result_max_chars: int = 20_000
    wait_seconds: float = 50.0


@contextlib.contextmanager
def _tool_errors() -> Iterator[None]:
    try:
        yield
    except DaemonUnreachable as exc:
        raise ToolError(str(exc)) from None
    except DaemonError as exc:
        raise ToolError(f"lmbridge: {exc.message}") from None


def build_server(client: DaemonClient, settings: Settings) -> tuple[MCPServer, Delegations]:
    server = MCPServer("lmbridge", version=__version__, instructions=INSTRUCTIONS)
    delegations = Delegations(client)
    limit = settings.result_max_chars

    @server.tool(annotations=READ_ONLY)
    async def list_models() -> dict[str, Any]:
        """The models of the local model server: id, type (llm, vlm, embeddings),
        state (loaded, not-loaded) and context length where known."""
        with _tool_errors():
            return text.models(await client.get("/v1/models"))

    @server.tool(annotations=READ_ONLY)
    async def health() -> dict[str, Any]:
        """Whether lmbridge, the model server behind it, its storage and its MCP servers
        are up."""
        with _tool_errors():
            body = await client.get("/readyz", errors_ok=True)
        return {"daemon": client.base_url, **body}

    @server.tool()
    async def chat(
        prompt: Annotated[str, Field(description="What to ask the local model.")],
        model: Annotated[
            str | None,
            Field(description="Model id (default: lmbridge's default or the loaded one)."),
        ] = None,
        system: Annotated[str | None, Field(description="System prompt.")] = None,
        temperature: Annotated[float | None, Field(ge=0, le=2)] = None,
        max_tokens: Annotated[int | None, Field(ge=1)] = None,
        json_schema: Annotated[
            dict[str, Any] | None,
            Field(
                description="A JSON schema the answer must follow; the answer is then "
                "returned as JSON."
            ),
        ] = None,
    ) -> Any:
        """One question to a local model, without history. Returns its answer (or the
        JSON object, with json_schema)."""
        body: dict[str, Any] = {"input": prompt, "store": True}
        _put(
            body,
            model=model,
            instructions=system,
            temperature=temperature,
            max_output_tokens=max_tokens,
        )
        if json_schema is not None:
            body["text"] = {
                "format": {
                    "type": "json_schema",
                    "name": "answer",
                    "schema": json_schema,
                    "strict": True,
                }
            }
        with _tool_errors():
            response = await client.post("/v1/responses", body)
        answer = text.output_text(response)
        if json_schema is not None:
            try:
                return json.dumps(json.loads(answer), ensure_ascii=False)
            except ValueError:
                raise ToolError(
                    f"the model's answer is not valid JSON (it began: {answer[:200]!r})"
                ) from None
        hint = (
            f"call get_response(response_id={response.get('id')!r}, offset={{offset}}) for the rest"
        )
        return text.cut(answer, limit, 0, hint)[0]

    @server.tool()
    async def respond(
        input: Annotated[str, Field(description="The next message of the conversation.")],
        model: Annotated[str | None, Field(description="Model id.")] = None,
        previous_response_id: Annotated[
            str | None,
            Field(
                description="Continue the conversation of this response (from an earlier respond)."
            ),
        ] = None,
        instructions: Annotated[
            str | None, Field(description="System prompt for this turn.")
        ] = None,
        max_tokens: Annotated[
            int | None, Field(ge=1, description="Longest answer, in tokens.")
        ] = None,
    ) -> dict[str, Any]:
        """One turn of a conversation that lmbridge remembers. Returns the answer and the
        response_id to pass as previous_response_id next time."""
        body: dict[str, Any] = {"input": input, "store": True}
        _put(
            body,
            model=model,
            previous_response_id=previous_response_id,
            instructions=instructions,
            max_output_tokens=max_tokens,
        )
        with _tool_errors():
            response = await client.post("/v1/responses", body)
        return text.response_result(response, [], max_chars=limit)

    @server.tool()
    async def delegate(
        task: Annotated[
            str,
            Field(description="What the local model should do, with everything it needs to know."),
        ],
        ctx: Context,
        mcp_servers: Annotated[
            list[str] | Literal["all"],
            Field(description='Names of lmbridge\'s MCP servers the model may use, or "all".'),
        ] = "all",
        model: Annotated[str | None, Field(description="Model id.")] = None,
        max_rounds: Annotated[
            int | None,
            Field(
                ge=1,
                description=(
                    "At most this many model -> tools -> model rounds (lmbridge's mcp.max_rounds "
                    "is the ceiling)."
                ),
            ),
        ] = None,
        wait_seconds: Annotated[
            float | None,
            Field(
                ge=0,
                le=3600,
                description=(
                    "How long to wait for the result before returning the response_id (default 50)."
                ),
            ),
        ] = None,
    ) -> dict[str, Any]:
        """A local model carries out a task on its own with lmbridge's MCP servers, then
        answers. Returns the answer and a trace of its tool calls; if the task takes
        longer than wait_seconds, returns its response_id: get_response gives the result
        later."""
        with _tool_errors():
            servers = await _servers(client, mcp_servers)
            body: dict[str, Any] = {
                "input": task,
                "instructions": DELEGATE_INSTRUCTIONS,
                "store": True,
                "tools": [{"type": "mcp", "server_label": name} for name in servers],
            }
            _put(body, model=model, mcp_max_rounds=max_rounds)
            run = await delegations.start(body)
        wait = settings.wait_seconds if wait_seconds is None else wait_seconds
        count = 0

        async def report(message: str) -> None:
            nonlocal count
            count += 1
            await ctx.report_progress(count, None, message)

        run.progress = report
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        try:
            while not run.done.is_set() and loop.time() < deadline:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(HEARTBEAT, deadline - loop.time())):
                        await run.done.wait()
                if not run.done.is_set():
                    await report(f"working: {len(run.steps)} tool call(s) so far")
        finally:
            run.progress = None
        if run.final is not None:
            return text.response_result(run.final, run.steps, max_chars=limit)
        with _tool_errors():
            response = await client.get(f"/v1/responses/{run.response_id}")
        return text.response_result(response, run.steps, max_chars=limit)

    @server.tool(annotations=READ_ONLY)
    async def get_response(
        response_id: Annotated[str, Field(description="The id respond or delegate returned.")],
        offset: Annotated[
            int, Field(ge=0, description="Where to start the text (for a long one).")
        ] = 0,
    ) -> dict[str, Any]:
        """The status of a response and, once it is finished, its answer (and the trace
        of a delegated task)."""
        with _tool_errors():
            response = await client.get(f"/v1/responses/{response_id}")
        known = delegations.get(response_id)
        steps = list(known.steps) if known is not None else None
        return text.response_result(response, steps, max_chars=limit, offset=offset)

    @server.tool(annotations=READ_ONLY)
    async def embed(
        texts: Annotated[list[str], Field(min_length=1, description="The texts to embed.")],
        model: Annotated[str | None, Field(description="Embedding model id.")] = None,
    ) -> dict[str, Any]:
        """Embeddings of the texts from a local embedding model: dimensions and vectors
        (a short preview when they are large)."""
        body: dict[str, Any] = {"input": texts}
        _put(body, model=model)
        with _tool_errors():
            return text.embeddings(await client.post("/v1/embeddings", body), limit)

    @server.tool(annotations=READ_ONLY)
    async def list_mcp_servers() -> dict[str, Any]:
        """lmbridge's MCP servers (what delegate can use): state and tools."""
        with _tool_errors():
            body = await client.get("/v1/mcp/servers")
        return {"servers": body.get("data") or []}

    return server, delegations


def _put(body: dict[str, Any], **values: Any) -> None:
    body.update({k: v for k, v in values.items() if v is not None})


async def _servers(client: DaemonClient, wanted: list[str] | str) -> list[str]:
    if wanted != "all":
        return list(dict.fromkeys(wanted))
    listing = await client.get("/v1/mcp/servers")
    # "all": those a task can use on its own; a server that needs approval is used only
    # when named, since its first call would stop the task.
    return [
        s["name"]
        for s in listing.get("data") or []
        if s.get("state") != "disabled" and not s.get("require_approval")
    ]
