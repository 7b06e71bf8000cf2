"""Structured outputs, pure: the schema a request asks for, the JSON answer read out of
what a model wrote, its validation errors, the upstream's format, the feedback turn."""

from __future__ import annotations

import pytest

from proxy.structured import (
    MAX_ERRORS,
    SchemaProblem,
    answer_schema,
    check_schema,
    extract_json,
    feedback,
    upstream_format,
)

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def person() -> object:
    return answer_schema({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})


@pytest.mark.parametrize(
    ("content", "text"),
    [
        ('{"a": 1}', '{"a": 1}'),
        ('  \n{"a": 1}\n ', '{"a": 1}'),
        ('```json\n{"a": 1}\n```', '{"a": 1}'),
        ('```\n{"a": 1}\n```', '{"a": 1}'),
        ('Here is the answer:\n```json\n{"a": 1}\n```\nHope it helps.', '{"a": 1}'),
        ('I think the user wants a person.\n\n{"a": 1}', '{"a": 1}'),
        ('{"a": 1}\n\nLet me know if you need more.', '{"a": 1}'),
        ("[1, 2]", "[1, 2]"),
        ('Well {not json} then {"a": [1]}', '{"a": [1]}'),
    ],
)
def test_the_json_answer_is_read_out_of_what_the_model_wrote(content, text):
    """Whitespace, one fence, prose before or after one value: the value comes out clean."""
    found = extract_json(content)
    assert found is not None
    assert found[0] == text


@pytest.mark.parametrize(
    "content",
    [
        "no json here",
        '{"a": 1} and also {"b": 2}',  # two values: which one?
        '```json\n{"a": 1}\n```\n```json\n{"b": 2}\n```',
        '{"a": 1',  # cut off
        '{"a": NaN}',
        "",
    ],
)
def test_no_answer_is_read_where_it_is_ambiguous_or_missing(content):
    """Nothing is guessed: none, or more than one value, is no answer."""
    assert extract_json(content) is None


def test_a_valid_answer_validates_and_comes_out_clean():
    """A fenced valid object is valid, with its clean text."""
    verdict = person().check('```json\n{"name": "Ada", "age": 36}\n```')
    assert verdict.valid
    assert verdict.text == '{"name": "Ada", "age": 36}'


def test_errors_name_the_path_and_what_is_wrong():
    """Each error gives a JSON path and jsonschema's message."""
    verdict = person().check('{"name": 5, "age": "x", "extra": 1}')
    assert not verdict.valid
    assert "at $.age: 'x' is not of type 'integer'" in verdict.errors
    assert "at $.name: 5 is not of type 'string'" in verdict.errors
    assert any("extra" in e for e in verdict.errors)


def test_errors_are_capped_in_count_and_length():
    """At most MAX_ERRORS errors and a note of the rest; long messages are cut."""
    schema = {"type": "array", "items": {"type": "integer"}}
    checker = answer_schema({"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    verdict = checker.check('["' + "x" * 1000 + '", "b", "c", "d", "e", "f", "g"]')
    assert len(verdict.errors) == MAX_ERRORS + 1
    assert verdict.errors[-1] == "... and 2 more error(s)."
    assert all(len(e) <= 310 for e in verdict.errors)


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("Sorry, I cannot do that.", "The answer is not JSON: Expecting value at line 1 column 1."),
        ("", "The answer is empty: a JSON value was required."),
        (None, "The answer is empty: a JSON value was required."),
        ('{"a": 1} {"b": 2}', "The answer is not JSON: Extra data at line 1 column 10."),
    ],
)
def test_an_answer_without_json_says_so(content, error):
    """Garbage, nothing, or two values: one error that says which."""
    verdict = person().check(content)
    assert verdict.errors == (error,)
    assert verdict.text is None


def test_json_object_wants_an_object():
    """json_object: any object is valid, an array is not."""
    checker = answer_schema({"type": "json_object"})
    assert checker.check('{"x": [1]}').valid
    assert checker.check("[1]").errors == ("The answer must be a JSON object, not an array.",)


def test_llama_cpp_json_object_with_a_schema_is_checked_against_it():
    """llama.cpp's {"type": "json_object", "schema": ...} counts its schema."""
    checker = answer_schema({"type": "json_object", "schema": PERSON})
    assert not checker.check('{"name": "Ada"}').valid


@pytest.mark.parametrize("fmt", [None, "json", {"type": "text"}, {"type": "grammar"}])
def test_formats_that_ask_for_no_json_are_left_alone(fmt):
    """No response_format, text, or one lmbridge does not know: nothing is checked."""
    assert answer_schema(fmt) is None


