"""Evaluate a backend on tasks (shared by every command; the cell writer is ``llmmem.runner``)."""

from __future__ import annotations

import logging
import math

from llmmem.config import ConfigError
from llmmem.suites import TaskResult, run_task
from llmmem.tasks import Task, get_task

log = logging.getLogger(__name__)


def resolve_tasks(names: list[str], include_path: str | None = None) -> list:
    """Load every task up front, so an unknown name fails before any model is loaded.

    ``lm_eval:<name>`` resolves to a task run by lm-evaluation-harness."""
    from llmmem.lmeval import PREFIX, resolve_lm_eval

    return [resolve_lm_eval(n, include_path) if n.startswith(PREFIX) else get_task(n, include_path) for n in names]


def limit_count(task, limit) -> int | None:
    """A limit as a number of docs: a count as given, a fraction of the task's docs rounded up (lm-eval)."""
    if limit is None or isinstance(limit, int):
        return limit
    return max(1, int(math.ceil(len(task.docs()) * float(limit))))


def check_tasks(tasks: list, limit_for, num_fewshot: int | None = None) -> None:
    """Data problems (missing fields, empty after filtering, shot pool too small for ``num_fewshot`` or the
    task's own) before any model loads."""
    from llmmem.tasks import FewshotSampler

    for t in tasks:
        lim = limit_for(t.name)
        if isinstance(t, Task):
            t.docs(limit=limit_count(t, lim))
            n = t.num_fewshot if num_fewshot is None else num_fewshot
            if n > 0:
                FewshotSampler(t.fewshot_pool(t.docs()), 0, t.fewshot_sampler, t.name).check(n)


def evaluate(backend, tasks: list[Task], *, limit: int | float | dict | None = None, num_fewshot: int | None = None,
             seed: int = 0, ref_backend=None, on_task=None, eval_spec=None) -> list[TaskResult]:
    """Run every task; ``limit`` is one count/fraction or {task: count/fraction}; ``eval_spec`` (an
    ``EvalSpec``) supplies limit and num_fewshot when given."""
    from llmmem.lmeval import LmEvalTask, run_lm_eval

    if eval_spec is not None:
        limit = {t.name: eval_spec.limit_for(t.name) for t in tasks}
        num_fewshot = eval_spec.num_fewshot
    out = []
    for task in tasks:
        lim = limit.get(task.name) if isinstance(limit, dict) else limit
        if isinstance(task, LmEvalTask):
            results = run_lm_eval(task, backend, limit=lim, num_fewshot=num_fewshot, seed=seed)
        else:
            results = [run_task(task, backend, limit=limit_count(task, lim), num_fewshot=num_fewshot, seed=seed,
                                ref_backend=ref_backend)]
        for res in results:
            log.info("%s: %s (%.1fs)", res.task, _headline(res), res.seconds)
            if on_task:
                on_task(res)
            out.append(res)
    return out


def _headline(res: TaskResult) -> str:
    keys = [k for k, v in res.metrics.items() if isinstance(v, float) and not k.endswith("_stderr")][:3]
    return ", ".join(f"{k}={res.metrics[k]:.3f}" for k in keys)


def raise_if_empty(tasks) -> None:
    if not tasks:
        raise ConfigError("no task to evaluate")
