"""llmmem results in lm-evaluation-harness 0.4.x's shape, so lm-eval's own readers (its table printer
``make_table``, the W&B / Zeno loggers, ``datasets.load_dataset`` on the samples) read llmmem cells.

* :func:`to_lm_eval` — pure function: a cell payload (what ``evaluation.write_cell`` assembles) -> lm-eval's
  top-level keys with lm-eval's meaning (``results``, ``groups``, ``group_subtasks``, ``configs``,
  ``versions``, ``n-shot``, ``higher_is_better``, ``n-samples``, ``config``, ``git_hash``, ``date``,
  ``model_source``, ``model_name``, ``model_name_sanitized``, ``chat_template`` ... ``task_hashes``).
* :func:`sample_records` — llmmem's per-doc rows -> lm-eval's per-sample records (the dict lm-eval's
  evaluator builds); :func:`jsonl_record` / :func:`write_samples` give the ``samples_<task>_<date>.jsonl``
  form lm-eval's ``EvaluationTracker`` writes (``arguments`` as ``gen_args_i/arg_j``, responses as strings).
* ``results.json`` (written by ``llmmem.results.CellDir.finish``) has lm-eval's keys at the top and llmmem's
  own sections beside them, the three whose names collide renamed (llmmem ``results`` -> ``metrics``,
  ``config`` -> ``cell_config``, ``versions`` -> ``environment``); :func:`llmmem_section` reads either layout.

Meanings carried over. A metric key is ``"<metric>,<filter>"``; llmmem's own tasks have filter ``none``;
``lm_eval:<task>`` results keep lm-eval's filters (llmmem stores them as ``metric@filter``, mapped back here,
or taken verbatim from ``tasks[t]["lm_eval"]["results"]`` when the cell recorded lm-eval's own dict).
Stderrs that could not be computed are ``"N/A"`` as in lm-eval. ``higher_is_better`` is the direction of
"more of what the task measures": for extraction and membership inference that is *more memorization*.
Per-bucket values stay in llmmem's section (lm-eval has no buckets). A membership-inference metric such
as ``loss_auc`` is a set-level aggregation: its per-sample item is ``[score, label]``, as lm-eval's corpus
metrics (BLEU) carry items to their aggregation.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import datetime
from pathlib import Path

from llmmem.config import ConfigError

MODEL_SOURCE = "llmmem"  # the lm-eval model name (llmmem.lm_eval_plugin): config.model_args re-runs the cell there
LM_EVAL_PREFIX = "lm_eval:"
RENAMED = {"results": "metrics", "config": "cell_config", "versions": "environment"}  # llmmem key -> its name in results.json

OUTPUT_TYPE = {"recall": "generate_until", "icl": "generate_until", "extraction": "generate_until",
               "mia": "loglikelihood"}
HIGHER_IS_BETTER = {
    "exact_match": True, "f1": True, "contains": True, "follows_context": True, "parametric": None,
    "extractable": True, "token_match": True, "prefix_match": True, "approx_memorized": True, "bleu4": True,
    "tf_accuracy": True, "suffix_nll": False, "suffix_logprob": True, "exposure": True,
}
MIA_SCORES = ("loss", "zlib", "min_k", "min_k_pp", "ref")
MIA_STATS = {"auc": "roc_auc", "tpr@1%fpr": "tpr_at_1pct_fpr", "tpr@0.1%fpr": "tpr_at_0.1pct_fpr"}
_SANITIZE_MODEL = re.compile(r"[\"<>:/|\\?*\[\]]+")


def hash_string(text: str) -> str:
    """lm-eval's ``utils.hash_string``."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _number(v):
    """A metric value as llmmem stored it (NaN -> None, inf -> "inf" strings by results.dumps) -> a number."""
    if isinstance(v, str) and v in ("inf", "-inf"):
        return float(v)
    return v


def lm_eval_task_name(name: str) -> str:
    return name[len(LM_EVAL_PREFIX):] if name.startswith(LM_EVAL_PREFIX) else name


def mia_metric(name: str) -> tuple[str, str] | None:
    """``loss_auc`` -> ("loss", "auc"); None for anything that is not a membership-inference statistic."""
    for score in sorted(MIA_SCORES, key=len, reverse=True):
        for stat in MIA_STATS:
            if name == f"{score}_{stat}":
                return score, stat
    return None


