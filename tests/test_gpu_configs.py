"""configs/gpu/: every config parses and validates with llmmem's own loaders, without loading a model or touching
the network, and opens with the command that runs it.

Each config's first line is ``# llmmem <command> configs/gpu/<its file> ...``; the command picks the loader:
``sweep`` -> ``load_sweep_spec`` + the plan (cells, Slurm array tasks) + submitit's own check of the Slurm
parameters; ``unlearn`` -> ``load_unlearn_config`` + the unlearning sets (offline task files); ``durability`` ->
``load_durability`` + ``build_sweep`` (its cells) + the forget ids against the GPU testbed's world;
``testbed build`` -> the testbed's ``preset_config``.

Not validated here (they need the network, a GPU or a built model): that the hub models and the hub tasks'
datasets and the C4 calibration set load, that the testbed tasks (shipped inside a built testbed) resolve, and
the time and memory estimates in the headers (no GPU was available to measure them)."""

import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
GPU = ROOT / "configs" / "gpu"
CONFIGS = sorted(GPU.glob("*.yaml"))
COMMAND = re.compile(r"^# (llmmem (sweep|unlearn|durability|testbed build)\b.*)$")


@pytest.fixture(autouse=True)
def _in_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs name files relative to the checkout (forget ids)


def header(path: Path) -> list[str]:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


def command(path: Path) -> tuple[str, list[str]]:
    """(subcommand, argv after it) of the config's first line."""
    first = header(path)[0] if header(path) else ""
    m = COMMAND.match(first)
    assert m, f"{path.name}: the first line must be '# llmmem <command> configs/gpu/{path.name} ...', got {first!r}"
    argv = m.group(1).split()
    sub = m.group(2)
    return sub, argv[1 + len(sub.split()):]


def test_the_gpu_configs_are_there():
    names = {p.name for p in CONFIGS}
    for want in ("pythia-1.4b-prune.yaml", "pythia-6.9b-prune.yaml", "llama2-7b-prune.yaml",
                 "pythia-1.4b-prune-workers.yaml", "unlearn-pythia-1.4b.yaml", "durability-testbed-gpu.yaml",
                 "testbed-gpu.yaml"):
        assert want in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_header_names_its_command_and_estimates(path):
    sub, argv = command(path)
    rel = f"configs/gpu/{path.name}"
    assert rel in argv, f"{path.name}: its command must name {rel}"
    text = "\n".join(header(path))
    # how it is launched on Slurm, and the time/memory figures marked as estimates
    assert re.search(r"sbatch|executor: slurm|salloc", text) or "executor: slurm" in path.read_text()
    assert "ESTIMATE" in text
    assert re.search(r"\bGB\b", text) and re.search(r"\b(min|minutes|h|hours|GPU-hours)\b", text)
    if sub == "sweep":
        assert "llmmem sweep --status" in text


def _sweeps():
    return [p for p in CONFIGS if command(p)[0] == "sweep"]


