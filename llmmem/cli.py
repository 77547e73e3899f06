"""The ``llmmem`` command line: argparse subcommands.

Every command that runs a model builds cells (``llmmem.cells.Cell``: a model, a chain of interventions, an
evaluation, a seed) and runs them with ``llmmem.runner.run_cell``. Bad input is one line on stderr and exit
code 2, before any model loads and with nothing written; heavy imports (torch, transformers) happen inside
the handlers, after the flags were checked. Flags follow lm-evaluation-harness where the concepts overlap.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
import traceback
from collections.abc import Callable

from llmmem import __version__
from llmmem.config import ConfigError, RunSettings, default_threads, model_spec_from_args
from llmmem.errors import ISSUES_URL, CellsFailed

log = logging.getLogger("llmmem")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message and exit code 2."""

    def error(self, message):  # noqa: D401
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def add_model_flags(p: argparse.ArgumentParser, required: bool = False) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=required, metavar="NAME_OR_PATH",
                   help="local HF checkpoint dir, .gguf file, preset (llmmem ls models) or hub id "
                        "(or --model_args pretrained=NAME_OR_PATH, as lm-eval)")
    g.add_argument("--model_args", default="", metavar="K=V,...", nargs="+", action=_JoinArgs,
                   help="pretrained=, dtype=float32|bfloat16|float16|auto, device=cpu|cuda|cuda:N|auto, revision=, "
                        "trust_remote_code=, gguf_file=, offload=, max_length= (k=v,k=v or k=v k=v as lm-eval)")
    g.add_argument("--device", default=None, help="cpu | cuda | cuda:N | auto (same as model_args device=)")
    g.add_argument("--trust_remote_code", action="store_true", default=None,
                   help="allow a hub model's own code (same as model_args trust_remote_code=true)")


class _JoinArgs(argparse.Action):
    """lm-eval 0.4.13 takes ``--model_args a=1 b=2`` / ``--tasks a b`` as well as ``a=1,b=2`` / ``a,b``: join
    the values with commas (repeating the flag adds to it)."""

    def __call__(self, parser, namespace, values, option_string=None):
        vals = [values] if isinstance(values, str) else list(values)
        old = getattr(namespace, self.dest, None)
        parts = ([old] if old and old != self.default else []) + [v for v in vals if v != ""]
        setattr(namespace, self.dest, ",".join(parts))


# lm-eval's --model names a backend class ("hf" = HFLM): `lm_eval --model hf --model_args pretrained=M` pasted
# as `llmmem eval --model hf --model_args pretrained=M` evaluates M on that backend
LM_EVAL_MODEL_TYPES = {"hf": "hf", "hf-auto": "hf", "hf-causal": "hf", "huggingface": "hf", "vllm": "vllm"}


def lm_eval_model_type(args) -> str | None:
    """The llmmem backend an lm-eval ``--model`` backend name stands for (None when --model is a model)."""
    from pathlib import Path

    name = getattr(args, "model", None)
    if name is None or str(name) not in LM_EVAL_MODEL_TYPES or Path(str(name)).expanduser().exists():
        return None
    return LM_EVAL_MODEL_TYPES[str(name)]


def model_spec_of(args):
    """--model / --model_args / --device / --trust_remote_code -> a ModelSpec (flags may not contradict).

    ``--model hf`` (or vllm) with ``--model_args pretrained=M`` is lm-eval's spelling: the model is M."""
    from llmmem.config import parse_kv_list

    kv = parse_kv_list(args.model_args)
    kind = lm_eval_model_type(args)
    if kind is not None:
        if "pretrained" not in kv:
            raise ConfigError(f"--model {args.model} is lm-eval's backend name; llmmem's --model is the model itself: "
                              f"give --model NAME_OR_PATH, or --model {args.model} --model_args pretrained=NAME_OR_PATH")
        args.model = None
    for flag, key in (("device", "device"), ("trust_remote_code", "trust_remote_code")):
        v = getattr(args, flag, None)
        if v is not None:
            if key in kv and str(kv[key]).lower() != str(v).lower():
                raise ConfigError(f"--{flag} {v} and --model_args {key}={kv[key]} disagree; give one of them")
            kv[key] = v
    return model_spec_from_args(args.model, kv)


def add_run_flags(p: argparse.ArgumentParser, batch: bool = True) -> None:
    g = p.add_argument_group("run")
    if batch:
        g.add_argument("--batch_size", default="8", help="requests per forward pass: N, auto or auto:N (default 8; "
                       "auto: the largest that fits, found once per model and cached in $LLMMEM_HOME)")
        g.add_argument("--max_batch_size", default=None, help="the cap of --batch_size auto (default 64, as lm-eval)")
    g.add_argument("--seed", default="0", help="random seed (default 0); eval also takes lm-eval's "
                   "python,numpy,torch,fewshot form (e.g. 0,1234,1234,1234)")
    g.add_argument("--threads", default=None,
                   help="CPU threads for torch (default: $LLMMEM_THREADS or half the cores)")
    g.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")


def settings_from(args, batch_size=None, seed=None) -> RunSettings:
    from llmmem.config import parse_batch_size

    bs = batch_size if batch_size is not None else getattr(args, "batch_size", 8)
    return RunSettings(batch_size=parse_batch_size(bs), seed=seed if seed is not None else getattr(args, "seed", 0),
                       quiet=getattr(args, "quiet", False), threads=getattr(args, "threads", None))


def setup_torch(settings: RunSettings) -> None:
    """Threads, seed, and quiet transformers when asked."""
    import torch

    torch.set_num_threads(settings.threads or default_threads())
    torch.manual_seed(settings.seed)
    if settings.quiet or not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if settings.quiet:
            hf_logging.set_verbosity_error()


# ----------------------------------------------------------------------------- generate
def cmd_generate(args) -> int:
    from llmmem.config import parse_float

    settings = settings_from(args)
    spec = model_spec_of(args)
    if args.max_gen_toks < 1:
        raise ConfigError(f"--max_gen_toks {args.max_gen_toks} must be >= 1")
    temperature = parse_float("--temperature", args.temperature, low=0.0, low_open=True)
    top_p = parse_float("--top_p", args.top_p, low=0.0, high=1.0, low_open=True)
    if any(not p for p in args.prompt):
        raise ConfigError("--prompt is empty; give the text to continue")
    setup_torch(settings)
    from llmmem.backends import make_backend
    from llmmem.backends.base import GenerateRequest
    from llmmem.models import load_model

    lm = load_model(spec)
    backend = make_backend("hf", lm, batch_size=settings.batch_size if isinstance(settings.batch_size, int) else 8,
                           quiet=settings.quiet)
    reqs = [GenerateRequest(context=p, max_gen_toks=args.max_gen_toks, until=args.until or [],
                            do_sample=args.do_sample, temperature=temperature, top_p=top_p, seed=settings.seed)
            for p in args.prompt]
    for prompt, res in zip(args.prompt, backend.generate(reqs)):
        if len(args.prompt) > 1:
            print(f"### {prompt}")
        print(prompt + res.text if args.echo else res.text)
    return 0


