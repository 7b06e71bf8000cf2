"""Numbered schema migrations. Each runs once, in order, in its own transaction,
and is recorded in ``schema_migrations``; never edit one that has shipped, add
the next number instead.

A script is split into statements with ``sqlite3.complete_statement`` (see
``run_script`` in storage/writer_process.py), so triggers with ``BEGIN ... END`` work.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


# Times are unix seconds (INTEGER). Bodies are JSON text, stored and returned as
# given. Every child table is deleted with its parent (ON DELETE CASCADE), so a
# purge or a delete is one statement on the parent.
RESPONSES = """
CREATE TABLE responses (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    status TEXT NOT NULL,
    previous_response_id TEXT,
    conversation_id TEXT,
    background INTEGER NOT NULL DEFAULT 0,
    body TEXT NOT NULL,
    turn_messages TEXT NOT NULL DEFAULT '[]',
    turn_tokens INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX responses_expires_at ON responses (expires_at);
CREATE INDEX responses_unfinished ON responses (status)
    WHERE status IN ('queued', 'in_progress');
-- A save is an upsert by id: never let one graft items onto another owner's response.
CREATE TRIGGER responses_owner_is_fixed
    BEFORE UPDATE OF owner ON responses
    WHEN NEW.owner IS NOT OLD.owner
BEGIN
    SELECT RAISE(ABORT, 'a response id already used by another owner');
END;
CREATE TABLE response_items (
    response_id TEXT NOT NULL REFERENCES responses (id) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ('input', 'output')),
    position INTEGER NOT NULL,
    item_id TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (response_id, kind, position)
);
CREATE INDEX response_items_item_id ON response_items (item_id);
CREATE TABLE response_events (
    response_id TEXT NOT NULL REFERENCES responses (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (response_id, seq)
);
CREATE TABLE conversations (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX conversations_expires_at ON conversations (expires_at);
CREATE TABLE conversation_items (
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    item_id TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    UNIQUE (conversation_id, position)
);
-- item_id first: find_item looks an id up without knowing its conversation.
CREATE INDEX conversation_items_item_id ON conversation_items (item_id, conversation_id);
"""

# The MCP servers whose tools a chain has listed so far (mcp_list_tools is sent once per
# server per conversation): a JSON array, cumulative along the chain.
MCP_LISTED = """
ALTER TABLE responses ADD COLUMN mcp_listed TEXT NOT NULL DEFAULT '[]';
"""

# A conversation takes one turn at a time: the turn running in it (its response id)
# and until when its claim holds unless renewed (unix seconds). A lease rather than a
# lock held in memory: it holds for every daemon sharing the database, and one that
# stops without releasing it holds it no longer than that.
CONVERSATION_LEASE = """
ALTER TABLE conversations ADD COLUMN busy_by TEXT;
ALTER TABLE conversations ADD COLUMN busy_until INTEGER NOT NULL DEFAULT 0;
"""

# One row per metered request (proxy/accounting.py): who spent how many tokens on which
# model. ``owner`` is the hash of the API key, never the key. ``ts`` is when the request
# ended (unix seconds, fractional); every query and the purge select by it.
USAGE = """
CREATE TABLE usage_records (
    ts REAL NOT NULL,
    owner TEXT NOT NULL,
    model TEXT NOT NULL,
    upstream TEXT NOT NULL,
    api TEXT NOT NULL,
    outcome TEXT NOT NULL CHECK (outcome IN ('ok', 'error', 'cancelled')),
    error_code TEXT,
    status INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens INTEGER NOT NULL DEFAULT 0,
    duration_ms REAL NOT NULL,
    ttft_ms REAL
);
CREATE INDEX usage_records_ts ON usage_records (ts);
CREATE INDEX usage_records_owner_ts ON usage_records (owner, ts);
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "responses and conversations", RESPONSES),
    Migration(2, "MCP servers listed along a chain", MCP_LISTED),
    Migration(3, "the turn running in a conversation", CONVERSATION_LEASE),
    Migration(4, "token usage per request", USAGE),
)
