"""Claims: which worker is computing which cells of a run directory, so two workers never run the same cell.

A worker claims a *unit* (a chain's first-step prefix cell and every cell of the same model and seed that
extends it: they share the prefix's weights, so they are computed in one place, in order) by creating
``<run>/.claims/<key>.json`` (``key``: a 16-hex hash of the unit's root cell config) atomically - the file
is written under a temporary name and hard-linked into place, so it appears complete or not at all, and a
second worker's link fails. The claim holds the worker id, host, pid, the run id of the command that
started the worker, the cell it is computing now and a heartbeat time that a thread refreshes every
``heartbeat_s`` seconds (rewritten through a temporary file and a rename, only while the claim is still
this worker's).

A claim is *dead* when its pid is gone on this host, or its heartbeat is older than ``timeout_s`` (another
host: a Slurm task on a node that died). A dead claim of an earlier command is taken over (renamed away
atomically, then claimed anew); a dead claim of the *same* command is left to that command's coordinator,
which records its cell as failed (the worker was killed, e.g. out of memory) - so within one command a
cell that kills its worker is not retried in a loop; the next command retries it.

A cell that raises is recorded in ``<run>/.failed/<cell key>.json`` (error type and first line, worker,
host, run id) with its traceback beside it (``<cell key>.traceback.txt``); the record is removed when the
cell later finishes. Torch-free.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

from llmmem.results import pid_alive

log = logging.getLogger(__name__)

CLAIMS_DIR = ".claims"
FAILED_DIR = ".failed"
HEARTBEAT_S = 30.0
TIMEOUT_S = 600.0


def heartbeat_seconds() -> float:
    """``$LLMMEM_HEARTBEAT_S`` or 30 s: how often a worker refreshes its claim."""
    return _env_seconds("LLMMEM_HEARTBEAT_S", HEARTBEAT_S)


def timeout_seconds() -> float:
    """``$LLMMEM_CLAIM_TIMEOUT_S`` or 600 s: a claim whose heartbeat is older is dead (covers other hosts)."""
    return _env_seconds("LLMMEM_CLAIM_TIMEOUT_S", TIMEOUT_S)


def _env_seconds(name: str, default: float) -> float:
    from llmmem.config import parse_float

    v = os.environ.get(name)
    return default if v in (None, "") else parse_float(name, v, low=0.0, low_open=True)


def cell_key(cell) -> str:
    """The 16-hex key of a cell in claim and failure file names (the cell's config hash, longer than the
    8 digits of its directory name)."""
    from llmmem.cells import config_hash

    return config_hash(cell.config(), 16)


@dataclass
class Identity:
    """Who holds a claim: worker id, host, pid and the run id of the command that started the worker."""

    worker: str
    run_id: str
    host: str = ""
    pid: int = 0

    def __post_init__(self):
        self.host = self.host or socket.gethostname()
        self.pid = self.pid or os.getpid()


def new_run_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


def claim_liveness(doc: dict | None, *, timeout_s: float | None = None, now: float | None = None) -> tuple[bool, str]:
    """(alive, why) for a claim document. Unreadable claims count as alive (a reader never steals a file it
    cannot judge; it goes stale through its mtime instead, see :meth:`Claims.read`)."""
    if not doc:
        return True, "unreadable"
    timeout_s = timeout_seconds() if timeout_s is None else timeout_s
    now = time.time() if now is None else now
    host, pid = doc.get("host"), doc.get("pid")
    if host == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid):
        return False, f"pid {pid} on {host} is gone"
    age = now - float(doc.get("heartbeat") or 0)
    if age > timeout_s:
        return False, f"heartbeat {age:.0f}s ago (timeout {timeout_s:.0f}s)"
    return True, f"heartbeat {max(age, 0):.0f}s ago"


def _write_tmp(path: Path, doc: dict) -> Path:
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return tmp


def _create_exclusive(path: Path, doc: dict) -> bool:
    """Create ``path`` holding ``doc``, complete, only if it does not exist (hard link of a temp file; the
    classic NFS-safe way). False when it exists."""
    tmp = _write_tmp(path, doc)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: O_EXCL, then the content (a reader may see it empty)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh)
        return True
    finally:
        tmp.unlink(missing_ok=True)


class Claim:
    """One held claim; refreshed by the :class:`Claims` heartbeat thread until released."""

    def __init__(self, claims: Claims, key: str, doc: dict):
        self.claims = claims
        self.key = key
        self.doc = doc
        self.lost = False
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self.claims.dir / f"{self.key}.json"

    def _rewrite(self, **changes) -> bool:
        """Update the file if it is still ours (same token); False (and ``lost``) when it is not."""
        with self._lock:
            if self.lost:
                return False
            current = self.claims.read(self.key)
            if not current or current.get("token") != self.doc["token"]:
                self.lost = True
                log.warning("claim %s (%s) was taken over by another worker", self.key, self.doc.get("unit"))
                return False
            self.doc.update(changes)
            tmp = _write_tmp(self.path, self.doc)
            os.replace(tmp, self.path)
            return True

    def heartbeat(self) -> bool:
        return self._rewrite(heartbeat=time.time())

    def set_current(self, cell_name: str | None, key: str | None = None) -> bool:
        """Say which cell of the unit is being computed now (``--status`` shows it as running)."""
        return self._rewrite(cell=cell_name, cell_key=key, heartbeat=time.time(), cell_started=time.time())

    def release(self) -> None:
        with self._lock:
            self.claims._held.pop(self.key, None)
            current = self.claims.read(self.key)
            if current and current.get("token") == self.doc["token"]:
                self.path.unlink(missing_ok=True)


class Claims:
    """The claims of one run directory, as seen by one worker."""

    def __init__(self, run_dir: Path | str, me: Identity, *, heartbeat_s: float | None = None,
                 timeout_s: float | None = None):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / CLAIMS_DIR
        self.me = me
        self.heartbeat_s = heartbeat_seconds() if heartbeat_s is None else heartbeat_s
        self.timeout_s = timeout_seconds() if timeout_s is None else timeout_s
        self._held: dict[str, Claim] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ reading
    def read(self, key: str) -> dict | None:
        path = self.dir / f"{key}.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            try:  # unreadable (should not happen: claims appear complete); stale once its mtime is
                if time.time() - path.stat().st_mtime > self.timeout_s:
                    return {"heartbeat": path.stat().st_mtime, "unreadable": True}
            except OSError:
                return None
            return {}

    def all(self) -> dict[str, dict]:
        """Every claim file: key -> document."""
        out = {}
        if self.dir.is_dir():
            for p in sorted(self.dir.glob("*.json")):
                doc = self.read(p.stem)
                if doc is not None:
                    out[p.stem] = doc
        return out

    def liveness(self, doc: dict | None) -> tuple[bool, str]:
        return claim_liveness(doc, timeout_s=self.timeout_s)

    # ------------------------------------------------------------------ claiming
    def acquire(self, key: str, unit: str, cells: list[str] | None = None) -> Claim | None:
        """Claim ``key`` (a unit); None when another worker holds it (alive, or dead but of this same command)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        doc = {"worker": self.me.worker, "host": self.me.host, "pid": self.me.pid, "run_id": self.me.run_id,
               "unit": unit, "cells": list(cells or []), "cell": None, "claimed_at": now, "heartbeat": now,
               "token": uuid.uuid4().hex}
        path = self.dir / f"{key}.json"
        for _ in range(5):
            if _create_exclusive(path, doc):
                claim = Claim(self, key, doc)
                self._held[key] = claim
                return claim
            other = self.read(key)
            if other is None:
                continue  # released in between: try again
            alive, why = self.liveness(other)
            if alive or other.get("run_id") == self.me.run_id:
                return None
            if not self._take_over(path, other, why):
                return None
        return None

    def _take_over(self, path: Path, dead: dict, why: str) -> bool:
        """Move a dead claim out of the way (one rename: only one worker wins), checking it is the one judged."""
        stale = path.with_name(f".{path.stem}.stale-{self.me.host}-{self.me.pid}-{uuid.uuid4().hex[:6]}")
        try:
            os.rename(path, stale)
        except FileNotFoundError:
            return True  # someone else moved it: try to create
        try:
            moved = json.loads(stale.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            moved = {}
        if moved.get("token") != dead.get("token") and dead.get("token"):
            # a fresh claim replaced the dead one between our read and our rename: put it back
            try:
                os.link(stale, path)
            except OSError:
                pass
            stale.unlink(missing_ok=True)
            return False
        stale.unlink(missing_ok=True)
        log.warning("taking over the claim of worker %s (pid %s on %s) on %s: %s", dead.get("worker"),
                    dead.get("pid"), dead.get("host"), dead.get("unit"), why)
        return True

    # ------------------------------------------------------------------ heartbeat
    def start_heartbeat(self) -> Claims:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="llmmem-heartbeat", daemon=True)
            self._thread.start()
        return self

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            for claim in list(self._held.values()):
                try:
                    claim.heartbeat()
                except OSError as e:  # a file system hiccup: try again next beat
                    log.warning("heartbeat of claim %s failed: %s", claim.key, e)

    def release_all(self) -> None:
        for claim in list(self._held.values()):
            claim.release()

    def __enter__(self):
        return self.start_heartbeat()

    def __exit__(self, *exc):
        self.stop_heartbeat()
        self.release_all()

    # ------------------------------------------------------------------ a coordinator's clean-up
    def reap_run(self, run_id: str, reason_for=None) -> list[dict]:
        """Claims left by this command's workers (which have all exited): each one's current cell is recorded
        as failed (``reason_for(doc) -> str`` says why), and the claim removed. Returns the claims reaped."""
        reaped = []
        for key, doc in self.all().items():
            if doc.get("run_id") != run_id:
                continue
            reason = reason_for(doc) if reason_for else "the worker exited without finishing it"
            if doc.get("cell"):
                record_failure(self.run_dir, doc.get("cell_key"), doc["cell"],
                               f"WorkerDied: worker {doc.get('worker')} (pid {doc.get('pid')} on {doc.get('host')}) "
                               f"died while computing this cell: {reason}", "", doc)
            (self.dir / f"{key}.json").unlink(missing_ok=True)
            reaped.append(doc)
        return reaped