# ----------------------------------------------------------------------------- cells from the command line
def _single_cell_run(args, cell, *, settings, include_path=None, run_dir=None, save_to=None, need_tokenizer=True,
                     save_format="fake", prepare_steps=True):
    """Validate the chain (before any model loads), load the model once, run the cell."""
    from llmmem.interventions import PrepareEnv
    from llmmem.sources import ensure_model

    if prepare_steps:
        env = PrepareEnv(include_path=include_path, model=cell.model.name)
        for step in cell.chain:
            step.intervention.prepare(step.spec, env)
    ensure_model(cell.model)  # a preset not there yet is fetched or built now, after validation (saying so)
    setup_torch(settings)
    from llmmem.runner import Session, run_cell

    process_seeds = seed_process(getattr(args, "_seeds", None))
    session = Session(cell.model, batch_size=_batch(settings, cell), quiet=settings.quiet, include_path=include_path,
                      need_tokenizer=need_tokenizer, keep_dense=False, max_batch_size=_max_batch(args))
    session.process_seeds = process_seeds
    try:
        return run_cell(session, cell, run_dir=run_dir, save_to=save_to, overwrite=getattr(args, "overwrite", False),
                        log_samples=getattr(args, "log_samples", False), save_format=save_format,
                        cache_dir=getattr(args, "use_cache", None))
    finally:
        session.close()


def _batch(settings, cell) -> int | str:
    return settings.batch_size


def _max_batch(args) -> int | None:
    from llmmem.config import parse_positive_int

    v = getattr(args, "max_batch_size", None)
    return None if v is None else parse_positive_int("--max_batch_size", v)


def seed_process(seeds) -> dict:
    """lm-eval's ``--seed python,numpy,torch,fewshot``: seed Python's, numpy's and torch's generators as lm-eval's
    ``simple_evaluate`` does (after llmmem's own seeding); returns the numpy/torch seeds to record."""
    if not seeds:
        return {}
    import random

    py, np_seed, torch_seed, _fewshot = seeds
    random.seed(py)
    out = {}
    if np_seed is not None:
        import numpy as np

        np.random.seed(np_seed)
        out["numpy_seed"] = np_seed
    if torch_seed is not None:
        import torch

        torch.manual_seed(torch_seed)
        out["torch_seed"] = torch_seed
    return out


def _prune_step(args):
    from llmmem.interventions import Step
    from llmmem.pruning.spec import PruneSpec

    spec = PruneSpec(method=args.method, sparsity=args.sparsity, structure=args.structure, profile=args.profile,
                     scope=args.scope, calibration=args.calibration, nsamples=args.nsamples, seqlen=args.seqlen)
    return Step("prune", spec)


def _checkpoint_cell(args, steps):
    from llmmem.cells import Cell, EvalSpec
    from llmmem.config import check_output_path, parse_int

    mspec = model_spec_of(args)
    check_output_path("--output", args.output, must_be_empty=True, overwrite=args.overwrite)
    return Cell(mspec, tuple(steps), EvalSpec(), parse_int("--seed", args.seed, minimum=0))


# ----------------------------------------------------------------------------- prune
def cmd_prune(args) -> int:
    settings = settings_from(args)
    cell = _checkpoint_cell(args, [_prune_step(args)])
    payload = _single_cell_run(args, cell, settings=settings, save_to=args.output, need_tokenizer=False)
    rep = payload["pruning"]
    print(f"{rep['method']} {rep['structure']} {rep['profile']}: target {rep['target_sparsity']:.4f}, measured "
          f"{rep['measured_sparsity']:.4f} in {rep['seconds']:.1f}s -> {args.output}")
    return 0


# ----------------------------------------------------------------------------- quantize
def _quantize_step(args):
    from llmmem.interventions import Step
    from llmmem.quantization.spec import QuantizeSpec

    spec = QuantizeSpec(method=args.method, bits=args.bits, group_size=args.group_size,
                        symmetric=not args.asymmetric, act_order=args.act_order, dampening_frac=args.dampening_frac,
                        calibration=args.calibration, nsamples=args.nsamples, seqlen=args.seqlen,
                        keep_sparsity=not args.no_keep_sparsity)
    return Step("quantize", spec)


def cmd_quantize(args) -> int:
    from llmmem.config import parse_choice

    settings = settings_from(args)
    fmt = parse_choice("--format", args.format, ("fake", "compressed-tensors"))
    if fmt == "compressed-tensors":
        try:
            import compressed_tensors  # noqa: F401
        except ImportError:
            raise ConfigError("--format compressed-tensors needs the compressed-tensors package: "
                              "pip install 'llmmem[quantize]'") from None
    cell = _checkpoint_cell(args, [_quantize_step(args)])
    payload = _single_cell_run(args, cell, settings=settings, save_to=args.output, save_format=fmt)
    rep = payload["quantization"]
    print(f"{rep['label']}: {rep['effective_bits']:.3f} bits per weight, relative error {rep['relative_error']:.4f}, "
          f"at most {rep['max_distinct_per_group']} values per group in {rep['seconds']:.1f}s -> {args.output} ({fmt})")
    return 0


# ----------------------------------------------------------------------------- eval
def eval_spec_of(args, tasks, seeds=None):
    from llmmem.cells import EvalSpec

    backend = args.backend
    kind = getattr(args, "_lm_eval_backend", None)
    if kind is not None:
        if backend not in (None, kind):
            raise ConfigError(f"--model {kind} (lm-eval's backend name) and --backend {backend} disagree; give one")
        backend = kind
    seeds = seeds or (None, None, None, None)
    return EvalSpec(tasks=tasks, limit=args.limit, num_fewshot=args.num_fewshot, backend=backend or "hf",
                    apply_chat_template=args.apply_chat_template if args.apply_chat_template is not None else False,
                    fewshot_as_multiturn=args.fewshot_as_multiturn, system_instruction=args.system_instruction,
                    gen_kwargs=args.gen_kwargs, mia_reference=args.mia_reference, predict_only=args.predict_only,
                    fewshot_seed=seeds[3], torch_seed=seeds[2])


def eval_output_path(path: str) -> tuple[str, str | None]:
    """``--output_path``: a run directory, or (as lm-eval) a ``.json`` file name: the run directory is then its
    folder, and the cell's results.json is also copied beside it as ``<stem>_<date>.json`` (lm-eval's name)."""
    from pathlib import Path

    p = Path(path).expanduser()
    if p.suffix.lower() == ".json" and not p.is_dir():
        return str(p.parent), p.stem
    return str(p), None


