"""Counterfactual memorization on the testbed (llmmem.testbed.memscore): the design, leaving items out, the
estimator, leave-one-out, bad input, and one small end-to-end run (interrupted, then resumed)."""

import json
import math
import random

import pytest

from conftest import cli_error, run_cli
from llmmem.config import ConfigError
from llmmem.testbed import memscore as ms
from llmmem.testbed.train import preset_config
from llmmem.testbed.world import build_world

# a tiny world without in-context episodes (they are what takes time to train, and memscore leaves them alone):
# 24 facts (counts 1, 2, 4), 5 member canaries (dup 1..16) and 5 held-out ones; 120 steps of batch 4
FAST = {"world": {"n_entities": 8, "n_cities": 6, "n_employers": 5, "max_count": 4, "canaries_per_dup": 1,
                  "n_heldout_entities": 2, "n_assoc": 0, "n_copy": 0, "n_override": 0, "n_openbook": 0,
                  "n_classify": 0},
        "train": {"epochs": 30, "batch": 4}}


def fast_config():
    return preset_config("tiny", FAST)


# ----------------------------------------------------------------------------- design
@pytest.mark.parametrize("world_cfg", ["tiny", "fast"])
@pytest.mark.parametrize("k", [2, 4, 8])
def test_design_is_balanced_complement_pairs(world_cfg, k):
    cfg = preset_config("tiny").world if world_cfg == "tiny" else fast_config().world
    items = ms.planted_items(build_world(0, cfg))
    ids = {it["id"] for it in items}
    design = ms.balanced_design(items, k, seed=0)
    assert design == ms.balanced_design(items, k, seed=0) and design != ms.balanced_design(items, k, seed=1)
    for i in ids:  # every item, held-out canaries (the placebo) included, in exactly half of the models
        assert sum(i in m for m in design) == k // 2, i
    for j in range(k // 2):  # pairs are complements, of (nearly) equal size, and half of every stratum each
        a, b = design[2 * j], design[2 * j + 1]
        assert not a & b and a | b == ids and abs(len(a) - len(b)) <= 1
        for key, stratum in ms._strata(items).items():
            assert abs(len(a & set(stratum)) - len(stratum) / 2) <= 0.5, key
    if k >= 4:  # pairs are drawn independently (not the same split again)
        assert design[0] != design[2] and design[0] != design[3]


def test_design_does_not_tie_singleton_strata_together():
    """With one canary per dup level every canary stratum is a single item; those must not all land on the same
    side of every pair (which would make canary membership perfectly correlated across items)."""
    items = ms.planted_items(build_world(0, fast_config().world))
    canaries = [it["id"] for it in items if it["kind"] == "canary" and not it["heldout"]]
    design = ms.balanced_design(items, 8, seed=0)
    patterns = {c: tuple(c in m for m in design) for c in canaries}
    assert len(set(patterns.values())) > 1, patterns
    assert any(0 < sum(c in m for c in canaries) < len(canaries) for m in design)


def test_plan_models_seeds_and_loo_choice():
    plan = ms.plan_memscore("tiny", 4, 3, loo=4, config=fast_config())
    trained = {it["id"] for it in plan["items"] if not it["heldout"]}
    heldout = {it["id"] for it in plan["items"] if it["heldout"]}
    subs = [r for r in plan["runs"] if r["role"] == "subsample"]
    assert [r["seed"] for r in plan["runs"]] == [3] * 9  # shared seed: 4 subsampled + full + 4 leave-one-out
    assert all(set(r["in"]) <= trained and set(r["placebo_in"]) <= heldout for r in subs)
    assert len(plan["loo"]) == 4 and set(plan["loo"]) <= trained
    assert {it["kind"] for it in plan["items"] if it["id"] in plan["loo"]} == {"fact", "canary"}
    levels = [it["level"] for it in plan["items"] if it["id"] in plan["loo"] and it["kind"] == "canary"]
    assert max(levels) == 16 and min(levels) == 1  # spread over the range: the highest and lowest dup first
    full = next(r for r in plan["runs"] if r["role"] == "loo-full")
    assert set(full["in"]) == trained
    for r in plan["runs"]:
        if r["role"] == "loo-without":
            assert set(r["in"]) == trained - {r["item"]}
    varied = ms.plan_memscore("tiny", 4, 3, loo=1, config=fast_config(), vary_seed=True)
    assert [r["seed"] for r in varied["runs"]] == [3, 4, 5, 6, 3, 3]
    assert plan["key"] != varied["key"]


# ----------------------------------------------------------------------------- leaving items out
def test_excluded_items_are_absent_from_the_training_documents():
    from llmmem.testbed.train import _packed_batches, build_tokenizer, training_stream

    world = build_world(0, preset_config("tiny").world)
    tok = build_tokenizer(world)
    items = ms.planted_items(world)
    trained = {it["id"] for it in items if not it["heldout"]}
    design = ms.balanced_design(items, 4, seed=0)
    full_ids, _ = training_stream(world, tok)
    texts = {}  # item -> its documents (token ids) in the full corpus
    for ids, item in zip(full_ids, world.doc_items):
        if item is not None:
            texts.setdefault(item, set()).add(tuple(ids))
    assert set(texts) == trained  # held-out canaries have no document
    for m in design[:2]:
        out = trained - m
        ids, keep = training_stream(world, tok, blank=out)
        seen = {tuple(d) for d, k in zip(ids, keep) if k}
        assert len(ids) == len(full_ids) and [len(d) for d in ids] == [len(d) for d in full_ids]
        for item in out:  # none of its documents is in what the model reads
            assert not texts[item] & seen, item
        for d, k, item in zip(ids, keep, world.doc_items):
            assert k == (item not in out)
            assert (set(d) == {tok.pad_token_id}) == (not k)
        decoded = " ".join(tok.decode(d, skip_special_tokens=True) for d, k in zip(ids, keep) if k)
        for c in world.canaries:  # the secrets of left-out and held-out canaries are nowhere in it
            assert (c["secret"] in decoded) == (c["id"] in m and c["member"]), c["id"]
        for f in world.facts:
            written = any(t.format(name=f["name"], value=f["value"]) in decoded for t in f["templates"])
            assert written == (f["id"] in m), f["id"]
        # the packed rows: masked tokens are exactly the pads of blanked documents
        for rows, _, mask in _packed_batches(ids, 64, 16, random.Random(0), keep):
            assert bool(((rows == tok.pad_token_id) == ~mask).all())


def test_blanked_loss_reads_nothing_of_a_blanked_document():
    """The gradient of blanked_loss does not depend on what a blanked document holds (so blanking is exact
    removal), and without blanking it is the ordinary packed loss. A mask on the blanked targets alone is not
    enough -- the token after a blanked document is predicted from it -- and the test sees the difference."""
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmmem.testbed.train import _packed_batches, blanked_loss, packed_forward

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2)).train()
    docs = [[1] + [random.Random(i).randrange(4, 40) for _ in range(3 + i % 5)] + [2] for i in range(12)]
    keep = [i != 5 for i in range(12)]

    def rows_with(blank_tokens):
        ds = [d if k else [blank_tokens] * len(d) for d, k in zip(docs, keep)]
        return next(_packed_batches(ds, seqlen=30, batch=2, rng=random.Random(0), keep=keep))

    def grads(loss_fn, blank_tokens):
        model.zero_grad()
        ids, pos, mask = rows_with(blank_tokens)
        loss_fn(model, ids[:, :-1], pos[:, :-1], mask[:, :-1]).backward()
        return [p.grad.clone() for p in model.parameters()]

    ids, _, mask = rows_with(0)
    assert not bool(mask.all())  # the blanked document is in this batch
    a, b = grads(blanked_loss, 0), grads(blanked_loss, 7)
    assert all(torch.equal(x, y) for x, y in zip(a, b))

    def targets_only(model, ids, pos, keep):
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits[:, :-1]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        return (nll * keep[:, 1:].reshape(-1).float()).sum() / nll.numel()

    a, b = grads(targets_only, 0), grads(targets_only, 7)
    assert not all(torch.allclose(x, y) for x, y in zip(a, b))
    ids, pos = next(_packed_batches(docs, seqlen=30, batch=2, rng=random.Random(0)))
    everything = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        assert torch.allclose(blanked_loss(model, ids[:, :-1], pos[:, :-1], everything[:, :-1]),
                              packed_forward(model, ids[:, :-1], pos[:, :-1]).loss, atol=1e-6)


