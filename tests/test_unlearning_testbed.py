"""Done-when check of the RMU and IdkDPO methods on a testbed that memorizes canaries: extraction of the forget
canaries goes from >= 0.9 to <= 0.1 while closed-book recall of the retain facts keeps >= 0.8 of its value.

The tiny preset memorizes no canary (its secrets are 10 digits, written at most 16 times), so the test trains
a tiny variant whose 4-digit secrets are written up to 64 times. The methods run through the shared loop
(``llmmem.unlearning.loop.unlearn``: the method hooks ``prepare``, ``forget_batch``/``retain_batch``,
``trainable_parameters``, ``loss``), as ``llmmem unlearn`` and sweeps run them. The numbers on the `small`
testbed through ``llmmem unlearn`` are in configs/unlearn/testbed-*.yaml.

Marked ``long`` (``pytest -m long``; not in CI): 104 s here on 2 CPU cores shared with other jobs (load ~6), 85 s
of it building the variant testbed, ~5 s per method. Measured (seed 0): RMU canary extraction 1.00 -> 0.00,
closed-book recall 0.175 -> 0.158 (0.90 of it); IdkDPO 1.00 -> 0.00, recall 0.175 -> 0.167 (0.95).
"""

import pytest
import torch

from llmmem.backends.base import GenerateRequest
from llmmem.unlearning.data import load_examples, tokenize

pytestmark = pytest.mark.long  # minutes on 2 shared CPU cores: not in CI (see the module docstring)

VARIANT = {"train": {"epochs": 8.0}, "world": {"max_dup": 64, "secret_digits": 4, "n_assoc": 200, "n_copy": 100,
                                              "n_override": 100, "n_openbook": 50, "n_classify": 20}}


@pytest.fixture(scope="module")
def memorizing_testbed(tmp_path_factory):
    from llmmem.testbed.train import build_testbed, preset_config

    return build_testbed(tmp_path_factory.mktemp("tbv") / "tiny-canaries", preset="tiny", seed=0, quiet=True,
                         config=preset_config("tiny", VARIANT))


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmmem.backends.hf import HFBackend
    from llmmem.models import wrap_model

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, HFBackend(wrap_model(model, tok, "tbv"), batch_size=64, quiet=True), tok


def _extracted(backend, examples) -> list[bool]:
    gens = backend.generate([GenerateRequest(context_ids=e.prefix_ids, max_gen_toks=len(e.suffix_ids)) for e in examples])
    return [g.token_ids[: len(e.suffix_ids)] == e.suffix_ids for g, e in zip(gens, examples)]


def unlearn_and_measure(path, name: str, method_args: dict, lr: float, steps: int, batch: int = 8, seed: int = 0):
    """The method through the shared loop (``llmmem.unlearning.loop.unlearn``, what ``llmmem unlearn`` and
    sweeps run: its hooks, AdamW, clipping at 1.0), extraction measured before and after."""
    from llmmem.unlearning.loop import unlearn
    from llmmem.unlearning.spec import UnlearnSpec

    torch.manual_seed(seed)
    model, backend, tok = _load(path)
    include = str(path / "tasks")
    groups = {"group": ["dup032", "dup064"]}
    forget = load_examples("testbed_canaries", include, filt=groups)
    retain = load_examples("testbed_recall", include)
    for s in (forget, retain):
        tokenize(s, backend)
    before_f, before_r = _extracted(backend, forget), _extracted(backend, retain)
    spec = UnlearnSpec(forget="testbed_canaries", forget_filter=groups, retain="testbed_recall", method=name,
                       method_args=method_args, steps=steps, lr=lr, batch_size=batch, weight_decay=0.0,
                       eval_every=steps, grad_norm_steps=0)
    report = unlearn(model, spec, forget, retain, tokenizer=tok, device="cpu", seed=seed)
    after_f, after_r = _extracted(backend, forget), _extracted(backend, retain)
    kept = sum(a for a, b in zip(after_r, before_r) if b) / max(1, sum(before_r))
    return {"forget_before": sum(before_f) / len(forget), "forget_after": sum(after_f) / len(forget),
            "retain_before": sum(before_r) / len(retain), "retain_after": sum(after_r) / len(retain),
            "retain_kept": kept, "seconds": report["seconds"]}


@pytest.mark.parametrize("name,args,lr,steps", [
    ("rmu", {"layer": 1, "steering_coeff": 20.0, "alpha": 10.0}, 1e-4, 30),
    ("idk_dpo", {"alpha": 5.0}, 3e-4, 40),
])
def test_forget_canaries_keep_facts(memorizing_testbed, name, args, lr, steps):
    r = unlearn_and_measure(memorizing_testbed, name, args, lr, steps)
    print(f"\n{name}: {r}")  # the measured figures (pytest -s), recorded in the module docstring
    assert r["forget_before"] >= 0.9, r
    assert r["forget_after"] <= 0.1, r
    assert r["retain_after"] >= 0.8 * r["retain_before"], r  # the runner's utility_retained ratio