def cmd_eval(args) -> int:
    from pathlib import Path

    from llmmem.cells import Cell, parse_seed
    from llmmem.config import check_output_path
    from llmmem.evaluation import check_tasks, resolve_tasks
    from llmmem.results import CellDir
    from llmmem.tasks import parse_task_list, with_model_tasks

    seeds = parse_seed(args.seed)
    args._seeds = seeds if "," in str(args.seed) else None
    settings = settings_from(args, seed=seeds[0])
    _max_batch(args)
    args._lm_eval_backend = lm_eval_model_type(args)
    spec = model_spec_of(args)
    names = parse_task_list(args.tasks)
    ev = eval_spec_of(args, names, seeds)
    from llmmem.backends import check_backend

    check_backend(ev.backend)
    from llmmem.sources import check_model, needs_build

    if ev.mia_reference:
        check_model(model_spec_from_args(ev.mia_reference, None))  # e.g. a path that does not exist
    if args.use_cache:
        check_output_path("--use_cache", args.use_cache)

    if not Path(spec.name).expanduser().exists():
        check_model(spec)  # unknown preset / offline hub id (a preset is built after validation)
    include = with_model_tasks(args.include_path, [spec.name])
    tasks = resolve_tasks(names, include)
    check_tasks(tasks, ev.limit_for, ev.num_fewshot)
    run_dir, json_stem = eval_output_path(args.output_path)
    check_output_path("--output_path", run_dir)
    cell = Cell(spec, (), ev, seeds[0])
    cd = CellDir(run_dir, cell.name())
    if cd.done and not args.overwrite:
        raise ConfigError(f"cell {cd.path} is already finished; pass --overwrite to redo it")
    if needs_build(spec):  # the preset's own tasks replace the ones checked before it was built
        from llmmem.sources import ensure_model

        ensure_model(spec)
        include = with_model_tasks(args.include_path, [spec.name])
    if ev.apply_chat_template:
        from llmmem.chat import check_model_template

        check_model_template(spec, ev.apply_chat_template)  # the tokenizer only: before the model loads
    args.log_samples = args.log_samples or ev.predict_only  # lm-eval: --predict_only implies --log_samples
    payload = _single_cell_run(args, cell, settings=settings, include_path=include, run_dir=run_dir)
    from llmmem.report import buckets_table, metrics_table

    results = payload["_results"]
    if args.write_out:
        _write_out(results)
    if ev.predict_only:
        print("predict only: no metric was computed; the outputs are in the samples files:")
        for r in results:
            print(f"  {r.task}: {r.n_samples} docs")
    else:
        table = {r.task: r.metrics for r in results}
        print(metrics_table(table, {r.task: r.n_samples for r in results}))
        bt = buckets_table(table)
        if bt and not settings.quiet:
            print(bt)
    for w in payload.get("warnings") or []:
        print(f"warning: {w}")
    if args.show_config or json_stem:
        doc = (Path(payload["_path"]) / "results.json").read_text()
        if args.show_config:
            print(doc)
        if json_stem:
            from llmmem.lmeval_format import date_id
            from llmmem.results import atomic_write_text

            copy = Path(run_dir) / f"{json_stem}_{date_id()}.json"
            atomic_write_text(copy, doc)
            print(f"wrote {copy}")
    print(f"\nwrote {payload['_path']}")
    return 0


def _write_out(results) -> None:
    """``--write_out`` (lm-eval's ``print_writeout``): the first document's prompt and target of every task."""
    for r in results:
        if not r.rows:
            continue
        row = r.rows[0]
        prompt = row.get("prompt", row.get("prefix", ""))
        print(f"Task: {r.task}; document 0; context prompt (starting on next line):\n{prompt}\n"
              f"(end of prompt on previous line)\ntarget string or answer choice index (starting on next line):\n"
              f"{row.get('target', row.get('label', ''))}\n(end of target on previous line)")


def cmd_validate(args) -> int:
    from llmmem.tasks import get_task, task_index

    names = args.tasks or sorted(task_index(args.include_path))
    problems = 0
    for name in names:
        task = get_task(name, args.include_path)
        hub = "hub" in (task.raw.get("tag") or [])
        try:
            from llmmem.tasks import _local_files

            local = [task._resolve(f) for f in _local_files(task.data)]
            if hub and (not local or not all(p.is_file() for p in local)):
                print(f"ok    {name}: YAML valid (hub data not checked: not present offline)")
                continue
            docs = task.docs()
            pool = task.fewshot_pool(docs)
            if task.suite in ("recall", "icl"):
                task.prompt(docs[0], pool, task.num_fewshot, 0)
                if task.doc_to_target:
                    task.answers(docs[0])
            print(f"ok    {name}: {len(docs)} rows")
        except ConfigError as e:
            if len(names) == 1:
                raise
            problems += 1
            print(f"FAIL  {name}: {e}")
    return 2 if problems else 0


# ----------------------------------------------------------------------------- sweep, report, plot
def cmd_sweep(args) -> int:
    from pathlib import Path

    from llmmem.sweep import load_sweep_spec, run_sweep

    if args.status is not None:
        return _sweep_status(args)
    if args.config is None:
        raise ConfigError("sweep: give a config file (see configs/), or --status RUN_DIR")
    cli = {"output_path": args.output_path, "use_cache": args.use_cache, "executor": args.executor,
           "workers": args.workers}
    spec = load_sweep_spec(args.config, args.overrides, **cli)
    if args.wait:
        spec.executor.slurm["wait"] = True
    settings = RunSettings(batch_size=spec.batch_size, seed=spec.seeds[0], quiet=args.quiet, threads=args.threads)
    if args.plot:
        from llmmem.plots import require_matplotlib

        require_matplotlib()
    if not args.dry_run and not spec.executor.workers and spec.executor.kind == "local":
        setup_torch(settings)  # the cells run in this process
    run_dir = Path(spec.output_path)
    cells = run_sweep(spec, run_dir, overwrite=args.overwrite, quiet=args.quiet, dry_run=args.dry_run,
                      threads=settings.threads if args.threads is not None else None)
    if args.dry_run:
        return 0
    return _sweep_finish(args, run_dir, cells)