def test_leave_one_out_changes_nothing_until_the_item_is_read():
    """Same seed, same order: a model trained without an item is bit-identical to the full model until a batch
    holds that item (here: 2 steps, an item whose documents come later vs one in the first batch)."""
    import torch

    from llmmem.testbed.train import build_tokenizer, train, training_stream

    cfg = preset_config("tiny", {**FAST, "train": {"epochs": 0.5, "batch": 4}})  # 4 steps per epoch -> 2 steps
    world = build_world(0, cfg.world)
    tok = build_tokenizer(world)
    ids, _ = training_stream(world, tok, blank=set())
    width = cfg.seqlen + 1
    read: dict = {}  # item -> {batch: tokens of it the model reads (a row's last token is never input)}
    stream = [item for i in _epoch_order(len(ids)) for item in [world.doc_items[i]] * len(ids[i])]
    for t, item in enumerate(stream):
        if item is not None and t % width < cfg.seqlen:
            b = t // width // cfg.batch
            read.setdefault(item, {}).setdefault(b, 0)
            read[item][b] += 1
    early = next(i for i, bs in sorted(read.items()) if bs.get(0, 0) >= 3)
    late = next(i for i, bs in sorted(read.items()) if min(bs) >= 2)

    def weights(blank):
        model, _, info = train(world, cfg, 0, quiet=True, blank=blank, probe_curve=False)
        assert info["steps"] == 2
        return [p.detach().clone() for p in model.parameters()]

    full = weights(set())
    assert all(torch.equal(a, b) for a, b in zip(full, weights({late})))
    assert not all(torch.equal(a, b) for a, b in zip(full, weights({early})))