def metric_names(task_metrics: dict) -> list[str]:
    """The metrics of one llmmem result (keys with a ``_stderr`` companion), in order."""
    return [k for k, v in task_metrics.items()
            if not k.endswith("_stderr") and k != "buckets" and f"{k}_stderr" in task_metrics
            and (v is None or isinstance(_number(v), (int, float))) and not isinstance(v, bool)]


def split_metric(key: str, lm_eval_task: bool) -> tuple[str, str]:
    """llmmem metric key -> (lm-eval metric, filter). Only ``lm_eval:`` tasks carry ``metric@filter``
    (llmmem's own metric names may contain '@', e.g. ``loss_tpr@1%fpr``)."""
    if lm_eval_task and "@" in key:
        metric, _, flt = key.rpartition("@")
        return metric, flt
    return key, "none"


# ----------------------------------------------------------------------------- results.json
def _model_args(config: dict, model: dict, report: dict | None) -> tuple[str, dict]:
    """(model name as given, lm-eval model_args for ``--model llmmem``) from the cell config (schema 2: model
    identity + chain) or the older flat shapes."""
    m = config.get("model")
    if isinstance(m, dict) and "chain" in config:  # a cell's canonical config
        name = m.get("name") or model.get("name")
        args = {"pretrained": str(name)}
        args.update({k: v for k, v in m.items() if k != "name" and v is not None and v is not False})
        for step in config.get("chain") or []:
            if step.get("kind") == "prune":
                args.update(_prune_args({k: v for k, v in step.items() if k != "kind"}, report or {},
                                        config.get("seed")))
            elif step.get("kind") == "quantize":
                g = step.get("group_size")
                args["quantize"] = f"{step['method']}:{step['bits']}:{g if g else -1}"
            else:  # the plugin applies pruning and quantization: the chain is recorded, not re-runnable there
                args.setdefault("llmmem_chain", "+".join(s.get("kind", "?") for s in config["chain"]))
        return str(name), args
    if isinstance(m, dict):  # llmmem eval: {"model": ModelSpec.__dict__}
        name = m.get("name") or model.get("name")
        margs = {k: v for k, v in m.items() if k != "name"}
    else:  # sweeps: {"model": name, "model_args": {...}}
        name = m or model.get("name")
        margs = dict(config.get("model_args") or {})
    args = {"pretrained": str(name)}
    args.update({k: v for k, v in margs.items() if v is not None and v is not False})
    if config.get("pruning") or report:
        args.update(_prune_args(config.get("pruning") or {}, report or {}, config.get("seed")))
        if args.get("calibration") == "self" and config.get("batch_size") not in (None, 8):
            args["prune_batch_size"] = config["batch_size"]  # self-generated calibration draws a seed per batch
    return str(name), args


def _prune_args(spec: dict, report: dict, cell_seed) -> dict:
    """``prune=METHOD:SPARSITY[:STRUCTURE]`` and its options, from the cell's PruneSpec and/or PruningReport
    (whose calibration entry records the source, sizes and seed really used)."""
    method = spec.get("method") or report.get("method")
    sparsity = spec.get("sparsity", report.get("target_sparsity"))
    structure = spec.get("structure") or report.get("structure") or "unstructured"
    value = f"{method}:{sparsity:g}" if isinstance(sparsity, (int, float)) else f"{method}:{sparsity}"
    if structure != "unstructured":
        value += f":{structure}"
    out = {"prune": value}
    used = report.get("calibration") if isinstance(report.get("calibration"), dict) else {}
    calib = {"calibration": used.get("source", spec.get("calibration")),
             "nsamples": used.get("nsamples", spec.get("nsamples")), "seqlen": used.get("seqlen", spec.get("seqlen")),
             "prune_seed": used.get("seed", cell_seed if spec else None)}
    profile = spec.get("profile") or report.get("profile")
    if method != "magnitude" or profile == "owl":
        out.update({k: v for k, v in calib.items() if v is not None and not (k == "prune_seed" and v == 0)})
    if profile not in (None, "uniform"):
        out["profile"] = profile
    scope = spec.get("scope") or report.get("scope")
    if scope not in (None, "layer"):
        out["scope"] = scope
    return out


def _limit(config: dict):
    lim = config.get("limit")
    if isinstance(lim, dict):
        vals = set(lim.values())
        return vals.pop() if len(vals) == 1 else lim
    return lim