@pytest.mark.parametrize("path", _sweeps(), ids=lambda p: p.name)
def test_sweep_config_validates_and_plans(path, tmp_path):
    from llmmem.evaluation import check_tasks, resolve_tasks
    from llmmem.executors import SLURM_KEYS, SLURM_OWN_KEYS, group_units, make_units
    from llmmem.sweep import load_sweep_spec, plan

    spec = load_sweep_spec(str(path))
    assert not spec.warnings
    for entry in spec.models:
        assert entry.spec.device == "cuda" and entry.spec.dtype == "float16"
    # every task is known; the offline ones' data is checked too (hub datasets need the network)
    tasks = resolve_tasks(spec.eval.tasks, None)
    offline = [t for t in tasks if "hub" not in (t.raw.get("tag") or [])]
    assert len(offline) < len(tasks)
    check_tasks(offline, spec.eval.limit_for)
    # the plan: dense + 3 methods x 8 sparsities unstructured + 3 methods at 2:4
    cells = plan(spec, tmp_path / "run")
    assert len(cells) == 28 and not any(c.done for c in cells)
    assert sum(not c.cell.chain for c in cells) == 1
    ex = spec.executor
    if ex.kind == "slurm":
        raw = yaml.safe_load(path.read_text())["slurm"]
        assert set(raw) <= set(SLURM_KEYS) | set(SLURM_OWN_KEYS)
        assert ex.slurm["gpus_per_node"] >= 1 and ex.slurm["time_min"] >= 60 and ex.slurm["mem_gb"] >= 32
        # the array tasks the header announces: whole units of one model, at least cells_per_task cells each
        groups = group_units(make_units(cells), ex.cells_per_task)
        n = -(-28 // ex.cells_per_task)
        assert len(groups) == n
        assert re.search(rf"\b{n} tasks\b", "\n".join(header(path)))
        # submitit itself checks every parameter name llmmem passes (its Slurm executor's, here without Slurm)
        submitit = pytest.importorskip("submitit")
        from llmmem.executors import _submitit_executor

        executor = _submitit_executor(replace(ex, slurm={**ex.slurm, "cluster": "debug"}), tmp_path / "submitit")
        assert isinstance(executor, submitit.AutoExecutor)
        assert executor.parameters["gpus_per_node"] == ex.slurm["gpus_per_node"]
    else:
        assert ex.kind == "local" and ex.workers and ex.workers >= 2


def test_workers_variant_plans_the_same_cells(tmp_path):
    """The local multi-GPU variant is the same sweep: same cells, same output path (either finishes the other)."""
    from llmmem.sweep import load_sweep_spec, plan

    a = load_sweep_spec(str(GPU / "pythia-1.4b-prune.yaml"))
    b = load_sweep_spec(str(GPU / "pythia-1.4b-prune-workers.yaml"))
    assert a.output_path == b.output_path
    assert a.executor.kind == "slurm" and b.executor.kind == "local" and b.executor.workers == 4
    assert [c.cell.name() for c in plan(a, tmp_path)] == [c.cell.name() for c in plan(b, tmp_path)]


@pytest.mark.parametrize("path", [p for p in CONFIGS if command(p)[0] == "unlearn"], ids=lambda p: p.name)
def test_unlearn_config_validates(path):
    from llmmem.evaluation import check_tasks, resolve_tasks
    from llmmem.interventions import PrepareEnv, get
    from llmmem.interventions.unlearn import load_sets
    from llmmem.unlearning.spec import load_unlearn_config

    uc = load_unlearn_config(str(path))
    spec = uc.spec
    assert uc.model.device == "cuda" and uc.model.dtype == "float32"  # bf16 autocast over float32 master weights
    assert spec.precision == "bf16" and spec.gradient_checkpointing and spec.grad_accum >= 2
    # the forget / retain / never-seen sets (offline task files), disjoint; the utility tasks and their data
    get("unlearn").prepare(spec, PrepareEnv(include_path=None, model=uc.model.name))
    forget, retain, nonmember = load_sets(spec, None)
    assert len(forget) >= 50 and retain and len(nonmember) >= 50
    check_tasks(resolve_tasks(spec.utility_tasks, None), lambda _t: spec.utility_limit)
    # the memory table and the multi-GPU (FSDP 2) launch line
    text = "\n".join(header(path))
    assert "accelerate launch" in text and "--fsdp_version 2" in text and "-m llmmem.cli unlearn" in text
    for model in ("Pythia-1.4B", "Pythia-6.9B", "Llama-2-7B"):
        assert re.search(rf"^#\s+{re.escape(model)}\s+[\d.]+e9\s+[\d.]+\s+GB", text, re.M), model


def _testbed_config(path: Path):
    from llmmem.testbed.train import preset_config

    sub, argv = command(path)
    assert sub == "testbed build"
    preset = argv[argv.index("--preset") + 1] if "--preset" in argv else "small"
    return preset_config(preset, yaml.safe_load(path.read_text())), argv[argv.index("--output") + 1]


@pytest.mark.parametrize("path", [p for p in CONFIGS if command(p)[0] == "testbed build"], ids=lambda p: p.name)
def test_testbed_config_validates(path):
    cfg, _ = _testbed_config(path)
    assert cfg.device == "cuda" and cfg.layers > 2


@pytest.mark.parametrize("path", [p for p in CONFIGS if command(p)[0] == "durability"], ids=lambda p: p.name)
def test_durability_config_validates(path):
    """load_durability + its sweep (every intervention spec, the cells) and the forget ids against the world of
    the GPU testbed it runs on. The testbed's tasks ship inside the built model, so they are not resolved here."""
    from llmmem.durability import build_sweep, load_durability
    from llmmem.interventions import with_prefixes
    from llmmem.testbed.world import build_world

    spec = load_durability(str(path))
    assert spec.retrained == "auto" and spec.model.device == "cuda"
    # the model is the testbed built by the testbed config its header runs first
    text = "\n".join(header(path))
    tb = GPU / "testbed-gpu.yaml"
    assert f"--config configs/gpu/{tb.name}" in text
    cfg, output = _testbed_config(tb)
    assert spec.model.name == output
    sweep = build_sweep(spec, Path(spec.model.name), Path("retrained-placeholder"))
    counts = [len(with_prefixes(sweep.chains_for(e))) for e in sweep.models]
    assert counts == [70, 26] and not sweep.warnings
    assert re.search(r"= 70\b", text) and re.search(r"= 26: 96 cells", text)
    world = build_world(0, cfg.world)
    canaries = {c["id"]: c for c in world.canaries}
    dups = sorted(canaries[i]["dup"] for i in spec.forget_ids)
    assert all(i in canaries and canaries[i]["member"] for i in spec.forget_ids)
    assert dups == sorted([4, 8, 16, 32, 64] * 8)
