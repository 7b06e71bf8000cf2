"""The models an upstream lists, as lmbridge holds them: ``ModelInfo`` and ``ModelList``,
and the readers of each server's list (LM Studio's native v1 and v0, any OpenAI-compatible
``/v1/models``, llama.cpp's router mode and ``/props``, Ollama's ``/api/tags`` and
``/api/ps``). Pure: fed JSON, returns records; a list it cannot read is None, never an
exception.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from proxy.profiles import TemplateTraits

ModelType = Literal["llm", "vlm", "embeddings", "unknown"]
ModelState = Literal["loaded", "not-loaded", "unknown"]
Purpose = Literal["chat", "embeddings", "any"]
Dialect = Literal["lmstudio-v1", "lmstudio-v0", "ollama", "llamacpp-router", "openai"]

# LM Studio's default Max Concurrent Predictions: its native lists do not say the
# value a model was loaded with.
LMSTUDIO_PARALLEL = 4


@dataclass(frozen=True, slots=True)
class ModelInfo:
    id: str
    type: ModelType = "unknown"
    state: ModelState = "unknown"
    context_length: int | None = None
    owned_by: str | None = None
    aliases: tuple[str, ...] = ()
    capabilities: tuple[str, ...] = ()
    # Whether the model reads images: None when the upstream does not say.
    vision: bool | None = None
    # Whether its chat template renders tools: None when the upstream does not say.
    # False (llama.cpp's supports_tools) means the model never sees offered tools.
    tools: bool | None = None
    # Requests the upstream runs at once for this model (LM Studio's default Max
    # Concurrent Predictions, llama.cpp's slots): None when it does not say.
    parallel: int | None = None
    # What llama.cpp's chat template says about thinking (None: no template seen).
    template: TemplateTraits | None = None
    # LM Studio 0.4+: the ids of the loaded instances (what an unload names).
    instances: tuple[str, ...] = ()
    # The upstreams that list it, in the configuration's order (proxy/routing.py).
    upstreams: tuple[str, ...] = ()
    # The server's own word for the model's state where it has more than loaded or not:
    # llama.cpp's router ("loading", "sleeping", "failed", ...); None elsewhere.
    status: str | None = None
    # Why its last load failed, as the server says (llama.cpp's router: the exit code).
    load_error: str | None = None

    def serves(self, purpose: Purpose) -> bool:
        if purpose == "any" or self.type == "unknown":
            return True
        if purpose == "embeddings":
            return self.type == "embeddings"
        return self.type in ("llm", "vlm")

    def as_openai(self) -> dict[str, Any]:
        """The OpenAI model object with LM Studio's extra fields (clients ignore them)."""
        entry = {
            "id": self.id,
            "object": "model",
            "created": 0,
            "owned_by": self.owned_by or "local",
            "type": self.type,
            "state": self.state,
            "max_context_length": self.context_length,
            "supports_tools": self.tools,
        }
        if self.upstreams:  # several upstreams: the ones that list it
            entry["upstreams"] = list(self.upstreams)
        return entry

    def tools_note(self) -> str | None:
        """Why offered tools do nothing with this model, or None when they may work."""
        if self.tools is not False:
            return None
        name = self.id.encode("ascii", "backslashreplace").decode()
        return (
            f"the chat template of model {name} cannot render tools: the model never sees "
            "the tools of this request and will not call them"
        )


@dataclass(frozen=True, slots=True)
class ModelList:
    models: tuple[ModelInfo, ...]
    dialect: Dialect
    fetched_at: float
    by_name: dict[str, ModelInfo] = field(default_factory=dict, compare=False)

    @classmethod
    def build(cls, models: Iterable[ModelInfo], dialect: Dialect, fetched_at: float) -> ModelList:
        models = tuple(models)
        by_name: dict[str, ModelInfo] = {}
        for model in models:
            for alias in model.aliases:
                by_name.setdefault(alias, model)
        for model in models:
            by_name[model.id] = model  # real ids win over upstream aliases
        return cls(models, dialect, fetched_at, by_name)

    def ids(self) -> list[str]:
        return [m.id for m in self.models]


