"""Compact JSON text, the one serialisation lmbridge writes (bodies, events, rows).

``json.dumps`` with options builds a ``JSONEncoder`` and its C encoder on every call,
which costs as much as encoding a small item; a stored response serialises seven
things. The C encoder is built once here. It skips the circular-reference check:
what lmbridge serialises is JSON it parsed or built, never a cycle.
"""

from __future__ import annotations

import json
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import Any

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))

if c_make_encoder is not None:
    _encode = c_make_encoder(
        None, _ENCODER.default, encode_basestring, None, ":", ",", False, False, True
    )

    def dumps(value: Any) -> str:
        if isinstance(value, str):
            return encode_basestring(value)
        return "".join(_encode(value, 0))

else:  # an interpreter without the C accelerator

    def dumps(value: Any) -> str:
        return _ENCODER.encode(value)


def dumps_bytes(value: Any) -> bytes:
    return dumps(value).encode()
