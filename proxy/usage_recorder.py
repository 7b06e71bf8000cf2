"""Usage records from where requests end to the database, off the request's path.

Data flow: the middleware (a metered request ended) or the Responses service (a
response ended, background ones included) calls ``UsageRecorder.ended``, which builds
the ``UsageRecord``, counts its tokens against the key's quota (proxy/quotas.py) and
appends it to a bounded buffer, without waiting for anything. ``run`` writes the buffer
in one batch at most ``usage.flush_interval`` after a record came, through the store's
group-commit writer; a full buffer (the database stalls) drops new records and counts
them rather than hold requests or memory. ``flush`` writes what is pending now and waits
for every write under way: the app's clean-up, and tests, call it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from proxy.accounting import (
    Api,
    Metered,
    Outcome,
    Tokens,
    outcome_of,
    responses_outcome,
    tokens_of,
)
from proxy.metrics import Metrics
from proxy.quotas import QuotaBook, day_start
from storage.records import UsageRecord, UsageStore

log = logging.getLogger("lmbridge.usage")

# There is one upstream today; a list of named upstreams comes later.
DEFAULT_UPSTREAM = "default"


class UsageRecorder:
    def __init__(
        self,
        store: UsageStore,
        metrics: Metrics,
        quotas: QuotaBook,
        *,
        enabled: bool = True,
        flush_interval: float = 1.0,
        max_pending: int = 10_000,
        upstream: str = DEFAULT_UPSTREAM,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.quotas = quotas
        self.enabled = enabled
        self.flush_interval = flush_interval
        self.max_pending = max_pending
        self.upstream = upstream
        self.clock = clock
        self._pending: list[UsageRecord] = []
        self._writing: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()

    async def start(self) -> None:
        """Count what each key spent today, as the database holds it."""
        if self.quotas.quotas:
            today = day_start(self.clock())
            self.quotas.seed(today, await self.store.tokens_since(today))

    def ended(
        self,
        metered: Metered,
        *,
        owner: str,
        model: str,
        status: int,
        error_code: str | None,
        seconds: float,
        upstream: str | None = None,
    ) -> None:
        """A metered request ended with ``status`` (its error's code, if any) after
        ``seconds``."""
        outcome, code = outcome_of(status, metered.error_code or error_code)
        tokens, ttft = metered.tokens, metered.ttft
        self._record(
            owner, model, metered.api, outcome, status, code, tokens, seconds, ttft, upstream
        )

    def response_ended(
        self,
        response: dict[str, Any],
        *,
        owner: str,
        model: str,
        seconds: float,
        ttft: float | None,
        api: Api = "responses",
        upstream: str | None = None,
    ) -> None:
        """A Response reached its end (completed, incomplete, failed or cancelled)."""
        outcome, code = responses_outcome(response)
        status = {"ok": 200, "cancelled": 499}.get(outcome, 500)
        tokens = tokens_of(response.get("usage"))
        self._record(owner, model, api, outcome, status, code, tokens, seconds, ttft, upstream)

    def _record(
        self,
        owner: str,
        model: str,
        api: Api,
        outcome: Outcome,
        status: int,
        code: str | None,
        tokens: Tokens,
        seconds: float,
        ttft: float | None,
        upstream: str | None,
    ) -> None:
        prompt, cached, completion, reasoning = tokens
        self.add(
            UsageRecord(
                ts=self.clock(),
                owner=owner,
                model=model,
                upstream=upstream or self.upstream,
                api=api,
                outcome=outcome,
                status=status,
                error_code=code,
                prompt_tokens=prompt,
                cached_tokens=cached,
                completion_tokens=completion,
                reasoning_tokens=reasoning,
                duration_ms=seconds * 1000,
                ttft_ms=None if ttft is None else ttft * 1000,
            )
        )

    def add(self, record: UsageRecord) -> None:
        self.quotas.spend(record.owner, record.ts, record.total_tokens)
        if not self.enabled:
            return
        if len(self._pending) >= self.max_pending:
            self.metrics.usage_dropped.labels("buffer_full").inc()
            return
        self._pending.append(record)
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def run(self) -> None:
        """Write the pending records, in one batch per ``flush_interval``, for ever."""
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.flush_interval)
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Hand what is pending to the database, and wait until every record handed over
        so far is written (or counted as dropped)."""
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.ensure_future(self._write(batch))
            self._writing.add(task)
            task.add_done_callback(self._writing.discard)
        if self._writing:
            await asyncio.shield(asyncio.gather(*self._writing))

    async def _write(self, batch: list[UsageRecord]) -> None:
        try:
            written = await self.store.record_usage(batch)
        except Exception as exc:  # the database failed: requests are not told, ops are
            log.error("could not write %d usage record(s): %s", len(batch), exc)
            self.metrics.usage_dropped.labels("storage_error").inc(len(batch))
            return
        self.metrics.usage_written.inc(written)

    async def purge_forever(self, retention: float, interval: float) -> None:
        """Delete records older than ``retention`` seconds, every ``interval``."""
        while True:
            try:
                purged = await self.store.purge_usage(self.clock() - retention)
                if purged:
                    log.info("purged %d usage record(s)", purged)
            except Exception:
                log.exception("purging usage records failed")
            await asyncio.sleep(interval)
