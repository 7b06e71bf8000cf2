"""Model profiles: what lmbridge does with one model's requests and answers, decided once
per request where the model is resolved and read by every path (chat pass-through, the
Responses API, MCP loops). Pure: no I/O.

A profile is detected from what the upstream says of the model (``detect``: llama.cpp's
``/props`` chat template and ``supports_tools``, LM Studio's capabilities, a few model
families known by name), then the ``[models]`` settings and ``[models."PATTERN"]``
tables override it (``profile_for``), then the request's ``lmbridge`` switches turn
parts off (``with_switches``). ``template_traits`` reads a chat template's text once,
when the model list is read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

from proxy.model_output.text_calls import DEFAULT_MAX_HELD
from proxy.model_output.think_tags import (
    MISTRAL_THINK,
    NAMED,
    SEED_THINK,
    THINK,
    THOUGHT,
    ThinkTags,
)

ReasoningInHistory = Literal["drop", "keep"]

# Model families whose thinking tags are known by name; the first variant is the one a
# template opens. Only names that cannot be mistaken for another family.
_FAMILY_TAGS: tuple[tuple[str, tuple[ThinkTags, ...]], ...] = (
    ("magistral", (MISTRAL_THINK, THINK)),  # [THINK] since 2509, <think> before
    ("seed-oss", (SEED_THINK,)),
    ("openthinker", (THOUGHT, THINK)),
    ("sky-t1", (THOUGHT,)),
)
# Families whose templates read the reasoning of earlier assistant messages and decide
# themselves what to drop: gpt-oss's analysis channel must come back between tool calls.
_KEEP_REASONING = ("gpt-oss",)

_LITERAL = re.compile(r"'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"")
_READS_REASONING = re.compile(r"""reasoning_content|\.thinking\b|\[['"]thinking['"]\]""")


@dataclass(frozen=True, slots=True)
class TemplateTraits:
    """What a chat template's text says about thinking."""

    think_tags: tuple[ThinkTags, ...] = ()  # the tags it writes around thinking
    opens_think: bool = False  # its generation prompt opens the block itself
    reads_reasoning: bool = False  # it renders the reasoning of assistant messages


def template_traits(template: Any) -> TemplateTraits | None:
    """The traits of a chat template's text (None: no template)."""
    if not isinstance(template, str) or not template:
        return None
    tags = tuple(t for t in NAMED.values() if t.open in template and t.close in template)
    # The generation prompt comes last in every template seen: a literal there that
    # opens the block without closing it (Qwen3-Thinking, QwQ, DeepSeek-R1) means the
    # answer starts inside the reasoning. Qwen3's '<think>\n\n</think>' (thinking off)
    # closes what it opens.
    tail = template[template.rfind("add_generation_prompt") :]
    opens = False
    for match in _LITERAL.finditer(tail):
        literal = match.group(1) or match.group(2) or ""
        for t in tags:
            at = literal.find(t.open)
            if at >= 0 and t.close not in literal[at:]:
                opens = True
                tags = (t, *(other for other in tags if other != t))
    return TemplateTraits(tags, opens, bool(_READS_REASONING.search(template)))


class Described(Protocol):
    """What the catalog knows of a model (``catalog.ModelInfo``)."""

    @property
    def id(self) -> str: ...
    @property
    def capabilities(self) -> tuple[str, ...]: ...
    @property
    def tools(self) -> bool | None: ...
    @property
    def template(self) -> TemplateTraits | None: ...


class Overrides(Protocol):
    """A model's settings (``config.ModelSettings`` as ``settings_for`` resolves it;
    None: not set, the detected value holds)."""

    @property
    def text_tool_calls(self) -> bool | None: ...
    @property
    def text_call_hold(self) -> int | None: ...
    @property
    def describe_tools(self) -> bool | None: ...
    @property
    def think_tags(self) -> bool | list[str] | None: ...
    @property
    def think_opened(self) -> bool | None: ...
    @property
    def template_tools(self) -> bool | None: ...
    @property
    def reasoning_in_history(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """What lmbridge normalises for one model."""

    # Whether the chat template renders tools (None: the upstream does not say).
    tools: bool | None = None
    # Tool calls written as text read back as tool calls.
    text_tool_calls: bool = True
    # Most characters of a stream held back while they may still be a text call.
    text_call_hold: int = DEFAULT_MAX_HELD
    # Tools described in the system message (the template cannot render them, and
    # text calls are read back).
    describe_tools: bool = False
    # Thinking in these tags at the start of the content becomes reasoning (none: off).
    think_tags: tuple[ThinkTags, ...] = (THINK,)
    # The template opens the first variant's block: the answer starts inside it.
    think_opened: bool = False
    # Whether the reasoning of earlier assistant turns goes back upstream.
    reasoning_in_history: ReasoningInHistory = "drop"

    @property
    def keeps_reasoning(self) -> bool:
        return self.reasoning_in_history == "keep"

    def as_json(self) -> dict[str, Any]:
        """The profile as the ``profile`` field of ``/v1/models`` shows it."""
        return {
            "tools": self.tools,
            "text_tool_calls": self.text_tool_calls,
            "describe_tools": self.describe_tools,
            "think_tags": [f"{t.open},{t.close}" for t in self.think_tags],
            "think_opened": self.think_opened,
            "reasoning_in_history": self.reasoning_in_history,
        }


def detect(model: Described) -> ModelProfile:
    """The profile the upstream's description of a model implies."""
    name = model.id.lower()
    traits = model.template
    tools = model.tools
    if tools is None and "trained_for_tool_use" in model.capabilities:
        tools = True  # LM Studio renders and parses tools for such models
    tags: tuple[ThinkTags, ...] = (THINK,)
    if traits is not None and traits.think_tags:
        tags = traits.think_tags
    else:
        tags = next((t for family, t in _FAMILY_TAGS if family in name), tags)
    keep = (traits is not None and traits.reads_reasoning) or any(
        family in name for family in _KEEP_REASONING
    )
    return ModelProfile(
        tools=tools,
        describe_tools=tools is False,
        think_tags=tags,
        think_opened=traits is not None and traits.opens_think,
        reasoning_in_history="keep" if keep else "drop",
    )


def profile_for(model: Described, settings: Overrides) -> ModelProfile:
    """The profile in effect for a model: detected, then its settings over it."""
    found = detect(model)
    tools = found.tools if settings.template_tools is None else settings.template_tools
    think = settings.think_tags
    tags = (
        parse_tags(think) if isinstance(think, list) else () if think is False else found.think_tags
    )
    history: ReasoningInHistory = found.reasoning_in_history
    if settings.reasoning_in_history == "keep":
        history = "keep"
    elif settings.reasoning_in_history == "drop":
        history = "drop"
    text_calls = settings.text_tool_calls is not False
    return ModelProfile(
        tools=tools,
        text_tool_calls=text_calls,
        text_call_hold=settings.text_call_hold or DEFAULT_MAX_HELD,
        describe_tools=settings.describe_tools is not False and text_calls and tools is False,
        think_tags=tags,
        think_opened=found.think_opened if settings.think_opened is None else settings.think_opened,
        reasoning_in_history=history,
    )


def with_switches(profile: ModelProfile, switches: Mapping[str, bool]) -> ModelProfile:
    """The profile with what the request's ``lmbridge`` switches turned off."""
    if not switches:
        return profile
    return replace(
        profile,
        text_tool_calls=profile.text_tool_calls and switches.get("text_tool_calls", True),
        describe_tools=profile.describe_tools
        and switches.get("describe_tools", True)
        and switches.get("text_tool_calls", True),
        think_tags=profile.think_tags if switches.get("think_tags", True) else (),
    )


def parse_tags(values: list[str]) -> tuple[ThinkTags, ...]:
    """Tag variants as configured: a name (``think``, ``thinking``, ``thought``,
    ``seed``, ``mistral``) or ``"OPEN,CLOSE"``; ValueError says what is wrong."""
    tags = []
    for value in values:
        if value in NAMED:
            tags.append(NAMED[value])
            continue
        open_, sep, close = value.partition(",")
        if not sep or not open_.strip() or not close.strip():
            raise ValueError(
                f"{value!r} is neither a named style ({', '.join(NAMED)}) nor 'OPEN,CLOSE'"
            )
        tags.append(ThinkTags(open_.strip(), close.strip()))
    return tuple(tags)