def parse_lmstudio_v1(data: Any) -> list[ModelInfo] | None:
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list):
        return None
    out: list[ModelInfo] = []
    for entry in models:
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            continue
        raw_instances = entry.get("loaded_instances")
        listed = raw_instances if isinstance(raw_instances, list) else []
        instances = [i for i in listed if isinstance(i, dict)]
        context = entry.get("max_context_length")
        for instance in instances:
            config = instance.get("config")
            if isinstance(config, dict) and int_or_none(config.get("context_length")) is not None:
                context = config["context_length"]  # what the loaded instance really has
                break
        capabilities = entry.get("capabilities") or {}
        kind = entry.get("type")
        vision = isinstance(capabilities, dict) and capabilities.get("vision") is True
        model_type: ModelType = (
            "embeddings"
            if kind in ("embedding", "embeddings")
            else ("vlm" if vision else "llm")
            if kind in ("llm", "vlm")
            else "unknown"
        )
        extra_ids = tuple(
            str(i["id"])
            for i in instances
            if isinstance(i.get("id"), str) and i["id"] != entry["key"]
        )
        out.append(
            ModelInfo(
                id=entry["key"],
                type=model_type,
                state="loaded" if instances else "not-loaded",
                context_length=int_or_none(context),
                owned_by=entry.get("publisher")
                if isinstance(entry.get("publisher"), str)
                else None,
                aliases=extra_ids,
                capabilities=tuple(k for k, v in capabilities.items() if v is True)
                if isinstance(capabilities, dict)
                else (),
                vision=None if model_type == "unknown" else vision,
                parallel=LMSTUDIO_PARALLEL,
                instances=tuple(str(i["id"]) for i in instances if isinstance(i.get("id"), str)),
            )
        )
    return out


def parse_lmstudio_v0(data: Any) -> list[ModelInfo] | None:
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return None
    # A plain /v1/models answer has no "state": not LM Studio's native list.
    if entries and not any(isinstance(e, dict) and "state" in e for e in entries):
        return None
    out: list[ModelInfo] = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        kind = entry.get("type")
        state = entry.get("state")
        context = entry.get("max_context_length")
        out.append(
            ModelInfo(
                id=entry["id"],
                type=kind if kind in ("llm", "vlm", "embeddings") else "unknown",
                # "idle" wakes up on the next request, so it counts as loaded.
                state="loaded"
                if state in ("loaded", "idle")
                else "not-loaded"
                if state == "not-loaded"
                else "unknown",
                context_length=int_or_none(context),
                owned_by=entry.get("publisher")
                if isinstance(entry.get("publisher"), str)
                else None,
                capabilities=tuple(
                    c for c in _list(entry.get("capabilities")) if isinstance(c, str)
                ),
                vision={"vlm": True, "llm": False, "embeddings": False}.get(str(kind)),
                parallel=LMSTUDIO_PARALLEL,
            )
        )
    return out


