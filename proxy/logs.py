"""Logging set-up: one line per event, as text for people or JSON for machines.

Structured fields travel in ``extra={"fields": {...}}``. Nothing here ever
receives a request body or an Authorization header: callers pass only ids,
paths, models, statuses and timings.
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
        line += record.getMessage()
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={_text(v)}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
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
        return json.dumps(entry, ensure_ascii=False, default=str)


def _text(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (" " in text or not text) else text


def configure_logging(level: str, fmt: str, stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name("lmbridge")
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == "lmbridge":  # ours from an earlier call; others are left alone
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
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
            line = json.dumps(
                {
                    "ts": round(now, 3),
                    "level": "info",
                    "logger": "lmbridge.request",
                    "msg": "request",
                    **fields,
                },
                ensure_ascii=False,
                default=str,
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
