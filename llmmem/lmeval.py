"""lm-evaluation-harness interoperability, both directions.

* ``lm_eval:<task or group>`` in ``llmmem eval`` and sweeps runs the task through lm-eval's
  ``simple_evaluate`` with ``HFLM(pretrained=<the in-memory model>)`` — a pruned model is evaluated
  without being saved — and its metrics land in the cell like any llmmem task (``metric@filter`` keys,
  with ``_stderr``).
* ``llmmem export-lm-eval DIR`` writes llmmem's offline recall / icl tasks as lm-eval task YAMLs
  (``dataset_path: json`` on a copy of the filtered docs, the same templates, delimiters and shots —
  llmmem samples shots with lm-eval's own rule — and scoring by llmmem's own code through
  ``process_results``), so ``lm_eval --include_path DIR`` gives llmmem's prompts and numbers doc by doc.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from llmmem.config import ConfigError
from llmmem.suites import TaskResult

log = logging.getLogger(__name__)
PREFIX = "lm_eval:"


def _require():
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("lm-eval is not installed: pip install 'llmmem[lm_eval]'")


# ----------------------------------------------------------------------------- fast checks before lm-eval's index
# lm-eval's TaskManager parses every task YAML it ships (~14,000; tens of seconds on a small CPU) and, offline,
# its dataset loads retry the hub for about a minute. A text scan of the same YAMLs answers the two questions
# asked most - is there such a task, and is its data here - in about a second.
_LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "npy"}


def _yaml_dirs(include_path: str | None) -> list[Path]:
    import importlib.util
    import os

    dirs = [Path(p).expanduser() for p in (include_path or "").split(os.pathsep) if p]
    spec = importlib.util.find_spec("lm_eval")
    if spec is not None and spec.submodule_search_locations:
        dirs.append(Path(list(spec.submodule_search_locations)[0]) / "tasks")
    return [d for d in dirs if d.is_dir()]


class _Texts:
    """The text of every task YAML under the search path, read once."""

    def __init__(self, include_path: str | None):
        self.files: list[tuple[Path, str]] = []
        for d in _yaml_dirs(include_path):
            for y in sorted(d.rglob("*.yaml")):
                try:
                    self.files.append((y, y.read_text(encoding="utf-8", errors="replace")))
                except OSError:
                    continue

    def mentioning(self, name: str, keys: tuple = ()) -> list[tuple[Path, dict]]:
        """The YAMLs where ``name`` occurs as a word (only as the value of one of ``keys`` when given)."""
        import re

        if keys:
            word = re.compile(rf"(?m)^(?:{'|'.join(keys)}):\s*['\"]?{re.escape(name)}['\"]?\s*(?:#.*)?$")
        else:
            word = re.compile(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])")
        out = []
        for path, text in self.files:
            if name in text and word.search(text):
                doc = _load_yaml_loose(text)
                if isinstance(doc, dict):
                    out.append((path, doc))
        return out


@lru_cache(maxsize=4)
def _texts(include_path: str | None) -> _Texts:
    return _Texts(include_path)


def _load_yaml_loose(text: str):
    """YAML with lm-eval's ``!function`` (and any other) tags read as plain values."""
    import yaml

    class _Loose(yaml.SafeLoader):
        pass

    _Loose.add_multi_constructor("", lambda loader, suffix, node: None)
    try:
        return yaml.load(text, Loader=_Loose)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError:
        return None


def _with_includes(path: Path, doc: dict, depth: int = 0) -> dict:
    inc = doc.get("include")
    if not isinstance(inc, str) or depth > 8:
        return doc
    p = Path(inc) if Path(inc).is_absolute() else path.parent / inc
    try:
        base = _load_yaml_loose(p.read_text(encoding="utf-8"))
    except OSError:
        return doc
    if not isinstance(base, dict):
        return doc
    return {**_with_includes(p, base, depth + 1), **doc}


