"""Kill -9 at the worst moments: a prune --output save, appends to curves.jsonl. (A sweep cell killed mid-run is
tests/test_sweep.py::test_kill_dash_nine_then_resume; a killed executor worker, tests/test_executors.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from llmmem.results import append_jsonl, read_jsonl_tolerant

# the checkpoint writer dies with every file written into its partial directory, before the rename into place
KILL_IN_SAVE = r"""
import contextlib, os, sys
import llmmem.checkpoint as ck
real = ck.atomic_directory

@contextlib.contextmanager
def dying(dest, *a, **k):
    with real(dest, *a, **k) as tmp:
        yield tmp
        os.kill(os.getpid(), 9)

ck.atomic_directory = dying
from llmmem.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # a subprocess importing torch and transformers: ~25 s on a loaded 2-core machine
def test_kill_9_during_prune_output_save_leaves_no_hidden_temp_and_reruns(tmp_path, llama_dir, monkeypatch):
    out = tmp_path / "pruned"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch), LLMMEM_HOME=str(tmp_path / "home"), LLMMEM_THREADS="1",
               HF_HUB_OFFLINE="1")
    args = ["prune", "--model", str(llama_dir), "--method", "magnitude", "--sparsity", "0.5", "--output", str(out),
            "--quiet"]
    r = subprocess.run([sys.executable, "-c", KILL_IN_SAVE, *args], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    left = list(out.iterdir())
    # what the killed save wrote is inside the output, under a recognisable name; nothing looks finished
    assert len(left) == 1 and left[0].name.startswith(".llmmem-partial-"), left
    assert any(p.suffix == ".safetensors" for p in left[0].iterdir())
    assert not list(scratch.iterdir()), "a temp directory was left outside the output"
    # the rerun needs no --overwrite (only a dead writer's partial is there) and removes the partial
    from llmmem.cli import main

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(args) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "config.json" in names and not [n for n in names if n.startswith(".llmmem-partial-")], names


APPENDER = r"""
import sys
from llmmem.results import append_jsonl
step = 0
while True:
    append_jsonl(sys.argv[1], [{"step": step, "set": s, "extractable": 0.5, "pad": "x" * 200} for s in ("a", "b")])
    step += 1
"""


def test_kill_9_during_curve_appends_loses_at_most_the_last_record(tmp_path):
    curves = tmp_path / "curves.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", APPENDER, str(curves)])
    deadline = time.time() + 60
    while time.time() < deadline and (not curves.exists() or curves.stat().st_size < 200_000):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows = read_jsonl_tolerant(curves)  # no corrupt line
    assert len(rows) > 100
    assert [(r["step"], r["set"]) for r in rows] == [(i // 2, "ab"[i % 2]) for i in range(len(rows))]
    text = curves.read_text()
    assert text.count("\n") in (len(rows), len(rows) + 1)  # at most one (torn) line beyond the complete ones


def test_append_after_a_torn_line_drops_it_instead_of_gluing(tmp_path):
    p = tmp_path / "curves.jsonl"
    append_jsonl(p, [{"step": 0}, {"step": 1}])
    with open(p, "a") as fh:
        fh.write('{"step": 2, "lo')  # the writer was killed mid-line
    append_jsonl(p, [{"step": 2}])  # the resumed writer
    assert read_jsonl_tolerant(p) == [{"step": 0}, {"step": 1}, {"step": 2}]
    assert all(json.loads(line) for line in p.read_text().splitlines())
    q = tmp_path / "only-torn.jsonl"
    q.write_text('{"step": 0, "x')
    append_jsonl(q, [{"step": 0}])
    assert read_jsonl_tolerant(q) == [{"step": 0}]