def _date_from(payload: dict) -> float | None:
    t = payload.get("timings") or {}
    try:
        end = datetime.strptime(str(t["finished_at"]), "%Y-%m-%dT%H:%M:%S%z").timestamp()
        return end - float(t.get("total_seconds") or 0.0)
    except (KeyError, ValueError, TypeError):
        return None


def task_config(name: str, info: dict, metrics: list[str], task=None) -> dict:
    """One task's entry of lm-eval's ``configs``; from llmmem's :class:`~llmmem.tasks.Task` when given."""
    suite = info.get("suite") or getattr(task, "suite", "")
    metric_list = []
    for m in metrics:
        mia = mia_metric(m) if suite == "mia" else None
        metric_list.append({"metric": m, "aggregation": MIA_STATS[mia[1]] if mia else "mean",
                            "higher_is_better": True if mia else HIGHER_IS_BETTER.get(m)})
    cfg: dict = {"task": name}
    if task is not None:
        cfg.update(_dataset_fields(task))
        same = task.fewshot_data in (None, "", "same")
        cfg.update({"fewshot_split": cfg.get("test_split") if same else "fewshot",
                    "doc_to_text": task.doc_to_text, "doc_to_target": task.doc_to_target, "unsafe_code": False,
                    "description": "",  # lm-eval's description is a prompt prefix; llmmem's is prose (metadata)
                    "target_delimiter": task.target_delimiter, "fewshot_delimiter": task.fewshot_delimiter})
    cfg["num_fewshot"] = info.get("num_fewshot", getattr(task, "num_fewshot", 0))
    cfg["metric_list"] = metric_list
    cfg["output_type"] = OUTPUT_TYPE.get(suite, "generate_until")
    if cfg["output_type"] == "generate_until":
        cfg["generation_kwargs"] = _gen_kwargs(task)
    cfg.update({"repeats": 1, "should_decontaminate": False})
    meta = {"version": info.get("version", getattr(task, "version", None)),
            "llmmem": {k: v for k, v in {"suite": suite, "hash": info.get("hash"), "primary_metric": info.get("primary_metric"),
                                         "chance": info.get("chance") or None}.items() if v is not None}}
    if task is not None:
        meta["llmmem"].update({k: v for k, v in {
            "description": task.description or None, "aliases": task.aliases, "bucket_by": task.bucket_by,
            "bucket_bins": task.bucket_bins, "filter": task.filter or None, "options": task.options or None,
            "id_field": task.id_field}.items() if v is not None})
        meta["config_source"] = str(task.path)
    cfg["metadata"] = meta
    return cfg


def _dataset_fields(task) -> dict:
    data = task.data
    if isinstance(data, str) and data.startswith("hf:"):
        parts = data[3:].split(":")
        return {"dataset_path": parts[0], "dataset_name": parts[1] if len(parts) > 1 and parts[1] else None,
                "test_split": parts[2] if len(parts) > 2 else "train"}
    if isinstance(data, dict):
        return {"dataset_path": "npy", "dataset_kwargs": {"data_files": {k: str(task._resolve(v)) for k, v in data.items()}},
                "test_split": "test"}
    return {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(task._resolve(str(data)))}},
            "test_split": "test"}


def _gen_kwargs(task) -> dict:
    gen = dict(getattr(task, "generation_kwargs", None) or {})
    if task is None:
        return gen
    if task.suite == "extraction":
        return {"until": [], "max_gen_toks": int(task.options.get("suffix_tokens", 32)), "do_sample": False}
    return {"until": list(gen.get("until", ["\n"])), "max_gen_toks": int(gen.get("max_gen_toks", 16)),
            "do_sample": bool(gen.get("do_sample", False)), **{k: v for k, v in gen.items()
                                                               if k not in ("until", "max_gen_toks", "do_sample")}}


