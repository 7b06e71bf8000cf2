"""Logging set-up: one line per event, as text for people or JSON for machines.

Structured fields travel in ``extra={"fields": {...}}``. Nothing here ever
receives a request body or an Authorization header: callers pass only ids,
paths, models, statuses and timings.

Paths, model names and ids are chosen by clients, so no character of theirs may
reach the log raw when it could end the line, start a forged one or drive the
terminal: every character ``str.isprintable`` refuses (C0 and C1 controls, DEL,
U+2028/U+2029, bidi and other format characters, lone surrogates) is written as a
backslash escape in text, as a ``\\u`` escape in JSON. A text value is quoted when
it is empty or holds a space, ``"`` or ``=``; a traceback's lines are indented, so
each record's first line is the only one that starts with a timestamp.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any, TextIO

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class TextFormatter(logging.Formatter):
    _second = -1
    _stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # one strftime per second, not per line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(second))
        line = f"{self._stamp}.{int(record.msecs):03d} {record.levelname:<7} {record.name}: "
        message = record.getMessage()
        line += message if message.isprintable() else _escape(message, quotes=False)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={_text(v)}" for k, v in fields.items())
        if record.exc_info:
            for part in self.formatException(record.exc_info).split("\n"):
                line += "\n  " + (part if part.isprintable() else _escape(part, quotes=False))
        return line


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _json_line(entry)


def _text(value: Any) -> str:
    """A field's value in a text line: as it is when that is unambiguous, else quoted."""
    text = str(value)
    if text and text.isprintable() and not (" " in text or '"' in text or "=" in text):
        return text
    return '"' + _escape(text, quotes=True) + '"'


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", '"': '\\"', "\\": "\\\\"}


def _escape(text: str, *, quotes: bool) -> str:
    """Backslash escapes for the characters that may not reach a text log raw, and in
    a quoted value also for ``"`` and ``\\`` (a message is prose: they stay)."""
    special = '"\\' if quotes else ""
    return "".join(
        char if char.isprintable() and char not in special else _escaped(char) for char in text
    )


def _escaped(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _json_line(entry: dict[str, Any]) -> str:
    """One JSON object as a line. json.dumps escapes C0 controls itself; what else is
    not printable (DEL, C1, U+2028, ...) can only be inside a string, where a \\u
    escape means the same character."""
    line = json.dumps(entry, ensure_ascii=False, default=str)
    # isascii() is O(1), isprintable() 1.6 ns a character: the usual line costs 20 ns.
    if (line.isascii() and "\x7f" not in line) or line.isprintable():
        return line
    return "".join(char if char.isprintable() else _json_escaped(char) for char in line)


def _json_escaped(char: str) -> str:
    code = ord(char)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # JSON escapes UTF-16 code units: a surrogate pair
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def configure_logging(
    level: str, fmt: str, stream: TextIO | None = None, *, library_level: str = "warning"
) -> None:
    """Log records of ``lmbridge.*`` at ``level``, everyone else's (httpx2, mcp, aiohttp)
    at ``library_level`` or above: libraries log what lmbridge would not (httpx2 writes
    each request's URL at info, credentials included)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name("lmbridge")
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == "lmbridge":  # ours from an earlier call; others are left alone
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(LEVELS[level], LEVELS[library_level]))
    logging.getLogger("lmbridge").setLevel(LEVELS[level])
    # aiohttp's access log is replaced by lmbridge's own request line.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class RequestLog:
    """The one-line-per-request log, kept off the ``logging`` machinery.

    Python's logging costs about 35 us a line (record, locks, formatter, one
    write per line), a sixth of what the whole proxy spends on a request. Lines
    here are formatted directly and written in batches: when 64 KB are pending
    or ``flush_interval`` after the first pending line, and at shutdown. The
    format matches the text and JSON formatters above.
    """

    def __init__(
        self,
        fmt: str,
        stream: TextIO | None = None,
        *,
        enabled: bool = True,
        flush_interval: float = 0.1,
    ) -> None:
        self.json = fmt == "json"
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.flush_interval = flush_interval
        self._pending: list[str] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""

    def write(self, fields: dict[str, Any]) -> None:
        now = time.time()
        if self.json:
            line = _json_line(
                {
                    "ts": round(now, 3),
                    "level": "info",
                    "logger": "lmbridge.request",
                    "msg": "request",
                    **fields,
                }
            )
        else:
            second = int(now)
            if second != self._second:
                self._second = second
                self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(second))
            millis = int((now - second) * 1000)
            line = f"{self._stamp}.{millis:03d} INFO    lmbridge.request: request " + " ".join(
                f"{k}={_text(v)}" for k, v in fields.items()
            )
        self._pending.append(line + "\n")
        self._size += len(line) + 1
        if self._size >= 65536:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(self.flush_interval, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        data = "".join(self._pending)
        self._pending.clear()
        self._size = 0
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stderr must not take requests down
