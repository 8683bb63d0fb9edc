"""The coordinator's registry (SQLite): enrollment tokens, enrolled hospitals, the audit log.

Tokens are stored as SHA-256 hashes only: the database never holds a usable token. The audit
log is append-only (triggers refuse UPDATE and DELETE): who, when, what, and the outcome of
every enrollment, revocation, run start and stop and round result.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    token_hash TEXT PRIMARY KEY, hospital TEXT NOT NULL, created REAL NOT NULL,
    expires REAL NOT NULL, used REAL);
CREATE TABLE IF NOT EXISTS hospitals (
    name TEXT PRIMARY KEY, node_key BLOB NOT NULL UNIQUE, identity_key BLOB NOT NULL UNIQUE,
    node_id TEXT NOT NULL, enrolled REAL NOT NULL, revoked REAL);  -- uint64: TEXT
CREATE TABLE IF NOT EXISTS retired_keys (key BLOB PRIMARY KEY, hospital TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pending_unregister (node_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, subject TEXT NOT NULL, outcome TEXT NOT NULL, detail TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS audit_append_only_u BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_append_only_d BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


class EnrollmentRefused(Exception):
    """A request the registry turns down; the message says why and is safe to show.
    `conflict`: refused for something already taken (a name, a key), not for the token."""

    def __init__(self, message: str, conflict: bool = False) -> None:
        super().__init__(message)
        self.conflict = conflict


@dataclass(frozen=True)
class Hospital:
    name: str
    node_key: bytes  # PEM public key Flower authenticates the SuperNode with
    identity_key: bytes  # raw Ed25519 public key, secure aggregation
    node_id: int
    enrolled: float
    revoked: float | None


def token_hash(token: str) -> str:
    return hashlib.sha256(token.strip().encode()).hexdigest()


class Registry:
    """One SQLite file; safe to use from the enrollment service's threads and from CLI
    processes at the same time (WAL, a busy timeout, and immediate write transactions)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        # Created 0600 first: SQLite gives its WAL and shared-memory files the same mode.
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
        self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def audit(self, actor: str, action: str, subject: str, outcome: str = "ok",
              detail: str = "") -> None:
        with self._write() as db:
            self._audit(db, actor, action, subject, outcome, detail)

    @staticmethod
    def _audit(db: sqlite3.Connection, actor: str, action: str, subject: str, outcome: str,
               detail: str) -> None:
        # Subjects and details can come from the network: printable, bounded.
        db.execute("INSERT INTO audit (ts, actor, action, subject, outcome, detail) "
                   "VALUES (?, ?, ?, ?, ?, ?)", (time.time(), _clean(actor, 80), action,
                                                 _clean(subject, 80), outcome,
                                                 _clean(detail, 500)))

    def audit_log(self, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT id, ts, actor, action, subject, outcome, detail FROM "
                                "audit ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        keys = ("id", "ts", "actor", "action", "subject", "outcome", "detail")
        return [dict(zip(keys, row, strict=True)) for row in reversed(rows)]

    def new_token(self, hospital: str, expires_s: float, actor: str) -> str:
        """A one-time enrollment token for `hospital`; only its hash is stored."""
        # A fixed prefix: never starts with '-' (a command line would read an option) and is
        # easy for secret scanners to spot.
        token = "fmt_" + secrets.token_urlsafe(24)
        now = time.time()
        with self._write() as db:
            db.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, NULL)",
                       (token_hash(token), hospital, now, now + expires_s))
            self._audit(db, actor, "token", hospital, "ok", f"expires in {expires_s:.0f}s")
        return token

    def enroll(self, token: str, hospital: str, node_key: bytes, identity_key: bytes,
               register: Any, unregister: Any, actor: str) -> Hospital:
        """Spend `token` on enrolling `hospital`; `register(node_key) -> node_id` registers
        the SuperNode key with the SuperLink inside the transaction, so a failed registration
        leaves the token unspent, and a failure after it is undone with `unregister(node_id)`.
        Refusals raise EnrollmentRefused and are audited."""
        try:
            with self._write() as db:
                self._check_enrollment(db, token, hospital, node_key, identity_key)
                node_id = int(register(node_key))
                try:
                    now = time.time()
                    db.execute("UPDATE tokens SET used = ? WHERE token_hash = ?",
                               (now, token_hash(token)))
                    db.execute("DELETE FROM hospitals WHERE name = ?", (hospital,))
                    db.execute("INSERT INTO hospitals VALUES (?, ?, ?, ?, ?, NULL)",
                               (hospital, node_key, identity_key, str(node_id), now))
                    self._audit(db, actor, "enroll", hospital, "ok", f"node {node_id}")
                except BaseException:
                    unregister(node_id)
                    raise
        except EnrollmentRefused as err:
            self.audit(actor, "enroll", hospital, "refused", str(err))
            raise
        return self.hospital(hospital)  # type: ignore[return-value]

    def _check_enrollment(self, db: sqlite3.Connection, token: str, hospital: str,
                          node_key: bytes, identity_key: bytes) -> None:
        row = db.execute("SELECT hospital, expires, used FROM tokens WHERE token_hash = ?",
                         (token_hash(token),)).fetchone()
        if row is None:
            raise EnrollmentRefused("unknown enrollment token (ask the coordinator for one: "
                                    "fedmri server token HOSPITAL)")
        for_hospital, expires, used = row
        if used is not None:
            raise EnrollmentRefused("this enrollment token was already used; ask the "
                                    "coordinator for a new one")
        if time.time() > expires:
            raise EnrollmentRefused("this enrollment token has expired; ask the coordinator "
                                    "for a new one")
        if for_hospital != hospital:
            raise EnrollmentRefused(f"this token was issued for {for_hospital!r}, not "
                                    f"{hospital!r}")
        current = db.execute("SELECT revoked FROM hospitals WHERE name = ?",
                             (hospital,)).fetchone()
        if current is not None and current[0] is None:
            raise EnrollmentRefused(f"the name {hospital!r} is already enrolled", conflict=True)
        for key, what in ((node_key, "SuperNode key"), (identity_key, "identity key")):
            used_by = db.execute(
                "SELECT name FROM hospitals WHERE node_key = ? OR identity_key = ? UNION "
                "SELECT hospital FROM retired_keys WHERE key = ?", (key, key, key)).fetchone()
            if used_by is not None:
                raise EnrollmentRefused(f"this {what} is already used by {used_by[0]!r}; "
                                        "make new keys (fedmri client init --force)",
                                        conflict=True)

    def revoke(self, hospital: str, unregister: Any, actor: str) -> Hospital:
        """Mark `hospital` revoked and `unregister(node_id)` its SuperNode key (None: the
        SuperLink is down; `server start` unregisters it, see pending_unregisters); its keys
        can never enroll again."""
        found = self.hospital(hospital)
        if found is None or found.revoked is not None:
            self.audit(actor, "revoke", hospital, "refused", "not enrolled")
            raise EnrollmentRefused(f"{hospital!r} is not an enrolled hospital")
        with self._write() as db:
            if unregister is None:
                db.execute("INSERT OR IGNORE INTO pending_unregister VALUES (?)",
                           (str(found.node_id),))
            else:
                unregister(found.node_id)
            db.execute("UPDATE hospitals SET revoked = ? WHERE name = ?", (time.time(), hospital))
            db.executemany("INSERT OR IGNORE INTO retired_keys VALUES (?, ?)",
                           [(found.node_key, hospital), (found.identity_key, hospital)])
            db.execute("UPDATE tokens SET used = ? WHERE hospital = ? AND used IS NULL",
                       (time.time(), hospital))
            self._audit(db, actor, "revoke", hospital, "ok", f"node {found.node_id}")
        return self.hospital(hospital)  # type: ignore[return-value]

    def pending_unregisters(self) -> list[int]:
        return [int(row[0]) for row in
                self._db.execute("SELECT node_id FROM pending_unregister").fetchall()]

    def unregistered(self, node_id: int) -> None:
        with self._write() as db:
            db.execute("DELETE FROM pending_unregister WHERE node_id = ?", (str(node_id),))

    def hospital(self, name: str) -> Hospital | None:
        row = self._db.execute("SELECT * FROM hospitals WHERE name = ?", (name,)).fetchone()
        return _hospital(row) if row else None

    def hospitals(self) -> list[Hospital]:
        return [_hospital(row) for row in
                self._db.execute("SELECT * FROM hospitals ORDER BY name").fetchall()]

    def members(self) -> dict[str, bytes]:
        """The federation's members: enrolled, not revoked, by name -> identity key."""
        return {h.name: h.identity_key for h in self.hospitals() if h.revoked is None}


def _hospital(row: tuple[Any, ...]) -> Hospital:
    name, node_key, identity_key, node_id, enrolled, revoked = row
    return Hospital(name, node_key, identity_key, int(node_id), enrolled, revoked)


def _clean(text: str, limit: int) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text[:limit])