def to_lm_eval(payload: dict, *, tasks: dict | None = None, samples: dict | None = None,
               date: float | None = None) -> dict:
    """lm-eval 0.4.x's top-level results keys for one llmmem cell.

    ``payload``: a cell payload or a finished ``results.json`` (either layout: llmmem's ``results`` /
    ``config`` / ``versions``, or the written results.json's ``metrics`` / ``cell_config`` / ``environment``).
    ``tasks``: {llmmem task name: Task} for full ``configs`` (without, configs hold what the payload knows).
    ``samples``: {llmmem task name: records from :func:`sample_records`} for lm-eval's ``task_hashes``.
    ``date``: UNIX time the evaluation started (default: from the payload's timings).
    A task's ``payload["tasks"][t]["lm_eval"]`` (lm-eval's own ``results`` / ``config`` / ``higher_is_better`` /
    ``n-samples`` / ``group_subtasks`` for that name), when recorded, is used verbatim."""
    metrics_all = llmmem_section(payload, "results")
    if not isinstance(metrics_all, dict):
        raise ConfigError("results payload: no per-task metrics ('results' or 'metrics')")
    config = llmmem_section(payload, "config") or {}
    env = llmmem_section(payload, "versions") or {}
    infos = payload.get("tasks") or {}
    n_samples = payload.get("n_samples") or {}
    tasks = tasks or {}
    names = {t: lm_eval_task_name(t) for t in metrics_all}
    clash = [n for n in set(names.values()) if list(names.values()).count(n) > 1]
    names = {t: (t if n in clash else n) for t, n in names.items()}  # lm_eval:x next to an llmmem x keeps its prefix

    out: dict = {"results": {}, "groups": {}, "group_subtasks": {}, "configs": {}, "versions": {}, "n-shot": {},
                 "higher_is_better": {}, "n-samples": {}}
    for task, metrics in metrics_all.items():
        name, info = names[task], infos.get(task) or {}
        n = n_samples.get(task)
        lm = info.get("lm_eval") or {}
        is_lm = task.startswith(LM_EVAL_PREFIX) or info.get("suite") == "lm_eval"
        if lm.get("results"):
            entry = {k: v for k, v in lm["results"].items()}
            entry["alias"] = entry.get("alias", name)
        else:
            entry = {"name": name, "alias": name}
            if n is not None:
                entry["sample_len"] = n
            for m in metric_names(metrics):
                metric, flt = split_metric(m, is_lm)
                v, se = _number(metrics[m]), _number(metrics.get(f"{m}_stderr"))
                entry[f"{metric},{flt}"] = v
                entry[f"{metric}_stderr,{flt}"] = se if _finite(se) else "N/A"
        entry.setdefault("name", name)
        out["results"][name] = entry
        if lm.get("is_group"):
            out["groups"][name] = dict(entry)
        if lm.get("group_subtasks") is not None:
            out["group_subtasks"][name] = list(lm["group_subtasks"])
        base_metrics = list(dict.fromkeys(k.split(",")[0] for k in entry
                                          if "," in k and not k.split(",")[0].endswith("_stderr")))
        out["higher_is_better"][name] = dict(lm.get("higher_is_better") or {
            m: (True if info.get("suite") == "mia" and mia_metric(m) else HIGHER_IS_BETTER.get(m)) for m in base_metrics})
        out["versions"][name] = info.get("version")
        out["n-shot"][name] = info.get("num_fewshot", 0)
        if lm.get("n-samples"):
            out["n-samples"][name] = dict(lm["n-samples"])
        elif n is not None:
            out["n-samples"][name] = {"original": info.get("n_original", n), "effective": n}
        out["configs"][name] = dict(lm["config"]) if lm.get("config") else task_config(
            name, info, metric_names(metrics), tasks.get(task))
    if not out["groups"]:
        del out["groups"]  # as lm-eval: present only when some group aggregates its subtasks
    for key in ("configs", "versions", "n-shot", "higher_is_better"):
        out[key] = dict(sorted(out[key].items()))

    name, model_args = _model_args(config, payload.get("model") or {}, payload.get("pruning"))
    seed = config.get("seed", (payload.get("seeds") or {}).get("seed"))
    ev = config.get("eval") if isinstance(config.get("eval"), dict) else config  # schema 2 keeps eval settings apart
    run = payload.get("run") or {}
    dtype = model_args.get("dtype")
    out["config"] = {
        "model": MODEL_SOURCE, "model_args": model_args,
        "model_dtype": f"torch.{dtype}" if dtype and dtype != "auto" else dtype,
        "batch_size": run.get("batch_size", config.get("batch_size")), "batch_sizes": [],
        "device": run.get("device", model_args.get("device")),
        "use_cache": run.get("use_cache", config.get("use_cache")), "limit": _limit(ev), "bootstrap_iters": 1000,
        "gen_kwargs": ev.get("gen_kwargs"), "random_seed": seed, "numpy_seed": seed, "torch_seed": seed,
        "fewshot_seed": seed, "backend": ev.get("backend"),
        "llmmem": {"fingerprint": (payload.get("model") or {}).get("fingerprint") or config.get("dense_fingerprint")},
    }
    commit = ((env.get("git") or {}) if isinstance(env, dict) else {}).get("commit")
    out["git_hash"] = commit[:7] if commit else None
    out["date"] = date if date is not None else _date_from(payload)
    out["lm_eval_version"] = env.get("lm_eval") if isinstance(env, dict) else None
    out["transformers_version"] = env.get("transformers") if isinstance(env, dict) else None
    out["upper_git_hash"] = None
    if samples:
        out["task_hashes"] = {names.get(t, t): task_hash(recs) for t, recs in samples.items()}
    else:
        out["task_hashes"] = {}
    template = run.get("chat_template", config.get("chat_template"))
    system = ev.get("system_instruction")
    out.update({
        "model_source": MODEL_SOURCE, "model_name": name, "model_name_sanitized": _SANITIZE_MODEL.sub("__", name),
        "system_instruction": system, "system_instruction_sha": hash_string(system) if system else None,
        "fewshot_as_multiturn": ev.get("fewshot_as_multiturn"),
        "chat_template": template if isinstance(template, str) else None,
        "chat_template_sha": hash_string(template) if isinstance(template, str) and template else None,
    })
    secs = (payload.get("timings") or {}).get("eval_seconds")
    out["total_evaluation_time_seconds"] = str(secs) if secs is not None else None
    return out


