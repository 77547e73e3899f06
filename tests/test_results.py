import json
import os
import subprocess
import sys

import pytest

from llmmem.config import ConfigError
from llmmem.results import (
    SCHEMA_VERSION,
    CellDir,
    CellExistsError,
    append_jsonl,
    atomic_directory,
    atomic_write_text,
    environment,
    iter_cells,
    read_jsonl_tolerant,
    validate_results,
)


def payload(**extra):
    d = {"cell_config": {"model": "m", "seed": 0}, "model": {"name": "m", "fingerprint": "abc"},
         "metrics": {"t": {"acc": 0.5, "acc_stderr": 0.1}}, "n_samples": {"t": 10}, "seeds": {"seed": 0}}
    d.update(extra)
    return d


def test_finish_writes_schema_and_refuses_overwrite(tmp_path):
    cell = CellDir(tmp_path, "m/dense-12345678").prepare()
    assert not cell.done
    cell.write_samples("t", [{"id": 0, "response": "x"}])
    cell.finish(payload())
    assert cell.done
    doc = json.loads(cell.results_path.read_text())
    assert doc["schema_version"] == SCHEMA_VERSION == 2 and validate_results(doc, lm_eval=False) == []
    assert doc["environment"]["llmmem"] and doc["environment"]["torch"]
    assert "total_seconds" in doc["timings"]
    assert (cell.path / "samples_t.jsonl").read_text().count("\n") == 1
    with pytest.raises(CellExistsError, match="--overwrite"):
        CellDir(tmp_path, cell.name).prepare()
    again = CellDir(tmp_path, cell.name).prepare(overwrite=True)
    assert not again.done and not (again.path / "samples_t.jsonl").exists()
    assert [c for c, _ in iter_cells(tmp_path)] == []


def test_discard_removes_the_unfinished_cell_and_its_empty_model_dir(tmp_path):
    cell = CellDir(tmp_path, "m/x-1").prepare()
    (cell.path / "samples_t.jsonl").write_text("{}\n")
    cell.discard()
    assert list(tmp_path.iterdir()) == []


def test_missing_keys_and_stderr_are_reported(tmp_path):
    cell = CellDir(tmp_path, "m/x").prepare()
    with pytest.raises(ValueError, match="missing"):
        cell.finish({"metrics": {}})
    assert not cell.done
    doc = payload(metrics={"t": {"acc": 0.5}})
    doc["schema_version"] = SCHEMA_VERSION
    doc["environment"], doc["timings"] = {}, {}
    assert any("acc_stderr" in p for p in validate_results(doc, lm_eval=False))


def test_corrupt_or_old_results_are_named_not_skipped(tmp_path):
    cell = CellDir(tmp_path, "m/a-1").prepare()
    cell.finish(payload())
    bad = tmp_path / "m" / "b-2"
    bad.mkdir()
    (bad / "results.json").write_text('{"schema_version": 2, "config"')  # truncated by hand
    with pytest.raises(ConfigError, match="b-2/results.json is not a valid results file"):
        list(iter_cells(tmp_path))
    (bad / "results.json").write_text(json.dumps({"schema_version": 1, "results": {}}))
    with pytest.raises(ConfigError, match="schema 1"):
        list(iter_cells(tmp_path))
    assert not CellDir(tmp_path, "m/b-2").done  # a sweep redoes it


def test_atomic_write_leaves_no_partial_file(tmp_path):
    """A writer killed mid-write leaves the old file intact and only a temp file behind."""
    target = tmp_path / "results.json"
    atomic_write_text(target, "old")
    code = (
        "import os, sys; from pathlib import Path; from llmmem import results as r\n"
        "def boom(*a): os._exit(9)\n"
        "r.os.replace = boom\n"
        f"r.atomic_write_text(Path({str(target)!r}), 'new' * 1000)\n"
    )
    rc = subprocess.run([sys.executable, "-c", code]).returncode
    assert rc == 9
    assert target.read_text() == "old"


def test_atomic_directory_cleans_what_a_killed_writer_left(tmp_path):
    out = tmp_path / "ckpt"
    code = (
        "import os; from llmmem.results import atomic_directory\n"
        f"with atomic_directory({str(out)!r}) as tmp:\n"
        "    (tmp / 'model.safetensors').write_bytes(b'x' * 1000)\n"
        "    os._exit(9)\n"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    left = list(out.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".llmmem-partial-")  # recognisable, inside the output
    with atomic_directory(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]  # the stale partial is gone
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # the user's umask, not mkdtemp's 0o700
    assert (out / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_appended_jsonl_survives_a_torn_last_line(tmp_path):
    p = tmp_path / "curves.jsonl"
    append_jsonl(p, [{"step": 0}, {"step": 1}])
    with open(p, "a") as fh:
        fh.write('{"step": 2, "lo')  # killed mid-line
    assert read_jsonl_tolerant(p) == [{"step": 0}, {"step": 1}]
    p.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(ConfigError, match="line 2"):
        read_jsonl_tolerant(p)


def test_environment_capture_has_versions_and_no_heavy_imports():
    env = environment()
    for k in ("llmmem", "python", "platform", "torch", "transformers", "git"):
        assert k in env
    assert env["vllm"] is None or isinstance(env["vllm"], str)
    assert os.environ.get("LLMMEM_HOME")  # isolated home per test
