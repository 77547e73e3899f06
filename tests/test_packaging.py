"""The wheel ships every llmmem package and every built-in task file (a normal, non-editable install works)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_contains_every_subpackage_and_task(tmp_path):
    # setuptools' PEP 517 hook directly (what pip wheel --no-build-isolation calls, without pip's seconds)
    r = subprocess.run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_wheel({str(tmp_path)!r})"],
                       cwd=REPO, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = tmp_path.glob("llmmem-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = sorted(str(p.parent.relative_to(REPO)) for p in (REPO / "llmmem").rglob("__init__.py")
                      if "__pycache__" not in p.parts)
    assert len(packages) >= 8
    missing = [p for p in packages if f"{p}/__init__.py" not in names]
    assert not missing, f"packages left out of the wheel: {missing}"
    modules = [str(p.relative_to(REPO)) for p in (REPO / "llmmem").rglob("*.py") if "__pycache__" not in p.parts]
    assert not [m for m in modules if m not in names]
    tasks = [p for p in (REPO / "tasks").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    missing = [str(p) for p in tasks if "llmmem/_tasks/" + str(p.relative_to(REPO / "tasks")) not in names]
    assert not missing, f"task files left out of the wheel: {missing}"
    assert any(n.endswith("entry_points.txt") for n in names)
