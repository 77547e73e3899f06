"""Cells as a model plus a chain of interventions: one identity whichever command built the cell, chains in
sweeps (product of stages, every prefix a cell, shared prefixes restored not recomputed), reports labelled by
the chain, the old layout refused, and the layering rule (interventions never import suites or backends)."""

import ast
import json
from pathlib import Path

import pytest
import yaml

from conftest import cli_error, run_cli
from llmmem.cells import Cell, EvalSpec
from llmmem.config import ConfigError, model_spec_from_args
from llmmem.interventions import Step, chain_label, expand_stages, with_prefixes
from llmmem.pruning.spec import PruneSpec

ROOT = Path(__file__).resolve().parent.parent


def _cells(run: Path) -> dict:
    return {str(p.parent.relative_to(run)): json.loads(p.read_text()) for p in sorted(run.rglob("results.json"))}


def test_same_cell_same_hash_whichever_command(tmp_path, llama_dir, capsys, monkeypatch):
    """`llmmem eval` then a one-method sweep into the same run directory: 3 cells, not 4 (the dense cell is shared)."""
    run = tmp_path / "run"
    assert run_cli(["eval", "--model", llama_dir, "--tasks", "capitals", "--limit", "4", "--output_path", run,
                    "--quiet", "--seed", "0"]) == 0
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump({"models": [str(llama_dir)], "methods": ["magnitude"], "sparsities": [0.3, 0.6],
                                   "tasks": ["capitals"], "limit": 4, "output_path": str(run)}))
    assert run_cli(["sweep", cfg, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "plan: 3 cells, 1 already done" in out
    assert len(_cells(run)) == 3
    # the same config built in Python gives the same name
    cell = Cell(model_spec_from_args(str(llama_dir), ""), (), EvalSpec(tasks=["capitals"], limit=4), 0)
    assert (run / cell.name() / "results.json").is_file()
    # and a relative path to the same model is the same model
    monkeypatch.chdir(Path(llama_dir).parent)
    rel = Cell(model_spec_from_args(Path(llama_dir).name, ""), (), EvalSpec(tasks=["capitals"], limit=4), 0)
    assert rel.key() == cell.key()


def test_identity_ignores_what_does_not_change_numbers():
    m = model_spec_from_args("smollm2-135m", "")
    a = Cell(m, (), EvalSpec(tasks=["capitals"]), 0)
    b = Cell(model_spec_from_args("smollm2-135m", "device=cpu,offload=true"), (), EvalSpec(tasks=["capitals"]), 0)
    assert a.key() == b.key()  # device / offload do not change a number
    assert a.key() != Cell(model_spec_from_args("smollm2-135m", "dtype=bfloat16"), (), a.eval, 0).key()
    assert a.key() != Cell(m, (), EvalSpec(tasks=["capitals"], limit=10), 0).key()
    assert a.key() != Cell(m, (), a.eval, 1).key()
    step = Step("prune", PruneSpec("wanda", 0.5))
    c = Cell(m, (step,), a.eval, 0)
    assert c.name() == f"smollm2-135m/wanda-unstructured-s0.5-{c.key()}"
    d = c.describe()["steps"][0]
    assert d["spec"] == {k: v for k, v in step.canonical().items() if k != "kind"}
    assert (d["kind"], d["label"], d["series"], d["axis"], d["axis_value"], d["axis_base"]) == \
        ("prune", "wanda-unstructured-s0.5", "wanda", "sparsity", 0.5, 0.0)
    assert c.weights_key() == Cell(m, (step,), EvalSpec(tasks=["other"]), 0).weights_key()  # eval is not weights


def test_stages_expand_to_chains_with_every_prefix():
    stages = [[{"unlearn": {"method": "npo", "forget": "f.jsonl", "retain": "r.jsonl", "steps": [5, 10],
                            "eval_every": 5}}, "none"],
              {"prune": {"method": ["magnitude", "wanda"], "sparsity": 0.5}}]
    chains, warnings = expand_stages(stages)
    assert warnings == []
    labels = [chain_label(c) for c in with_prefixes(chains)]
    assert labels == ["dense", "npo-5steps", "npo-5steps+magnitude-unstructured-s0.5",
                      "npo-5steps+wanda-unstructured-s0.5", "npo-10steps", "npo-10steps+magnitude-unstructured-s0.5",
                      "npo-10steps+wanda-unstructured-s0.5", "magnitude-unstructured-s0.5", "wanda-unstructured-s0.5"]


@pytest.mark.parametrize("stages,needle", [
    ("wanda", "must be a list of stages"),
    ([{"prune": {"method": "wanda", "sparsity": 0.5}, "unlearn": {}}], "a stage is one mapping"),
    ([{"compress": {}}], "unknown intervention 'compress'"),
    ([{"prune": {"method": "wanda", "sparsity": 0.5, "sparsty": 0.3}}], "unknown key(s) sparsty"),
    ([{"prune": {"method": "wanda", "sparsity": []}}], "sparsity is an empty list"),
    ([{"prune": {"method": ["wanda"], "structure": ["2:4"], "profile": ["owl"]}}], "profile owl makes no cell"),
    ([{"unlearn": {"method": "npo", "forget": "f.jsonl", "retain": "r.jsonl", "lr": float("nan")}}], "lr=nan"),
])
def test_bad_stages(stages, needle):
    with pytest.raises(ConfigError, match=None) as e:
        expand_stages(stages)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_incompatible_combinations_are_dropped_visibly():
    chains, warnings = expand_stages([{"prune": {"method": "wanda", "sparsity": [0.5], "structure": ["unstructured", "2:4"],
                                                 "profile": ["uniform", "owl"]}}])
    assert [chain_label(c) for c in chains] == ["wanda-unstructured-s0.5", "wanda-unstructured-s0.5-owl",
                                                "wanda-2of4-s0.5"]
    assert warnings and "profile=owl cannot be combined with structure 2:4" in warnings[0]


def _chain_cfg(tmp_path, model, out, stages, **over):
    cfg = {"models": [str(model)], "interventions": stages, "tasks": ["testbed_recall", "testbed_canaries"],
           "limit": 8, "batch_size": 8, "output_path": str(out)}
    cfg.update(over)
    p = tmp_path / f"{out.name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


UNLEARN = {"unlearn": {"method": "grad_diff", "forget": "testbed_canaries", "forget_filter": {"group": ["dup016"]},
                       "retain": "testbed_recall", "steps": 4, "lr": 1e-3, "eval_every": 2}}


def test_chain_sweep_unlearn_then_prune(tmp_path, tiny_testbed, capsys):
    """unlearn x prune: every prefix is a cell, the unlearned weights are computed once and restored, and a
    chain cell equals the same chain run alone; reports label cells by their chain."""
    run = tmp_path / "run"
    cfg = _chain_cfg(tmp_path, tiny_testbed, run, [UNLEARN, {"prune": {"method": "magnitude", "sparsity": [0.3, 0.6]}}])
    assert run_cli(["sweep", cfg, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "plan: 4 cells" in out  # dense, unlearn, unlearn+0.3, unlearn+0.6
    cells = _cells(run)
    labels = sorted(d["cell"]["label"] for d in cells.values())
    assert labels == ["dense", "grad_diff-4steps", "grad_diff-4steps+magnitude-unstructured-s0.3",
                      "grad_diff-4steps+magnitude-unstructured-s0.6"]
    u = next(d for d in cells.values() if d["cell"]["label"] == "grad_diff-4steps")
    assert u["unlearning"]["method"] == "grad_diff" and "steps_to_forget" in u["unlearning"]
    assert (run / next(k for k, d in cells.items() if d is u) / "curves.jsonl").is_file()
    chained = [d for d in cells.values() if "+" in d["cell"]["label"]]
    for d in chained:
        assert d["interventions"][0] == {"kind": "unlearn", "label": "grad_diff-4steps",
                                         "report": d["interventions"][0]["report"]}
        assert d["interventions"][0]["report"]["steps"] == 4  # the restored step's report is kept
        assert d["unlearning"]["steps"] == 4 and abs(d["pruning"]["measured_sparsity"] - d["pruning"]["target_sparsity"]) < 0.01
    # the 0.6 cell run on its own (unlearning recomputed in a fresh process state) gives the same numbers
    alone = tmp_path / "alone"
    cfg2 = _chain_cfg(tmp_path, tiny_testbed, alone, [UNLEARN, {"prune": {"method": "magnitude", "sparsity": 0.6}}])
    assert run_cli(["sweep", cfg2, "--quiet"]) == 0
    a = {d["cell"]["label"]: d["metrics"] for d in _cells(alone).values()}
    b = {d["cell"]["label"]: d["metrics"] for d in cells.values()}
    assert a["grad_diff-4steps+magnitude-unstructured-s0.6"] == b["grad_diff-4steps+magnitude-unstructured-s0.6"]
    report = (run / "report.md").read_text()
    assert "| grad_diff-4steps |" in report.replace(" | dense | ", " | ") or "grad_diff-4steps" in report
    assert "dense-unstructured" not in report


def test_unlearning_cells_labelled_by_method_in_reports(tmp_path, tiny_testbed, capsys):
    from llmmem.report import load_run

    cfg = tmp_path / "ul.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(tiny_testbed), "forget": "testbed_canaries",
                                   "forget_filter": {"group": ["dup016"]}, "retain": "testbed_recall", "method": "npo",
                                   "steps": 2, "eval_every": 2, "output_path": str(tmp_path / "ul")}))
    assert run_cli(["unlearn", cfg, "--quiet"]) == 0
    (c,) = load_run(tmp_path / "ul")
    assert c["label"] == "npo-2steps" and c["kind"] == "unlearn" and c["series"] == "npo"
    assert run_cli(["report", tmp_path / "ul"]) == 0
    assert "npo-2steps" in capsys.readouterr().out


def test_old_layout_is_refused(tmp_path, llama_dir, capsys):
    run = tmp_path / "old"
    old = run / "tiny-llama" / "dense-unstructured-s0-12345678"
    old.mkdir(parents=True)
    (old / "results.json").write_text(json.dumps({"schema_version": 1, "results": {}}))
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump({"models": [str(llama_dir)], "methods": [], "tasks": ["capitals"], "limit": 4,
                                   "output_path": str(run)}))
    cli_error(capsys, ["sweep", cfg], "schema 1", "new output_path")
    cli_error(capsys, ["report", run], "schema 1", "new output directory")


