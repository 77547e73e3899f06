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


def prompt_format(eval_spec, backend, seed: int):
    """The ``PromptFormat`` of an evaluation: the chat template (rendered with the backend's tokenizer), the
    system instruction, multi-turn shots and the few-shot seed of ``eval_spec`` (an ``EvalSpec``)."""
    from llmmem.tasks import PromptFormat

    if eval_spec is None:
        return None
    chat = None
    if eval_spec.apply_chat_template:
        from llmmem.chat import chat_renderer

        chat = chat_renderer(getattr(backend, "tok", None), eval_spec.apply_chat_template)
    return PromptFormat(system_instruction=eval_spec.system_instruction, chat=chat,
                        fewshot_as_multiturn=bool(eval_spec.fewshot_as_multiturn),
                        fewshot_seed=eval_spec.fewshot_seed_for(seed))


def evaluate(backend, tasks: list[Task], *, limit: int | float | dict | None = None, num_fewshot: int | None = None,
             seed: int = 0, ref_backend=None, on_task=None, eval_spec=None) -> list[TaskResult]:
    """Run every task; ``limit`` is one count/fraction or {task: count/fraction}; ``eval_spec`` (an
    ``EvalSpec``) supplies limit and num_fewshot when given, and the lm-eval flags: chat template, system
    instruction, few-shot seed (recall / icl prompts; extraction and MIA score raw text and ignore them),
    ``gen_kwargs`` (recall / icl generate requests; extraction generates its suffix greedily, always),
    ``predict_only`` (outputs, no metrics)."""
    from llmmem.lmeval import LmEvalTask, run_lm_eval

    fmt = None
    predict_only, sampling_seed = False, None
    if eval_spec is not None:
        limit = {t.name: eval_spec.limit_for(t.name) for t in tasks}
        num_fewshot = eval_spec.num_fewshot
        fmt = prompt_format(eval_spec, backend, seed)
        predict_only = eval_spec.predict_only
        sampling_seed = eval_spec.sampling_seed_for(seed)
        ignored = sorted({t.suite for t in tasks if isinstance(t, Task) and t.suite not in ("recall", "icl")})
        if ignored and (eval_spec.apply_chat_template or eval_spec.system_instruction):
            log.info("%s tasks score raw text: the chat template and system instruction do not apply to them",
                     "/".join(ignored))
    out = []
    for task in tasks:
        lim = limit.get(task.name) if isinstance(limit, dict) else limit
        if isinstance(task, LmEvalTask):
            results = run_lm_eval(task, backend, limit=lim, num_fewshot=num_fewshot, seed=seed, eval_spec=eval_spec)
        else:
            if eval_spec is not None and task.suite in ("recall", "icl"):
                task = task.with_generation_kwargs(eval_spec.gen_kwargs)
            results = [run_task(task, backend, limit=limit_count(task, lim), num_fewshot=num_fewshot, seed=seed,
                                ref_backend=ref_backend, prompt_format=fmt, predict_only=predict_only,
                                sampling_seed=sampling_seed)]
        for res in results:
            log.info("%s: %s (%.1fs)", res.task, _headline(res) or "outputs only (predict_only)", res.seconds)
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