def _members(name: str, texts: _Texts, seen: set) -> list[tuple[Path, dict]] | None:
    """The task YAMLs a task, group or tag name stands for; None when the scan cannot tell (lm-eval decides)."""
    if name in seen:
        return []
    seen.add(name)
    tasks = [(p, d) for p, d in texts.mentioning(name, ("task",)) if d.get("task") == name]
    if tasks:
        return tasks[:1]
    found = texts.mentioning(name)
    groups = [(p, d) for p, d in found if d.get("group") == name]
    tagged = [(p, d) for p, d in found
              if (d.get("tag") == name or (isinstance(d.get("tag"), list) and name in d["tag"])) and "task" in d]
    if not groups and not tagged:
        return None
    out = list(tagged)
    for _, g in groups:
        subs = g.get("task") if isinstance(g.get("task"), list) else []
        for sub in subs:
            sub_name = sub.get("task") if isinstance(sub, dict) else sub
            if not isinstance(sub_name, str):
                return None
            m = _members(sub_name, texts, seen)
            if m is None:
                return None
            out += m
    return out


def _hub_cached(dataset: str) -> bool:
    import os

    hf_home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser()
    hub = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or hf_home / "hub")
    ds = Path(os.environ.get("HF_DATASETS_CACHE") or hf_home / "datasets")
    return (hub / f"datasets--{dataset.replace('/', '--')}").is_dir() or (ds / dataset.replace("/", "___")).is_dir()


def precheck(name: str, include_path: str | None = None, offline: bool | None = None) -> None:
    """Fast, before lm-eval's own index: an unknown task name, and (offline) a task whose data is a hub dataset
    that is not in the local cache, are one line at once."""
    from llmmem.presets import hub_reachable

    texts = _texts(include_path)
    if not texts.files:
        return
    members = _members(name, texts, set())
    if members is None:
        if not texts.mentioning(name):
            raise ConfigError(f"unknown lm-eval task {name!r}; see `lm_eval --tasks list`"
                              + (f" (include_path {include_path})" if include_path else ""))
        return  # something lm-eval knows how to read; it decides
    if offline is None:
        offline = os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes") or not hub_reachable()
    if not offline:
        return
    for path, doc in members:
        doc = _with_includes(path, doc)
        ds = doc.get("dataset_path")
        if not isinstance(ds, str) or ds in _LOCAL_BUILDERS:
            continue
        local = Path(ds).expanduser() if Path(ds).expanduser().is_absolute() else path.parent / ds
        if local.exists() or _hub_cached(ds):
            continue
        what = f"task {doc.get('task')!r} of {name!r}" if doc.get("task") != name else f"{name!r}"
        raise ConfigError(f"lm_eval:{name}: the data of {what} is the Hugging Face dataset {ds!r}, which is not "
                          f"available offline (the hub is unreachable and it is not in the local cache); run it "
                          f"where the hub is reachable")


@dataclass
class LmEvalTask:
    """A task run by lm-evaluation-harness (``lm_eval:<name>``)."""

    name: str  # "lm_eval:<lm-eval name>"
    include_path: str | None = None
    suite: str = "lm_eval"

    @property
    def lm_eval_name(self) -> str:
        return self.name[len(PREFIX):]

    def docs(self, limit=None):  # interface parity with Task (data is lm-eval's business)
        return []


def _task_manager(include_path: str | None):
    import os

    from lm_eval.tasks import TaskManager

    paths = [p for p in (include_path or "").split(os.pathsep) if p]
    return TaskManager(include_path=paths, verbosity="ERROR") if paths else TaskManager(verbosity="ERROR")


def resolve_lm_eval(name: str, include_path: str | None = None) -> LmEvalTask:
    _require()
    task = LmEvalTask(name, include_path)
    precheck(task.lm_eval_name, include_path)
    from llmmem.presets import hub_reachable

    if not hub_reachable():  # datasets and the hub client must not retry the network for a minute
        import os

        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tm = _task_manager(include_path)
    if task.lm_eval_name not in tm.all_tasks:
        raise ConfigError(f"unknown lm-eval task {task.lm_eval_name!r}; see `lm_eval --tasks list`"
                          + (f" (include_path {include_path})" if include_path else ""))
    return task


def _split_key(key: str) -> tuple[str, str | None]:
    metric, _, flt = key.partition(",")
    return metric, (flt or None)