def test_run_directory_refuses_other_settings(tmp_path, llama_dir, capsys):
    run = tmp_path / "run"
    base = {"models": [str(llama_dir)], "methods": [], "tasks": ["capitals"], "limit": 4, "output_path": str(run)}
    cfg = tmp_path / "a.yaml"
    cfg.write_text(yaml.safe_dump(base))
    assert run_cli(["sweep", cfg, "--quiet"]) == 0
    cfg.write_text(yaml.safe_dump(dict(base, limit=5)))
    cli_error(capsys, ["sweep", cfg], "other settings", "limit")


def test_report_shows_cells_of_other_settings_apart(tmp_path, llama_dir, capsys):
    run = tmp_path / "run"
    for lim in ("4", "5"):
        assert run_cli(["eval", "--model", llama_dir, "--tasks", "capitals", "--limit", lim, "--output_path", run,
                        "--quiet"]) == 0
    assert run_cli(["report", run]) == 0
    out = capsys.readouterr().out
    assert "evaluation settings A" in out and "evaluation settings B" in out
    assert out.count("| task | metric | dense |") == 4  # two groups x (absolute, normalised), never two dense columns


LAYER_RULES = {
    # an intervention never imports a suite, a backend or the evaluation side
    "intervention": (["llmmem/interventions", "llmmem/pruning", "llmmem/unlearning", "llmmem/quantization"],
                     ("llmmem.suites", "llmmem.backends", "llmmem.evaluation", "llmmem.tracking", "llmmem.lmeval",
                      "llmmem.runner", "llmmem.sweep")),
    # a suite never imports an intervention
    "suite": (["llmmem/suites"], ("llmmem.interventions", "llmmem.pruning", "llmmem.unlearning", "llmmem.quantization",
                                  "llmmem.runner")),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


@pytest.mark.parametrize("rule", sorted(LAYER_RULES))
def test_layering(rule):
    dirs, forbidden = LAYER_RULES[rule]
    bad = []
    for d in dirs:
        for f in sorted((ROOT / d).rglob("*.py")):
            for mod in _imports(f):
                if any(mod == x or mod.startswith(x + ".") for x in forbidden):
                    bad.append(f"{f.relative_to(ROOT)} imports {mod}")
    assert not bad, bad


def test_layering_check_can_fail(tmp_path):
    """The import reader sees a forbidden import (so the rule above is not vacuous)."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from llmmem.backends.base import GenerateRequest\n")
    assert "llmmem.backends.base" in _imports(f)


# ----------------------------------------------------------------------------- quantization as an intervention
def _max_distinct_per_group(w, group):
    import torch

    rows, cols = w.shape
    g = w.reshape(rows, cols // group, group)
    return max(len(torch.unique(g[r, j])) for r in range(rows) for j in range(cols // group))


def test_quantize_cli_checkpoint_has_at_most_16_values_per_group(tmp_path, llama_dir, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "q4"
    assert run_cli(["quantize", "--model", llama_dir, "--method", "rtn", "--bits", "4", "--group_size", "32",
                    "--output", out, "--quiet"]) == 0, capsys.readouterr().err
    assert "16 values per group" in capsys.readouterr().out
    state = load_file(str(out / "model.safetensors"))
    linears = [k for k in state if ".layers." in k and k.endswith("proj.weight")]
    assert len(linears) == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    assert all(_max_distinct_per_group(state[k], 32) <= 16 for k in linears)
    assert any(_max_distinct_per_group(state[k], 32) == 16 for k in linears)  # the grid is used, not collapsed
    dense = load_file(str(Path(llama_dir) / "model.safetensors"))
    assert all(state[k].equal(dense[k]) for k in state if k not in linears)  # embeddings, norms, head untouched
    doc = json.loads((out / "quantization.json").read_text())
    assert doc["bits"] == 4 and doc["group_size"] == 32 and doc["max_distinct_per_group"] <= 16
    assert doc["effective_bits"] == pytest.approx(4 + 16 / 32)
    assert set(doc["per_linear"]) and all("rel_error" in v for v in doc["per_linear"].values())
    cell = json.loads((out / "llmmem_cell.json").read_text())
    assert cell["cell"]["label"] == "rtn-w4g32"


@pytest.mark.parametrize("args,needle", [
    (["--method", "awq"], "method='awq'"),
    (["--method", "rtn", "--bits", "5"], "bits='5' is not supported"),
    (["--method", "rtn", "--group_size", "0"], "group_size"),
    (["--method", "rtn", "--act_order", "true"], "act_order=true applies to method gptq only"),
    (["--method", "gptq", "--dampening_frac", "nan"], "dampening_frac"),
    (["--method", "rtn", "--format", "gguf"], "--format='gguf'"),
])
def test_quantize_bad_input(tmp_path, llama_dir, capsys, args, needle):
    cli_error(capsys, ["quantize", "--model", llama_dir, *args, "--output", tmp_path / "q"], needle)
    assert not (tmp_path / "q").exists()


def test_chain_sweep_prune_then_quantize(tmp_path, llama_dir, capsys):
    """prune x quantize in one sweep: sparse + quantized cells keep the pruned zeros, and their reports say so."""
    run = tmp_path / "run"
    cfg = tmp_path / "pq.yaml"
    cfg.write_text(yaml.safe_dump({
        "models": [str(llama_dir)], "tasks": ["capitals"], "limit": 4, "output_path": str(run),
        "interventions": [{"prune": {"method": "magnitude", "sparsity": 0.5}},
                          {"quantize": {"method": "rtn", "bits": [8, 4], "group_size": 32}}]}))
    assert run_cli(["sweep", cfg, "--quiet"]) == 0, capsys.readouterr().err
    cells = {d["cell"]["label"]: d for d in _cells(run).values()}
    assert sorted(cells) == ["dense", "magnitude-unstructured-s0.5", "magnitude-unstructured-s0.5+rtn-w4g32",
                             "magnitude-unstructured-s0.5+rtn-w8g32"]
    for bits in (8, 4):
        q = cells[f"magnitude-unstructured-s0.5+rtn-w{bits}g32"]
        rep = q["quantization"]
        assert rep["bits"] == bits and rep["zeros_preserved"] >= rep["zeros_before"] > 0
        assert q["pruning"]["measured_sparsity"] == pytest.approx(0.5, abs=0.01)
        assert q["cell"]["steps"][1]["axis"] == "bits" and q["cell"]["steps"][1]["axis_value"] == bits
    from llmmem.report import load_run

    series = {c["series"] for c in load_run(run) if c["kind"] == "quantize"}
    assert series == {"magnitude-unstructured-s0.5 -> rtn g32"}


def test_chain_sweep_unlearn_then_quantize(tmp_path, tiny_testbed, capsys):
    run = tmp_path / "run"
    cfg = _chain_cfg(tmp_path, tiny_testbed, run, [UNLEARN, {"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}])
    assert run_cli(["sweep", cfg, "--quiet"]) == 0, capsys.readouterr().err
    labels = sorted(d["cell"]["label"] for d in _cells(run).values())
    assert labels == ["dense", "grad_diff-4steps", "grad_diff-4steps+rtn-w4g32"]


def test_plugin_quantize_argument():
    from llmmem.lm_eval_plugin import parse_interventions

    chain = parse_interventions({"prune": "wanda:0.5", "quantize": "gptq:4:64", "calibration": "self"})
    assert [s.kind for s in chain] == ["prune", "quantize"]
    q = chain[1].spec
    assert (q.method, q.bits, q.group_size, q.calibration) == ("gptq", 4, 64, "self")
    with pytest.raises(ConfigError, match="quantize='rtn:5'"):
        parse_interventions({"quantize": "rtn:5"})
