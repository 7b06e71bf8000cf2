"""The exception tree: each class's HTTP status and OpenAI error shape."""

from __future__ import annotations

import json

import pytest
from aiohttp import ClientConnectionResetError

from proxy.errors import (
    BadRequest,
    CircuitOpen,
    LMBridgeError,
    ModelNotFound,
    ModelRequired,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    UpstreamError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
    error_body,
)
from proxy.middleware import describe_error
from storage.errors import StorageError

KEYS = {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("cls", "parent", "status", "error_type", "code"),
    [
        (LMBridgeError, Exception, 500, "server_error", "internal_error"),
        (BadRequest, LMBridgeError, 400, "invalid_request_error", "invalid_request"),
        (ModelRequired, BadRequest, 400, "invalid_request_error", "model_required"),
        (Unauthorized, LMBridgeError, 401, "invalid_request_error", "invalid_api_key"),
        (NotFound, LMBridgeError, 404, "invalid_request_error", "not_found"),
        (ModelNotFound, NotFound, 404, "invalid_request_error", "model_not_found"),
        (PayloadTooLarge, LMBridgeError, 413, "invalid_request_error", "request_too_large"),
        (UpstreamError, LMBridgeError, 502, "upstream_error", "upstream_error"),
        (UpstreamUnavailable, UpstreamError, 502, "upstream_error", "upstream_unavailable"),
        (UpstreamTimeout, UpstreamError, 504, "upstream_error", "upstream_timeout"),
        (CircuitOpen, UpstreamError, 503, "upstream_error", "circuit_open"),
    ],
)
def test_classes(cls, parent, status, error_type, code):
    """Each class has the status, OpenAI type and code of the tree in the module docstring."""
    exc = cls("Something went wrong.")
    assert type(exc).__mro__[1] is parent
    assert (exc.status, exc.error_type, exc.code) == (status, error_type, code)
    assert exc.retry_after is None
    assert str(exc) == exc.message == "Something went wrong."
    assert exc.body() == {
        "error": {
            "message": "Something went wrong.",
            "type": error_type,
            "param": None,
            "code": code,
        }
    }


def test_upstream_status_is_an_upstream_error():
    """UpstreamStatus belongs to the UpstreamError branch."""
    assert issubclass(UpstreamStatus, UpstreamError)


def test_param_and_code_override():
    """param and code given to the constructor appear in the body."""
    exc = NotFound("Unknown route.", param="path", code="unknown_route")
    assert exc.body() == {
        "error": {
            "message": "Unknown route.",
            "type": "invalid_request_error",
            "param": "path",
            "code": "unknown_route",
        }
    }


def test_code_override_is_per_instance():
    """Overriding the code of one instance leaves the class and other instances alone."""
    BadRequest("a", code="custom")
    assert BadRequest("b").code == "invalid_request"
    assert BadRequest.code == "invalid_request"


def test_body_is_json_serialisable():
    """body() can be written as JSON as it is."""
    body = ModelRequired("Say which model.", param="model").body()
    assert json.loads(json.dumps(body)) == body
    assert set(body) == {"error"}
    assert set(body["error"]) == KEYS


def test_error_body_shape():
    """error_body builds the one OpenAI error shape, with param and code None by default."""
    assert error_body("m", "t") == {
        "error": {"message": "m", "type": "t", "param": None, "code": None}
    }
    assert error_body("m", "t", "p", "c") == {
        "error": {"message": "m", "type": "t", "param": "p", "code": "c"}
    }