def _sweep_finish(args, run_dir, cells) -> int:
    """After a sweep: the report (and plots) of what is done, and what is not: failed cells (exit 1), cells
    left to other workers or submitted to Slurm (exit 0)."""
    failed = [c for c in cells if c.failed]
    left = [c for c in cells if c.left and not c.done]
    if any(c.done for c in cells):
        from llmmem.report import build_report
        from llmmem.results import atomic_write_text

        text = build_report(run_dir)
        atomic_write_text(run_dir / "report.md", text + "\n")
        print(f"\nwrote {run_dir / 'report.md'}" + (" (finished cells only)" if failed or left else ""))
        if args.plot:
            from llmmem.plots import plot_run

            for p in plot_run(run_dir):
                print(f"wrote {p}")
    if left:
        print(f"{len(left)} cell(s) are being computed by other workers or queued in Slurm; "
              f"follow them with: llmmem sweep --status {run_dir}")
    if failed:
        print(f"{len(failed)} cell(s) failed:")
        for c in failed:
            print(f"  {c.cell.name()}: {c.failed.splitlines()[0][:300]}")
        print(f"tracebacks in {run_dir / '.failed'}; rerun the same command to retry them")
        return 1
    return 0


def _sweep_status(args) -> int:
    """``llmmem sweep --status RUN_DIR`` (the plan recorded in its sweep.json) or ``llmmem sweep CONFIG
    --status`` (the config's plan, in its output_path)."""
    from pathlib import Path

    from llmmem.executors import format_status, plan_record, status_of_run_dir

    config = args.config
    status = args.status if isinstance(args.status, str) else None
    if status and status.endswith((".yaml", ".yml")) and config is None:
        config, status = status, None  # `llmmem sweep --status CONFIG.yaml`
    if config is None:
        if not status:
            raise ConfigError("sweep --status: give the run directory (--status RUN_DIR) or a config")
        print(status_of_run_dir(Path(status)))
        return 0
    from llmmem.sweep import load_sweep_spec, plan, prepare

    cli = {"output_path": status or args.output_path}
    spec = load_sweep_spec(config, args.overrides, **cli)
    run_dir = Path(spec.output_path)
    prepare(spec, build=False)
    print(format_status(run_dir, plan_record(plan(spec, run_dir))))
    return 0


def _run_dir_arg(path):
    from pathlib import Path

    run_dir = Path(path)
    if not run_dir.exists():
        raise ConfigError(f"run directory {run_dir} does not exist")
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} is not a directory")
    return run_dir


def cmd_report(args) -> int:
    from llmmem.report import build_report
    from llmmem.results import atomic_write_text

    run_dir = _run_dir_arg(args.run_dir)
    text = build_report(run_dir)
    print(text)
    atomic_write_text(run_dir / "report.md", text + "\n")
    return 0


def cmd_plot(args) -> int:
    from llmmem.config import check_output_path
    from llmmem.plots import plot_run, require_matplotlib

    run_dir = _run_dir_arg(args.run_dir)
    if args.out:
        check_output_path("--out", args.out)
    require_matplotlib()
    for p in plot_run(run_dir, args.out):
        print(f"wrote {p}")
    return 0


# ----------------------------------------------------------------------------- unlearn
UNLEARN_CLI = ("forget", "retain", "nonmember", "method", "steps", "lr", "batch_size", "eval_every", "reference_model",
               "output_path", "seed")


def cmd_unlearn(args) -> int:
    from llmmem.cells import Cell, EvalSpec
    from llmmem.config import check_output_path
    from llmmem.interventions import Step
    from llmmem.tasks import with_model_tasks
    from llmmem.unlearning.spec import load_unlearn_config

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)  # `llmmem unlearn key=value ...`: an override, not a config path
        config = None
    cli = {k: getattr(args, k) for k in UNLEARN_CLI}
    cli.update(model=args.model, model_args=args.model_args or None, method_args=args.method_args or None,
               utility_tasks=args.utility_tasks.split(",") if args.utility_tasks else None)
    uc = load_unlearn_config(config, overrides, **cli)
    mspec, spec, output, seed = uc.model, uc.spec, uc.output_path, uc.seed
    check_output_path("output_path", output)
    from pathlib import Path

    from llmmem.interventions import PrepareEnv
    from llmmem.sources import check_model, ensure_model, needs_build

    if not Path(mspec.name).expanduser().exists():
        check_model(mspec)  # a preset not built yet (the testbed) is checked against its tasks, built below
    include = with_model_tasks(None, [mspec.name])
    if spec.utility_tasks:
        from llmmem.evaluation import check_tasks, resolve_tasks

        check_tasks(resolve_tasks(spec.utility_tasks, include), lambda _t: spec.utility_limit)
    if spec.reference_model:
        ref = model_spec_from_args(spec.reference_model, None)
        if not Path(ref.name).expanduser().exists():
            check_model(ref)
    rank, scratch = _accelerate_rank(mspec)
    cell = Cell(mspec, (Step("unlearn", spec),), EvalSpec(), seed)
    cell.chain[0].intervention.prepare(spec, PrepareEnv(include_path=include, model=mspec.name))
    from llmmem.results import CellDir

    if rank == 0 and CellDir(output, cell.name()).done and not args.overwrite:
        raise ConfigError(f"cell {Path(output) / cell.name()} is already finished; pass --overwrite to redo it")
    settings = RunSettings(seed=seed, quiet=args.quiet, threads=args.threads,
                           batch_size=64)  # the tracker's evaluation batch
    for m in [mspec] + ([ref] if spec.reference_model else []):
        if needs_build(m):
            ensure_model(m)  # after validation, saying so
    include = with_model_tasks(None, [mspec.name])
    try:
        payload = _single_cell_run(args, cell, settings=settings, include_path=include, run_dir=scratch or output,
                                   prepare_steps=False)
    finally:
        if scratch:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
    if rank != 0:
        return 0
    u, m = payload["unlearning"], payload["metrics"]
    ratio = (u.get("utility_retained") or {}).get("retain_loss_ratio")
    print(f"{spec.method}: forget extractable {m['unlearn_forget_initial']['extractable']:.2f} -> "
          f"{m['unlearn_forget']['extractable']:.2f}, forgotten {m['unlearn_forget']['forgotten_rate']:.2f}"
          + (f", retain loss x{ratio:.2f}" if ratio else "") + f" ({u['seconds']:.0f}s) -> {payload['_path']}")
    if args.plot:
        from llmmem.plots import plot_run

        for p in plot_run(output):
            print(f"wrote {p}")
    return 0


def _accelerate_rank(mspec) -> tuple[int, str | None]:
    """Under a multi-process ``accelerate launch``: this process's rank, its own GPU (``cuda:LOCAL_RANK``) and,
    on ranks other than 0, a scratch directory for the cell (every rank runs the cell - the model is sharded -,
    rank 0 writes it). (0, None) otherwise."""
    from llmmem.unlearning.loop import launched_with_accelerate

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or not launched_with_accelerate():
        return 0, None
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if mspec.device in ("auto", "cuda"):
        mspec.device = f"cuda:{local}"
    if rank == 0:
        return 0, None
    import tempfile

    return rank, tempfile.mkdtemp(prefix=f"llmmem-unlearn-rank{rank}-")