def parse_openai(data: Any) -> list[ModelInfo] | None:
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return None
    out: list[ModelInfo] = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        meta: dict[str, Any] = entry["meta"] if isinstance(entry.get("meta"), dict) else {}
        # llama.cpp: the context the server runs with, before the one the model was trained on.
        context = meta.get("n_ctx") or meta.get("n_ctx_train") or entry.get("max_model_len")
        raw_aliases = entry.get("aliases")
        aliases = (
            tuple(a for a in raw_aliases if isinstance(a, str) and a != entry["id"])
            if isinstance(raw_aliases, list)
            else ()
        )
        # llama.cpp's router mode reports each model's status; others report none.
        status = entry.get("status")
        value = status.get("value") if isinstance(status, dict) else None
        value = value if isinstance(value, str) else None
        failed = isinstance(status, dict) and status.get("failed") is True
        state: ModelState = (
            "loaded"
            if value in ("loaded", "loading", "sleeping")
            else "not-loaded"
            if value == "unloaded"
            else "unknown"
        )
        # llama.cpp says what the model reads; other servers do not.
        architecture = entry.get("architecture")
        modalities = (
            architecture.get("input_modalities") if isinstance(architecture, dict) else None
        )
        out.append(
            ModelInfo(
                id=entry["id"],
                state=state,
                context_length=int_or_none(context),
                owned_by=entry.get("owned_by") if isinstance(entry.get("owned_by"), str) else None,
                aliases=aliases,
                vision=("image" in modalities) if isinstance(modalities, list) else None,
                status="failed" if failed and value == "unloaded" else value,
                load_error=_exit_reason(status) if isinstance(status, dict) and failed else None,
                instances=(entry["id"],) if value in ("loaded", "loading", "sleeping") else (),
            )
        )
    return out


def is_router_list(data: Any) -> bool:
    """Whether a ``/v1/models`` answer is llama.cpp's router's: its entries carry a
    ``status`` object (a server of one model, and other servers, have none)."""
    entries = data.get("data") if isinstance(data, dict) else None
    return isinstance(entries, list) and any(
        isinstance(e, dict) and isinstance(e.get("status"), dict) for e in entries
    )


def parse_llamacpp_router(data: Any) -> list[ModelInfo] | None:
    """llama.cpp's router mode (``llama-server`` without ``-m``): ``GET /v1/models`` (or
    ``/models``) with ``status: {value: unloaded|loading|loaded|sleeping|downloading,
    failed?, exit_code?}`` on each entry; None when the list is not the router's."""
    return parse_openai(data) if is_router_list(data) else None


def parse_ollama(tags: Any, running: Any) -> list[ModelInfo] | None:
    """Ollama: the local models of ``GET /api/tags`` (``{"models": [{name, model,
    details}]}``) marked loaded when ``GET /api/ps`` lists them too (``running``; None
    when that list could not be read: the state is then unknown). None when ``tags`` is
    not Ollama's list."""
    listed = tags.get("models") if isinstance(tags, dict) else None
    if not isinstance(listed, list):
        return None
    ps = running.get("models") if isinstance(running, dict) else None
    loaded: dict[str, dict[str, Any]] = {}
    for entry in ps if isinstance(ps, list) else []:
        name = _ollama_name(entry)
        if name is not None:
            loaded[name] = entry
    names = [n for n in map(_ollama_name, listed) if n is not None]
    names += [n for n in loaded if n not in set(names)]  # loaded, yet not listed
    out: list[ModelInfo] = []
    for name in dict.fromkeys(names):
        here = loaded.get(name)
        state: ModelState = "loaded" if here is not None else "not-loaded"
        if not isinstance(ps, list):
            state = "unknown"
        short = name.removesuffix(":latest")
        out.append(
            ModelInfo(
                id=name,
                state=state,
                context_length=int_or_none(here.get("context_length")) if here else None,
                owned_by="ollama",
                aliases=(short,) if short != name else (),
                instances=(name,) if here is not None else (),
            )
        )
    return out


def _ollama_name(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return None
    name = entry.get("name") or entry.get("model")
    return name if isinstance(name, str) and name else None


def _exit_reason(status: dict[str, Any]) -> str:
    code = status.get("exit_code")
    shown = code if type(code) is int else "unknown"
    return f"the model's process exited with code {shown} before it was ready"


def template_renders_tools(props: Any) -> bool | None:
    """What llama.cpp's ``/props`` says of its chat template and tools (None: nothing)."""
    caps = props.get("chat_template_caps") if isinstance(props, dict) else None
    tools = caps.get("supports_tools") if isinstance(caps, dict) else None
    return tools if isinstance(tools, bool) else None


def int_or_none(value: Any) -> int | None:
    return value if type(value) is int and value > 0 else None  # not bool, not junk


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
