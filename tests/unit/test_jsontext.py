"""jsontext.dumps writes what json.dumps(ensure_ascii=False, compact) writes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.jsontext import dumps, dumps_bytes

VALUES: list[Any] = [
    {"text": 'é ✓ "quoted" \\ \n\t\u2028 😀', "n": [1, -2, 2.5, 1e300, None, True, False]},
    {"nested": {"list": [{}, [], [[{"a": ""}]]]}, "empty": ""},
    [],
    "a string\n",
    0,
    None,
    {1: "int keys become strings", 2.5: "so do floats"},
    {"nan": float("nan"), "inf": float("inf")},
]


@pytest.mark.parametrize("value", VALUES)
def test_same_text_as_the_standard_library(value: Any) -> None:
    expected = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    assert dumps(value) == expected
    assert dumps_bytes(value) == expected.encode()


def test_what_is_not_json_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        dumps({"x": object()})