def run_lm_eval(task: LmEvalTask, backend, *, limit=None, num_fewshot=None, seed: int = 0,
                eval_spec=None) -> list[TaskResult]:
    """Run one lm-eval task or group on the backend's in-memory model; one TaskResult per lm-eval task.
    ``eval_spec`` (an ``EvalSpec``) passes lm-eval's own flags through: chat template, multi-turn shots,
    system instruction, ``gen_kwargs``, ``predict_only``, the few-shot and torch seeds."""
    _require()
    from lm_eval import simple_evaluate

    from llmmem.tasks import fewshot_seed

    t0 = time.time()
    model = _lm_eval_model(backend)
    flags = {}
    fs_seed, torch_seed = fewshot_seed(seed), seed
    if eval_spec is not None:
        flags = {"apply_chat_template": eval_spec.apply_chat_template,
                 "fewshot_as_multiturn": bool(eval_spec.fewshot_as_multiturn),
                 "system_instruction": eval_spec.system_instruction, "gen_kwargs": dict(eval_spec.gen_kwargs) or None,
                 "predict_only": eval_spec.predict_only}
        fs_seed, torch_seed = eval_spec.fewshot_seed_for(seed), eval_spec.sampling_seed_for(seed)
    out = simple_evaluate(model=model, tasks=[task.lm_eval_name], num_fewshot=num_fewshot, limit=limit,
                          task_manager=_task_manager(task.include_path), log_samples=True, random_seed=seed,
                          numpy_random_seed=seed, torch_random_seed=torch_seed, fewshot_random_seed=fs_seed,
                          bootstrap_iters=1000, verbosity="ERROR", **flags)
    results = []
    for name, res in out["results"].items():
        metrics = {}
        for key, value in res.items():
            if key == "alias" or not isinstance(value, (int, float)) or key.startswith("sample"):
                continue
            metric, flt = _split_key(key)
            stderr = metric.endswith("_stderr")
            base = metric[: -len("_stderr")] if stderr else metric
            ours = base if flt in (None, "none") else f"{base}@{flt}"
            metrics[ours + ("_stderr" if stderr else "")] = None if value == "N/A" else float(value)
        for k in [k for k in metrics if not k.endswith("_stderr")]:
            metrics.setdefault(f"{k}_stderr", float("nan"))
        if flags.get("predict_only"):  # lm-eval's placeholder metric ("bypass": 999) is not a score
            metrics = {}
        primary = next((k for k in metrics if not k.endswith("_stderr")), None)
        samples = out.get("samples", {}).get(name, [])
        rows = [{"id": s.get("doc_id"), "target": s.get("target"), "response": _first(s.get("filtered_resps")),
                 **{m: s.get(m) for m in {_split_key(k)[0] for k in res if "," in k and not k.split(",")[0].endswith("_stderr")}
                    if isinstance(s.get(m), (int, float))}} for s in samples]
        n = out.get("n-samples", {}).get(name, {}).get("effective", len(rows))
        results.append(TaskResult(f"{PREFIX}{name}", metrics, rows, n, out.get("versions", {}).get(name),
                                  "lm_eval", round(time.time() - t0, 3), int(num_fewshot or 0), "lm_eval", primary))
    return results


def _first(x):
    while isinstance(x, list) and x:
        x = x[0]
    return x


def _lm_eval_model(backend):
    if getattr(backend, "name", "") == "hf":
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=backend.model, tokenizer=backend.tok, batch_size=backend.batch_size,
                    max_length=backend.max_length)
    raise ConfigError(f"lm_eval tasks are not supported on the {backend.name} backend yet")