def test_a_schema_without_schema_accepts_any_json():
    """json_schema with no 'schema': any JSON value is valid."""
    checker = answer_schema({"type": "json_schema", "json_schema": {"name": "x"}})
    assert checker.check("[1]").valid


@pytest.mark.parametrize(
    ("fmt", "param", "words"),
    [
        (
            {"type": "json_schema", "json_schema": "x"},
            "response_format.json_schema",
            "must be an object",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": []}},
            "response_format.json_schema.schema",
            "must be an object",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "thing"}}},
            "response_format.json_schema.schema",
            "not valid ($.type)",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"minLength": -1}}},
            "response_format.json_schema.schema",
            "not valid",
        ),
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"$ref": "https://example.com/s.json"}},
            },
            "response_format.json_schema.schema",
            "fetches none",
        ),
        (
            {"type": "json_object", "schema": {"type": 3}},
            "response_format.schema",
            "not valid",
        ),
    ],
)
def test_a_bad_schema_is_refused_with_its_param(fmt, param, words):
    """A schema that is not one, or refers outside itself: SchemaProblem with the param."""
    with pytest.raises(SchemaProblem) as caught:
        answer_schema(fmt)
    assert caught.value.param == param
    assert words in str(caught.value)


def test_a_schema_is_checked_once_and_its_verdict_kept():
    """The same schema again (keys in another order) reuses its validator; a bad one is
    refused every time, with the param of each request."""
    first = answer_schema({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    again = {"type": "json_schema", "json_schema": {"schema": dict(reversed(PERSON.items()))}}
    second = answer_schema(again)
    assert first is not None and second is not None
    assert first.validator is second.validator
    assert not second.check('{"name": "Ada", "age": 36}').errors
    bad = {"type": 3}
    for param in ("text.format.schema", "response_format.schema"):
        with pytest.raises(SchemaProblem) as caught:
            check_schema(bad, param)
        assert caught.value.param == param


def test_a_large_schema_is_checked_without_being_kept():
    big = {"type": "object", "properties": {f"p{i:05}": {"type": "string"} for i in range(5000)}}
    schema = answer_schema({"type": "json_schema", "json_schema": {"schema": big}})
    assert schema is not None
    assert schema.check('{"p00001": 3}').errors
    with pytest.raises(SchemaProblem):
        check_schema({**big, "type": 3}, "response_format")


def test_the_declared_draft_is_used():
    """A draft-07 schema is checked as draft-07 (its 'items' array form is valid there)."""
    schema = {"$schema": "http://json-schema.org/draft-07/schema#", "items": [{"type": "string"}]}
    check_schema(schema, "p")
    checker = answer_schema({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert not checker.check("[1]").valid


def test_local_references_resolve():
    """$defs references (as pydantic writes them) resolve inside the schema."""
    schema = {
        "$defs": {"P": PERSON},
        "type": "object",
        "properties": {"people": {"type": "array", "items": {"$ref": "#/$defs/P"}}},
    }
    checker = answer_schema({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert checker.check('{"people": [{"name": "A", "age": 1}]}').valid
    assert checker.check('{"people": [{"name": "A"}]}').errors == (
        "at $.people[0]: 'age' is a required property",
    )


def test_a_missing_local_reference_is_an_error_not_a_crash():
    """A '#/...' reference to nothing: an error text, no exception."""
    schema = {"$ref": "#/$defs/Missing"}
    checker = answer_schema({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    (error,) = checker.check("{}").errors
    assert "cannot be resolved" in error


@pytest.mark.parametrize(
    ("fmt", "lmstudio", "sent"),
    [
        (
            {"type": "json_object"},
            True,
            {
                "type": "json_schema",
                "json_schema": {"name": "json_object", "schema": {"type": "object"}},
            },
        ),
        (
            {"type": "json_object", "schema": PERSON},
            True,
            {"type": "json_schema", "json_schema": {"name": "json_object", "schema": PERSON}},
        ),
        ({"type": "json_object"}, False, None),
        ({"type": "json_schema", "json_schema": {"name": "p", "strict": True}}, True, None),
        ("junk", True, None),
    ],
)
def test_the_format_sent_is_the_one_the_upstream_takes(fmt, lmstudio, sent):
    """LM Studio gets json_schema for json_object; anything else goes as it came."""
    assert upstream_format(fmt, lmstudio=lmstudio) == sent


def test_feedback_quotes_the_answer_and_the_errors():
    """The retry appends the answer as the assistant's and the errors as the user's."""
    verdict = person().check('{"name": "Ada"}')
    assistant, user = feedback('{"name": "Ada"}', verdict)
    assert assistant == {"role": "assistant", "content": '{"name": "Ada"}'}
    assert user["role"] == "user"
    assert "- at $: 'age' is a required property" in user["content"]
    assert "only the corrected JSON" in user["content"]
