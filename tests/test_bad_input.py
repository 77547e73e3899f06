"""The bad-input contract, table-driven, across every subcommand.

Each case runs the real command line in a subprocess (so log lines and interpreter-exit output count) from an
empty working directory with an empty ``$LLMMEM_HOME`` and the hub offline, and asserts: exit code 2, exactly
one line on stderr naming the offending key or value, no traceback, no file or directory created or changed
(the case's directory tree is compared before and after), and - for the cases that need no model - the error
within 5 seconds (the checks run before torch is imported).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
NO_MODEL_SECONDS = 5.0


@dataclass
class Case:
    id: str
    argv: list
    needles: list  # each must occur in the one stderr line
    setup: object = None  # fn(tmp: Path) -> None, writes the inputs the case needs
    env: dict = field(default_factory=dict)
    seconds: float = NO_MODEL_SECONDS


# ----------------------------------------------------------------------------- inputs
def canaries(n, start=0, group="count004"):
    return [{"id": f"c{i}", "prefix": f"my account {i} pin is", "secret": f"{i % 10} {(i * 3) % 10} 7 1",
             "group": group} for i in range(start, start + n)]


def write_jsonl(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def unlearn_sets(tmp: Path):
    write_jsonl(tmp / "forget.jsonl", canaries(4))
    write_jsonl(tmp / "retain.jsonl", [{"text": f"the sky over city {i} is blue and wide"} for i in range(6)])
    write_jsonl(tmp / "nonmember.jsonl", canaries(4, start=10, group="heldout"))


def plain_file(tmp: Path):
    (tmp / "afile").write_text("not a directory\n")


def sweep_cfg(**over):
    """A setup writing ``s.yaml``: a tiny valid sweep on the test model, with ``over`` applied (None deletes)."""

    def setup(tmp: Path):
        cfg = {"models": ["@MODEL@"], "methods": ["magnitude"], "sparsities": [0.5], "calibration": "self",
               "nsamples": 2, "seqlen": 8, "tasks": ["capitals"], "limit": 2, "output_path": "run"}
        for k, v in over.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        text = yaml.safe_dump(cfg).replace("'@MODEL@'", json.dumps(str(_MODEL[0]))).replace("@MODEL@", str(_MODEL[0]))
        (tmp / "s.yaml").write_text(text)
        plain_file(tmp)
        unlearn_sets(tmp)

    return setup


def task_dir(files: dict):
    """A setup writing ``tasks/<name>`` files (YAML text or jsonl rows)."""

    def setup(tmp: Path):
        d = tmp / "tasks"
        d.mkdir()
        for name, content in files.items():
            if isinstance(content, list):
                write_jsonl(d / name, content)
            else:
                (d / name).write_text(content)

    return setup


GOOD_ROWS = [{"id": i, "q": f"question {i}", "a": f"answer {i}"} for i in range(8)]
GOOD_YAML = "task: mytask\nsuite: recall\ndata: my.jsonl\ndoc_to_text: 'Q: {{q}}'\ndoc_to_target: '{{a}}'\n"


def results_dir(doc_text: str):
    def setup(tmp: Path):
        d = tmp / "run" / "m" / "dense-12345678"
        d.mkdir(parents=True)
        (d / "results.json").write_text(doc_text)
        plain_file(tmp)

    return setup


def tb_config(text: str):
    def setup(tmp: Path):
        (tmp / "tb.yaml").write_text(text)

    return setup


def copy_configs(tmp: Path):
    shutil.copytree(REPO / "configs", tmp / "configs")
    unlearn_sets(tmp)


def ids_file(text: str):
    def setup(tmp: Path):
        (tmp / "ids.txt").write_text(text)
        unlearn_sets(tmp)

    return setup


_MODEL: list = []  # the tiny checkpoint (a session fixture), filled in by the test
M = "@M@"
GEN = ["generate", "--model", M, "--prompt", "x"]
PRUNE_W = ["prune", "--model", M, "--method", "wanda", "--sparsity", "0.5", "--output", "out"]
PRUNE = ["prune", "--model", M, "--method", "magnitude", "--sparsity", "0.5", "--output", "out"]
EVAL = ["eval", "--model", M, "--tasks", "capitals", "--limit", "2"]
UNL = ["unlearn", "--model", M, "--forget", "forget.jsonl", "--retain", "retain.jsonl", "--nonmember",
       "nonmember.jsonl", "--steps", "4", "--eval_every", "2", "--output_path", "u"]
QUANT = ["quantize", "--model", M, "--method", "rtn", "--output", "out"]
DUR = ["durability", "configs/durability-testbed-tiny.yaml"]
UNLEARN_CFG = ["unlearn", "configs/unlearn-testbed.yaml"]
NOT_WRITABLE = "/proc/self/llmmem-out" if os.geteuid() == 0 else "ro/out"  # root writes anywhere but /proc/self


def _ro(tmp: Path):
    if os.geteuid() != 0:
        (tmp / "ro").mkdir()
        (tmp / "ro").chmod(0o555)


CASES = [
    # ------------------------------------------------------------------ generate / model flags / environment
    Case("generate-temperature-nan", GEN + ["--do_sample", "--temperature", "nan"], ["--temperature", "nan"]),
    Case("generate-temperature-inf", GEN + ["--temperature", "inf"], ["--temperature", "inf"]),
    Case("generate-top-p-zero", GEN + ["--top_p", "0"], ["--top_p", "0"]),
    Case("generate-max-gen-toks-zero", GEN + ["--max_gen_toks", "0"], ["--max_gen_toks"]),
    Case("generate-max-gen-toks-word", GEN + ["--max_gen_toks", "many"], ["--max_gen_toks", "many"]),
    Case("generate-empty-prompt", ["generate", "--model", M, "--prompt", ""], ["--prompt", "empty"]),
    Case("generate-seed-negative", GEN + ["--seed", "-1"], ["--seed", "-1"]),
    Case("generate-seed-float", GEN + ["--seed", "1.5"], ["--seed", "1.5"]),
    Case("generate-batch-size-zero", GEN + ["--batch_size", "0"], ["--batch_size", "0"]),
    Case("generate-batch-size-auto-word", GEN + ["--batch_size", "auto:x"], ["--batch_size", "x"]),
    Case("generate-threads-zero", GEN + ["--threads", "0"], ["--threads", "0"]),
    Case("env-threads-abc", GEN, ["LLMMEM_THREADS", "abc"], env={"LLMMEM_THREADS": "abc"}),
    Case("env-threads-zero", ["eval", "--model", M, "--tasks", "capitals"], ["LLMMEM_THREADS", "0"],
         env={"LLMMEM_THREADS": "0"}),
    Case("env-tasks-path-missing", ["ls", "tasks"], ["LLMMEM_TASKS_PATH", "nowhere"],
         env={"LLMMEM_TASKS_PATH": "nowhere"}),
    Case("model-args-no-equals", GEN + ["--model_args", "dtype"], ["--model_args", "'dtype'", "key=value"]),
    Case("model-args-unknown-key", GEN + ["--model_args", "flavour=x"], ["--model_args", "flavour"]),
    Case("model-args-bad-dtype", GEN + ["--model_args", "dtype=float17"], ["dtype", "float17"]),
    Case("model-args-max-length", GEN + ["--model_args", "max_length=-3"], ["max_length", "-3"]),
    Case("model-args-bad-device", GEN + ["--model_args", "device=tpu"], ["device", "tpu"]),
    Case("model-args-bad-bool", GEN + ["--model_args", "trust_remote_code=maybe"], ["trust_remote_code", "maybe"]),
    Case("model-args-twice", GEN + ["--model_args", "dtype=float32,dtype=bfloat16"], ["dtype", "twice"]),
    Case("device-flag-disagrees", GEN + ["--device", "cpu", "--model_args", "device=cuda"], ["--device", "device=cuda"]),
    Case("model-missing-path", ["generate", "--model", "./nope", "--prompt", "x"], ["./nope", "does not exist"]),
    Case("model-is-plain-file", ["generate", "--model", "afile", "--prompt", "x"], ["afile"], setup=plain_file),
    Case("model-dir-without-config", ["generate", "--model", "tasks", "--prompt", "x"], ["no config.json"],
         setup=task_dir({})),
    Case("model-hub-id-offline", ["generate", "--model", "someorg/somemodel", "--prompt", "x"],
         ["someorg/somemodel", "unreachable"]),
    Case("model-unknown-preset", ["generate", "--model", "smollm-999", "--prompt", "x"], ["smollm-999", "smollm2-135m"]),
    Case("no-model", ["generate", "--prompt", "x"], ["--model"]),
    Case("unknown-subcommand", ["frobnicate"], ["frobnicate"]),
    # ------------------------------------------------------------------ prune
    Case("prune-sparsity-too-big", PRUNE[:-4] + ["--sparsity", "1.5", "--output", "out"], ["sparsity", "1.5"]),
    Case("prune-sparsity-nan", PRUNE[:-4] + ["--sparsity", "nan", "--output", "out"], ["sparsity", "nan"]),
    Case("prune-unknown-method", ["prune", "--model", M, "--method", "lottery", "--sparsity", "0.5", "--output", "out"],
         ["lottery"]),
    Case("prune-bad-structure", PRUNE + ["--structure", "5:4"], ["structure", "5:4"]),
    Case("prune-owl-with-nm", PRUNE[:-4] + ["--structure", "2:4", "--profile", "owl", "--output", "out"],
         ["owl", "2:4"]),
    Case("prune-scope-global-wanda", ["prune", "--model", M, "--method", "wanda", "--sparsity", "0.5", "--scope",
                                      "global", "--output", "out"], ["scope=global", "wanda"]),
    Case("prune-output-is-file", PRUNE[:-1] + ["afile"], ["--output", "afile", "not a directory"], setup=plain_file),
    Case("prune-output-not-writable", PRUNE[:-1] + [NOT_WRITABLE], ["--output", "writable"], setup=_ro),
    Case("prune-output-not-empty", PRUNE[:-1] + ["tasks"], ["--output", "not empty", "--overwrite"],
         setup=task_dir({"x.txt": "x"})),
    Case("prune-calibration-missing", PRUNE_W + ["--calibration", "calib.txt"], ["calib.txt", "does not exist"]),
    Case("prune-calibration-hub-offline", PRUNE_W + ["--calibration", "hf:someorg/corpus"],
         ["hf:someorg/corpus", "unreachable"]),
    Case("prune-nsamples-zero", PRUNE + ["--nsamples", "0"], ["nsamples", "0"]),
    # ------------------------------------------------------------------ quantize
    Case("quantize-bits-five", QUANT[:-2] + ["--bits", "5", "--output", "out"], ["bits", "5"]),
    Case("quantize-bits-word", QUANT[:-2] + ["--bits", "four", "--output", "out"], ["bits", "four"]),
    Case("quantize-unknown-method", ["quantize", "--model", M, "--method", "awq", "--output", "out"], ["awq", "rtn"]),
    Case("quantize-group-size-zero", QUANT + ["--group_size", "0"], ["group_size", "0"]),
    Case("quantize-dampening-nan", QUANT + ["--dampening_frac", "nan"], ["dampening_frac", "nan"]),
    Case("quantize-bad-format", QUANT + ["--format", "gguf"], ["--format", "gguf"]),
    Case("quantize-output-is-file", QUANT[:-1] + ["afile"], ["--output", "afile"], setup=plain_file),
    Case("quantize-calibration-missing", ["quantize", "--model", M, "--method", "gptq", "--calibration", "c.txt",
                                          "--output", "out"], ["c.txt", "does not exist"]),
    # ------------------------------------------------------------------ durability (configs/durability-*.yaml)
    Case("durability-unknown-key", DUR + ["colour=red"], ["colour"], setup=copy_configs),
    Case("durability-relearn-fraction", DUR + ["relearn_fraction=0.9"], ["relearn_fraction", "0.9"],
         setup=copy_configs),
    Case("durability-one-forget-id", DUR + ["forget_ids=[canary-6]"], ["forget_ids"], setup=copy_configs),
    Case("durability-forget-id-twice", DUR + ["forget_ids=[canary-6,canary-6]"], ["forget_ids", "twice"],
         setup=copy_configs),
    Case("durability-batch-size-zero", DUR + ["batch_size=0"], ["batch_size", "0"], setup=copy_configs),
    Case("durability-memscore-missing", DUR + ["memscore=none.jsonl"], ["memscore", "none.jsonl"],
         setup=copy_configs),
    Case("durability-unknown-preset", DUR + ["model=testbed-tinyy"], ["testbed-tinyy"], setup=copy_configs),
    Case("durability-config-missing", ["durability", "none.yaml"], ["none.yaml", "does not exist"]),
    # ------------------------------------------------------------------ eval
    Case("eval-unknown-task", ["eval", "--model", M, "--tasks", "capitols"], ["capitols", "capitals"]),
    Case("eval-empty-tasks", ["eval", "--model", M, "--tasks", ","], ["--tasks", "empty"]),
    Case("eval-task-twice", ["eval", "--model", M, "--tasks", "capitals,capitals"], ["capitals", "twice"]),
    Case("eval-limit-zero", EVAL[:-1] + ["0"], ["limit", "0"]),
    Case("eval-limit-nan", EVAL[:-1] + ["nan"], ["limit", "nan"]),
    Case("eval-limit-negative-fraction", EVAL[:-1] + ["-0.5"], ["limit", "-0.5"]),
    Case("eval-num-fewshot-negative", EVAL + ["--num_fewshot", "-1"], ["num_fewshot", "-1"]),
    Case("eval-num-fewshot-too-many", EVAL + ["--num_fewshot", "100000"], ["num_fewshot", "100000"]),
    Case("eval-unknown-backend", EVAL + ["--backend", "tgi"], ["tgi", "hf"]),
    Case("eval-gen-kwargs-nan", EVAL + ["--gen_kwargs", "temperature=nan"], ["temperature", "nan"]),
    Case("eval-gen-kwargs-unknown", EVAL + ["--gen_kwargs", "colour=red"], ["gen_kwargs", "colour"]),
    Case("eval-multiturn-without-chat", EVAL + ["--fewshot_as_multiturn"], ["fewshot_as_multiturn",
                                                                            "apply_chat_template"]),
    Case("eval-output-path-is-file", EVAL + ["--output_path", "afile"], ["--output_path", "afile"], setup=plain_file),
    Case("eval-output-path-not-writable", EVAL + ["--output_path", NOT_WRITABLE], ["--output_path", "writable"],
         setup=_ro),
    Case("eval-use-cache-is-file", EVAL + ["--use_cache", "afile"], ["--use_cache", "afile"], setup=plain_file),
    Case("eval-mia-reference-missing", EVAL + ["--mia_reference", "./noref"], ["./noref"]),
    Case("eval-empty-system-instruction", EVAL + ["--system_instruction", " "], ["system_instruction"]),
    Case("eval-include-path-missing", EVAL + ["--include_path", "nowhere"], ["--include_path", "nowhere"]),
    Case("eval-lm-eval-unknown-task", ["eval", "--model", M, "--tasks", "lm_eval:no_such_task_xyz"],
         ["no_such_task_xyz"]),
    Case("eval-lm-eval-hub-data-offline", ["eval", "--model", M, "--tasks", "lm_eval:arc_easy"],
         ["arc_easy", "offline"], env={"HF_HOME": "@T@/hf"}),
    # ------------------------------------------------------------------ task YAMLs and their data
    Case("task-yaml-syntax-error", EVAL[:4] + ["mytask", "--include_path", "tasks"], ["mytask.yaml", "line"],
         setup=task_dir({"mytask.yaml": "task: mytask\nsuite: recall\ndata: [unclosed\n"})),
    Case("task-yaml-unknown-key", EVAL[:4] + ["mytask", "--include_path", "tasks"], ["mytask.yaml", "colour"],
         setup=task_dir({"mytask.yaml": GOOD_YAML + "colour: red\n", "my.jsonl": GOOD_ROWS})),
    Case("task-yaml-unknown-suite", EVAL[:4] + ["mytask", "--include_path", "tasks"], ["mytask.yaml", "poetry"],
         setup=task_dir({"mytask.yaml": GOOD_YAML.replace("recall", "poetry"), "my.jsonl": GOOD_ROWS})),
    Case("task-yaml-num-fewshot-word", EVAL[:4] + ["mytask", "--include_path", "tasks"], ["num_fewshot", "three"],
         setup=task_dir({"mytask.yaml": GOOD_YAML + "num_fewshot: three\n", "my.jsonl": GOOD_ROWS})),
    Case("task-yaml-bad-metric", EVAL[:4] + ["mytask", "--include_path", "tasks"], ["mytask.yaml", "bleurt_xyz"],
         setup=task_dir({"mytask.yaml": GOOD_YAML + "metric_list: [bleurt_xyz]\n", "my.jsonl": GOOD_ROWS})),
    Case("task-yaml-generation-kwargs-type", EVAL[:4] + ["mytask", "--include_path", "tasks"],
         ["generation_kwargs"],
         setup=task_dir({"mytask.yaml": GOOD_YAML + "generation_kwargs: 12\n", "my.jsonl": GOOD_ROWS})),
    Case("task-data-missing", EVAL[:4] + ["mytask", "--include_path", "tasks"], ["my.jsonl", "does not exist"],
         setup=task_dir({"mytask.yaml": GOOD_YAML})),
    Case("task-data-bad-json", EVAL[:4] + ["mytask", "--include_path", "tasks"], ["my.jsonl:2", "JSON"],
         setup=task_dir({"mytask.yaml": GOOD_YAML, "my.jsonl": '{"q": "a", "a": "b"}\n{"q": \n'})),
    Case("task-template-field-missing", EVAL[:4] + ["mytask", "--include_path", "tasks"], ["'q'"],
         setup=task_dir({"mytask.yaml": GOOD_YAML, "my.jsonl": [{"question": "x", "a": "y"}]})),
    Case("task-data-hub-offline", EVAL[:4] + ["mytask", "--include_path", "tasks"], ["someorg/qa", "unreachable"],
         setup=task_dir({"mytask.yaml": GOOD_YAML.replace("my.jsonl", "hf:someorg/qa")})),
    # ------------------------------------------------------------------ sweep (YAML configs and overrides)
    Case("sweep-unknown-key", ["sweep", "s.yaml"], ["colour"], setup=sweep_cfg(colour="red")),
    Case("sweep-limit-typo", ["sweep", "s.yaml"], ["limit", "capitols"], setup=sweep_cfg(limit={"capitols": 5})),
    Case("sweep-limit-default-nan", ["sweep", "s.yaml"], ["limit.default", "nan"],
         setup=sweep_cfg(limit={"default": float("nan")})),
    Case("sweep-seeds-empty", ["sweep", "s.yaml"], ["seeds", "empty"], setup=sweep_cfg(seeds=[])),
    Case("sweep-seeds-twice", ["sweep", "s.yaml"], ["seeds", "twice"], setup=sweep_cfg(seeds=[0, 0])),
    Case("sweep-seed-word", ["sweep", "s.yaml", "seeds=[zero]"], ["seed", "zero"], setup=sweep_cfg()),
    Case("sweep-sparsity-nan", ["sweep", "s.yaml", "sparsities=[.nan]"], ["sparsity", "nan"], setup=sweep_cfg()),
    Case("sweep-sparsity-inf-override", ["sweep", "s.yaml", "sparsities=[0.3,inf]"], ["sparsity", "inf"],
         setup=sweep_cfg()),
    Case("sweep-owl-only-with-nm", ["sweep", "s.yaml"], ["owl", "2:4", "no cell"],
         setup=sweep_cfg(profiles=["owl"], structures=["2:4"])),
    Case("sweep-empty-sparsities", ["sweep", "s.yaml"], ["empty"], setup=sweep_cfg(sparsities=[])),
    Case("sweep-empty-tasks", ["sweep", "s.yaml"], ["tasks", "empty"], setup=sweep_cfg(tasks=[])),
    Case("sweep-empty-models", ["sweep", "s.yaml"], ["models", "empty"], setup=sweep_cfg(models=[])),
    Case("sweep-model-not-a-name", ["sweep", "s.yaml"], ["models", "123"], setup=sweep_cfg(models=[123])),
    Case("sweep-batch-size-zero", ["sweep", "s.yaml"], ["batch_size", "0"], setup=sweep_cfg(batch_size=0)),
    Case("sweep-log-samples-word", ["sweep", "s.yaml"], ["log_samples", "maybe"], setup=sweep_cfg(log_samples="maybe")),
    Case("sweep-num-fewshot-negative", ["sweep", "s.yaml"], ["num_fewshot", "-2"], setup=sweep_cfg(num_fewshot=-2)),
    Case("sweep-output-path-is-file", ["sweep", "s.yaml"], ["output_path", "afile"], setup=sweep_cfg(output_path="afile")),
    Case("sweep-output-flag-not-writable", ["sweep", "s.yaml", "--output_path", NOT_WRITABLE],
         ["output_path", "writable"], setup=lambda t: (sweep_cfg()(t), _ro(t))),
    Case("sweep-include-path-missing", ["sweep", "s.yaml"], ["include_path", "nowhere"],
         setup=sweep_cfg(include_path="nowhere")),
    Case("sweep-use-cache-is-file", ["sweep", "s.yaml", "--use_cache", "afile"], ["use_cache", "afile"],
         setup=sweep_cfg()),
    Case("sweep-stage-unknown-key", ["sweep", "s.yaml"], ["colour"],
         setup=sweep_cfg(methods=None, sparsities=None, calibration=None, nsamples=None, seqlen=None,
                         interventions=[{"prune": {"method": "wanda", "sparsity": [0.5], "colour": "red"}}])),
    Case("sweep-stage-unknown-kind", ["sweep", "s.yaml"], ["distill"],
         setup=sweep_cfg(methods=None, sparsities=None, calibration=None, nsamples=None, seqlen=None,
                         interventions=[{"distill": {"steps": 3}}])),
    Case("sweep-flat-and-stages", ["sweep", "s.yaml"], ["interventions", "methods"],
         setup=sweep_cfg(interventions=[{"prune": {"method": "wanda", "sparsity": 0.5}}])),
    Case("sweep-unlearn-stage-overlap", ["sweep", "s.yaml"], ["forget", "nonmember", "overlap"],
         setup=sweep_cfg(methods=None, sparsities=None, calibration=None, nsamples=None, seqlen=None,
                         interventions=[{"unlearn": {"method": "grad_diff", "forget": "forget.jsonl",
                                                     "retain": "retain.jsonl", "nonmember": "forget.jsonl",
                                                     "steps": 2, "eval_every": 1}}])),
    Case("sweep-config-not-yaml", ["sweep", "afile"], ["afile", ".yaml"], setup=plain_file),
    Case("sweep-config-missing", ["sweep", "none.yaml"], ["none.yaml", "does not exist"]),
    Case("sweep-config-syntax", ["sweep", "s.yaml"], ["s.yaml", "line"],
         setup=lambda t: (t / "s.yaml").write_text("models: [a\ntasks: x\n")),
    Case("sweep-config-not-mapping", ["sweep", "s.yaml"], ["s.yaml", "mapping"],
         setup=lambda t: (t / "s.yaml").write_text("- a\n- b\n")),
    Case("sweep-override-syntax", ["sweep", "s.yaml", "sparsities"], ["sparsities", "key=value"], setup=sweep_cfg()),
    Case("sweep-testbed-task-typo-no-build", ["sweep", "configs/testbed.yaml", "tasks=[testbed_recal]"],
         ["testbed_recal", "testbed_recall"], setup=copy_configs),
    # ------------------------------------------------------------------ unlearn (flags, YAML, method_args, id files)
    Case("unlearn-steps-zero", UNL[:-6] + ["--steps", "0", "--output_path", "u"], ["steps", "0"], setup=unlearn_sets),
    Case("unlearn-lr-inf", UNL + ["--lr", "inf"], ["lr", "inf"], setup=unlearn_sets),
    Case("unlearn-method-args-nan", UNL + ["--method", "npo", "--method_args", "beta=nan"], ["method_args.beta", "nan"],
         setup=unlearn_sets),
    Case("unlearn-method-args-word", UNL + ["--method", "npo", "--method_args", "beta=big"], ["method_args", "beta", "big"],
         setup=unlearn_sets),
    Case("unlearn-method-args-unknown", UNL + ["--method", "npo", "--method_args", "zeta=1"],
         ["method_args", "zeta"], setup=unlearn_sets),
    Case("unlearn-unknown-method", UNL + ["--method", "forgetful"], ["forgetful", "npo"], setup=unlearn_sets),
    Case("unlearn-eval-every-gt-steps", UNL[:-6] + ["--steps", "4", "--eval_every", "9", "--output_path", "u"],
         ["eval_every", "9"], setup=unlearn_sets),
    Case("unlearn-forget-nonmember-overlap", UNL[:-8] + ["--nonmember", "forget.jsonl", "--steps", "4", "--eval_every",
                                                         "2", "--output_path", "u"],
         ["forget", "nonmember", "overlap"], setup=unlearn_sets),
    Case("unlearn-exposure-alternatives-too-few", UNL + ["exposure_alternatives=1"], ["exposure_alternatives", "1"],
         setup=unlearn_sets),
    Case("unlearn-output-is-file", UNL[:-1] + ["afile"], ["output_path", "afile"],
         setup=lambda t: (unlearn_sets(t), plain_file(t))),
    Case("unlearn-utility-task-unknown", UNL + ["--utility_tasks", "capitols"], ["capitols"], setup=unlearn_sets),
    Case("unlearn-reference-missing", UNL + ["--reference_model", "./noref"], ["./noref"], setup=unlearn_sets),
    Case("unlearn-forget-missing-file", UNL[:3] + ["--forget", "gone.jsonl"] + UNL[5:], ["gone.jsonl"],
         setup=unlearn_sets),
    Case("unlearn-override-first", ["unlearn", "steps=0", "--model", M, "--forget", "forget.jsonl", "--retain",
                                    "retain.jsonl"], ["steps", "0"], setup=unlearn_sets),
    Case("unlearn-config-wrong-type", UNLEARN_CFG + ["forget=[a,b]"], ["forget"], setup=copy_configs),
    Case("unlearn-config-steps-word-no-build", UNLEARN_CFG + ["steps=many"], ["steps", "many"], setup=copy_configs),
    Case("unlearn-ids-file-missing", UNL + ["forget_ids=nope.txt"], ["nope.txt", "does not exist"], setup=unlearn_sets),
    Case("unlearn-ids-file-duplicate", UNL + ["forget_ids=ids.txt"], ["ids.txt", "c1"], setup=ids_file("c1\nc2\nc1\n")),
    Case("unlearn-ids-file-unknown-id", UNL + ["forget_ids=ids.txt"], ["c99"], setup=ids_file("c1\nc99\n")),
    Case("unlearn-ids-file-empty", UNL + ["forget_ids=ids.txt"], ["ids", "no ids"], setup=ids_file("# nothing\n")),
    Case("unlearn-testbed-ids-unknown-no-build", UNLEARN_CFG + ["forget_ids=[canary-nope]"], ["canary-nope"],
         setup=copy_configs),
    # ------------------------------------------------------------------ testbed
    Case("testbed-unknown-preset", ["testbed", "build", "--preset", "huge", "--output", "tb"], ["huge", "tiny"]),
    Case("testbed-config-wrong-type", ["testbed", "build", "--preset", "tiny", "--config", "tb.yaml", "--output", "tb"],
         ["layers", "two"], setup=tb_config("train: {layers: two}\n")),
    Case("testbed-config-float-count", ["testbed", "build", "--preset", "tiny", "--config", "tb.yaml", "--output", "tb"],
         ["n_entities", "1.5"], setup=tb_config("world: {n_entities: 1.5}\n")),
    Case("testbed-config-epochs-nan", ["testbed", "build", "--preset", "tiny", "--config", "tb.yaml", "--output", "tb"],
         ["epochs", "nan"], setup=tb_config("train: {epochs: .nan}\n")),
    Case("testbed-config-bool", ["testbed", "build", "--preset", "tiny", "--config", "tb.yaml", "--output", "tb"],
         ["isolate_documents", "sometimes"], setup=tb_config("train: {isolate_documents: sometimes}\n")),
    Case("testbed-config-list-type", ["testbed", "build", "--preset", "tiny", "--config", "tb.yaml", "--output", "tb"],
         ["assoc_pairs"], setup=tb_config("world: {assoc_pairs: 7}\n")),
    Case("testbed-config-not-mapping", ["testbed", "build", "--preset", "tiny", "--config", "tb.yaml", "--output", "tb"],
         ["train"], setup=tb_config("train: [1, 2]\n")),
    Case("testbed-exclude-missing", ["testbed", "build", "--preset", "tiny", "--exclude", "ex.txt", "--output", "tb"],
         ["ex.txt", "does not exist"]),
    Case("testbed-exclude-unknown-ids", ["testbed", "build", "--preset", "tiny", "--exclude", "ids.txt", "--output",
                                         "tb"], ["canary-nope"], setup=ids_file("canary-nope\n")),
    Case("testbed-output-is-file", ["testbed", "build", "--preset", "tiny", "--output", "afile"], ["--output", "afile"],
         setup=plain_file),
    Case("testbed-output-not-writable", ["testbed", "build", "--preset", "tiny", "--output", NOT_WRITABLE],
         ["--output", "writable"], setup=_ro),
    Case("testbed-seed-negative", ["testbed", "build", "--preset", "tiny", "--seed", "-1", "--output", "tb"],
         ["--seed", "-1"]),
    Case("testbed-threads-zero", ["testbed", "build", "--preset", "tiny", "--threads", "0", "--output", "tb"],
         ["--threads", "0"]),
    # ------------------------------------------------------------------ report / plot (result files)
    Case("report-malformed-results", ["report", "run"], ["results.json", "not a valid results file"],
         setup=results_dir('{"schema_version": 2, "metr')),
    Case("report-old-schema", ["report", "run"], ["results.json", "schema 1"],
         setup=results_dir(json.dumps({"schema_version": 1, "results": {}}))),
    Case("report-results-not-object", ["report", "run"], ["results.json"], setup=results_dir("[1, 2]")),
    Case("report-missing-dir", ["report", "nowhere"], ["nowhere", "does not exist"]),
    Case("report-dir-is-file", ["report", "afile"], ["afile", "not a directory"], setup=plain_file),
    Case("report-no-cells", ["report", "tasks"], ["tasks", "no finished cell"], setup=task_dir({})),
    Case("plot-out-is-file", ["plot", "run", "--out", "afile"], ["--out", "afile"],
         setup=results_dir('{"schema_version": 2}')),
    Case("plot-malformed-results", ["plot", "run"], ["results.json", "not a valid results file"],
         setup=results_dir("{")),
    Case("plot-missing-dir", ["plot", "nowhere"], ["nowhere", "does not exist"]),
    # ------------------------------------------------------------------ validate / export-lm-eval / fetch / ls
    Case("validate-unknown-task", ["validate", "capitols"], ["capitols"]),
    Case("validate-bad-yaml", ["validate", "--include_path", "tasks", "mytask"], ["mytask.yaml", "colour"],
         setup=task_dir({"mytask.yaml": GOOD_YAML + "colour: red\n", "my.jsonl": GOOD_ROWS})),
    Case("validate-include-path-missing", ["validate", "--include_path", "nowhere"], ["--include_path", "nowhere"]),
    Case("export-dir-is-file", ["export-lm-eval", "afile"], ["afile", "not a directory"], setup=plain_file),
    Case("export-unknown-task", ["export-lm-eval", "out", "--tasks", "capitols"], ["capitols"]),
    Case("export-not-exportable", ["export-lm-eval", "out", "--tasks", "famous_passages"], ["famous_passages",
                                                                                             "recall/icl"]),
    Case("export-empty-tasks", ["export-lm-eval", "out", "--tasks", ","], ["--tasks", "empty"]),
    Case("fetch-unknown-preset", ["fetch", "smollm-999"], ["smollm-999", "smollm2-135m"]),
    Case("fetch-one-unknown-of-two", ["fetch", "testbed", "nope"], ["nope"]),
    Case("ls-unknown-what", ["ls", "widgets"], ["widgets"]),
    Case("ls-include-path-missing", ["ls", "tasks", "--include_path", "nowhere"], ["--include_path", "nowhere"]),
]


def _tree(root: Path) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def _sub(arg: str, tmp: Path) -> str:
    return str(arg).replace(M, str(_MODEL[0])).replace("@T@", str(tmp))


def test_the_table_is_wide():
    """At least 60 cases, and every subcommand has some."""
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
    from llmmem.cli import COMMANDS, build_parser

    build_parser()
    covered = {c.argv[0] for c in CASES}
    assert set(COMMANDS) <= covered, set(COMMANDS) - covered


def _prepare(case: Case, tmp_path: Path, llama_dir) -> tuple[Path, dict]:
    _MODEL[:] = [llama_dir]
    work = tmp_path / "work"
    work.mkdir()
    if case.setup:
        case.setup(work)
    env = {"LLMMEM_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}  # home not created: a write shows up
    env.update({k: _sub(v, work) for k, v in case.env.items()})
    return work, env


@pytest.fixture
def fresh_logging():
    """cli.main configures logging to stderr as it would in a fresh process (pytest's own handlers set aside)."""
    import logging

    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers[:] = []
    yield
    root.handlers[:] = saved
    root.setLevel(level)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, llama_dir, monkeypatch, capfd, fresh_logging):
    from llmmem import presets
    from llmmem.cli import main

    work, env = _prepare(case, tmp_path, llama_dir)
    for k in [k for k in os.environ if k.startswith("LLMMEM_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(work)
    presets.hub_reachable.cache_clear()
    before = _tree(tmp_path)
    t0 = time.monotonic()
    try:
        rc = main([_sub(a, work) for a in case.argv])
    except SystemExit as e:  # argparse
        rc = e.code
    seconds = time.monotonic() - t0
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, f"exit {rc}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{err[-3000:]}"
    for needle in case.needles:
        assert _sub(needle, work) in lines[0], f"{needle!r} not in: {lines[0]}"
    assert _tree(tmp_path) == before, "the command created or changed files"
    assert seconds < case.seconds, f"{seconds:.1f}s before the error (limit {case.seconds}s)"


# ----------------------------------------------------------------------------- presets not built yet
FRESH = [
    # (argv, expected exit code, a needle in stderr (exit 2) or stdout (exit 0))
    (["eval", "--model", "testbed", "--tasks", "testbed_recall", "--output_path", "afile"], 2, "--output_path afile"),
    (["eval", "--model", "testbed-tiny", "--tasks", "testbed_recall,testbed_canaries", "--limit", "5",
      "--output_path", "afile"], 2, "--output_path afile"),
    (["eval", "--model", "testbed", "--tasks", "testbed_recal"], 2, "testbed_recall"),
    (["unlearn", "configs/unlearn-testbed.yaml", "output_path=afile"], 2, "output_path afile"),
    (["sweep", "configs/testbed.yaml", "--dry_run"], 0, "preset testbed is not built yet"),
]


@pytest.mark.parametrize("argv,code,needle", FRESH, ids=[" ".join(a[:3]) for a, _, _ in FRESH])
def test_testbed_commands_validate_from_an_empty_home(argv, code, needle, tmp_path, monkeypatch, capfd,
                                                       fresh_logging):
    """The README's testbed commands know the testbed's tasks before it is built: from an empty LLMMEM_HOME they
    get past task validation (to the next check, or a dry run's plan) without building anything."""
    from llmmem import presets
    from llmmem.cli import main

    work = tmp_path / "work"
    work.mkdir()
    copy_configs(work)
    plain_file(work)
    for k in [k for k in os.environ if k.startswith("LLMMEM_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("LLMMEM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(work)
    presets.hub_reachable.cache_clear()
    t0 = time.monotonic()
    rc = main(argv)
    out, err = capfd.readouterr()
    assert rc == code, err[-3000:]
    assert needle in (err if code else out), (out + err)[-3000:]
    assert "Traceback" not in err
    assert not (tmp_path / "home" / "models").exists(), "a preset was built during validation"
    assert time.monotonic() - t0 < 10


def test_lm_eval_task_with_datasets_offline_is_one_quick_line(tmp_path, monkeypatch):
    """HF_DATASETS_OFFLINE=1 (the hub itself reachable): a hub dataset not in the cache is refused at once."""
    pytest.importorskip("lm_eval")
    from llmmem import presets
    from llmmem.config import ConfigError
    from llmmem.lmeval import precheck

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(presets, "hub_reachable", lambda *a, **k: True)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="arc_easy.*not available offline"):
        precheck("arc_easy")
    assert time.monotonic() - t0 < 5