def _epoch_order(n):
    order = list(range(n))
    random.Random(0).shuffle(order)  # train(): rng = random.Random(seed), first epoch's shuffle
    return order


def test_world_excludes_facts_and_canaries():
    cfg = preset_config("tiny").world
    full = build_world(0, cfg)
    assert len(full.documents) == len(full.doc_items)
    for f in full.facts:  # every fact document is tagged with its fact, exactly count times
        tagged = [t for (k, t), i in zip(full.documents, full.doc_items) if i == f["id"]]
        assert len(tagged) == f["count"] and all(f["name"] in t and f["value"] in t for t in tagged)
    for c in full.canaries:
        tagged = [t for (k, t), i in zip(full.documents, full.doc_items) if i == c["id"]]
        assert len(tagged) == c["dup"] and all(c["secret"] in t for t in tagged)
    assert all((i is None) == (k not in ("fact", "canary")) for (k, _), i in zip(full.documents, full.doc_items))
    assert "excluded" not in full.facts[0]
    w = build_world(0, cfg, exclude={"fact-3", "canary-1"})
    assert "fact-3" not in w.doc_items and "canary-1" not in w.doc_items and w.excluded == ["canary-1", "fact-3"]
    f3 = next(f for f in w.facts if f["id"] == "fact-3")
    assert f3["excluded"] and not any(t.format(name=f3["name"], value=f3["value"]) in doc
                                      for _, doc in w.documents for t in f3["templates"])
    assert sum(not f["excluded"] for f in w.facts) == len(w.facts) - 1
    assert len(w.documents) == len(full.documents) - f3["count"] - full.canaries[1]["dup"]
    assert w.eval_sets == {**full.eval_sets, "canaries": w.eval_sets["canaries"]}
    with pytest.raises(ConfigError, match=r"fact-999.*fact-0 \.\. fact-119 and canary-0 \.\. canary-29"):
        build_world(0, cfg, exclude={"fact-999"})


