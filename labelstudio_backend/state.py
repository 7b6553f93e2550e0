"""Per-project settings shared by all gunicorn workers.

Label Studio sends `/setup` (the project's `extra_params`, its URL and a token) and `/webhook` to whichever
worker accepts the connection, so what they change is written here: a small SQLite file in the state
directory the operator chooses (`--state-dir`; kept across restarts, never deleted; 0700, the file 0600
as it may hold a token). Each write is one SQLite transaction: it is there whole or not at all. Each
project has a `generation` counter that a webhook bumps; a worker whose cached reference list is from an
older generation lists the references again (or, without API access, reads them from here). The name of
the project's model connection in Label Studio, which predictions carry, is kept here too (/setup learns
it; /predict and `seggpt labelstudio predict` use it). Without a state directory (the Flask test client,
one process) the same interface is kept in memory.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from dataclasses import dataclass, field


@dataclass
class ProjectRecord:
    params: dict = field(default_factory=dict)
    hostname: str | None = None  # Label Studio's URL as /setup reported it
    access_token: str | None = None  # the token /setup carried (the project creator's legacy token)
    generation: int = 0
    name: str | None = None  # the project's model connection in Label Studio (its Name), as /setup last found it


class MemoryState:
    persistent = False

    def __init__(self):
        self._projects: dict[int, ProjectRecord] = {}
        self._lock = threading.Lock()

    def get(self, project_id: int) -> ProjectRecord:
        with self._lock:
            record = self._projects.get(project_id)
            return ProjectRecord(dict(record.params), record.hostname, record.access_token, record.generation,
                                 record.name) if record else ProjectRecord()

    def set_setup(self, project_id: int, params: dict, hostname: str | None, access_token: str | None) -> None:
        with self._lock:
            record = self._projects.setdefault(project_id, ProjectRecord())
            record.params, record.hostname, record.access_token = dict(params), hostname, access_token

    def set_name(self, project_id: int, name: str | None) -> None:
        with self._lock:
            self._projects.setdefault(project_id, ProjectRecord()).name = name

    def bump(self, project_id: int) -> int:
        with self._lock:
            record = self._projects.setdefault(project_id, ProjectRecord())
            record.generation += 1
            return record.generation


class SqliteState:
    """The same as MemoryState, in a SQLite file every worker opens (one short connection per call), and
    the project's references (so that they survive a restart)."""

    persistent = True

    def __init__(self, directory: str):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.path = os.path.join(directory, "projects.sqlite3")
        old = os.umask(0o077)  # created private: it may hold a token
        try:
            with self._connect() as db:
                db.execute("CREATE TABLE IF NOT EXISTS projects (id INTEGER PRIMARY KEY, params TEXT NOT NULL "
                           "DEFAULT '{}', hostname TEXT, access_token TEXT, generation INTEGER NOT NULL DEFAULT 0)")
                db.execute("CREATE TABLE IF NOT EXISTS project_references (id INTEGER PRIMARY KEY, refs TEXT NOT NULL)")
                if "name" not in {row[1] for row in db.execute("PRAGMA table_info(projects)")}:  # an older file
                    db.execute("ALTER TABLE projects ADD COLUMN name TEXT")
        finally:
            os.umask(old)
        for path in (directory, self.path):
            try:
                os.chmod(path, 0o700 if path == directory else 0o600)
            except OSError:
                pass

    def _connect(self):
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        return _Closing(db)

    def get(self, project_id: int) -> ProjectRecord:
        with self._connect() as db:
            row = db.execute("SELECT params, hostname, access_token, generation, name FROM projects WHERE id = ?",
                             (project_id,)).fetchone()
        if row is None:
            return ProjectRecord()
        return ProjectRecord(json.loads(row[0] or "{}"), row[1], row[2], int(row[3]), row[4])

    def set_setup(self, project_id: int, params: dict, hostname: str | None, access_token: str | None) -> None:
        with self._connect() as db:
            db.execute("INSERT INTO projects (id, params, hostname, access_token) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT(id) DO UPDATE SET params = excluded.params, hostname = excluded.hostname, "
                       "access_token = excluded.access_token", (project_id, json.dumps(params), hostname, access_token))

    def set_name(self, project_id: int, name: str | None) -> None:
        with self._connect() as db:
            db.execute("INSERT INTO projects (id, name) VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET name = excluded.name",
                       (project_id, name))

    def bump(self, project_id: int) -> int:
        with self._connect() as db:
            db.execute("INSERT INTO projects (id, generation) VALUES (?, 1) "
                       "ON CONFLICT(id) DO UPDATE SET generation = generation + 1", (project_id,))
            return int(db.execute("SELECT generation FROM projects WHERE id = ?", (project_id,)).fetchone()[0])


    def load_references(self, project_id: int) -> list | None:
        with self._connect() as db:
            row = db.execute("SELECT refs FROM project_references WHERE id = ?", (project_id,)).fetchone()
        try:
            return json.loads(row[0]) if row else None
        except ValueError:
            return None

    def save_references(self, project_id: int, refs: list) -> None:
        with self._connect() as db:
            db.execute("INSERT INTO project_references (id, refs) VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET "
                       "refs = excluded.refs", (project_id, json.dumps(refs, default=str)))


class _Closing:
    def __init__(self, db):
        self.db = db

    def __enter__(self):
        return self.db

    def __exit__(self, *exc):
        self.db.close()
        return False