def llmmem_section(doc: dict, key: str):
    """llmmem's own section ``key`` ("results", "config", "versions") in either layout: today's (top level)
    or results.json's (renamed, lm-eval's keys at the top)."""
    renamed = RENAMED.get(key, key)
    if renamed in doc:
        return doc[renamed]
    if key == "results" and "configs" in doc and "n-shot" in doc:  # lm-eval's results, not llmmem's
        return None
    if key == "config" and isinstance(doc.get("config"), dict) and doc["config"].get("model") == MODEL_SOURCE:
        return None
    if key == "versions" and "n-shot" in doc:
        return None
    return doc.get(key)


# ----------------------------------------------------------------------------- samples
def date_id(ts: float | None = None) -> str:
    """lm-eval's file date stamp: local ISO time with ':' -> '-'."""
    dt = datetime.now() if ts is None else datetime.fromtimestamp(ts)
    return dt.isoformat().replace(":", "-")


def results_filename(stamp: str) -> str:
    return f"results_{stamp}.json"


def samples_filename(task: str, stamp: str) -> str:
    return f"samples_{lm_eval_task_name(task)}_{stamp}.jsonl"


def _doc_hash(doc) -> str:
    return hash_string(json.dumps(doc, indent=2, default=_non_serializable, ensure_ascii=False))


def _non_serializable(o):
    """lm-eval's ``utils.handle_non_serializable`` (numpy scalars to Python, sets to lists, else str)."""
    try:
        import numpy as np

        if isinstance(o, np.bool_):
            return bool(o)
        if isinstance(o, np.integer):
            return int(o)
        if isinstance(o, np.floating):
            return float(o)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, set):
        return list(o)
    return str(o)


_ROW_ONLY = {"prompt", "prefix", "response", "prediction", "target", "aliases", "parametric_target"}


def _clean_doc(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if not str(k).startswith("_")}


