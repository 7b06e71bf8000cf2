"""Structured outputs: the JSON answer a request asked for (``response_format`` on chat
completions, ``text.format`` on the Responses API), read out of what the model wrote and
checked against the request's schema. Pure: the callers send the corrected request
upstream when an answer does not validate (``chat_schema.py``, ``responses/tool_rounds.py``).

- ``answer_schema``: the schema a chat ``response_format`` asks for, checked before any
  upstream call (``SchemaProblem`` says what is wrong and where).
- ``upstream_format``: the ``response_format`` the upstream kind accepts.
- ``AnswerSchema.check``: the JSON answer of a message's content (a whole value, one
  fenced block, or one value with prose around it) and what does not validate.
- ``feedback``: the messages that ask the model once more.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import SchemaError, ValidationError
from referencing import Registry
from referencing.exceptions import Unresolvable

from proxy.jsontext import json_type
from proxy.usage import add_usage, chat_usage, usage_from_chat

Outcome = Literal["valid", "valid_after_retry", "invalid"]

# What the feedback and the error quote of the validation errors: enough to fix an
# answer, short enough for a small model's context and a readable error message.
MAX_ERRORS = 5
MAX_ERROR_CHARS = 300
# A long answer is searched for its JSON value from this many brackets at most: each
# try parses to the end of a value, and garbage must not cost quadratic time.
_MAX_STARTS = 64

# The schema sent for json_object to an upstream that only takes json_schema.
ANY_OBJECT: dict[str, Any] = {"type": "object"}

# No remote retrieval: a $ref is resolved inside the schema or not at all (lmbridge
# never fetches a URL a client put in a schema).
_NO_RETRIEVAL: Registry[Any] = Registry()


class SchemaProblem(ValueError):
    """A requested format lmbridge cannot check answers against; ``param`` says where."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class Verdict:
    """One answer checked: its JSON text as the client should get it (None: no JSON
    value found) and the errors found (none: valid)."""

    text: str | None
    errors: tuple[str, ...]

    @property
    def valid(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        return "; ".join(self.errors)


@dataclass(frozen=True, slots=True)
class AnswerSchema:
    """What a request asked the answer to be: any JSON object (``json_object``) or a
    value valid against a schema."""

    kind: Literal["json_object", "json_schema"]
    validator: Any  # a jsonschema validator for the schema (its own draft)

    def check(self, content: Any) -> Verdict:
        if not isinstance(content, str) or not content.strip():
            return Verdict(None, ("The answer is empty: a JSON value was required.",))
        found = extract_json(content)
        if found is None:
            return Verdict(None, (_not_json(content),))
        text, value = found
        if self.kind == "json_object" and not isinstance(value, dict):
            return Verdict(text, (f"The answer must be a JSON object, not {json_type(value)}.",))
        return Verdict(text, tuple(self._errors(value)))

    def _errors(self, value: Any) -> Iterator[str]:
        try:
            errors = sorted(self.validator.iter_errors(value), key=lambda e: list(e.path))
        except Unresolvable as exc:  # a $ref to a part of the schema that is missing
            yield f"The schema's reference {exc} cannot be resolved."
            return
        for error in errors[:MAX_ERRORS]:
            yield _describe(error)
        if len(errors) > MAX_ERRORS:
            yield f"... and {len(errors) - MAX_ERRORS} more error(s)."


def answer_schema(response_format: Any, param: str = "response_format") -> AnswerSchema | None:
    """The answer a chat ``response_format`` asks for; None: no JSON is asked for (or a
    format lmbridge does not know, left to the upstream). Raises SchemaProblem."""
    if not isinstance(response_format, Mapping):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        # llama.cpp's own shape carries a schema next to the type.
        schema = response_format.get("schema")
        if schema is None:
            return AnswerSchema("json_object", _validator(ANY_OBJECT, param))
        return AnswerSchema("json_object", _validator(schema, f"{param}.schema"))
    if kind != "json_schema":
        return None
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        raise SchemaProblem(
            "'json_schema' must be an object with the schema's 'name' and 'schema'.",
            f"{param}.json_schema",
        )
    schema = spec.get("schema", {})
    return AnswerSchema("json_schema", _validator(schema, f"{param}.json_schema.schema"))


def check_schema(schema: Any, param: str) -> None:
    """Raises SchemaProblem when ``schema`` is not a JSON schema lmbridge can check with."""
    _validator(schema, param)


def _validator(schema: Any, param: str) -> Any:
    if not isinstance(schema, Mapping):
        raise SchemaProblem("The JSON schema must be an object.", param)
    # An agent sends the same schema with every request: checking a schema costs
    # milliseconds, looking up its text microseconds. Schemas of any size are checked,
    # only small ones kept.
    key = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
    compiled = _compiled(key) if len(key) <= _CACHED_SCHEMA_BYTES else _compile(schema)
    if isinstance(compiled, str):
        raise SchemaProblem(compiled, param)
    return compiled


_CACHED_SCHEMA_BYTES = 64 * 1024


@functools.lru_cache(maxsize=128)
def _compiled(key: bytes) -> Any:
    return _compile(orjson.loads(key))


def _compile(schema: Mapping[str, Any]) -> Any:
    """A validator for ``schema``, or what is wrong with it. (jsonschema's validators
    keep no state between checks: one serves every request.)"""
    for ref in _references(schema):
        if not ref.startswith("#"):
            return (
                f"The JSON schema refers to {ref[:100]!r}: lmbridge resolves only references "
                "inside the schema (starting with '#'), it fetches none."
            )
    cls = validators.validator_for(schema, default=Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        return f"The JSON schema is not valid ({_path(exc.absolute_path)}): {_cut(exc.message)}"
    return cls(schema, registry=_NO_RETRIEVAL)


def _references(schema: Any) -> Iterator[str]:
    todo = [schema]
    while todo:
        node = todo.pop()
        if isinstance(node, Mapping):
            ref = node.get("$ref")
            if isinstance(ref, str):
                yield ref
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)


def upstream_format(response_format: Any, *, lmstudio: bool) -> dict[str, Any] | None:
    """The ``response_format`` to send instead of the request's, None: as it came. LM
    Studio refuses ``json_object`` and takes ``json_schema``: any object, or llama.cpp's
    schema next to the type."""
    if not lmstudio or not isinstance(response_format, Mapping):
        return None
    if response_format.get("type") != "json_object":
        return None
    schema = response_format.get("schema")
    return {
        "type": "json_schema",
        "json_schema": {
            "name": "json_object",
            "schema": schema if isinstance(schema, Mapping) else ANY_OBJECT,
        },
    }


def plan_answer(
    body: dict[str, Any], *, lmstudio: bool, param: str = "response_format"
) -> AnswerSchema | None:
    """The answer a chat request's ``response_format`` asks for (None: no JSON), with the
    format rewritten in place as the upstream takes it. Raises SchemaProblem."""
    fmt = body.get("response_format")
    schema = answer_schema(fmt, param)
    sent = upstream_format(fmt, lmstudio=lmstudio)
    if sent is not None:
        body["response_format"] = sent
    return schema


def feedback(answer: Any, verdict: Verdict) -> list[dict[str, Any]]:
    """The model's answer and a user message with what is wrong with it: appended to the
    request's messages, they ask for the answer once more."""
    errors = "\n".join(f"- {e}" for e in verdict.errors)
    return [
        {"role": "assistant", "content": answer if isinstance(answer, str) else ""},
        {
            "role": "user",
            "content": "Your answer does not match the required JSON schema:\n"
            f"{errors}\n"
            "Answer again with only the corrected JSON value: no explanation, no code fence.",
        },
    ]


# --- the JSON value of an answer -------------------------------------------

_FENCE = re.compile(r"```[ \t]*(?:json5?|JSON|jsonc)?[ \t]*\r?\n(.*?)```", re.DOTALL)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def extract_json(content: str) -> tuple[str, Any] | None:
    """The JSON value of an answer and its text, where the answer unambiguously holds
    one: the whole content, else the one fenced block (```json), else the one object or
    array with prose around it. None: no value, or more than one."""
    text = content.strip()
    whole = _parse(text)
    if whole is not None:
        return text, whole[0]
    fences = _FENCE.findall(text)
    if len(fences) == 1:
        inner = fences[0].strip()
        parsed = _parse(inner)
        if parsed is not None:
            return inner, parsed[0]
    found: list[tuple[str, Any]] = []
    position = 0
    for _ in range(_MAX_STARTS):
        start = _next_bracket(text, position)
        if start < 0:
            break
        try:
            value, end = _DECODER.raw_decode(text, start)
        except ValueError:
            position = start + 1
            continue
        found.append((text[start:end], value))
        position = end
    if len(found) == 1:
        return found[0]
    return None


def _next_bracket(text: str, position: int) -> int:
    starts = [i for i in (text.find("{", position), text.find("[", position)) if i >= 0]
    return min(starts) if starts else -1


def _parse(text: str) -> tuple[Any] | None:
    try:
        return (_DECODER.decode(text),)
    except (ValueError, RecursionError):
        return None


def _not_json(content: str) -> str:
    try:
        _DECODER.decode(content.strip())
    except json.JSONDecodeError as exc:
        return f"The answer is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}."
    except (ValueError, RecursionError):
        pass
    return "The answer holds no single JSON value."


def _describe(error: ValidationError) -> str:
    return f"at {_path(error.absolute_path)}: {_cut(error.message)}"


def _path(path: Any) -> str:
    out = "$"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _cut(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


# --- chat completions ------------------------------------------------------


def first_message(completion: Any) -> dict[str, Any] | None:
    """The message of a completion's first choice (local servers answer one)."""
    choices = completion.get("choices") if isinstance(completion, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    message = choices[0].get("message")
    return message if isinstance(message, dict) else None


def summed_usage(first: Any, second: Any) -> dict[str, Any] | None:
    """The chat ``usage`` of two calls together (the answer and the one asked again)."""
    a = usage_from_chat(first if isinstance(first, dict) else None)
    b = usage_from_chat(second if isinstance(second, dict) else None)
    return chat_usage(add_usage(a, b))


def completion_chunks(completion: dict[str, Any], *, include_usage: bool) -> list[dict[str, Any]]:
    """A whole completion as the chunks of a stream: the message in one delta, the
    finish reason, and the usage when the client asked for it."""
    top = {k: v for k, v in completion.items() if k not in ("choices", "usage", "object")}
    top["object"] = "chat.completion.chunk"
    chunks: list[dict[str, Any]] = []
    for choice in completion.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        if not isinstance(message, dict):
            message = {}
        delta = {k: v for k, v in message.items() if v is not None and k != "tool_calls"}
        calls = message.get("tool_calls")
        if isinstance(calls, list) and calls:
            delta["tool_calls"] = [
                {"index": n, **call} if isinstance(call, dict) else call
                for n, call in enumerate(calls)
            ]
        index = choice.get("index", 0)
        chunks.append({**top, "choices": [{"index": index, "delta": delta, "finish_reason": None}]})
        finish = choice.get("finish_reason") or "stop"
        chunks.append({**top, "choices": [{"index": index, "delta": {}, "finish_reason": finish}]})
    if include_usage and isinstance(completion.get("usage"), dict):
        chunks.append({**top, "choices": [], "usage": completion["usage"]})
    return chunks