# ----------------------------------------------------------------------------- estimator
def test_estimator_matches_hand_computation():
    items = [{"id": "a", "kind": "fact", "level": 4, "heldout": False},
             {"id": "b", "kind": "canary", "level": 0, "heldout": True}]
    scores = [  # (a correct, a loss, b correct, b loss)
        (1, 0.5, 0, 4.0), (1, 1.5, 0, 5.0), (0, 3.0, 0, 4.5), (1, 2.0, 0, 4.0)]
    membership = [{"a"}, {"a", "b"}, {"b"}, set()]
    models = [{"in": m, "scores": {"a": {"correct": s[0], "loss": s[1]}, "b": {"correct": s[2], "loss": s[3]}}}
              for m, s in zip(membership, scores)]
    a, b = ms.estimate(items, models)
    # a: in = models 0, 1 (correct 1, 1; loss 0.5, 1.5); out = models 2, 3 (correct 0, 1; loss 3.0, 2.0)
    assert (a["n_in"], a["n_out"], a["acc_in"], a["acc_out"], a["mem"]) == (2, 2, 1.0, 0.5, 0.5)
    assert a["mem_se"] == pytest.approx(math.sqrt(0 / 2 + 0.5 / 2))  # s_in^2 = 0, s_out^2 = 0.5
    assert (a["loss_in"], a["loss_out"], a["mem_loss"]) == (1.0, 2.5, 1.5)
    assert a["mem_loss_se"] == pytest.approx(math.sqrt(0.5 / 2 + 0.5 / 2))
    assert a["count"] == 4 and "dup" not in a
    # b (a placebo): in = models 1, 2 (loss 5.0, 4.5), out = models 0, 3 (loss 4.0, 4.0)
    assert b["mem"] == 0.0 and b["heldout"] and b["dup"] == 0
    assert b["mem_loss"] == pytest.approx(4.0 - 4.75) and b["mem_loss_se"] == pytest.approx(math.sqrt(0.125 / 2))
    one = ms.two_sample([1.0], [0.0, 1.0])
    assert one["diff"] == 0.5 and one["se"] is None
    assert ms.two_sample([], [1.0])["diff"] is None


def test_loo_comparison_matches_hand_computation():
    rows = [{"mem": 0.5, "loo_mem": 1.0, "mem_se": 0.1, "mem_loss": 2.0, "loo_mem_loss": 1.0, "mem_loss_se": 0.2},
            {"mem": 0.2, "loo_mem": 0.0, "mem_se": 0.3, "mem_loss": 0.5, "loo_mem_loss": 0.7, "mem_loss_se": None},
            {"mem": 0.9, "loo_mem": 1.0, "mem_se": 0.2, "mem_loss": 3.0, "loo_mem_loss": 2.0, "mem_loss_se": 0.4},
            {"mem": 0.4, "loo_mem": None, "mem_se": 0.2, "mem_loss": 3.0, "loo_mem_loss": None}]
    err = ms.loo_comparison(rows)
    assert err["mem"]["n"] == 3
    assert err["mem"]["mean_abs_diff"] == pytest.approx((0.5 + 0.2 + 0.1) / 3)
    assert err["mem"]["mean_diff"] == pytest.approx((-0.5 + 0.2 - 0.1) / 3)
    # ranks: subsampled 2, 1, 3; LOO 2.5, 1, 2.5 (tie) -> Pearson of the ranks = 1.5 / sqrt(2 * 1.5)
    assert err["mem"]["spearman"] == pytest.approx(1.5 / math.sqrt(3))
    assert err["mem"]["mean_se"] == pytest.approx(0.2)
    assert err["mem_loss"]["mean_abs_diff"] == pytest.approx((1.0 + 0.2 + 1.0) / 3)
    assert err["mem_loss"]["spearman"] == pytest.approx(1.0) and err["mem_loss"]["mean_se"] == pytest.approx(0.3)
    assert ms.loo_comparison(rows[:2])["mem"]["spearman"] is None  # fewer than 3 items