# ----------------------------------------------------------------------------- export
UTILS = '''"""Scoring for llmmem tasks exported to lm-evaluation-harness: llmmem's own scoring code on the task YAMLs
in llmmem_src/ (one process_<task> per YAML there, so several exports into one directory coexist)."""

from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).resolve().parent


@lru_cache(maxsize=None)
def _task(name):
    from llmmem.suites import SUITES
    from llmmem.tasks import load_task_file

    task = load_task_file(HERE / "llmmem_src" / f"{name}.yaml")
    return task, SUITES.get(task.suite)().metrics(task)


def make_process_results(name):
    def process_results(doc, results):
        from llmmem.suites.icl import ICLSuite

        task, metrics = _task(name)
        row = ICLSuite().score_row(task, dict(doc, _row=0), "", results[0])
        return {m: row[m] for m in metrics}
    return process_results


for _yaml in sorted((HERE / "llmmem_src").glob("*.yaml")):
    globals()[f"process_{_yaml.stem}"] = make_process_results(_yaml.stem)
'''


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    import json

    path.write_text("".join(json.dumps(_public(r), ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def export_tasks(out_dir: Path, names: list[str] | None = None, include_path: str | None = None) -> list[Path]:
    """Write lm-eval YAMLs for llmmem's recall / icl tasks whose data is local.

    The exported task reads the task's docs (``filter`` applied, data order kept) and draws its shots as
    llmmem does (llmmem follows lm-eval's sampler), so under lm-eval — with the fewshot seed
    ``llmmem.tasks.fewshot_seed(seed)``, lm-eval's default 1234 for llmmem's default seed 0 — every doc
    gets llmmem's prompt, and ``process_results`` scores with llmmem's own code (the task's YAML is
    copied to ``llmmem_src/``). Split layout: the docs are the ``test`` split and also the few-shot split
    (lm-eval then drops the doc from its own shots); with ``fewshot_data`` they are ``validation`` and the
    shots ``train`` with no few-shot split declared, where lm-eval also passes the doc to the sampler.
    """
    from llmmem.suites import SUITES
    from llmmem.tasks import get_task

    out_dir = Path(out_dir)
    index = _task_index(include_path)
    explicit = bool(names)
    names = names or sorted(index)
    written = []
    from llmmem.config import check_output_path

    check_output_path("export-lm-eval: DIR", out_dir)
    chosen = []
    for name in names:  # every task checked (and its docs read) before anything is written
        task = get_task(name, include_path)
        local = all(isinstance(x, str) and not x.startswith("hf:")
                    for x in (task.data, task.fewshot_data or "same"))
        if task.suite not in ("recall", "icl") or not local:
            if explicit:
                raise ConfigError(f"task {name}: only recall/icl tasks with local jsonl data can be exported")
            continue
        chosen.append((name, task, task.docs()))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "llmmem_src").mkdir(exist_ok=True)
    for name, task, docs in chosen:
        same = task.fewshot_data in (None, "", "same")
        data = out_dir / f"{name}.jsonl"
        _write_jsonl(data, docs)
        if same:
            splits = {"dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
                      "test_split": "test", "fewshot_split": "test"}
        else:
            shots = out_dir / f"{name}.fewshot.jsonl"
            _write_jsonl(shots, task.fewshot_pool(docs))
            splits = {"dataset_kwargs": {"data_files": {"validation": str(data.resolve()), "train": str(shots.resolve())}},
                      "validation_split": "validation", "training_split": "train"}
        src = out_dir / "llmmem_src" / f"{name}.yaml"
        raw = dict(task.raw, data=str(data.resolve()), fewshot_data="same" if same else str(shots.resolve()))
        raw.pop("filter", None)  # the copied docs are already filtered
        src.write_text(_yaml_dump(raw))
        metrics = SUITES.get(task.suite)().metrics(task)
        fn = f"process_{name}"
        gen = task.generation_kwargs
        doc = {
            "task": f"llmmem_{name}",
            "dataset_path": "json",
            **splits,
            "output_type": "generate_until",
            **({"description": task.prompt_description} if task.prompt_description else {}),
            "doc_to_text": task.doc_to_text,
            "doc_to_target": task.doc_to_target,
            "target_delimiter": task.target_delimiter,
            "fewshot_delimiter": task.fewshot_delimiter,
            **({"fewshot_config": {"sampler": task.fewshot_sampler}} if task.fewshot_sampler != "default" else {}),
            # lm-eval never overrides a num_fewshot of 0 written in a task's config; llmmem's 0 is a default that
            # --num_fewshot overrides, which lm-eval does when the key is absent
            **({"num_fewshot": task.num_fewshot} if task.num_fewshot else {}),
            "generation_kwargs": {"until": list(gen.get("until", ["\n"])), "max_gen_toks": int(gen.get("max_gen_toks", 16)),
                                  "do_sample": False},
            "process_results": f"!function llmmem_lmeval_utils.{fn}",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics],
            "metadata": {"version": task.version, "llmmem_task": name},
        }
        path = out_dir / f"llmmem_{name}.yaml"
        text = _yaml_dump(doc)
        path.write_text(text.replace("'!function llmmem_lmeval_utils." + fn + "'", "!function llmmem_lmeval_utils." + fn))
        written.append(path)
    (out_dir / "llmmem_lmeval_utils.py").write_text(UTILS)
    if not written:
        raise ConfigError("no exportable task (recall/icl tasks with local jsonl data)")
    return written


def _task_index(include_path):
    from llmmem.tasks import task_index

    return task_index(include_path)


def _yaml_dump(doc: dict) -> str:
    import yaml

    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=1000)