# ----------------------------------------------------------------------------- durability
def cmd_durability(args) -> int:
    from llmmem.durability import load_durability, plot, run_durability, write_report

    spec = load_durability(args.config, args.overrides, output_path=args.output_path)
    if args.plot:
        from llmmem.plots import require_matplotlib

        require_matplotlib()
    settings = RunSettings(batch_size=spec.batch_size, seed=spec.seeds[0], quiet=args.quiet, threads=args.threads)
    if not args.dry_run:
        setup_torch(settings)
    run_dir = run_durability(spec, quiet=args.quiet, dry_run=args.dry_run, overwrite=args.overwrite)
    if args.dry_run:
        return 0
    from llmmem.report import build_report
    from llmmem.results import atomic_write_text

    atomic_write_text(run_dir / "report.md", build_report(run_dir) + "\n")
    path = write_report(run_dir)
    print(f"\nwrote {run_dir / 'report.md'}\nwrote {path}")
    if args.plot:
        from llmmem.plots import plot_run

        for p in plot_run(run_dir) + plot(run_dir):
            print(f"wrote {p}")
    return 0


# ----------------------------------------------------------------------------- testbed
def cmd_testbed(args) -> int:
    from llmmem.testbed.train import build_testbed, preset_config

    memscore_only = [f for f, v in (("--models", args.models), ("--loo", args.loo), ("--vary-seed", args.vary_seed))
                     if v not in (None, False)]
    if args.action == "build" and memscore_only:
        raise ConfigError(f"{memscore_only[0]} is an option of `testbed memscore`, not `testbed build`")
    if args.action == "memscore" and args.exclude:
        raise ConfigError("--exclude is an option of `testbed build`; memscore chooses each model's items itself")
    overrides = None
    if args.config:
        from pathlib import Path

        from llmmem.config import yaml_load_file

        if not Path(args.config).is_file():
            raise ConfigError(f"--config {args.config} does not exist")
        overrides = yaml_load_file(args.config, "testbed config (train: and/or world:)")
    if args.device is not None or args.dtype is not None:
        overrides = dict(overrides or {})
        train = dict(overrides.get("train") or {})
        train.update({k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v is not None})
        overrides["train"] = train
    cfg = preset_config(args.preset, overrides)  # unknown preset or bad sizes -> one line, exit 2
    from llmmem.testbed.train import train_device

    train_device(cfg)  # device=cuda without CUDA: one line, before the world is built
    if args.action == "memscore":
        return _testbed_memscore(args, cfg)
    exclude = None
    if args.exclude:
        from llmmem.config import read_id_file

        exclude = read_id_file(args.exclude, "--exclude file")
        if not exclude:
            raise ConfigError(f"--exclude file {args.exclude} names no facts or canaries")
    from llmmem.config import check_output_path

    check_output_path("--output", args.output)
    settings = RunSettings(seed=args.seed, quiet=args.quiet, threads=args.threads)
    setup_torch(settings)
    out = build_testbed(args.output, preset=args.preset, seed=args.seed, overwrite=args.overwrite, exclude=exclude,
                        quiet=args.quiet, config=cfg)
    import json

    info = json.loads((out / "world.json").read_text())["training"]
    print(f"testbed {args.preset} seed {args.seed}: {info['params']:,} parameters, {info['steps']} steps, "
          f"final loss {info['loss_curve'][-1]['loss']:.3f}, {info['seconds']:.0f}s -> {out}")
    return 0


def _testbed_memscore(args, cfg) -> int:
    from llmmem.config import parse_int
    from llmmem.testbed.memscore import run_memscore

    if args.models is None:
        raise ConfigError("testbed memscore: --models K is required (an even number >= 2)")
    models = parse_int("--models", args.models)
    loo = 0 if args.loo is None else parse_int("--loo", args.loo)
    settings = RunSettings(seed=args.seed, quiet=args.quiet, threads=args.threads)
    setup_torch(settings)
    # run_memscore checks the rest (models even, --loo within the items, --output) before anything trains
    out = run_memscore(args.output, preset=args.preset, models=models, seed=args.seed, loo=loo, config=cfg,
                       vary_seed=args.vary_seed, overwrite=args.overwrite, threads=settings.threads)
    import json

    doc = json.loads((out / "memscore.json").read_text())
    err = doc["loo"]["error"]
    line = "; ".join(f"LOO vs subsampled {k}: mean |diff| {v['mean_abs_diff']:.3f}, spearman "
                     f"{'-' if v['spearman'] is None else format(v['spearman'], '.2f')} (n={v['n']})"
                     for k, v in err.items())
    print(f"memscore {args.preset} seed {args.seed}: {len(doc['models'])} models, train "
          f"{doc['timings']['train_seconds']:.0f}s, eval {doc['timings']['eval_seconds']:.0f}s -> {out}"
          + (f"\n{line}" if line else ""))
    return 0


# ----------------------------------------------------------------------------- export-lm-eval
def cmd_export_lm_eval(args) -> int:
    from llmmem.lmeval import export_tasks
    from llmmem.tasks import parse_task_list

    names = parse_task_list(args.tasks) if args.tasks is not None else None
    for p in export_tasks(args.dir, names, args.include_path):
        print(f"wrote {p}")
    print(f"run with: lm_eval --model hf --model_args pretrained=MODEL --include_path {args.dir} --tasks "
          f"llmmem_<task>")
    return 0


# ----------------------------------------------------------------------------- fetch
def cmd_fetch(args) -> int:
    from llmmem.presets import PRESETS, fetch_preset

    for name in args.preset:
        PRESETS.check(name)
    tty = sys.stderr.isatty()
    if tty and not args.quiet:
        for name in args.preset:
            path = fetch_preset(name, quiet=False, force=args.force)
            print(f"{name}: {path}")
        return 0
    # not a terminal (a log, CI) or --quiet: no progress bars, no progress lines; one summary line
    import time

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    pkg = logging.getLogger("llmmem")
    level = pkg.level
    pkg.setLevel(logging.WARNING)
    done, t0 = [], time.monotonic()
    try:
        for name in args.preset:
            there = (PRESETS.get(name).local_dir() / "config.json").exists() and not args.force
            done.append(f"{name} -> {fetch_preset(name, quiet=True, force=args.force)}"
                        + (" (already there)" if there else ""))
    finally:
        pkg.setLevel(level)
    print(f"fetched {len(done)} preset(s) in {time.monotonic() - t0:.0f}s: {'; '.join(done)}")
    return 0