def test_load_memscores_reads_rows_and_refuses_other_files(tmp_path):
    (tmp_path / "memscore.jsonl").write_text('{"id": "fact-0", "mem": 0.5, "mem_loss": 1.0}\n\n'
                                             '{"id": "canary-3", "mem": 1.0, "mem_loss": 4.0}\n')
    got = ms.load_memscores(tmp_path)
    assert got == ms.load_memscores(tmp_path / "memscore.jsonl")
    assert got["canary-3"]["mem"] == 1.0 and got["fact-0"]["mem_loss"] == 1.0
    with pytest.raises(ConfigError, match="no memscore.jsonl"):
        ms.load_memscores(tmp_path / "nowhere")
    (tmp_path / "memscore.jsonl").write_text('{"id": "fact-0"}\nnot json\n')
    with pytest.raises(ConfigError, match="line 2"):
        ms.load_memscores(tmp_path)


# ----------------------------------------------------------------------------- bad input
def test_cli_bad_input_fails_before_training(tmp_path, capsys, monkeypatch):
    import llmmem.testbed.train as train_mod

    def no_training(*a, **k):
        raise AssertionError("trained despite bad input")

    monkeypatch.setattr(train_mod, "train", no_training)
    out = tmp_path / "ms"

    def bad(args, *needles):
        cli_error(capsys, ["testbed", "memscore", "--preset", "tiny", "--output", out, *args], *needles)

    bad([], "--models K is required")
    bad(["--models", "1"], "--models 1", "even number >= 2")
    bad(["--models", "3"], "--models 3", "even")
    bad(["--models", "four"], "--models", "not an integer")
    bad(["--models", "4", "--loo", "136"], "--loo 136", "at most 135")  # tiny: 120 facts + 15 member canaries
    bad(["--models", "4", "--loo", "-1"], "--loo -1", ">= 0")
    bad(["--models", "4", "--exclude", tmp_path / "x.txt"], "--exclude", "testbed build")
    bad(["--models", "4", "--preset", "huge"], "unknown testbed preset")
    cli_error(capsys, ["testbed", "build", "--preset", "tiny", "--models", "4", "--output", out],
              "--models", "testbed memscore")
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("x")
    bad(["--models", "2"], "not empty", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


# ----------------------------------------------------------------------------- end to end
def test_memscore_end_to_end_interrupted_then_resumed(tmp_path, monkeypatch, capsys):
    """K=4 (+ leave-one-out for 1 item) on the small fast world. The first call dies while training the third
    model: nothing is published, the two finished models are kept; the second call (the CLI) trains only the
    rest and writes the results."""
    import yaml

    import llmmem.testbed.train as train_mod

    real_train = train_mod.train
    calls = []

    def counting_train(*a, **k):
        calls.append(k.get("blank"))
        if fail_at and len(calls) == fail_at:
            raise RuntimeError("killed")
        return real_train(*a, **k)

    monkeypatch.setattr(train_mod, "train", counting_train)
    out = tmp_path / "ms"
    fail_at = 3
    with pytest.raises(RuntimeError, match="killed"):
        ms.run_memscore(out, preset="tiny", models=4, seed=0, loo=1, config=fast_config(), threads=1)
    assert [p.name for p in out.iterdir()] == [ms.WORK]
    assert len(list((out / ms.WORK).glob("model-*.json"))) == 2
    fail_at = None
    cfg = tmp_path / "fast.yaml"
    cfg.write_text(yaml.safe_dump(FAST))
    rc = run_cli(["testbed", "memscore", "--preset", "tiny", "--config", cfg, "--models", "4", "--loo", "1",
                  "--output", out, "--threads", "1", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert len(calls) == 3 + 4  # 2 done + 1 killed, then the 4 others (K=4 subsampled + full + 1 without)
    assert "LOO vs subsampled mem_loss" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["memscore.json", "memscore.jsonl", "scores.jsonl", "world.json"]

    doc = json.loads((out / "memscore.json").read_text())
    rows = ms.load_memscores(out)
    world = build_world(0, fast_config().world)
    assert set(rows) == {f["id"] for f in world.facts} | {c["id"] for c in world.canaries}
    subs = [m for m in doc["models"] if m["role"] == "subsample"]
    assert len(subs) == 4 and all(m["seed"] == 0 and m["steps"] == subs[0]["steps"] for m in doc["models"])
    for r in rows.values():  # balanced: in exactly 2 of the 4 models
        assert (r["n_in"], r["n_out"]) == (2, 2)
        assert sum(r["id"] in set(m["in"]) | set(m["placebo_in"]) for m in subs) == 2
    size = {f["id"]: f["count"] for f in world.facts} | {c["id"]: c["dup"] for c in world.canaries}
    for m in doc["models"]:  # each model's blanked documents are exactly the copies of its left-out items
        left_out = {i for i, n in size.items() if n} - set(m["in"])
        assert m["blanked_documents"] == sum(size[i] for i in left_out), m["name"]
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == len(doc["models"]) * len(rows)
    for r in rows.values():  # the estimator over scores.jsonl gives the published rows
        ins = [s["correct"] for s in scores if s["id"] == r["id"] and s["role"] == "subsample"
               and (s["in"] or s["placebo_in"])]
        outs = [s["correct"] for s in scores if s["id"] == r["id"] and s["role"] == "subsample"
                and not (s["in"] or s["placebo_in"])]
        assert r["mem"] == pytest.approx(sum(ins) / 2 - sum(outs) / 2)

    top = next(r for r in rows.values() if r["kind"] == "canary" and r["dup"] == 16)
    placebo = [r for r in rows.values() if r.get("heldout")]
    assert len(placebo) == 5 and all(r["acc_in"] == r["acc_out"] == 0 and r["mem"] == 0 for r in placebo)
    assert top["mem"] > 0.5 and top["acc_in"] == 1.0  # memorized when in, never extracted when out
    # the placebo's loss difference is noise (which other canaries a model saw moves every canary's loss)
    assert top["mem_loss"] > 2 * max(abs(r["mem_loss"]) for r in placebo)
    assert top["mem_loss"] > 4 * sum(abs(r["mem_loss"]) for r in placebo) / len(placebo)

    (loo_id,) = doc["loo"]["items"]
    loo_row = rows[loo_id]
    assert loo_row["loo_mem"] == loo_row["loo_acc_full"] - loo_row["loo_acc_without"]
    assert loo_row["loo_mem_loss"] == pytest.approx(loo_row["loo_loss_without"] - loo_row["loo_loss_full"])
    assert loo_row["loo_mem_loss"] > 0  # the item is easier for the model that saw it
    assert all(r["loo_mem"] is None for i, r in rows.items() if i != loo_id)
    err = doc["loo"]["error"]["mem_loss"]
    assert err["n"] == 1 and err["mean_abs_diff"] == pytest.approx(abs(loo_row["mem_loss"] - loo_row["loo_mem_loss"]))
    full = next(m for m in doc["models"] if m["role"] == "loo-full")
    assert full["blanked_documents"] == 0
    assert doc["design"]["items"] == {"facts": 24, "canaries": 5, "placebo": 5}
    assert set(doc["buckets"]["canary"]) == {"1", "2", "4", "8", "16", "heldout"}
    assert doc["timings"]["train_seconds"] > 0


@pytest.mark.slow
def test_memscore_tiny_preset(tmp_path):
    """The tiny preset as the CI job runs it: K=4 and leave-one-out for 3 items (~8 trainings)."""
    out = ms.run_memscore(tmp_path / "ms", preset="tiny", models=4, seed=0, loo=3, threads=1)
    rows = ms.load_memscores(out)
    assert all((r["n_in"], r["n_out"]) == (2, 2) for r in rows.values())
    top = [r["mem_loss"] for r in rows.values() if r["kind"] == "canary" and r["dup"] == 16]
    placebo = [r["mem_loss"] for r in rows.values() if r.get("heldout")]
    assert min(top) > max(placebo)
    doc = json.loads((out / "memscore.json").read_text())
    assert doc["loo"]["error"]["mem_loss"]["n"] == 3
