"""Model profiles: detected from what the upstream says, overridden by the settings and
the request's switches; the thinking tag variants they name, read whole and streamed."""

from __future__ import annotations

import itertools

import pytest

from proxy.config import ModelsConfig
from proxy.model_output.think_tags import (
    MISTRAL_THINK,
    SEED_THINK,
    THINK,
    THINKING,
    ReasoningSplitter,
    ThinkTags,
    split_reasoning,
)
from proxy.model_records import ModelInfo, parse_lmstudio_v1
from proxy.profiles import (
    ModelProfile,
    detect,
    parse_tags,
    profile_for,
    template_traits,
    with_switches,
)

# The ends of real chat templates (llama.cpp's /props chat_template), cut to what counts.
QWEN3 = (
    "{%- for message in messages %}{%- if message.role == 'assistant' %}"
    "{%- set reasoning_content = '' %}{%- if message.reasoning_content is string %}"
    "{%- set reasoning_content = message.reasoning_content %}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + "
    "'\\n</think>\\n\\n' + content.lstrip('\\n') }}{%- endif %}{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}\n{%- endif %}\n"
)
QWEN3_THINKING = QWEN3.replace(
    "{{- '<|im_start|>assistant\\n' }}", "{{- '<|im_start|>assistant\\n<think>\\n' }}"
)
DEEPSEEK_R1 = (
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}"
    "{% endif %}{% if add_generation_prompt and not ns.is_tool %}"
    "{{'<\uff5cAssistant\uff5c><think>\\n'}}{% endif %}"
)
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GPT_OSS = (
    "{%- elif message.role == 'assistant' and message.thinking and not "
    "future_final_message.found -%}{{- '<|start|>assistant<|channel|>analysis<|message|>' + "
    "message.thinking + '<|end|>' }}{%- endif -%}"
    "{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}"
)
MAGISTRAL = (
    "{%- if message['role'] == 'assistant' %}{{- '[THINK]' + message['thinking'] + "
    "'[/THINK]' }}{%- endif %}{%- if add_generation_prompt %}{%- endif %}"
)


def model(model_id: str = "m", **fields: object) -> ModelInfo:
    return ModelInfo(id=model_id, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("template", "tags", "opens", "reads"),
    [
        (QWEN3, (THINK,), False, True),
        (QWEN3_THINKING, (THINK,), True, True),
        (DEEPSEEK_R1, (THINK,), True, False),
        (SMOLLM2, (), False, False),
        (GPT_OSS, (), False, True),
        (MAGISTRAL, (MISTRAL_THINK,), False, True),
    ],
    ids=["qwen3", "qwen3-thinking", "deepseek-r1", "smollm2", "gpt-oss", "magistral"],
)
def test_template_traits(template, tags, opens, reads):
    """A chat template's text says its thinking tags, whether it opens the block in the
    generation prompt, and whether it renders the reasoning of earlier messages."""
    traits = template_traits(template)
    assert traits is not None
    assert (traits.think_tags, traits.opens_think, traits.reads_reasoning) == (tags, opens, reads)


def test_no_template_no_traits():
    """No template, or junk in its place: nothing is read."""
    assert template_traits(None) is None
    assert template_traits("") is None
    assert template_traits(42) is None


def test_detection_from_llamacpp_props():
    """llama.cpp: supports_tools false means describe the tools; a template that opens
    <think> means the answer starts inside it; one that reads reasoning keeps it."""
    smol = detect(model("smollm2", tools=False, template=template_traits(SMOLLM2)))
    assert smol == ModelProfile(tools=False, describe_tools=True, think_tags=(THINK,))
    qwen = detect(model("qwen3", tools=True, template=template_traits(QWEN3_THINKING)))
    assert qwen.think_opened and qwen.keeps_reasoning and not qwen.describe_tools


def test_detection_from_lmstudio_capabilities():
    """LM Studio: trained_for_tool_use means its template renders tools; families known by
    name get their tags (Magistral's [THINK]) and gpt-oss keeps its reasoning."""
    listing = {
        "models": [
            {
                "key": "mistralai/magistral-small-2509",
                "type": "llm",
                "capabilities": {"trained_for_tool_use": True, "reasoning": True},
            },
            {"key": "openai/gpt-oss-20b", "type": "llm", "capabilities": {"reasoning": True}},
            {"key": "plain", "type": "llm", "capabilities": {}},
        ]
    }
    magistral, gpt_oss, plain = (detect(m) for m in parse_lmstudio_v1(listing) or [])
    assert magistral.tools is True
    assert magistral.think_tags == (MISTRAL_THINK, THINK)
    assert magistral.reasoning_in_history == "drop"
    assert gpt_oss.tools is None and gpt_oss.reasoning_in_history == "keep"
    assert plain == ModelProfile()


