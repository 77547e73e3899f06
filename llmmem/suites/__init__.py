"""Suites turn task docs into backend requests and responses into scores.

Contract: ``build(task, docs, backend, num_fewshot, seed) -> Requests`` and
``score(task, docs, requests, responses, backend) -> rows`` (one dict per doc with its per-sample
metrics); ``summarize(task, rows)`` adds set-level metrics (e.g. ROC-AUC); ``conventions(task, seed)``
says which reference convention the task's numbers follow (recorded with the result). ``run_task``
drives one task end to end and aggregates (means, bootstrap standard errors, per-bucket values), and
counts the requests that did not fit the model (``n_truncated``, one warning per task).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from llmmem.config import ConfigError
from llmmem.metrics import aggregate
from llmmem.registry import Registry
from llmmem.tasks import Task

log = logging.getLogger(__name__)


@dataclass
class Requests:
    generate: list = field(default_factory=list)
    loglikelihood: list = field(default_factory=list)
    rolling: list = field(default_factory=list)
    meta: list = field(default_factory=list)  # per-doc bookkeeping for score()


@dataclass
class Responses:
    generate: list = field(default_factory=list)
    loglikelihood: list = field(default_factory=list)
    rolling: list = field(default_factory=list)


class Suite:
    name = "base"
    default_metrics: tuple = ()

    def build(self, task: Task, docs: list[dict], backend, num_fewshot: int, seed: int) -> Requests:
        raise NotImplementedError

    def score(self, task: Task, docs: list[dict], req: Requests, resp: Responses, backend) -> list[dict]:
        raise NotImplementedError

    def summarize(self, task: Task, rows: list[dict], seed: int) -> dict:
        return {}

    def conventions(self, task: Task, seed: int) -> dict:
        """{what: which reference convention} for the task's numbers (written into the result's config)."""
        return dict(BACKEND_CONVENTIONS)

    def metrics(self, task: Task) -> list[str]:
        return list(task.metric_list or self.default_metrics)


SUITES: Registry[type[Suite]] = Registry("suite")
SUITES.register("recall", "llmmem.suites.recall:RecallSuite", "closed-book QA / cloze, exact match and F1")
SUITES.register("icl", "llmmem.suites.icl:ICLSuite", "open-book, overriding QA, in-context classification, associative recall")
SUITES.register("extraction", "llmmem.suites.extraction:ExtractionSuite", "verbatim extraction of a suffix from its prefix")
SUITES.register("mia", "llmmem.suites.mia:MIASuite", "membership inference scores and ROC-AUC")
SUITES.register("tofu", "llmmem.suites.tofu:TofuSuite", "TOFU: forget quality, model utility, truth ratio (open-unlearning)")
SUITES.register("muse", "llmmem.suites.muse:MuseSuite", "MUSE: VerbMem, KnowMem forget/retain, PrivLeak (open-unlearning)")


BACKEND_CONVENTIONS = {
    "long_requests": "lm-eval rolling windows (lm_eval/utils.py get_rolling_token_windows, context_len=1): "
                     "nothing cut; counted in n_truncated",
    "generation_prompts": "left-truncated to max_length - max_gen_toks (as lm-eval's HFLM); counted in n_truncated",
}


@dataclass
class TaskResult:
    task: str
    metrics: dict
    rows: list
    n_samples: int
    version: object
    hash: str
    seconds: float
    num_fewshot: int
    suite: str = ""
    primary_metric: str | None = None
    chance: dict = field(default_factory=dict)
    conventions: dict = field(default_factory=dict)  # {what: reference convention}, e.g. which tokens MIA scores
    n_truncated: int = 0  # requests that did not fit the model (prompt left-cut, or scored in windows)


def count_truncated(backend, req: Requests, resp: Responses) -> int:
    """Mark generation results whose prompt the backend left-truncates, and count every truncated request."""
    check = getattr(backend, "prompt_truncated", None)
    if check is not None:
        for q, r in zip(req.generate, resp.generate):
            if not getattr(r, "truncated", False) and check(q):
                r.truncated = True
    return sum(bool(getattr(r, "truncated", False)) for r in (*resp.generate, *resp.loglikelihood, *resp.rolling))


def run_task(task: Task, backend, *, limit: int | None = None, num_fewshot: int | None = None, seed: int = 0,
             data=None, fewshot_data=None, ref_backend=None) -> TaskResult:
    """Run one task. ``data`` / ``fewshot_data`` read other files than the YAML names (fixtures)."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit} must be >= 1")
    t0 = time.time()
    suite = SUITES.get(task.suite)()
    suite.ref_backend = ref_backend
    if data is not None or fewshot_data is not None:
        task = task.with_data(data, fewshot_data)
    docs = task.docs(limit=limit)
    k = task.num_fewshot if num_fewshot is None else num_fewshot
    if k < 0:
        raise ConfigError(f"--num_fewshot {k} must be >= 0")
    req = suite.build(task, docs, backend, k, seed)
    resp = Responses(
        generate=backend.generate(req.generate) if req.generate else [],
        loglikelihood=backend.loglikelihood(req.loglikelihood) if req.loglikelihood else [],
        rolling=backend.loglikelihood_rolling(req.rolling) if req.rolling else [],
    )
    n_truncated = count_truncated(backend, req, resp)
    if n_truncated:
        n_req = len(req.generate) + len(req.loglikelihood) + len(req.rolling)
        log.warning("%s: %d of %d requests longer than the model's %s tokens (prompts left-truncated, "
                    "log-likelihoods scored in windows)", task.name, n_truncated, n_req,
                    getattr(backend, "max_length", "?"))
    rows = suite.score(task, docs, req, resp, backend)
    names = suite.metrics(task)
    metrics = aggregate(rows, names, task.bucket_by, seed=seed + 1234)
    metrics.update(suite.summarize(task, rows, seed))
    primary = names[0] if names else next((m for m in metrics if m.endswith("_auc")), None)
    chance = {m: c for m in names if (c := task.chance.get(m, task.chance.get("*"))) is not None}
    return TaskResult(task.name, metrics, rows, len(rows), task.version, task.content_hash(),
                      round(time.time() - t0, 3), k, task.suite, primary, chance,
                      suite.conventions(task, seed), n_truncated)
