"""One turn at a time per conversation: a turn claims its conversation before it reads
the history and releases it once its final state is stored. The claim is a lease in
the database (storage/records.py ``claim_conversation``), renewed while the turn runs,
so that a daemon that died does not hold a conversation for ever."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from proxy.errors import ConversationLocked
from proxy.tasks import BackgroundTasks
from storage.errors import StorageError
from storage.records import ResponseStore

log = logging.getLogger("lmbridge.responses")

# A turn holds its conversation for this long (clock seconds) unless it renews its
# claim, as it does every third of it while it runs: a daemon that dies mid-turn
# leaves the conversation busy no longer than this.
CONVERSATION_LEASE = 60
# A release that failed is tried again after 0.25 s, then at doubling intervals.
RELEASE_RETRY_FIRST = 0.25
RELEASE_RETRIES = 8


@dataclass
class ConversationTurn:
    """A turn's claim on its conversation (storage/records.py ``claim_conversation``)."""

    conversation_id: str
    owner: str
    holder: str  # the response id
    renewing: asyncio.Task[None] | None = None


class ConversationClaims:
    def __init__(
        self, store: ResponseStore, tasks: BackgroundTasks, clock: Callable[[], float]
    ) -> None:
        self.store = store
        self.tasks = tasks
        self.clock = clock
        self.lease = CONVERSATION_LEASE
        self.renewal = CONVERSATION_LEASE / 3  # seconds of real time

    async def claim(
        self, conversation_id: str | None, store: bool, owner: str, response_id: str
    ) -> ConversationTurn | None:
        """Take the conversation for this turn, or ConversationLocked. A turn
        with ``store: false`` appends nothing, so it takes nothing."""
        if conversation_id is None or not store:
            return None
        turn = ConversationTurn(conversation_id, owner, response_id)
        claimed = await self.store.claim_conversation(
            turn.conversation_id, owner, response_id, self._lease_end()
        )
        if claimed is False:
            raise ConversationLocked(
                f"Another response is in progress in conversation '{turn.conversation_id}'; "
                "a conversation takes one turn at a time. Retry once it has finished.",
                param="conversation",
            )
        if claimed is None:
            return None  # absent: prepare() answers 404
        turn.renewing = self.tasks.spawn(self._renew(turn), f"claim on {turn.conversation_id}")
        return turn

    def _lease_end(self) -> int:
        return int(self.clock()) + int(self.lease)

    async def _renew(self, turn: ConversationTurn) -> None:
        while True:
            await asyncio.sleep(self.renewal)
            try:
                await self.store.claim_conversation(
                    turn.conversation_id, turn.owner, turn.holder, self._lease_end()
                )
            except StorageError as exc:
                log.warning("could not renew the claim on a conversation: %s", exc)

    async def release(self, turn: ConversationTurn) -> None:
        """After the turn's final state is stored (the next turn must see its items)."""
        if turn.renewing is not None:
            turn.renewing.cancel()
        try:
            await self.store.release_conversation(turn.conversation_id, turn.holder)
        except StorageError as exc:
            # A writer that died is replaced on the next write: try again shortly rather
            # than leave the conversation locked for the rest of the lease.
            log.warning("could not release a conversation, trying again: %s", exc)
            self.tasks.spawn(self._release_later(turn), f"release {turn.conversation_id}")

    async def _release_later(self, turn: ConversationTurn) -> None:
        delay = RELEASE_RETRY_FIRST
        for _ in range(RELEASE_RETRIES):
            await asyncio.sleep(delay)
            try:
                await self.store.release_conversation(turn.conversation_id, turn.holder)
                return
            except StorageError:
                delay = min(delay * 2, self.renewal)
        log.warning("could not release a conversation (free again in %gs at most)", self.lease)
