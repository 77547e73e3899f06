"""Request cache (``--use_cache DIR``): answers repeated backend requests from sqlite.

A cached answer is keyed by

* ``model_key``: what the weights are. The caller builds it from the dense checkpoint's fingerprint and
  the cell's intervention chain (:func:`cache_model_key`), never from the model name alone: a pruned
  model under the dense model's name would otherwise be served the dense model's answers (which is
  what lm-evaluation-harness's ``--use_cache`` does, keyed on the request only);
* the request: every field of the request dataclass, token ids included, so generation settings
  (``max_gen_toks``, ``until``, sampling, seed) are part of the key;
* the backend's own settings that change answers: backend name, maximum length, stop token ids, a hash
  of the tokenizer (text requests are tokenized by the backend), the model's dtype and device type.

Sampling requests without a seed are never cached (each call must draw anew). One sqlite file per
cache directory, in WAL mode with a busy timeout, so several processes (a sweep and an ``eval``, two
sweep workers) can share it. Not for network filesystems: sqlite's WAL mode needs shared memory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import sqlite3
import time
from dataclasses import asdict
from pathlib import Path

from llmmem.backends.base import (
    Backend,
    GenerateRequest,
    GenerateResult,
    LoglikelihoodRequest,
    LoglikelihoodResult,
    RollingRequest,
    RollingResult,
)
from llmmem.config import ConfigError

log = logging.getLogger(__name__)

CACHE_FILE = "llmmem-requests.sqlite"
CACHE_VERSION = 1  # part of every key: a change of answer format invalidates old entries
_KINDS = {"generate": GenerateResult, "loglikelihood": LoglikelihoodResult, "rolling": RollingResult}
_LOOKUP_CHUNK = 500  # sqlite's default limit on bound parameters is 999


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def cache_model_key(fingerprint: str, weights_key: str | None = None) -> str:
    """The model part of a cache key: the dense checkpoint's fingerprint plus the cell's weights key
    (``Cell.weights_key()``: a hash of the model identity, the whole intervention chain and the seed).

    Two cells share answers only when both the checkpoint and the whole chain match: never a dense answer
    for a pruned cell (lm-eval keys its cache on the model name)."""
    if not isinstance(fingerprint, str) or not fingerprint.strip():
        raise ConfigError(f"cache model key: fingerprint={fingerprint!r} must be a non-empty string")
    return f"{fingerprint}+{weights_key or 'dense'}"


def _plain(obj):
    """JSON-able form of requests (dataclasses, paths, tuples) for hashing."""
    from llmmem.results import jsonable

    return jsonable(obj)


def tokenizer_fingerprint(tok) -> str | None:
    """A hash of what a tokenizer does: the fast tokenizer's full JSON (vocabulary, merges, normalizer,
    BOS post-processor), else its vocabulary, special tokens and what it adds to a probe string."""
    if tok is None:
        return None
    h = hashlib.sha256(type(tok).__name__.encode())
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        try:
            h.update(_canonical(tok.get_vocab()).encode())
        except (AttributeError, NotImplementedError, TypeError):
            h.update(repr(getattr(tok, "name_or_path", "")).encode())
    h.update(_canonical({k: str(v) for k, v in (getattr(tok, "special_tokens_map", None) or {}).items()}).encode())
    try:
        h.update(_canonical(tok("a b")["input_ids"]).encode())
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode the probe still gets a stable hash
        pass
    return h.hexdigest()[:32]


def backend_settings(inner) -> dict:
    """What besides the weights and the request changes a backend's answers: backend, truncation length, stop
    ids, tokenizer, and the dtype and device the model runs in (the checkpoint fingerprint is the same for a
    float32 and a bfloat16 load)."""
    eos = getattr(inner, "eos_ids", None)
    spec = getattr(getattr(inner, "lm", None), "spec", None)
    dtype, device = getattr(spec, "dtype", None), getattr(spec, "device", None)
    try:
        param = next(inner.model.parameters())
        dtype, device = str(param.dtype).replace("torch.", ""), param.device.type
    except (AttributeError, StopIteration, TypeError):
        pass
    return {"backend": getattr(inner, "name", type(inner).__name__), "max_length": getattr(inner, "max_length", None),
            "eos_ids": list(eos) if isinstance(eos, (list, tuple)) else eos,
            "tokenizer": tokenizer_fingerprint(getattr(inner, "tok", None)), "dtype": dtype, "device": device}


def cacheable(request) -> bool:
    """Sampling without a seed is never cached."""
    return not (isinstance(request, GenerateRequest) and request.do_sample and request.seed is None)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class CachingBackend(Backend):
    """Wraps a backend: hits come from the cache, misses go to ``inner`` in one batch; order is kept.

    Everything else (``encode``, ``decode``, ``model``, ``tok``, ``batch_size``, ``max_length``,
    ``update_weights`` ...) is the inner backend's. In a sweep the backend lives for a whole model while
    the weights change per cell: set :attr:`model_key` for each cell before evaluating it.
    ``stats`` counts hits, misses and uncacheable requests (e.g. to record in a cell's timings).
    """

    def __init__(self, inner: Backend, path: str | Path, model_key: str, *, timeout: float = 60.0,
                 settings: dict | None = None):
        self.inner = inner
        self.model_key = model_key
        self.timeout = float(timeout)
        self.path = self._dir(path)
        self.db_path = self.path / CACHE_FILE
        self.settings = dict(backend_settings(inner), **(settings or {}))
        self._settings_json = _canonical(_plain(self.settings))
        self.stats: dict = {}
        self.reset_stats()
        self._warned_write = False
        self._conn = self._open()

    # ---------------------------------------------------------------- set-up
    @staticmethod
    def _dir(path) -> Path:
        p = Path(path).expanduser()
        if p.exists() and not p.is_dir():
            raise ConfigError(f"--use_cache {p} is a file; give a directory (the cache is {CACHE_FILE} inside it)")
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--use_cache {p}: cannot create the directory: {_one_line(e)}") from None
        return p

    def _error(self, e: BaseException, doing: str) -> ConfigError:
        msg = _one_line(e)
        low = msg.lower()
        if "locked" in low or "busy" in low:
            hint = f"another process held a lock for more than {self.timeout:g}s; retry, or use another --use_cache directory"
        elif "not a database" in low or "malformed" in low or "corrupt" in low or "disk image" in low:
            hint = f"the file is damaged; delete {self.db_path} to start an empty cache"
        else:
            hint = "check the file and its permissions, or use another --use_cache directory"
        return ConfigError(f"--use_cache {self.db_path}: cannot {doing}: {msg} ({hint})")

    def _open(self) -> sqlite3.Connection:
        conn = None
        try:
            conn = sqlite3.connect(str(self.db_path), timeout=self.timeout, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("request cache %s: journal mode %s (WAL unavailable); concurrent use will wait on locks",
                            self.db_path, mode)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, model_key TEXT NOT NULL, "
                         "kind TEXT NOT NULL, value TEXT NOT NULL, created REAL NOT NULL) WITHOUT ROWID")
            conn.execute("SELECT count(*) FROM answers WHERE key = ''").fetchone()
        except sqlite3.Error as e:
            if conn is not None:
                conn.close()
            raise self._error(e, "open the request cache") from None
        return conn

    # ---------------------------------------------------------------- keys
    @property
    def model_key(self) -> str:
        return self._model_key

    @model_key.setter
    def model_key(self, value: str) -> None:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"request cache: model_key={value!r} must be a non-empty string "
                              "(the checkpoint fingerprint + the intervention chain: see cache_model_key)")
        self._model_key = value

    def key(self, kind: str, request) -> str:
        body = _canonical({"v": CACHE_VERSION, "kind": kind, "request": _plain(asdict(request))})
        h = hashlib.sha256()
        for part in (self._model_key, self._settings_json, body):
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()

    # ---------------------------------------------------------------- the cache
    def _lookup(self, keys: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        try:
            for i in range(0, len(keys), _LOOKUP_CHUNK):
                chunk = keys[i:i + _LOOKUP_CHUNK]
                rows = self._conn.execute(f"SELECT key, value FROM answers WHERE key IN ({','.join('?' * len(chunk))})",
                                          chunk).fetchall()
                found.update(rows)
        except sqlite3.Error as e:
            raise self._error(e, "read the request cache") from None
        return found

    def _store(self, kind: str, items: list[tuple[str, object]]) -> None:
        if not items:
            return
        now = time.time()
        rows = [(k, self._model_key, kind, json.dumps(asdict(r), ensure_ascii=False), now) for k, r in items]
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?)", rows)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:  # the answers are computed: return them, lose only their caching
            if not self._warned_write:
                log.warning("%s; %d answers were not cached", self._error(e, "write the request cache"), len(rows))
                self._warned_write = True

    def _run(self, kind: str, requests: list, call) -> list:
        if not requests:
            return []
        t0 = time.perf_counter()
        keys = [self.key(kind, r) if cacheable(r) else None for r in requests]
        found = self._lookup(sorted({k for k in keys if k is not None}))
        cls = _KINDS[kind]
        out: list = [None] * len(requests)
        todo: list[int] = []  # positions sent to the model
        first_of: dict[str, int] = {}  # a repeated request is computed once
        for i, k in enumerate(keys):
            if k is None:
                todo.append(i)
                self.stats["uncacheable"] += 1
                continue
            if k in found:
                try:
                    out[i] = cls(**json.loads(found[k]))
                    self.stats["hits"] += 1
                    continue
                except (TypeError, ValueError):  # an entry this version cannot read: recompute and replace it
                    found.pop(k)
            if k not in first_of:
                first_of[k] = i
                todo.append(i)
                self.stats["misses"] += 1
        self.stats["lookup_seconds"] += time.perf_counter() - t0
        if todo:
            answers = call([requests[i] for i in todo])
            if len(answers) != len(todo):
                raise RuntimeError(f"{self.inner.name} backend returned {len(answers)} answers for {len(todo)} requests")
            for i, a in zip(todo, answers):
                out[i] = a
            self._store(kind, [(keys[i], out[i]) for i in todo if keys[i] is not None])
        for i, k in enumerate(keys):
            if out[i] is None:  # a repeat of a request computed above
                out[i] = copy.deepcopy(out[first_of[k]])
        return out

    # ---------------------------------------------------------------- the Backend contract
    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.inner.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode(ids)

    def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        return self._run("generate", requests, self.inner.generate)

    def loglikelihood(self, requests: list[LoglikelihoodRequest]) -> list[LoglikelihoodResult]:
        return self._run("loglikelihood", requests, self.inner.loglikelihood)

    def loglikelihood_rolling(self, requests: list[RollingRequest]) -> list[RollingResult]:
        return self._run("rolling", requests, self.inner.loglikelihood_rolling)

    def __getattr__(self, attr: str):
        # only called for attributes not found on the wrapper: model, tok, batch_size, max_length, update_weights ...
        if attr in ("inner", "_conn", "_model_key") or attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def reset_stats(self) -> dict:
        """Start new counters (e.g. per sweep cell); returns the previous ones."""
        old, self.stats = self.stats, {"hits": 0, "misses": 0, "uncacheable": 0, "lookup_seconds": 0.0}
        return old

    def entries(self, model_key: str | None = None) -> int:
        """Number of cached answers (for ``model_key`` when given)."""
        try:
            if model_key is None:
                return self._conn.execute("SELECT count(*) FROM answers").fetchone()[0]
            return self._conn.execute("SELECT count(*) FROM answers WHERE model_key = ?", (model_key,)).fetchone()[0]
        except sqlite3.Error as e:
            raise self._error(e, "read the request cache") from None

    def close(self) -> None:
        """Close the cache file, then the inner backend (when it has a ``close``)."""
        conn, self._conn = self.__dict__.get("_conn"), None
        if conn is not None:
            conn.close()
        inner_close = getattr(self.inner, "close", None)
        if callable(inner_close):
            inner_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
