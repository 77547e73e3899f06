"""Done-when check of the RMU and IdkDPO methods on a testbed that memorizes canaries: extraction of the forget
canaries goes from >= 0.9 to <= 0.1 while closed-book recall of the retain facts keeps >= 0.8 of its value.

The tiny preset memorizes no canary (its secrets are 10 digits, written at most 16 times), so the test trains
a tiny variant whose 4-digit secrets are written up to 64 times (~10 s on one core). The training loop is the
method interface only (``prepare``, ``forget_batch``/``retain_batch``, ``trainable_parameters``, ``loss``), so
it checks the methods whatever the runner does around them. The numbers on the `small` testbed through
``llmmem unlearn`` are in configs/unlearn/testbed-*.yaml.
"""

import copy
import random

import pytest
import torch

from llmmem.backends.base import GenerateRequest
from llmmem.unlearning import METHODS
from llmmem.unlearning.data import load_examples, tokenize

pytestmark = pytest.mark.slow

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
    torch.manual_seed(seed)
    model, backend, tok = _load(path)
    include = str(path / "tasks")
    forget = load_examples("testbed_canaries", include, filt={"group": ["dup032", "dup064"]})
    retain = load_examples("testbed_recall", include)
    for s in (forget, retain):
        tokenize(s, backend)
    before_f, before_r = _extracted(backend, forget), _extracted(backend, retain)
    method = METHODS.get(name)(**method_args)
    method.prepare(lambda text: backend.encode(text, add_special_tokens=False))
    ref = copy.deepcopy(model).eval() if method.needs_reference else None
    model.train()
    opt = torch.optim.AdamW(method.trainable_parameters(model), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    pad = tok.pad_token_id
    for _ in range(steps):
        fb = rng.sample(forget, min(batch, len(forget)))
        rb = rng.sample(retain, batch)
        loss = method.loss(model, method.forget_batch(fb, pad, "cpu"), method.retain_batch(rb, pad, "cpu"), ref)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    after_f, after_r = _extracted(backend, forget), _extracted(backend, retain)
    kept = sum(a for a, b in zip(after_r, before_r) if b) / max(1, sum(before_r))
    return {"forget_before": sum(before_f) / len(forget), "forget_after": sum(after_f) / len(forget),
            "retain_before": sum(before_r) / len(retain), "retain_after": sum(after_r) / len(retain), "retain_kept": kept}


@pytest.mark.parametrize("name,args,lr,steps", [
    ("rmu", {"layer": 1, "steering_coeff": 20.0, "alpha": 10.0}, 1e-4, 30),
    ("idk_dpo", {"alpha": 5.0}, 3e-4, 40),
])
def test_forget_canaries_keep_facts(memorizing_testbed, name, args, lr, steps):
    r = unlearn_and_measure(memorizing_testbed, name, args, lr, steps)
    assert r["forget_before"] >= 0.9, r
    assert r["forget_after"] <= 0.1, r
    assert r["retain_after"] >= 0.8 * r["retain_before"], r  # the runner's utility_retained ratio
