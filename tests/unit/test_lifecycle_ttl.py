"""A request's own idle ttl: LM Studio's ``ttl`` and Ollama's ``keep_alive``."""

from __future__ import annotations

import math

import pytest

from proxy.errors import BadRequest
from proxy.lifecycle import request_ttl


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, None),
        ({"ttl": None, "keep_alive": None}, None),
        ({"ttl": 300}, 300.0),
        ({"ttl": 0.5}, 0.5),
        ({"keep_alive": "5m"}, 300.0),
        ({"keep_alive": 30}, 30.0),
        ({"keep_alive": 0}, 0.0),
        ({"keep_alive": -1}, math.inf),
        ({"keep_alive": "-1m"}, math.inf),
        ({"keep_alive": "1h", "ttl": 5}, 3600.0),
    ],
)
def test_request_ttl(body, expected):
    """Seconds or a duration; negative keep_alive keeps the model for ever."""
    assert request_ttl(body) == expected


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"ttl": 0}, "ttl"),
        ({"ttl": -3}, "ttl"),
        ({"ttl": "5m"}, "ttl"),
        ({"ttl": True}, "ttl"),
        ({"keep_alive": "soon"}, "keep_alive"),
        ({"keep_alive": [1]}, "keep_alive"),
        ({"keep_alive": False}, "keep_alive"),
    ],
)
def test_bad_request_ttl_is_a_400(body, param):
    """A value that is no duration is a 400 naming the field."""
    with pytest.raises(BadRequest) as caught:
        request_ttl(body)
    assert caught.value.param == param