# ----------------------------------------------------------------------------- ls
def cmd_ls(args) -> int:
    from llmmem.presets import PRESETS

    if args.what == "tasks":
        from llmmem.tasks import load_task_file, task_index

        index = task_index(getattr(args, "include_path", None))
        width = max(len(n) for n in index) if index else 4
        for name, path in sorted(index.items()):
            try:
                t = load_task_file(path)
                tag = " [hub]" if "hub" in (t.raw.get("tag") or []) else ""
                print(f"{name:<{width}}  {t.suite:<10}  {t.description}{tag}")
            except ConfigError as e:
                print(f"{name:<{width}}  {'?':<10}  (invalid: {e})")
        return 0
    if args.what == "models":
        rows = []
        for e in PRESETS.entries():
            preset = PRESETS.get(e.name)
            here = "fetched" if (preset.local_dir() / "config.json").exists() else "not fetched"
            rows.append((e.name, here, preset.description))
        width = max(len(r[0]) for r in rows)
        for name, here, desc in rows:
            print(f"{name:<{width}}  {here:<11}  {desc}")
    return 0


# ----------------------------------------------------------------------------- parser
COMMANDS: dict[str, Callable] = {}


def _bool_flag(value: str):
    """lm-eval 0.4.13's ``--fewshot_as_multiturn [true|false]``."""
    from llmmem.config import parse_bool

    try:
        return parse_bool("--fewshot_as_multiturn", value)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation (lm-evaluation-harness spelling and meaning)")
    g.add_argument("--limit", default=None, help="per task: the first N docs, or a fraction 0 < x < 1 of them")
    g.add_argument("--num_fewshot", type=int, default=None, help="override every task's shot count")
    g.add_argument("--backend", default=None, help="hf (default) | vllm (also: --model hf|vllm with --model_args "
                   "pretrained=..., as lm-eval)")
    g.add_argument("--apply_chat_template", nargs="?", const=True, default=None, metavar="TEMPLATE",
                   help="recall/icl prompts in the model's chat template (or its template named TEMPLATE), built as "
                        "lm-eval builds them; extraction and MIA score raw text")
    g.add_argument("--fewshot_as_multiturn", nargs="?", const=True, default=None, type=_bool_flag, metavar="BOOL",
                   help="few-shot examples as user/assistant turns (default with --apply_chat_template, as lm-eval "
                        "0.4.13; 'false': all in one user message)")
    g.add_argument("--system_instruction", default=None,
                   help="a system message (with a chat template), else text before the prompt, as lm-eval")
    g.add_argument("--gen_kwargs", default=None, metavar="K=V,...", nargs="+", action=_JoinArgs,
                   help="override recall/icl tasks' generation settings: max_gen_toks, until, do_sample, "
                        "temperature, top_p (e.g. max_gen_toks=32,until=[\"\\n\\n\"])")
    g.add_argument("--predict_only", action="store_true",
                   help="log the model's outputs (implies --log_samples); no metric is computed")
    g.add_argument("--mia_reference", default=None, metavar="MODEL",
                   help="reference model for the reference-ratio membership score")
    g = p.add_argument_group("output (lm-evaluation-harness spelling)")
    g.add_argument("--verbosity", default=None, type=str.upper, metavar="LEVEL",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                   help="log level: DEBUG | INFO (default) | WARNING | ERROR | CRITICAL")
    g.add_argument("--write_out", "-w", action="store_true",
                   help="print each task's first prompt and target (after the run)")
    g.add_argument("--show_config", action="store_true", help="print the cell's results.json (configs included)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="llmmem",
        description="Benchmark harness for memorization in language models: prune or unlearn, "
                    "then measure recall, in-context learning and extraction.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"llmmem {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name, handler, help_, epilog):
        p = sub.add_parser(name, help=help_, description=help_, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(handler=handler)
        COMMANDS[name] = handler
        return p

    p = add("generate", cmd_generate, "Greedy (or seeded sampled) continuation of one or more prompts.",
            _examples('llmmem generate --model smollm2-135m --prompt "The capital of France is"',
                      'llmmem generate --model ./my-ckpt --prompt "Q: 2+2=" --max_gen_toks 8 --until "\\n"',
                      'llmmem generate --model smollm2-135m --prompt "Once" --do_sample --seed 3'))
    add_model_flags(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    p.add_argument("--max_gen_toks", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--until", action="append", help="stop string (repeatable)")
    p.add_argument("--do_sample", action="store_true", help="sample instead of greedy (seeded by --seed)")
    p.add_argument("--temperature", default="1.0", help="sampling temperature (> 0)")
    p.add_argument("--top_p", default="1.0", help="nucleus sampling mass (0 < p <= 1)")
    p.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    add_run_flags(p)

    p = add("prune", cmd_prune, "Prune a model (magnitude, Wanda, SparseGPT) and save a normal HF checkpoint.",
            _examples("llmmem prune --model smollm2-135m --method wanda --sparsity 0.5 --nsamples 32 --seqlen 256 "
                      "--output pruned/wanda50",
                      "llmmem prune --model ./ckpt --method sparsegpt --structure 2:4 --calibration calib.safetensors "
                      "--output pruned/sgpt24",
                      "llmmem prune --model smollm2-135m --method magnitude --sparsity 0.6 --profile owl "
                      "--calibration corpus.txt --output pruned/mag-owl"))
    add_model_flags(p)
    g = p.add_argument_group("pruning")
    g.add_argument("--method", required=True, help="magnitude | wanda | sparsegpt")
    g.add_argument("--sparsity", type=float, default=None, help="fraction of weights to prune, in [0, 1) "
                   "(optional for N:M, where it is N/M)")
    g.add_argument("--structure", default="unstructured", help="unstructured | N:M (e.g. 2:4)")
    g.add_argument("--profile", default="uniform", help="uniform | owl (outlier-weighted layer-wise sparsity)")
    g.add_argument("--scope", default="layer", help="magnitude only: layer (one threshold per matrix) | global")
    g.add_argument("--calibration", default="auto", metavar="SRC",
                   help="auto (c4 when online, else self) | self | c4 | hf:PATH[:CONFIG[:SPLIT]] | "
                        "tokens .safetensors/.pt/.npy | text .txt/.jsonl")
    g.add_argument("--nsamples", type=int, default=None, help="calibration sequences (default 128, or the token file's)")
    g.add_argument("--seqlen", type=int, default=None, help="tokens per calibration sequence (default 2048 capped "
                   "at the model's positions, or the token file's)")
    g.add_argument("--output", required=True, help="directory for the pruned checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    add_run_flags(p)

    p = add("quantize", cmd_quantize, "Quantize a model's weights (RTN or GPTQ, 2-8 bits) and save a checkpoint.",
            _examples("llmmem quantize --model smollm2-135m --method rtn --bits 4 --group_size 32 --output q/rtn4",
                      "llmmem quantize --model ./pruned/wanda50 --method gptq --bits 4 --group_size 64 --calibration self "
                      "--nsamples 32 --seqlen 256 --output q/sparse-gptq4   # zeros stay zeros",
                      "llmmem quantize --model ./ckpt --method gptq --bits 4 --group_size 128 --format compressed-tensors "
                      "--output q/w4a16   # a checkpoint vLLM serves"))
    add_model_flags(p)
    g = p.add_argument_group("quantization (weight-only)")
    g.add_argument("--method", required=True, help="rtn (round to nearest) | gptq")
    g.add_argument("--bits", default="4", help="2 | 3 | 4 | 8 (default 4)")
    g.add_argument("--group_size", default="128", help="input columns per scale (default 128); -1 = per output channel")
    g.add_argument("--asymmetric", action="store_true", help="a zero-point per group (default symmetric)")
    g.add_argument("--act_order", default=None, help="gptq: true | false (default true, as llm-compressor)")
    g.add_argument("--dampening_frac", default="0.01", help="gptq: Hessian dampening, fraction of mean(diag H)")
    g.add_argument("--no_keep_sparsity", action="store_true", help="let zeros of a pruned model change")
    g.add_argument("--calibration", default="auto", metavar="SRC", help="gptq: as `llmmem prune --calibration`")
    g.add_argument("--nsamples", default=None, help="gptq: calibration sequences (default 128)")
    g.add_argument("--seqlen", default=None, help="gptq: tokens per calibration sequence")
    g.add_argument("--format", default="fake", help="fake (dequantized safetensors, loads anywhere) | "
                   "compressed-tensors (packed, served by vLLM)")
    g.add_argument("--output", required=True, help="directory for the quantized checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    add_run_flags(p)

    p = add("fetch", cmd_fetch, "Download and convert a preset model into $LLMMEM_HOME/models.",
            _examples("llmmem fetch smollm2-135m", "LLMMEM_HOME=/data/llmmem llmmem fetch smollm2-135m --force"))
    p.add_argument("preset", nargs="+", help="preset name(s): see `llmmem ls models`")
    p.add_argument("--force", action="store_true", help="fetch again even if present")
    p.add_argument("--quiet", action="store_true")

    p = add("eval", cmd_eval, "Evaluate a model on tasks; writes a cell (results.json, samples_<task>.jsonl).",
            _examples("llmmem eval --model smollm2-135m --tasks capitals,capitals_override --limit 50",
                      "llmmem eval --model_args pretrained=./pruned/wanda50,dtype=float32 --tasks famous_passages "
                      "--output_path results/mine --log_samples",
                      "llmmem eval --model smollm2-135m --tasks capitals --apply_chat_template --fewshot_as_multiturn "
                      "--limit 0.25",
                      "llmmem eval --model ./ckpt --tasks wikimia --mia_reference smollm2-135m"))
    add_model_flags(p)
    p.add_argument("--tasks", required=True, nargs="+", action=_JoinArgs,
                   help="comma-separated task names (llmmem ls tasks; lm_eval:<task>)")
    add_eval_flags(p)
    p.add_argument("--output_path", default="results/eval",
                   help="run directory (default results/eval); a .json file name (as lm-eval): its folder is the run "
                        "directory and results.json is also copied there as <name>_<date>.json")
    p.add_argument("--log_samples", "-s", action="store_true", help="keep prompts in samples_<task>.jsonl")
    p.add_argument("--overwrite", action="store_true", help="redo a finished cell")
    p.add_argument("--include_path", default=None,
                   help="extra directory of task YAMLs (llmmem's, and lm-eval's for lm_eval: tasks)")
    p.add_argument("--use_cache", default=None, metavar="DIR",
                   help="answer repeated requests from a sqlite cache in DIR (keyed by the cell's weights)")
    add_run_flags(p)

    p = add("sweep", cmd_sweep, "Run a grid (models x pruning x sparsities, plus dense) on tasks; resumable.",
            _examples("llmmem sweep configs/quickstart.yaml --plot",
                      "llmmem sweep configs/quickstart.yaml sparsities=[0.3,0.6] limit=20 --output_path results/small",
                      "llmmem sweep configs/testbed.yaml --dry_run",
                      "llmmem sweep configs/testbed.yaml --executor local --workers 2",
                      "llmmem sweep configs/gpu/pythia-1.4b-prune.yaml --executor slurm",
                      "llmmem sweep --status results/pythia-1.4b"))
    p.add_argument("config", nargs="?", default=None, help="sweep YAML (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys (YAML values)")
    p.add_argument("--output_path", default=None, help="run directory (overrides the config's)")
    p.add_argument("--overwrite", action="store_true", help="redo finished cells")
    p.add_argument("--dry_run", action="store_true", help="print the plan and stop")
    p.add_argument("--plot", action="store_true", help="draw the figures when done (needs the plot extra)")
    p.add_argument("--use_cache", default=None, metavar="DIR",
                   help="answer repeated requests from a sqlite cache in DIR (keyed by each cell's weights)")
    g = p.add_argument_group("executor (where the cells run; see docs/architecture.md)")
    g.add_argument("--executor", default=None, help="local (default) | slurm (a submitit job array; the config's "
                   "slurm: {partition, gpus_per_node, cpus_per_task, mem_gb, time_min, ...})")
    g.add_argument("--workers", default=None, help="executor local: N worker processes (one GPU each when GPUs "
                   "are visible, else the CPU threads split between them)")
    g.add_argument("--wait", action="store_true", help="executor slurm: wait for the job array, then report")
    g.add_argument("--status", nargs="?", const=True, default=None, metavar="RUN_DIR",
                   help="show done / running / queued / failed / pending cells of RUN_DIR (or of the config's "
                        "output_path) and stop")
    p.add_argument("--threads", default=None, help="CPU threads for torch (per worker with --workers)")
    p.add_argument("--quiet", action="store_true")

    p = add("durability", cmd_durability,
            "Unlearn, then compress or relearn: does forgotten knowledge come back (beside a model retrained "
            "without it), and which examples disappear first?",
            _examples("llmmem durability configs/durability-testbed.yaml --plot",
                      "llmmem durability configs/durability-testbed.yaml --dry_run",
                      "llmmem durability configs/durability-testbed-tiny.yaml output_path=results/dur-tiny"))
    p.add_argument("config", help="durability YAML (see configs/durability-testbed.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys (YAML values)")
    p.add_argument("--output_path", default=None)
    p.add_argument("--overwrite", action="store_true", help="redo finished cells")
    p.add_argument("--dry_run", action="store_true", help="print the plan and stop")
    p.add_argument("--plot", action="store_true")
    p.add_argument("--threads", default=None)
    p.add_argument("--quiet", action="store_true")

    p = add("report", cmd_report, "Markdown table of a run (absolute and normalised to dense); writes report.md.",
            _examples("llmmem report results/quickstart"))
    p.add_argument("run_dir")

    p = add("plot", cmd_plot, "Figures of a run: headline retention curves, per-task curves, extraction by bucket.",
            _examples("llmmem plot results/quickstart", "llmmem plot results/quickstart --out figs/"))
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="output directory (default RUN_DIR/plots)")

    p = add("validate", cmd_validate, "Check task YAMLs and their data (fields, templates, shot pools).",
            _examples("llmmem validate", "llmmem validate capitals famous_passages",
                      "llmmem validate --include_path ./my_tasks my_task"))
    p.add_argument("tasks", nargs="*", help="task names (default: all)")
    p.add_argument("--include_path", default=None)

    p = add("unlearn", cmd_unlearn, "Unlearn a forget set; track per-example forgetting curves and what predicts them.",
            _examples("llmmem unlearn configs/unlearn-testbed.yaml --plot",
                      "llmmem unlearn --model testbed --forget forget.jsonl --retain retain.jsonl --method npo "
                      "--steps 60 --eval_every 5",
                      "llmmem unlearn configs/unlearn-testbed.yaml method=grad_ascent lr=5e-4"))
    p.add_argument("config", nargs="?", default=None, help="unlearning YAML (keys as the flags)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys")
    p.add_argument("--model", default=None)
    p.add_argument("--model_args", default="")
    p.add_argument("--forget", default=None, help="task name or jsonl (text, or prefix + secret)")
    p.add_argument("--retain", default=None, help="task name or jsonl")
    p.add_argument("--nonmember", default=None, help="never-seen examples (task or jsonl): forgetting threshold, MIA")
    p.add_argument("--method", default=None, help="see `llmmem ls methods` (grad_diff, npo, simnpo, ...)")
    p.add_argument("--method_args", default="", metavar="K=V,...", help="e.g. beta=0.1,alpha=1")
    p.add_argument("--steps", default=None)
    p.add_argument("--lr", default=None)
    p.add_argument("--batch_size", default=None)
    p.add_argument("--eval_every", default=None)
    p.add_argument("--utility_tasks", default=None, help="comma-separated tasks evaluated at every evaluation")
    p.add_argument("--reference_model", default=None, help="a model trained without the forget set")
    p.add_argument("--output_path", default=None)
    p.add_argument("--seed", default=None)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--plot", action="store_true")
    p.add_argument("--threads", default=None)
    p.add_argument("--quiet", action="store_true")

    p = add("testbed", cmd_testbed, "Build the synthetic world and train a small model on it (ground truth included).",
            _examples("llmmem testbed build --preset tiny --output /tmp/tb",
                      "llmmem testbed build --preset small --seed 1 --output testbeds/s1",
                      "llmmem testbed build --exclude forget.txt --output testbeds/retrained  # without those items",
                      "llmmem testbed build --preset small --device cuda --output testbeds/s0  # bf16 autocast",
                      "llmmem testbed memscore --preset tiny --models 4 --loo 5 --output testbeds/memscore"))
    p.add_argument("action", choices=["build", "memscore"],
                   help="build: generate the world, train, write model + tasks; memscore: counterfactual "
                        "memorization of every fact and canary from K models on random halves of them")
    p.add_argument("--preset", default="small", help="tiny (tests, < 1 min) | small (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--exclude", default=None, metavar="FILE",
                   help="fact/canary ids (one per line) to leave out of training (build)")
    p.add_argument("--models", default=None, metavar="K", help="memscore: models to train (even, >= 2)")
    p.add_argument("--loo", default=None, metavar="N",
                   help="memscore: exact leave-one-out for N items (N + 1 more models)")
    p.add_argument("--vary-seed", dest="vary_seed", action="store_true",
                   help="memscore: model i trains with seed S+i (default: all share seed S; only their items differ)")
    p.add_argument("--config", default=None, metavar="YAML",
                   help="override the preset: {train: {layers, hidden, epochs, ...}, world: {n_entities, ...}}")
    p.add_argument("--device", default=None, help="train on cpu (default) | cuda | cuda:N | auto")
    p.add_argument("--dtype", default=None, help="auto (default: bfloat16 autocast on CUDA, float32 on the CPU) | "
                   "float32 | bfloat16")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true")

    p = add("export-lm-eval", cmd_export_lm_eval, "Write llmmem's recall/icl tasks as lm-evaluation-harness task YAMLs.",
            _examples("llmmem export-lm-eval lm_eval_tasks/",
                      "llmmem export-lm-eval lm_eval_tasks/ --tasks capitals,capitals_override",
                      "lm_eval --model hf --model_args pretrained=./ckpt --include_path lm_eval_tasks/ "
                      "--tasks llmmem_capitals"))
    p.add_argument("dir", help="output directory")
    p.add_argument("--tasks", default=None, help="comma-separated llmmem tasks (default: every exportable task)")
    p.add_argument("--include_path", default=None)

    p = add("ls", cmd_ls, "List presets (models) or tasks.", _examples("llmmem ls models", "llmmem ls tasks"))
    p.add_argument("what", choices=["models", "tasks"], help="what to list")
    p.add_argument("--include_path", default=None, help="extra directory of task YAMLs (ls tasks)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # sweep overrides may follow options (argparse stops filling a positional list at the first option)
        if getattr(args, "command", None) in ("sweep", "unlearn", "durability") and all("=" in e and not e.startswith("-")
                                                                            for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    quiet = getattr(args, "quiet", False)
    verbosity = getattr(args, "verbosity", None)  # lm-eval's --verbosity
    level = getattr(logging, verbosity) if verbosity else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="llmmem: %(message)s", stream=sys.stderr)
    if verbosity:
        logging.getLogger().setLevel(level)
    if quiet:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return args.handler(args) or 0
    except ConfigError as e:
        msg = textwrap.shorten(" ".join(str(e).split()), width=1000, placeholder=" ...")
        sys.stderr.write(f"llmmem {args.command}: error: {msg}\n")
        return 2
    except CellsFailed as e:
        sys.stderr.write(f"llmmem {args.command}: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("llmmem: interrupted\n")
        return 130
    except BrokenPipeError:  # `llmmem ls tasks | head`: the reader left; say nothing
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return 0
    except Exception as e:  # noqa: BLE001 - a bug: say so first, then the traceback
        first = " ".join(str(e).split())[:300]
        sys.stderr.write(f"llmmem {args.command}: internal error (a bug in llmmem, not in your input): "
                         f"{type(e).__name__}: {first} - please report it at {ISSUES_URL} with the traceback below\n")
        traceback.print_exc(file=sys.stderr)
        return 1


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