# ----------------------------------------------------------------------------- failures
def _failed_dir(run_dir: Path | str) -> Path:
    return Path(run_dir) / FAILED_DIR


def record_failure(run_dir: Path | str, key: str | None, cell_name: str, error, tb: str = "",
                   who: dict | Identity | None = None) -> Path:
    """Record that ``cell_name`` failed: ``error`` (an exception or a line) and its traceback. Written
    atomically; the latest failure of a cell replaces earlier ones."""
    from llmmem.results import atomic_write_json, atomic_write_text, safe_name

    if isinstance(error, BaseException):
        first = " ".join(str(error).split()) or "(no message)"
        line = f"{type(error).__name__}: {first}"
        tb = tb or "".join(traceback.format_exception(type(error), error, error.__traceback__))
    else:
        line = str(error)
    key = key or safe_name(cell_name)
    d = _failed_dir(run_dir)
    who = who.__dict__ if isinstance(who, Identity) else dict(who or {})
    doc = {"cell": cell_name, "key": key, "error": line[:2000], "time": time.time(),
           "worker": who.get("worker"), "host": who.get("host"), "pid": who.get("pid"), "run_id": who.get("run_id")}
    if tb:
        atomic_write_text(d / f"{key}.traceback.txt", tb)
        doc["traceback"] = str(Path(FAILED_DIR) / f"{key}.traceback.txt")
    atomic_write_json(d / f"{key}.json", doc)
    return d / f"{key}.json"


def clear_failure(run_dir: Path | str, key: str) -> None:
    d = _failed_dir(run_dir)
    (d / f"{key}.json").unlink(missing_ok=True)
    (d / f"{key}.traceback.txt").unlink(missing_ok=True)


def read_failures(run_dir: Path | str) -> dict[str, dict]:
    """Failure records by cell name (the latest per cell)."""
    out: dict[str, dict] = {}
    d = _failed_dir(run_dir)
    if not d.is_dir():
        return out
    for p in sorted(d.glob("*.json")):
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("cell"):
            old = out.get(doc["cell"])
            if old is None or (doc.get("time") or 0) >= (old.get("time") or 0):
                out[doc["cell"]] = doc
    return out