def sample_records(rows: list[dict], *, suite: str, metrics: list[str], task=None, docs: list[dict] | None = None,
                   filter_name: str = "none") -> list[dict]:
    """llmmem's per-doc rows (a TaskResult's ``rows``, prompts included) -> lm-eval's per-sample records, as
    lm-eval's evaluator builds them (``arguments`` a list of request tuples, raw responses).

    ``metrics``: the task's metric names (:func:`metric_names` of its llmmem metrics). ``docs``: the task's
    docs (``task.docs(limit=...)``), matched to rows by ``task.doc_id`` when ``task`` is given (else by
    position), for ``doc``; without them ``doc`` holds the row's own fields.
    ``task``: the llmmem Task, for generation settings and texts of membership-inference docs.
    ``lm_eval:`` tasks: write lm-eval's own samples (``simple_evaluate(...)["samples"]``) instead."""
    if task is not None and docs is not None:  # rows carry task.doc_id(doc) as "id" (extraction skips short docs)
        index = {task.doc_id(d): d for d in docs}
        matched = [index.get(str(row.get("id"))) for row in rows]
    elif docs is not None:
        if len(docs) != len(rows):
            raise ValueError(f"{len(docs)} docs for {len(rows)} rows (give the task to match them by id)")
        matched = list(docs)
    else:
        matched = [None] * len(rows)
    gen = _gen_kwargs(task) if task is not None else {}
    out = []
    for i, row in enumerate(rows):
        src = matched[i]
        doc = _clean_doc(src) if src is not None else {k: v for k, v in row.items()
                                                       if k not in metrics and k not in _ROW_ONLY}
        response = row.get("response")
        if suite in ("recall", "icl"):
            target = row.get("target", "")
            arguments = [(row.get("prompt", ""), gen)]
            resps, filtered = [[response]], [response]
        elif suite == "extraction":
            target = row.get("target", "")
            prefix = row.get("prefix") or ""
            greedy = row.get("tf_accuracy") == 1.0
            arguments = [(prefix, gen or {"until": [], "max_gen_toks": None, "do_sample": False}), (prefix, target)]
            resps = [[response], [[row.get("suffix_logprob"), greedy]]]
            filtered = [response, [row.get("suffix_logprob"), greedy]]
        elif suite == "mia":
            target = row.get("label")
            field = (task.options if task is not None else {}).get("text_field", "text")
            text = str(src.get(field, "")) if src is not None else ""
            n_tok, loss = row.get("n_tokens"), row.get("loss")
            logprob = -loss * n_tok if _finite(loss) and _finite(n_tok) else None
            arguments = [("", text)]
            resps, filtered = [[[logprob, None]]], [[logprob, None]]
        else:
            target = row.get("target")
            arguments = []
            resps, filtered = [[response]], [response]
        values = {}
        for m in metrics:
            mia = mia_metric(m) if suite == "mia" else None
            if mia:
                values[m] = [row.get(mia[0]), row.get("label")]  # the item its aggregation (ROC-AUC, TPR) takes
            elif m in row:
                values[m] = row[m]
        rec = {"doc_id": i, "doc": doc, "target": target, "arguments": arguments, "resps": resps,
               "filtered_resps": filtered, "filter": filter_name, "metrics": list(values),
               "doc_hash": _doc_hash(doc), "prompt_hash": hash_string(str(arguments[0][0]) if arguments else ""),
               "target_hash": hash_string(str(target))}
        rec.update(values)
        extra = {k: v for k, v in row.items() if k not in values and k not in ("prompt",)}
        rec["llmmem"] = extra  # llmmem's own per-row fields: id, prediction, aliases, bucket value ...
        out.append(rec)
    return out


def _sanitize_list(sub):
    """lm-eval's ``utils.sanitize_list``: every leaf to str, lists and tuples kept."""
    if isinstance(sub, list):
        return [_sanitize_list(x) for x in sub]
    if isinstance(sub, tuple):
        return tuple(_sanitize_list(x) for x in sub)
    return str(sub)


def jsonl_record(record: dict) -> dict:
    """A record as lm-eval's ``EvaluationTracker.save_results_samples`` writes it to the jsonl."""
    rec = dict(record)
    rec["resps"] = _sanitize_list(rec["resps"])
    rec["filtered_resps"] = _sanitize_list(rec["filtered_resps"])
    rec["arguments"] = {f"gen_args_{i}": {f"arg_{j}": a for j, a in enumerate(arg)}
                        for i, arg in enumerate(record["arguments"])}
    rec["target"] = str(rec["target"])
    return rec


def dumps_record(record: dict) -> str:
    return json.dumps(jsonl_record(record), default=_non_serializable, ensure_ascii=False)


def write_samples(path: str | Path, records: list[dict]) -> Path:
    """Write ``samples_<task>_<date>.jsonl`` (atomically)."""
    from llmmem.results import atomic_write_text

    path = Path(path)
    atomic_write_text(path, "".join(dumps_record(r) + "\n" for r in records))
    return path


def task_hash(records: list[dict]) -> str:
    """lm-eval's ``task_hashes`` entry: the hash of every sample's doc, prompt and target hashes."""
    return hash_string("".join(r["doc_hash"] + r["prompt_hash"] + r["target_hash"] for r in records))