# --- UpstreamStatus --------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "raw", "body", "message"),
    [
        (
            400,
            b'{"error": {"message": "Bad messages", "type": "invalid_request_error", '
            b'"param": "messages", "code": "bad_messages"}}',
            {
                "error": {
                    "message": "Bad messages",
                    "type": "invalid_request_error",
                    "param": "messages",
                    "code": "bad_messages",
                }
            },
            "Bad messages",
        ),
        (
            500,
            b'{"error": {"message": "Boom", "type": "server_error", "extra": 1}}',
            {
                "error": {
                    "message": "Boom",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                    "extra": 1,
                }
            },
            "Boom",
        ),
        (
            400,
            # llama.cpp: the HTTP status as a number in "code".
            b'{"error": {"code": 400, "message": "the request exceeds the available context '
            b'size", "type": "exceed_context_size_error", "n_prompt_tokens": 5000, "n_ctx": 4096}}',
            {
                "error": {
                    # A context overflow gets OpenAI's code, whoever worded it.
                    "code": "context_length_exceeded",
                    "message": "the request exceeds the available context size",
                    "type": "invalid_request_error",
                    "param": None,
                    "n_prompt_tokens": 5000,
                    "n_ctx": 4096,
                }
            },
            "the request exceeds the available context size",
        ),
        (
            404,
            b'{"error": {"code": 404, "message": "Model not found", "type": "not_found_error"}}',
            {
                "error": {
                    "code": "404",
                    "message": "Model not found",
                    "type": "not_found_error",
                    "param": None,
                }
            },
            "Model not found",
        ),
        (
            400,
            b'{"error": {"message": "Missing type"}}',
            {
                "error": {
                    "message": "Missing type",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            },
            "Missing type",
        ),
        (
            400,
            # LM Studio: a plain string error.
            b'{"error": "Model qwen is not loaded"}',
            {
                "error": {
                    "message": "Model qwen is not loaded",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            },
            "Model qwen is not loaded",
        ),
        (
            422,
            b'{"error": {"message": "", "type": "invalid_request_error"}}',
            {
                "error": {
                    "message": "",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            },
            "upstream returned HTTP 422",
        ),
    ],
    ids=[
        "openai",
        "openai-5xx-extra-fields",
        "llama-cpp-numeric-code",
        "llama-cpp-404",
        "no-type",
        "string-error",
        "empty-message",
    ],
)
def test_upstream_status_with_error_json(status, raw, body, message):
    """An OpenAI-style upstream error body is kept (code made a string, missing keys added)."""
    exc = UpstreamStatus(status, raw, "application/json")
    assert exc.status == status
    assert exc.body() == body
    assert exc.message == str(exc) == message
    assert exc.raw == raw
    assert exc.content_type == "application/json"


def test_upstream_status_does_not_change_the_class():
    """The upstream's status is set on the instance, not on UpstreamStatus itself."""
    UpstreamStatus(418, b"teapot", "text/plain")
    assert UpstreamStatus.status == 502


@pytest.mark.parametrize(
    ("status", "raw", "message", "error_type"),
    [
        (
            404,
            b"404 page not found",
            "upstream returned HTTP 404: 404 page not found",
            "invalid_request_error",
        ),
        (405, b"", "upstream returned HTTP 405", "invalid_request_error"),
        (500, b"  \n ", "upstream returned HTTP 500", "upstream_error"),
        (
            502,
            b"<html><body><h1>502 Bad Gateway</h1></body></html>\n",
            "upstream returned HTTP 502: <html><body><h1>502 Bad Gateway</h1></body></html>",
            "upstream_error",
        ),
        (
            503,
            b'{"detail": "Service unavailable"}',
            'upstream returned HTTP 503: {"detail": "Service unavailable"}',
            "upstream_error",
        ),
        (400, b'["error"]', 'upstream returned HTTP 400: ["error"]', "invalid_request_error"),
        (
            400,
            b'{"error": {"code": 400}}',
            'upstream returned HTTP 400: {"error": {"code": 400}}',
            "invalid_request_error",
        ),
        (
            400,
            b'{"error": null}',
            'upstream returned HTTP 400: {"error": null}',
            "invalid_request_error",
        ),
        (500, b"caf\xe9 \xff", "upstream returned HTTP 500: caf\ufffd \ufffd", "upstream_error"),
        (400, b"{not json", "upstream returned HTTP 400: {not json", "invalid_request_error"),
    ],
    ids=[
        "plain-text",
        "empty",
        "whitespace",
        "html",
        "json-without-error",
        "json-array",
        "error-without-message",
        "error-null",
        "not-utf8",
        "broken-json",
    ],
)
def test_upstream_status_with_other_bodies(status, raw, message, error_type):
    """A body that is no OpenAI error is wrapped: message with the text, code upstream_<status>."""
    exc = UpstreamStatus(status, raw, "text/html")
    assert exc.status == status
    assert exc.message == message
    assert exc.body() == {
        "error": {
            "message": message,
            "type": error_type,
            "param": None,
            "code": f"upstream_{status}",
        }
    }


def test_upstream_status_long_body_is_truncated():
    """A long plain body is cut to 500 characters plus an ellipsis in the message."""
    raw = b"<html>" + b"x" * 5000 + b"</html>"
    exc = UpstreamStatus(500, raw, "text/html")
    prefix = "upstream returned HTTP 500: "
    assert exc.message.startswith(prefix + "<html>xxx")
    assert exc.message.endswith("...")
    assert len(exc.message) == len(prefix) + 500 + 3
    assert exc.body()["error"]["message"] == exc.message


def test_upstream_status_exactly_500_characters_is_not_truncated():
    """A body of exactly 500 characters is kept whole."""
    exc = UpstreamStatus(500, b"y" * 500, "text/plain")
    assert exc.message == "upstream returned HTTP 500: " + "y" * 500


def test_upstream_status_truncates_characters_not_bytes():
    """Truncation counts decoded characters, so a multi-byte character is never split."""
    exc = UpstreamStatus(500, "é".encode() * 600, "text/plain")
    assert exc.message == "upstream returned HTTP 500: " + "é" * 500 + "..."


@pytest.mark.parametrize(
    "raw", [b'{"error": "model crashed"}', b'{"error": {"message": "model crashed"}}']
)
def test_upstream_5xx_error_json_is_not_a_request_error(raw):
    """A 5xx whose body lacks an error type is typed upstream_error, like a plain-text 5xx."""
    assert UpstreamStatus(500, raw, "application/json").body()["error"]["type"] == "upstream_error"


@pytest.mark.parametrize(
    ("exc", "status", "code", "logged"),
    [
        (BadRequest("bad", param="x"), 400, "invalid_request", None),
        (StorageError("disk full"), 503, "storage_unavailable", "storage failed: disk full"),
        (RuntimeError("a bug"), 500, "internal_error", "unhandled error"),
        (ConnectionResetError("gone"), 499, None, None),
        (ClientConnectionResetError("gone"), 499, None, None),
    ],
)
def test_describe_error_is_the_one_mapping_of_exceptions(exc, status, code, logged, caplog):
    """Every exception out of a handler (or out of a stream already under way) gets its
    status, OpenAI body and log line here; a client that went away is not an error."""
    got_status, body = describe_error(exc, "req_1")
    assert got_status == status
    assert set(body["error"]) == KEYS
    assert body["error"]["code"] == code
    if logged is None:
        assert not caplog.records
    else:
        assert logged in caplog.text


@pytest.mark.parametrize(
    ("status", "raw", "overflow"),
    [
        (400, b'{"error": {"message": "x", "type": "exceed_context_size_error"}}', True),
        (400, b'{"error": {"message": "x", "code": "context_length_exceeded"}}', True),
        # vLLM
        (
            400,
            b'{"error": {"message": "This model\'s maximum context length is 4096 tokens"}}',
            True,
        ),
        # LM Studio
        (
            400,
            b'{"error": "The number of tokens to keep from the initial prompt is greater '
            b'than the context length"}',
            True,
        ),
        (413, b"prompt is too long", True),
        (400, b'{"error": {"message": "temperature must be positive"}}', False),
        (500, b'{"error": {"message": "context length exceeded"}}', False),
        (404, b'{"error": {"message": "model not found"}}', False),
    ],
)
def test_context_overflow_is_recognised_and_gets_openais_code(status, raw, overflow):
    """However a server words a prompt that does not fit, it is context_length_exceeded."""
    exc = UpstreamStatus(status, raw, "application/json")
    assert exc.context_overflow is overflow
    assert (exc.code == "context_length_exceeded") is overflow
