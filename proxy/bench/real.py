"""``lmbridge bench --real``: prompt-cache reuse across a Responses chain on llama.cpp.

Starts llama.cpp with SmolLM2-135M the way ``serve --embedded`` does, and the
daemon in front of it, then runs one chain of turns through ``/v1/responses``
with a long first prompt (instructions and rules, as a coding agent sends).
Each turn reports the upstream's ``prompt_tokens`` and ``cached_tokens``: when
lmbridge renders the stored history exactly as before, everything but the new
turn comes from the cache. For scale, the last turn's prompt is also sent once
straight to llama.cpp with its cache disabled (``cache_prompt: false``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from proxy.bench.processes import free_port, start_daemon, stop, wait_ready
from proxy.config import EmbeddedConfig
from proxy.embedded import EmbeddedUpstream

RULES = [
    "Read the files you change before you change them.",
    "Keep each function small and name it after what it does.",
    "Write a test for every behaviour you add, and run the tests.",
    "Never print secrets, tokens or passwords.",
    "Explain what you did in one short paragraph at the end.",
    "Prefer the standard library over new dependencies.",
    "Handle errors where they happen and say what went wrong.",
    "Do not reformat code you did not change.",
]


def long_instructions(target_words: int = 1400) -> str:
    lines = ["You are a careful coding assistant working in a Python repository."]
    n = 0
    while sum(len(line.split()) for line in lines) < target_words:
        rule = RULES[n % len(RULES)]
        lines.append(f"Rule {n + 1}: {rule} This applies to every file in section {n // 8 + 1}.")
        n += 1
    return "\n".join(lines)


QUESTIONS = [
    "List three things you check before a commit.",
    "Which rule is about secrets?",
    "Summarise rule 3 in five words.",
    "What do you do after changing code?",
    "Name one rule about errors.",
    "What is the last thing you write?",
]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="lmbridge-bench-real-"))
    embedded = EmbeddedUpstream(EmbeddedConfig(context_length=4096, parallel=1), tmp / "llama.log")
    upstream = await embedded.start()
    port = free_port()
    log = tmp / "lmbridge.log"
    try:
        daemon = await start_daemon(
            [
                "--upstream",
                upstream,
                "--port",
                str(port),
                "--db",
                str(tmp / "bench.db"),
                "--log-level",
                "warning",
            ],
            log,
        )
    except BaseException:
        await embedded.stop()
        raise
    base = f"http://127.0.0.1:{port}"
    turns: list[dict[str, Any]] = []
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, base, daemon, log)
            instructions = long_instructions()
            previous: str | None = None
            for index in range(args.real_turns):
                body: dict[str, Any] = {
                    "model": "smollm2",
                    "instructions": instructions,
                    "input": QUESTIONS[index % len(QUESTIONS)],
                    "max_output_tokens": 24,
                    "temperature": 0,
                }
                if previous is not None:
                    body["previous_response_id"] = previous
                started = time.perf_counter()
                async with session.post(base + "/v1/responses", json=body) as resp:
                    response = await resp.json()
                elapsed = time.perf_counter() - started
                previous = response["id"]
                usage = response["usage"] or {}
                turns.append(
                    {
                        "turn": index + 1,
                        "prompt_tokens": usage.get("input_tokens"),
                        "cached_tokens": (usage.get("input_tokens_details") or {}).get(
                            "cached_tokens"
                        ),
                        "seconds": round(elapsed, 3),
                    }
                )
            # The last turn's prompt once more, straight to llama.cpp, cache disabled.
            cold = await _cold_prompt(session, upstream, instructions, previous, base)
    finally:
        await stop(daemon)
        await embedded.stop()
    return {"turns": turns, "cold_last_prompt": cold}


async def _cold_prompt(
    session: aiohttp.ClientSession,
    upstream: str,
    instructions: str,
    last_id: str | None,
    base: str,
) -> dict[str, Any]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}]
    if last_id is not None:
        async with session.get(f"{base}/v1/responses/{last_id}/input_items?order=asc") as r:
            _ = await r.json()
    # Rebuild the history the way a client resending it would.
    chain = []
    current = last_id
    while current:
        async with session.get(f"{base}/v1/responses/{current}") as resp:
            response = await resp.json()
        async with session.get(f"{base}/v1/responses/{current}/input_items?order=asc") as r:
            items = (await r.json())["data"]
        text = "".join(
            p.get("text", "")
            for item in response["output"]
            if item["type"] == "message"
            for p in item["content"]
        )
        chain.append((items[0]["content"][0]["text"], text))
        current = response.get("previous_response_id")
    for question, answer in reversed(chain):
        messages += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    body = {"model": "smollm2", "messages": messages, "max_tokens": 1, "cache_prompt": False}
    started = time.perf_counter()
    async with session.post(upstream + "/v1/chat/completions", json=body) as resp:
        completion = await resp.json()
    return {
        "prompt_tokens": completion["usage"]["prompt_tokens"],
        "seconds": round(time.perf_counter() - started, 3),
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [
        "prompt cache across one /v1/responses chain on llama.cpp (SmolLM2-135M):",
        "",
        f"{'turn':>4} {'prompt tokens':>14} {'cached tokens':>14} {'seconds':>8}",
    ]
    for t in report["turns"]:
        lines.append(
            f"{t['turn']:>4} {t['prompt_tokens']:>14} {t['cached_tokens']:>14} {t['seconds']:>8.3f}"
        )
    cold = report["cold_last_prompt"]
    lines.append(
        f"\nthe last turn's history sent straight to llama.cpp with its cache off: "
        f"{cold['prompt_tokens']} prompt tokens, {cold['seconds']:.3f} s"
    )
    return "\n".join(lines) + "\n"
