"""The study database: one SQLite file holds the answers, the raters, their assignments and their votes.

WAL mode lets the server answer many raters at once: readers never wait for the writer, and each vote is
one short write transaction. Every request opens its own connection (cheap for SQLite) so no connection is
shared between the server's worker threads.

Votes are stored as the rater gave them (``A`` / ``tie`` / ``B`` as displayed); the assignment records which
model was shown as A, so results translate votes into model terms without the rater ever seeing a model.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CRITERIA = ("correctness", "helpfulness")
CHOICES = ("A", "tie", "B")
MAX_COMMENT_CHARS = 4000

SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE models (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, source TEXT NOT NULL);
CREATE TABLE tasks (id INTEGER PRIMARY KEY, instruction TEXT NOT NULL, input TEXT NOT NULL);
CREATE TABLE answers (
  task_id INTEGER NOT NULL REFERENCES tasks(id),
  model_id INTEGER NOT NULL REFERENCES models(id),
  output TEXT NOT NULL,
  PRIMARY KEY (task_id, model_id)
);
-- One item: a task's answers from two models (model_1 listed before model_2 on the command line).
CREATE TABLE items (
  id INTEGER PRIMARY KEY,
  task_id INTEGER NOT NULL REFERENCES tasks(id),
  model_1 INTEGER NOT NULL REFERENCES models(id),
  model_2 INTEGER NOT NULL REFERENCES models(id)
);
CREATE TABLE raters (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, token TEXT NOT NULL UNIQUE);
-- An item in one rater's queue, at its position, with the side model_1 is shown on.
CREATE TABLE assignments (
  id INTEGER PRIMARY KEY,
  rater_id INTEGER NOT NULL REFERENCES raters(id),
  item_id INTEGER NOT NULL REFERENCES items(id),
  position INTEGER NOT NULL,
  model_1_is_a INTEGER NOT NULL CHECK (model_1_is_a IN (0, 1)),
  UNIQUE (rater_id, position),
  UNIQUE (rater_id, item_id)
);
-- At most one vote per assignment: a revision replaces it (and counts in `revisions`).
CREATE TABLE votes (
  assignment_id INTEGER PRIMARY KEY REFERENCES assignments(id),
  correctness TEXT NOT NULL CHECK (correctness IN {CHOICES}),
  helpfulness TEXT NOT NULL CHECK (helpfulness IN {CHOICES}),
  comment TEXT NOT NULL DEFAULT '',
  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
  updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
  revisions INTEGER NOT NULL DEFAULT 0
);
"""


def connect(path: str | Path) -> sqlite3.Connection:
    """A connection in WAL mode that waits (rather than fails) while another thread writes."""
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)  # autocommit; transactions are explicit
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # durable at each checkpoint; WAL keeps the file consistent
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


@contextmanager
def opened(path: str | Path) -> Iterator[sqlite3.Connection]:
    conn = connect(path)
    try:
        yield conn
    finally:
        conn.close()


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE takes the write lock up front, so concurrent writers queue instead of deadlocking."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def meta(conn: sqlite3.Connection, key: str) -> str:
    return conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()["value"]
