"""Log lines: one line per record whatever a client put in a path, a model name or an
id; text values quoted and escaped so that they read back, JSON lines valid JSON."""

from __future__ import annotations

import ast
import io
import json
import logging

import pytest

from proxy.logs import JSONFormatter, RequestLog, TextFormatter, configure_logging

# The issue's example: no space, so it used to be written bare.
FORGED = "/v1/responses/x\n2026-12-03T06:59:59.999\tINFO\tlmbridge.request:\trequest\tforged=1"
ESCAPED_FORGED = (
    '"/v1/responses/x\\n2026-12-03T06:59:59.999\\tINFO\\tlmbridge.request:\\trequest\\tforged=1"'
)


def text_line(value: object) -> str:
    stream = io.StringIO()
    log = RequestLog("text", stream)
    log.write({"path": value, "status": 200})
    log.flush()
    return stream.getvalue()


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("qwen/qwen3-4b@q4_k_m", "qwen/qwen3-4b@q4_k_m"),
        ("modèle✓", "modèle✓"),
        ("back\\slash", "back\\slash"),
        (200, "200"),
        ("", '""'),
        ("two words", '"two words"'),
        ('say"hi', '"say\\"hi"'),
        ("a=b", '"a=b"'),
        ('a "quoted" \\ value', '"a \\"quoted\\" \\\\ value"'),
        (FORGED, ESCAPED_FORGED),
        ("x\ry", '"x\\ry"'),
        ("nul\x00", '"nul\\x00"'),
        ("\x1b[2J\x1b[31mred", '"\\x1b[2J\\x1b[31mred"'),
        ("bell\x07", '"bell\\x07"'),
        ("del\x7f", '"del\\x7f"'),
        ("nel\x85", '"nel\\x85"'),
        ("csi\x9b31m", '"csi\\x9b31m"'),
        ("line\u2028sep", '"line\\u2028sep"'),
        ("para\u2029sep", '"para\\u2029sep"'),
        ("rlo\u202etxt.exe", '"rlo\\u202etxt.exe"'),
        ("lone\ud83d", '"lone\\ud83d"'),
        ("tag\U000e0041", '"tag\\U000e0041"'),
        ("vt\x0bff\x0cfs\x1c", '"vt\\x0bff\\x0cfs\\x1c"'),
    ],
)
def test_text_values_are_quoted_and_escaped(value, shown):
    """A text value is bare when unambiguous; else quoted, with every character that
    is not printable (C0, DEL, C1, U+2028/9, format characters) escaped."""
    line = text_line(value)
    assert line.endswith(f" path={shown} status=200\n")
    assert line.count("\n") == 1 and line[:-1].isprintable()
    if shown.startswith('"'):
        assert ast.literal_eval(shown) == value  # reads back as a Python string literal


def test_the_forged_request_line_of_the_issue_stays_one_line():
    """GET /v1/responses/x%0A2026-...%09INFO... writes one line, not two."""
    line = text_line(FORGED)
    assert line.count("\n") == 1
    assert "\n2026-12-03T06:59:59.999" not in line


@pytest.mark.parametrize(
    "value", [FORGED, "\x00\x1b\x7f\x85\x9b\u2028\u2029\u202e", "lone\ud83d", "\U000e0041", "é"]
)
def test_json_lines_escape_what_is_not_printable(value):
    """A JSON request line holds no raw control or line-separator character and reads
    back to the same value."""
    stream = io.StringIO()
    log = RequestLog("json", stream)
    log.write({"path": value, "model": value})
    log.flush()
    line = stream.getvalue()
    assert line.count("\n") == 1 and line[:-1].isprintable()
    entry = json.loads(line)
    assert entry["path"] == entry["model"] == value


def record(msg: str, *args: object, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("lmbridge.test", logging.WARNING, __file__, 1, msg, args, exc_info)


def test_text_messages_escape_what_is_not_printable():
    """A message carrying a client's string (a model name, a tool type) stays on its line;
    its spaces, quotes and backslashes are left as they are."""
    line = TextFormatter().format(record("unknown model %s", 'm"x\\y z\n\x1b[2J\u2028'))
    assert line.endswith('WARNING lmbridge.test: unknown model m"x\\y z\\n\\x1b[2J\\u2028')
    assert "\n" not in line


def test_traceback_lines_are_indented_and_escaped():
    """After a record's first line every line starts with spaces, so an exception message
    cannot forge a record; what is not printable in it is escaped."""
    try:
        raise ValueError("bad\n2026-12-03T06:59:59.999 INFO    lmbridge.request: forged\x1b[2J")
    except ValueError as caught:
        line = TextFormatter().format(record("unhandled error", exc=caught))
    first, *rest = line.split("\n")
    assert first.endswith("WARNING lmbridge.test: unhandled error")
    assert rest and all(part.startswith("  ") for part in rest)
    assert "  Traceback (most recent call last):" in rest
    assert "  2026-12-03T06:59:59.999 INFO    lmbridge.request: forged\\x1b[2J" in rest


def test_json_formatter_escapes_messages_and_fields():
    """The JSON formatter writes printable JSON that reads back to the same message."""
    message = "model \x7f\x85\u2028\ud83d"
    rec = record("%s", message)
    rec.fields = {"model": "\u2029"}
    line = JSONFormatter().format(rec)
    assert line.isprintable() and "\n" not in line
    entry = json.loads(line)
    assert (entry["msg"], entry["model"]) == (message, "\u2029")


@pytest.fixture
def logging_state():
    """configure_logging changes process-wide loggers: put them back afterwards."""
    root, own = logging.getLogger(), logging.getLogger("lmbridge")
    handlers, levels = list(root.handlers), (root.level, own.level)
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(levels[0])
    own.setLevel(levels[1])


def emit_all() -> None:
    logging.getLogger("httpx2").info("HTTP Request: POST http://bob:pw@mcp.local/mcp?token=t")
    logging.getLogger("mcp.client.streamable_http").debug("Sending client message")
    logging.getLogger("client").warning("library warning")
    logging.getLogger("lmbridge.mcp").debug("own debug")
    logging.getLogger("lmbridge.request").info("own info")
    logging.getLogger("lmbridge").warning("own warning")


@pytest.mark.parametrize(
    ("level", "library_level", "shown"),
    [
        ("info", "warning", ["library warning", "own info", "own warning"]),
        ("debug", "warning", ["library warning", "own debug", "own info", "own warning"]),
        ("warning", "warning", ["library warning", "own warning"]),
        ("error", "warning", []),
        ("info", "info", ["HTTP Request", "library warning", "own info", "own warning"]),
        ("warning", "debug", ["library warning", "own warning"]),
    ],
)
def test_libraries_log_at_warning_unless_asked(logging_state, level, library_level, shown):
    """lmbridge.* logs at logging.level; httpx2, mcp and other libraries only at warning
    (logging.library_level), or higher when logging.level is: httpx2's request lines,
    URLs with credentials, stay out by default."""
    stream = io.StringIO()
    configure_logging(level, "text", stream, library_level=library_level)
    emit_all()
    lines = stream.getvalue().splitlines()
    assert [next(s for s in SHOWN if s in line) for line in lines] == shown


SHOWN = [
    "HTTP Request",
    "Sending client message",
    "library warning",
    "own debug",
    "own info",
    "own warning",
]
