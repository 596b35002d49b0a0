"""The agent's SQLite store: patients, sessions, turns, entity memory, retrieved evidence,
responses, tool calls, audit rounds and the demo drug inventory.

- WAL journal (readers never block the writer), foreign keys on;
- a schema version in ``PRAGMA user_version`` with ordered migrations, applied on open;
- one transaction per turn (``record_turn``): a crash in the middle of a turn rolls that turn
  back and loses no turn committed before it.
"""
from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from ..kb import KnowledgeBase

ENTITY_KINDS = ("allergy", "condition", "medication", "age", "sex", "pregnant")

# Each migration takes the schema from version i to i + 1. Never edit one that has shipped:
# append a new one.
MIGRATIONS: list[str] = [
    # 1: the conversation record
    """
    CREATE TABLE patients (patient_id TEXT PRIMARY KEY, created REAL NOT NULL);
    CREATE TABLE sessions (session_id TEXT PRIMARY KEY,
                           patient_id TEXT NOT NULL REFERENCES patients(patient_id),
                           started REAL NOT NULL, summary TEXT NOT NULL DEFAULT '');
    CREATE TABLE turns (turn_id INTEGER PRIMARY KEY AUTOINCREMENT,
                        session_id TEXT NOT NULL REFERENCES sessions(session_id),
                        idx INTEGER NOT NULL, user_text TEXT NOT NULL, answer TEXT NOT NULL,
                        triage_level TEXT NOT NULL, triage_reason TEXT NOT NULL, created REAL NOT NULL,
                        UNIQUE(session_id, idx));
    CREATE TABLE entities (patient_id TEXT NOT NULL REFERENCES patients(patient_id), kind TEXT NOT NULL,
                           value TEXT NOT NULL, source TEXT NOT NULL, updated REAL NOT NULL,
                           PRIMARY KEY (patient_id, kind, value));
    CREATE TABLE retrieved (turn_id INTEGER NOT NULL REFERENCES turns(turn_id), rank INTEGER NOT NULL,
                            evidence_id TEXT NOT NULL, score REAL, PRIMARY KEY (turn_id, rank));
    CREATE TABLE responses (turn_id INTEGER PRIMARY KEY REFERENCES turns(turn_id), payload TEXT NOT NULL);
    """,
    # 2: tool calls and audit rounds get their own tables
    """
    CREATE TABLE tool_calls (turn_id INTEGER NOT NULL REFERENCES turns(turn_id), seq INTEGER NOT NULL,
                             name TEXT NOT NULL, arguments TEXT NOT NULL, ok INTEGER NOT NULL,
                             result TEXT NOT NULL, PRIMARY KEY (turn_id, seq));
    CREATE TABLE audits (turn_id INTEGER NOT NULL REFERENCES turns(turn_id), round INTEGER NOT NULL,
                         critique TEXT NOT NULL, PRIMARY KEY (turn_id, round));
    """,
    # 3: the pharmacy's drug inventory (the inventory tool reads it)
    """
    CREATE TABLE inventory (drug_id TEXT PRIMARY KEY, name TEXT NOT NULL, form TEXT NOT NULL,
                            strength TEXT NOT NULL, stock INTEGER NOT NULL CHECK (stock >= 0));
    CREATE INDEX turns_by_session ON turns(session_id, idx);
    """,
    # 4: summary memory remembers how many turns it already folds in
    """
    ALTER TABLE sessions ADD COLUMN summarised_upto INTEGER NOT NULL DEFAULT 0;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


class Store:
    """``Store(path)`` opens (creating or migrating) the database. Thread-safe through one lock,
    so the async agent can write from worker threads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self.conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.migrate()

    # ------------------------------------------------------------ schema
    @property
    def version(self) -> int:
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

    def migrate(self, target: int = SCHEMA_VERSION) -> int:
        """Apply the migrations from the stored version up to ``target``, each in its own
        transaction; returns the new version. A database newer than this code is refused."""
        with self._lock:
            current = self.version
            if current > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path}: schema version {current} is newer than this medkit "
                                   f"({SCHEMA_VERSION}); upgrade medkit")
            for v in range(current, target):
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    for stmt in filter(str.strip, MIGRATIONS[v].split(";")):
                        self.conn.execute(stmt)
                    self.conn.execute(f"PRAGMA user_version={v + 1}")
                    self.conn.execute("COMMIT")
                except BaseException:
                    self.conn.execute("ROLLBACK")
                    raise
            return self.version

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    # ------------------------------------------------------------ sessions and turns
    def ensure_session(self, patient_id: str, session_id: str) -> None:
        with self._lock:
            now = time.time()
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                self.conn.execute("INSERT OR IGNORE INTO patients VALUES (?, ?)", (patient_id, now))
                row = self.conn.execute("SELECT patient_id FROM sessions WHERE session_id=?", (session_id,)).fetchone()
                if row and row[0] != patient_id:
                    raise ValueError(f"session {session_id!r} belongs to patient {row[0]!r}, not {patient_id!r}")
                self.conn.execute("INSERT OR IGNORE INTO sessions (session_id, patient_id, started) VALUES (?, ?, ?)",
                                  (session_id, patient_id, now))
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise

    def turns(self, session_id: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self.conn.execute("SELECT turn_id, idx, user_text, answer, triage_level FROM turns "
                                     "WHERE session_id=? ORDER BY idx", (session_id,)).fetchall()
        return [dict(zip(("turn_id", "idx", "user", "answer", "triage"), r)) for r in rows]

    def summary(self, session_id: str) -> tuple[str, int]:
        """(summary text, number of turns it already folds in)."""
        with self._lock:
            row = self.conn.execute("SELECT summary, summarised_upto FROM sessions WHERE session_id=?",
                                    (session_id,)).fetchone()
        return (row[0], row[1]) if row else ("", 0)

    def record_turn(self, turn: dict[str, Any], _fail_before_commit: bool = False) -> int:
        """Write one whole turn in ONE transaction: the turn, the entity-memory changes, the
        retrieved evidence, the tool calls, the audit rounds, the response and the session
        summary. Returns the turn id. Any error rolls the whole turn back."""
        with self._lock:
            c = self.conn
            c.execute("BEGIN IMMEDIATE")
            try:
                idx = c.execute("SELECT COALESCE(MAX(idx), -1) + 1 FROM turns WHERE session_id=?",
                                (turn["session_id"],)).fetchone()[0]
                cur = c.execute("INSERT INTO turns (session_id, idx, user_text, answer, triage_level, triage_reason,"
                                " created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                                (turn["session_id"], idx, turn["user"], turn["answer"], turn["triage"]["level"],
                                 turn["triage"]["reason"], time.time()))
                tid = cur.lastrowid
                for kind, value, source in turn.get("memory_add", []):
                    self._put_entity(turn["patient_id"], kind, value, source)
                for kind, value in turn.get("memory_remove", []):
                    c.execute("DELETE FROM entities WHERE patient_id=? AND kind=? AND value=?",
                              (turn["patient_id"], kind, value))
                c.executemany("INSERT INTO retrieved VALUES (?, ?, ?, ?)",
                              [(tid, r, e, s) for r, (e, s) in enumerate(turn.get("retrieved", []))])
                c.executemany("INSERT INTO tool_calls VALUES (?, ?, ?, ?, ?, ?)",
                              [(tid, i, t["name"], json.dumps(t["arguments"]), int(t["ok"]),
                                json.dumps(t.get("result") if t["ok"] else t.get("error")))
                               for i, t in enumerate(turn.get("tool_calls", []))])
                c.executemany("INSERT INTO audits VALUES (?, ?, ?)",
                              [(tid, a["round"], json.dumps(a)) for a in turn.get("audit_rounds", [])])
                c.execute("INSERT INTO responses VALUES (?, ?)", (tid, json.dumps(turn["response"])))
                if "summary" in turn:
                    c.execute("UPDATE sessions SET summary=?, summarised_upto=? WHERE session_id=?",
                              (turn["summary"], turn.get("summarised_upto", 0), turn["session_id"]))
                if _fail_before_commit:  # used by the crash test
                    raise RuntimeError("simulated crash before commit")
                c.execute("COMMIT")
                return tid
            except BaseException:
                c.execute("ROLLBACK")
                raise

    # ------------------------------------------------------------ entity memory
    def _put_entity(self, patient_id: str, kind: str, value: str, source: str) -> None:
        if kind not in ENTITY_KINDS:
            raise ValueError(f"unknown memory kind {kind!r}; expected one of {ENTITY_KINDS}")
        if kind in ("age", "sex", "pregnant"):  # single-valued
            self.conn.execute("DELETE FROM entities WHERE patient_id=? AND kind=?", (patient_id, kind))
        self.conn.execute("INSERT OR REPLACE INTO entities VALUES (?, ?, ?, ?, ?)",
                          (patient_id, kind, str(value), source, time.time()))

    def memory(self, patient_id: str) -> dict[str, Any]:
        """What is remembered of a patient: ``{allergies, conditions, medications, age, sex, pregnant}``."""
        with self._lock:
            rows = self.conn.execute("SELECT kind, value FROM entities WHERE patient_id=? ORDER BY updated, value",
                                     (patient_id,)).fetchall()
        from .memory import apply

        empty = {"allergies": [], "conditions": [], "medications": [], "age": None, "sex": None, "pregnant": None}
        return apply(empty, [(k, v) for k, v in rows], [])

    def remember(self, patient_id: str, kind: str, value: Any, source: str = "user edit") -> None:
        """Add (or for age/sex/pregnant, set) one remembered fact, in its own transaction."""
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                self.conn.execute("INSERT OR IGNORE INTO patients VALUES (?, ?)", (patient_id, time.time()))
                self._put_entity(patient_id, kind, str(value).lower() if kind == "pregnant" else value, source)
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise

    def forget(self, patient_id: str, kind: str | None = None, value: str | None = None) -> int:
        """Delete remembered facts (one value, one kind, or everything); returns how many."""
        q, args = "DELETE FROM entities WHERE patient_id=?", [patient_id]
        if kind:
            q, args = q + " AND kind=?", args + [kind]
        if value is not None:
            q, args = q + " AND value=?", args + [str(value)]
        with self._lock:
            return self.conn.execute(q, args).rowcount

    # ------------------------------------------------------------ inventory
    def seed_inventory(self, kb: KnowledgeBase, seed: int = 0) -> int:
        """Fill an empty inventory with every knowledge-base drug: form from the route, strength
        from the smallest usual dose, and a made-up stock level (a demo pharmacy, seeded)."""
        with self._lock:
            if self.conn.execute("SELECT COUNT(*) FROM inventory").fetchone()[0]:
                return 0
            r = random.Random(seed)
            rows = []
            for did in sorted(kb.drugs):
                d = kb.drugs[did]
                dose = d["adult_dose"]
                form = {"oral": "tablets", "inhaled": "inhaler", "subcutaneous": "injection",
                        "intramuscular": "injection", "intravenous": "injection"}.get(dose["route"], dose["route"])
                stock = 0 if r.random() < 0.1 else r.randint(5, 200)
                rows.append((did, d["name"], form, f"{dose['single_dose_min']:g} {dose['unit']}", stock))
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany("INSERT INTO inventory VALUES (?, ?, ?, ?, ?)", rows)
            self.conn.execute("COMMIT")
            return len(rows)

    def inventory(self, drug_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self.conn.execute("SELECT drug_id, name, form, strength, stock FROM inventory WHERE drug_id=?",
                                    (drug_id,)).fetchone()
        return dict(zip(("drug_id", "name", "form", "strength", "stock"), row)) if row else None

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {t: self.conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                    for t in ("patients", "sessions", "turns", "entities", "retrieved", "responses",
                              "tool_calls", "audits", "inventory")}