def test_settings_override_detection_most_specific_first():
    """[models] defaults, then the matching tables (exact over longer glob over shorter)
    override what was detected; unset keys keep the detected value."""
    config = ModelsConfig.model_validate(
        {
            "qwen3-*": {"reasoning_in_history": "drop", "think_tags": ["think", "thinking"]},
            "qwen3-4b*": {"think_opened": False},
            "qwen3-4b-thinking": {"reasoning_in_history": "keep"},
            "smol*": {"template_tools": True},
            "tiny": {"template_tools": False},
        }
    )
    traits = template_traits(QWEN3_THINKING)
    qwen = profile_for(model("qwen3-8b", template=traits), config.settings_for("qwen3-8b"))
    assert qwen.think_tags == (THINK, THINKING)
    assert qwen.think_opened and qwen.reasoning_in_history == "drop"
    small = profile_for(
        model("qwen3-4b-thinking", template=traits), config.settings_for("qwen3-4b-thinking")
    )
    assert not small.think_opened and small.reasoning_in_history == "keep"
    smol = profile_for(model("smollm2", tools=False), config.settings_for("smollm2"))
    assert smol.tools is True and not smol.describe_tools
    tiny = profile_for(model("tiny"), config.settings_for("tiny"))
    assert tiny.tools is False and tiny.describe_tools


def test_global_settings_turn_parts_off_for_every_model():
    """models.think_tags = false, describe_tools = false, text_tool_calls = false: off for
    every model whatever was detected (describe_tools needs text calls to read back)."""
    smol = model("smol", tools=False)
    off = ModelsConfig.model_validate({"think_tags": False, "describe_tools": False})
    profile = profile_for(smol, off.settings_for("smol"))
    assert profile.think_tags == () and not profile.describe_tools
    no_text = ModelsConfig.model_validate({"text_tool_calls": False})
    profile = profile_for(smol, no_text.settings_for("smol"))
    assert not profile.text_tool_calls and not profile.describe_tools


def test_request_switches_turn_parts_off_only():
    """The request's lmbridge switches turn parts off; true changes nothing."""
    profile = ModelProfile(tools=False, describe_tools=True)
    assert with_switches(profile, {}) is profile
    assert with_switches(profile, {"think_tags": True, "describe_tools": True}) == profile
    off = with_switches(profile, {"think_tags": False, "describe_tools": False})
    assert off.think_tags == () and not off.describe_tools and off.text_tool_calls
    assert not with_switches(profile, {"text_tool_calls": False}).describe_tools


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["think"], (THINK,)),
        (["seed", "mistral"], (SEED_THINK, MISTRAL_THINK)),
        (["<r>, </r>"], (ThinkTags("<r>", "</r>"),)),
    ],
)
def test_tag_settings(values, expected):
    """A configured variant is a name or "OPEN,CLOSE"."""
    assert parse_tags(values) == expected


@pytest.mark.parametrize("bad", [["nope"], ["<r>"], [",</r>"], ["<r>, "]])
def test_bad_tag_settings_are_refused(bad):
    """A bad variant stops start-up with a line naming the table and key."""
    with pytest.raises(ValueError, match="think_tags"):
        ModelsConfig.model_validate({"qwen3-*": {"think_tags": bad}})
    with pytest.raises(ValueError, match="neither a named style"):
        parse_tags(bad)


def test_profile_as_json():
    """The profile as /v1/models shows it."""
    assert ModelProfile(think_tags=(MISTRAL_THINK,)).as_json() == {
        "tools": None,
        "text_tool_calls": True,
        "describe_tools": False,
        "think_tags": ["[THINK],[/THINK]"],
        "think_opened": False,
        "reasoning_in_history": "drop",
    }


# --- the tag variants a profile names, read whole and streamed -----------------

VARIANTS = (MISTRAL_THINK, THINK)


@pytest.mark.parametrize(
    ("content", "opened", "truncated", "reasoning", "answer"),
    [
        ("[THINK]plan[/THINK]\n\nDone.", False, False, "plan", "Done."),
        ("<think>plan</think>Done.", False, False, "plan", "Done."),
        ("[THINK]a <think> b[/THINK]c", False, False, "a <think> b", "c"),
        ("[TOOL_CALLS]x", False, False, "", "[TOOL_CALLS]x"),
        ("[THI", False, False, "", "[THI"),
        ("inside already[/THINK]answer", True, False, "inside already", "answer"),
        ("[THINK]cut off by the len", False, True, "cut off by the len", ""),
        ("inside and cut", True, True, "inside and cut", ""),
    ],
)
def test_variants_at_every_cut(content, opened, truncated, reasoning, answer):
    """Every variant is read, whole and for every place a stream can be cut in two or
    three deltas (an unclosed block cut by the length limit stays reasoning)."""
    assert split_reasoning(content, VARIANTS, opened=opened, truncated=truncated) == (
        reasoning,
        answer,
    )
    n = len(content)
    cuts = [[i] for i in range(1, n)] + [[i, j] for i in range(1, n) for j in range(i + 1, n)]
    for cut in cuts:
        splitter = ReasoningSplitter(VARIANTS, opened=opened)
        edges = [0, *cut, n]
        parts = [splitter.feed(content[a:b]) for a, b in itertools.pairwise(edges)]
        parts.append(splitter.finish(truncated=truncated))
        got = ("".join(p.reasoning for p in parts), "".join(p.content for p in parts))
        assert got == (reasoning, answer), cut
