"""Unlearning losses against open-unlearning's formulas, re-implemented here from its source
(locuslab/open-unlearning: src/trainer/utils.py, src/trainer/unlearn/*.py), on a tiny random Llama."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tiny
from llmmem.config import ConfigError
from llmmem.unlearning import METHODS
from llmmem.unlearning.data import Example, batch_of


def _batch():
    """Two sequences of different lengths: prompt tokens and padding unlabelled."""
    ids = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 9, 10, 11, 0, 0]])
    labels = torch.tensor([[-100, -100, 6, 7, 8, 9], [-100, -100, 10, 11, -100, -100]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}


def _batch2():
    ids = torch.tensor([[1, 12, 13, 14, 15], [1, 16, 17, 18, 19]])
    labels = torch.tensor([[-100, 12, 13, 14, 15], [-100, -100, 17, 18, 19]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    model = tiny.make_model("llama")
    torch.manual_seed(1)
    ref = tiny.make_model("llama")  # a different "reference" so log-ratios are not zero
    return model, ref


# ---- open-unlearning, src/trainer/utils.py (re-implemented) ----------------------------------------
def ou_compute_batch_nll(model, inputs):
    outputs = model(**inputs)
    logits = outputs.logits
    shifted_labels = inputs["labels"][..., 1:].contiguous()
    logits = logits[..., :-1, :].contiguous()
    loss = nn.CrossEntropyLoss(ignore_index=-100, reduction="none")(logits.transpose(-1, -2), shifted_labels).sum(dim=-1)
    return loss


def ou_compute_dpo_loss(model, ref_model, win_inputs=None, lose_inputs=None, beta=1.0):
    win_log_ratio, lose_log_ratio = 0.0, 0.0
    if win_inputs is not None:
        win_loss = ou_compute_batch_nll(model, win_inputs)
        with torch.no_grad():
            win_ref_loss = ou_compute_batch_nll(ref_model, win_inputs)
        win_log_ratio = -(win_loss - win_ref_loss)
    if lose_inputs is not None:
        lose_loss = ou_compute_batch_nll(model, lose_inputs)
        with torch.no_grad():
            lose_ref_loss = ou_compute_batch_nll(ref_model, lose_inputs)
        lose_log_ratio = -(lose_loss - lose_ref_loss)
    return -2 / beta * F.logsigmoid(beta * (win_log_ratio - lose_log_ratio)).mean()


def ou_compute_kl_divergence(model, target_model, inputs):
    with torch.no_grad():
        ref_outputs = target_model(**inputs)
    ref_probs = F.log_softmax(ref_outputs.logits, dim=-1).view(-1, ref_outputs.logits.shape[-1])
    outputs = model(**inputs)
    current_probs = F.log_softmax(outputs.logits, dim=-1).view(-1, outputs.logits.shape[-1])
    return nn.functional.kl_div(current_probs, ref_probs, reduction="batchmean", log_target=True)


def ou_compute_undial_loss(model, ref_model, inputs, beta, skip_ignored=False):
    """compute_undial_loss; ``skip_ignored`` leaves positions labelled -100 unadjusted (the reference indexes
    the vocabulary with -100 there, i.e. token vocab-100)."""
    logits = model(**inputs).logits
    shift_labels = inputs["labels"][..., 1:].contiguous()
    shift_logits = logits[..., :-1, :].contiguous()
    with torch.no_grad():
        teacher_logits = ref_model(**inputs).logits
    shift_teacher_logits = teacher_logits[..., :-1, :].contiguous()
    mask = torch.zeros_like(shift_teacher_logits)
    batch_idx = torch.arange(mask.shape[0]).view(-1, 1, 1)
    seq_idx = torch.arange(mask.shape[1]).view(1, -1, 1)
    mask[batch_idx, seq_idx, shift_labels.unsqueeze(-1)] = 1.0
    if skip_ignored:
        mask = mask * (shift_labels != -100).unsqueeze(-1)
    soft_label = F.softmax(shift_teacher_logits - mask * beta, dim=-1)
    loss = nn.CrossEntropyLoss(reduction="none")(shift_logits.view(-1, shift_logits.size(-1)),
                                                 soft_label.view(-1, soft_label.size(-1)))
    return loss.mean()


# ---- open-unlearning, src/trainer/unlearn/rmu.py (re-implemented) -----------------------------------
def ou_forward_with_cache(model, inputs, module, no_grad=True):
    cache = []

    def hook(module, input, output):
        cache.append(output[0] if isinstance(output, tuple) else output)

    h = module.register_forward_hook(hook)
    with torch.set_grad_enabled(not no_grad):
        model(**inputs)
    h.remove()
    return cache[0]


def ou_compute_activation_loss(activation1, activation2, mask):
    squared_diff = torch.nn.functional.mse_loss(activation1, activation2, reduction="none")
    expanded_mask = mask.unsqueeze(-1).expand_as(squared_diff)
    squared_diff_sum = (squared_diff * expanded_mask).mean(dim=2).sum(dim=(1))
    num_tokens = mask.sum(dim=-1, keepdim=True)
    return (squared_diff_sum / num_tokens).mean()


def close(a, b, tol=1e-6):
    a, b = float(torch.as_tensor(a).detach()), float(torch.as_tensor(b).detach())
    return abs(a - b) <= tol * max(1.0, abs(b))


# ---------------------------------------------------------------------------------------------------------
def test_nll_terms_are_the_token_mean_of_the_batch(models):
    """14.4: GA/GradDiff forget and every retain NLL are model(**inputs).loss (token mean over the batch)."""
    model, _ = models
    b, r = _batch(), _batch2()
    hf_f, hf_r = model(**b).loss, model(**r).loss
    assert close(METHODS.get("grad_ascent")().loss(model, b, r, None), -hf_f)
    gd = METHODS.get("grad_diff")(gamma=0.7, alpha=2.0).loss(model, b, r, None)
    assert close(gd, -0.7 * hf_f + 2.0 * hf_r)
    # and that differs from the mean of per-sequence means (the old llmmem convention) on this batch
    per_seq = ou_compute_batch_nll(model, b) / (b["labels"][:, 1:] != -100).sum(-1)
    assert not close(per_seq.mean(), hf_f, 1e-4)
    # every method's retain NLL is the same token mean
    for name, kw in (("npo", {}), ("simnpo", {}), ("undial", {"alpha": 1.0})):
        m = METHODS.get(name)(**{**kw, "gamma": 0.0})
        assert close(m.loss(model, b, r, models[1]), m.args["alpha"] * hf_r), name


def test_npo_simnpo_match_reference(models):
    model, ref = models
    b, r = _batch(), _batch2()
    npo = METHODS.get("npo")(alpha=0.5).loss(model, b, r, ref)
    assert close(npo, ou_compute_dpo_loss(model, ref, None, b, beta=0.1) + 0.5 * model(**r).loss)
    # SimNPO (src/trainer/unlearn/simnpo.py): summed NLL / number of labelled tokens - delta
    nll = ou_compute_batch_nll(model, b)
    n = (b["labels"] != -100).sum(-1)
    expected = -F.logsigmoid(4.5 * (nll / n - 0.25)).mean() * 2 / 4.5
    sim = METHODS.get("simnpo")(delta=0.25, alpha=0.0, gamma=1.0).loss(model, b, r, None)
    assert close(sim, expected)
    # policy == reference: NPO's forget term is 2/beta log 2
    assert math.isclose(float(METHODS.get("npo")(alpha=0.0).loss(model, b, r, model)), 2 / 0.1 * math.log(2),
                        rel_tol=1e-6)


def test_kl_retain_matches_reference(models):
    model, ref = models
    b, r = _batch(), _batch2()
    m = METHODS.get("grad_diff")(retain_loss="kl", gamma=0.0)
    assert m.needs_reference
    assert close(m.loss(model, b, r, ref), ou_compute_kl_divergence(model, ref, r))
    with pytest.raises(ConfigError, match="retain_loss='ce' is not one of nll, kl"):
        METHODS.get("grad_diff")(retain_loss="ce")


def _examples():
    exs = [Example("a", "the code is", " 1 2 3", prefix_ids=[1, 5, 6], suffix_ids=[7, 8, 9]),
           Example("b", "Q: who? A:", " Bob", prefix_ids=[1, 10, 11, 12], suffix_ids=[13])]
    return exs


def test_idk_dpo_batches_and_loss(models, tmp_path):
    model, ref = models
    idk = tmp_path / "idk.jsonl"
    idk.write_text("I do not know.\n\nNo idea.\n")
    m = METHODS.get("idk_dpo")(idk=str(idk))
    assert m.refusals == ["I do not know.", "No idea."] and m.needs_reference
    enc = {" I do not know.": [20, 21, 22], " No idea.": [23, 24]}
    with pytest.raises(RuntimeError, match="prepare"):
        m.forget_batch(_examples(), 0, "cpu")
    m.prepare(lambda text: enc[text])
    torch.manual_seed(3)
    fb = m.forget_batch(_examples(), 0, "cpu")
    orig = batch_of(_examples(), 0, "cpu")
    for k in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(fb[k], orig[k])
    alt = fb["alternate"]
    for i, e in enumerate(_examples()):  # the same prefix, then a refusal, labelled on the refusal only
        n = int(alt["attention_mask"][i].sum())
        ids = alt["input_ids"][i, :n].tolist()
        assert ids[: len(e.prefix_ids)] == e.prefix_ids and ids[len(e.prefix_ids):] in ([20, 21, 22], [23, 24])
        lab = alt["labels"][i, :n].tolist()
        assert lab == [-100] * len(e.prefix_ids) + ids[len(e.prefix_ids):]
    lose = {k: fb[k] for k in ("input_ids", "attention_mask", "labels")}
    r = _batch2()
    got = m.loss(model, fb, r, ref)
    expected = ou_compute_dpo_loss(model, ref, alt, lose, beta=0.1) + model(**r).loss
    assert close(got, expected)
    with pytest.raises(RuntimeError, match="forget_batch"):
        m.loss(model, lose, r, ref)
    with pytest.raises(ConfigError, match="is not a file"):
        METHODS.get("idk_dpo")(idk=str(tmp_path / "missing.txt"))


def test_undial_matches_reference(models):
    model, ref = models
    # every position labelled: the reference formula as written
    ids = torch.tensor([[1, 5, 6, 7, 8], [1, 9, 10, 11, 12]])
    full = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    m = METHODS.get("undial")()
    assert m.args == {"beta": 10.0, "gamma": 1.0, "alpha": 0.0, "retain_loss": "nll", "positions": "all"}
    assert close(m.loss(model, full, None, ref), ou_compute_undial_loss(model, ref, full, 10.0))
    # prompt and padding unlabelled: averaged over every position, unlabelled ones distil the plain teacher
    b = _batch()
    assert close(m.loss(model, b, None, ref), ou_compute_undial_loss(model, ref, b, 10.0, skip_ignored=True))
    # positions="labels": the mean over labelled positions only
    lab = METHODS.get("undial")(positions="labels", beta=3.0).loss(model, b, None, ref)
    logits = model(**b).logits[:, :-1].float()
    with torch.no_grad():
        t = ref(**b).logits[:, :-1].float()
    y = b["labels"][:, 1:]
    rows = []
    for i, j in zip(*torch.nonzero(y != -100, as_tuple=True)):
        z = t[i, j].clone()
        z[y[i, j]] -= 3.0
        rows.append(-(F.softmax(z, -1) * F.log_softmax(logits[i, j], -1)).sum())
    assert close(lab, torch.stack(rows).mean())


def test_rmu_matches_reference(models):
    model, ref = models
    b, r = _batch(), _batch2()
    torch.manual_seed(5)
    m = METHODS.get("rmu")(layer=1, steering_coeff=6.5, alpha=3.0)
    got = m.loss(model, b, r, ref)
    # the control vector: torch.rand, unit norm, times the steering coefficient
    torch.manual_seed(5)
    u = torch.rand(1, 1, model.config.hidden_size)
    control = u / torch.norm(u) * 6.5
    assert torch.allclose(m.control_vec, control) and math.isclose(float(m.control_vec.norm()), 6.5, rel_tol=1e-6)
    layer = model.model.layers[1]
    hf = ou_forward_with_cache(model, b, layer, no_grad=False)
    f = ou_compute_activation_loss(hf, control.expand_as(hf), b["labels"] != -100)
    hr = ou_forward_with_cache(model, r, layer, no_grad=False)
    hr_ref = ou_forward_with_cache(ref, r, ref.model.layers[1], no_grad=True)
    expected = f + 3.0 * ou_compute_activation_loss(hr, hr_ref, r["labels"] != -100)
    assert close(got, expected)
    # the scored-token counts differ (4 and 2): the reference's broadcast is mean(s) * mean(1/n), not mean(s/n)
    per_seq = METHODS.get("rmu")(layer=1, steering_coeff=6.5, alpha=0.0, reduction="per_sequence")
    per_seq.control_vec = control
    s = ((hf - control).pow(2).mean(-1) * (b["labels"] != -100)).sum(-1)
    n = (b["labels"] != -100).sum(-1)
    assert close(per_seq.loss(model, b, r, ref), (s / n).mean()) and not close((s / n).mean(), f, 1e-3)
    # WMDP's rmu/unlearn.py: mse_loss over everything, times alpha on the retain side
    w = METHODS.get("rmu")(layer=1, alpha=1200.0, reduction="wmdp")
    w.control_vec = control
    exp_w = F.mse_loss(hf, control.expand_as(hf)) + 1200.0 * F.mse_loss(hr, hr_ref)
    assert close(w.loss(model, b, r, ref), exp_w)


def test_rmu_parameters_and_layers(models, tmp_path):
    model = tiny.make_model("llama")
    b, r = _batch(), _batch2()
    m = METHODS.get("rmu")(layer=1.0, params=[r"model\.layers\.(0|1)\.mlp\.down_proj\.weight"])
    assert m.args["layer"] == 1
    chosen = m.trainable_parameters(model)
    assert len(chosen) == 2 and all(p.shape == model.model.layers[0].mlp.down_proj.weight.shape for p in chosen)
    ref = tiny.make_model("llama")
    for p in model.parameters():
        p.requires_grad_(True)
    m.loss(model, b, r, ref).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    with pytest.raises(ConfigError, match=r"layer=7 is out of range; this model has decoder blocks 0\.\.1"):
        METHODS.get("rmu")().loss(model, b, r, ref)
    with pytest.raises(ConfigError, match="match no parameter"):
        METHODS.get("rmu")(params=["nothing"]).trainable_parameters(model)
    with pytest.raises(ConfigError, match="must be an integer"):
        METHODS.get("rmu")(layer=1.5)
    with pytest.raises(ConfigError, match="not a regular expression"):
        METHODS.get("rmu")(params=["(unclosed"])


def test_trainer_defaults_are_recorded():
    expected_lr = {"grad_ascent": 1e-5, "grad_diff": 1e-5, "npo": 1e-5, "simnpo": 1e-5, "idk_dpo": 1e-5,
                   "undial": 1e-4, "rmu": 1e-5}
    for name, lr in expected_lr.items():
        td = METHODS.get(name).trainer_defaults
        assert td["open-unlearning"]["lr"] == lr, name
        for setting, d in td.items():
            assert d["source"] and {"lr", "weight_decay", "optimizer", "scheduler"} <= set(d), (name, setting)
            assert ("epochs" in d and d["epochs"]) or d.get("max_steps"), (name, setting)
    assert METHODS.get("grad_diff").trainer_defaults["tofu"]["weight_decay"] == 0.01
    assert METHODS.get("grad_diff").trainer_defaults["tofu"]["warmup_epochs"] == 1.0
    assert METHODS.get("npo").trainer_defaults["muse"]["scheduler"] == "constant"
    w = METHODS.get("rmu").trainer_defaults["wmdp"]
    assert w["lr"] == 5e-5 and w["max_steps"] == 80 and w["method_args"]["steering_coeff"] == 2.0
    # method defaults equal open-unlearning's configs/trainer/*.yaml method_args
    assert METHODS.get("npo")().args["beta"] == 0.1 and METHODS.get("idk_dpo")().args["beta"] == 0.1
    assert METHODS.get("simnpo")().args == {"beta": 4.5, "delta": 0.0, "gamma": 0.125, "alpha": 1.0,
                                            "retain_loss": "nll"}
    assert METHODS.get("rmu")().args["steering_coeff"] == 2.0 and METHODS.get("rmu")().args["params"] == [".*"]
    assert METHODS.get("noisy_ft").trainer_defaults == {}


def _forget_logprob(model, examples):
    b = batch_of(examples, 0, "cpu")
    with torch.no_grad():
        nll = ou_compute_batch_nll(model, b)
    return -float(nll.sum())


@pytest.mark.parametrize("name,kw,lr", [("rmu", {"layer": 0, "steering_coeff": 20.0}, 1e-2),
                                        ("idk_dpo", {"beta": 0.5}, 1e-2), ("undial", {}, 1e-2)])
def test_a_few_steps_lower_the_forget_likelihood(name, kw, lr):
    torch.manual_seed(0)
    model = tiny.make_model("llama")
    ref = tiny.make_model("llama")
    ref.load_state_dict(model.state_dict())
    forget, retain = _examples(), [Example("c", "x", " y", prefix_ids=[1, 30, 31], suffix_ids=[32, 33])]
    m = METHODS.get(name)(**kw)
    m.prepare(lambda text: [40 + len(text) % 7, 41])
    before = _forget_logprob(model, forget)
    opt = torch.optim.AdamW(m.trainable_parameters(model), lr=lr)
    for _ in range(8):
        loss = m.loss(model, m.forget_batch(forget, 0, "cpu"), m.retain_batch(retain, 0, "cpu"), ref)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert _forget_logprob(model, forget) < before - 1.0


def test_chunk_long_examples():
    from llmmem.unlearning.data import chunk_examples

    long = Example("t", "a", " b", group="g", prefix_ids=[1, 2], suffix_ids=list(range(10, 21)))
    short = Example("s", "x", " y", prefix_ids=[1], suffix_ids=[5, 6])
    out = chunk_examples([long, short], 5)
    assert [e.id for e in out] == ["t#0", "t#1", "t#2", "s"]
    assert [e.prefix_ids + e.suffix_ids for e in out[:3]] == [[1, 2, 10, 11, 12], [13, 14, 15, 16, 17], [18, 19, 20]]
    assert all(len(e.prefix_ids) == 1 and e.group == "g" for e in out[:3]) and out[3] is short
    with pytest.raises(ConfigError, match="max_tokens=1 must be >= 2"):
        chunk_examples([long], 1)


@pytest.fixture(scope="module")
def tok_model():
    tok = tiny.make_tokenizer()
    return tok, tiny.make_model("llama", vocab=len(tok))


def _loop_run(tok_model, name, method_args, steps=2):
    import copy

    from llmmem.unlearning.loop import unlearn
    from llmmem.unlearning.spec import UnlearnSpec

    tok, model = tok_model[0], copy.deepcopy(tok_model[1])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    forget = [Example(f"f{i}", "the access code is", f" {i} {i + 3} {i + 5}") for i in range(4)]
    retain = [Example(f"r{i}", f"the capital of land {i} is", f" city {i}") for i in range(4)]
    spec = UnlearnSpec(forget="f.jsonl", retain="r.jsonl", method=name, method_args=method_args, steps=steps,
                       lr=1e-2, batch_size=2, eval_every=steps, grad_norm_steps=0)
    report = unlearn(model, spec, forget, retain, tokenizer=tok, device="cpu")
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    return report, changed


def test_the_loop_calls_the_method_hooks(tok_model):
    """The shared loop (what `llmmem unlearn` and sweeps run) builds batches, the optimizer's parameters and the
    refusal answers through the method's hooks: RMU updates only the parameters its ``params`` name, IdkDPO gets
    its tokenizer through ``prepare`` (it refuses to build batches without it)."""
    target = r"model\.layers\.0\.mlp\.down_proj\.weight"
    report, changed = _loop_run(tok_model, "rmu", {"layer": 0, "params": [target], "steering_coeff": 20.0})
    assert changed == {"model.layers.0.mlp.down_proj.weight"}
    assert report["args"]["params"] == [target] and report["args"]["layer"] == 0
    report, changed = _loop_run(tok_model, "idk_dpo", {"beta": 0.1})
    assert len(report["loss_curve"]) == 2 and "model.embed_tokens.weight" in changed
    report, _ = _loop_run(tok_model, "undial", {})
    assert report["args"]["beta"] == 10.0 and report["n_retain"] == 4


def test_spec_keeps_word_and_list_method_args():
    """method_args are numbers (recorded as floats), words and lists of words, checked by the method itself."""
    from llmmem.interventions.unlearn import check_method
    from llmmem.unlearning.spec import UnlearnSpec

    s = UnlearnSpec(forget="f.jsonl", retain="r.jsonl", method="rmu",
                    method_args={"layer": 1, "params": ["a.*"], "tokens": "all", "alpha": "10"})
    assert s.method_args == {"layer": 1.0, "params": ["a.*"], "tokens": "all", "alpha": 10.0}
    assert check_method(s).args["layer"] == 1
    with pytest.raises(ConfigError, match="RMU: tokens='some' is not one of labels, all"):
        check_method(UnlearnSpec(forget="f.jsonl", retain="r.jsonl", method="rmu", method_args={"tokens": "some"}))
    with pytest.raises(ConfigError, match=r"method_args.params=\[1, 2\]"):
        UnlearnSpec(forget="f.jsonl", retain="r.jsonl", method="rmu", method_args={"params": [1, 2]})
    # UNDIAL's reference has no retain term: no retain set needed unless alpha asks for one
    assert UnlearnSpec(forget="f.jsonl", method="undial").retain is None
    with pytest.raises(ConfigError, match="needs a retain set"):
        UnlearnSpec(forget="f.jsonl", method="undial", method_args={"alpha": 1})
