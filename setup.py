"""Package discovery (the metadata is in pyproject.toml).

Every ``llmmem`` package is found (a new subpackage ships without editing a list), and the built-in tasks in
``tasks/`` ship inside the wheel as ``llmmem._tasks`` with all their subdirectories. pyproject.toml alone
cannot map a directory outside ``llmmem/`` into discovered packages, hence this file.
"""

from setuptools import find_namespace_packages, find_packages, setup

TASK_FILES = ["*.yaml", "*.jsonl", "*.md", "*.py"]
tasks = ["llmmem._tasks"] + [f"llmmem._tasks.{p}" for p in find_namespace_packages(where="tasks")
                             if "__pycache__" not in p]
setup(
    packages=find_packages(include=["llmmem", "llmmem.*"]) + tasks,
    package_dir={"llmmem._tasks": "tasks"},
    package_data={p: TASK_FILES for p in tasks},
)
