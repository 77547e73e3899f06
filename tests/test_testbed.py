"""Testbed: deterministic world, ground truth, tokenizer, training output, task files, bad input."""

import json
import random

import pytest

from conftest import cli_error, run_cli
from llmmem.config import ConfigError
from llmmem.testbed.train import preset_config
from llmmem.testbed.world import SYLLABLES, WorldConfig, build_world, world_json


def test_world_is_deterministic_byte_for_byte():
    cfg = preset_config("tiny").world
    a, b, c = build_world(0, cfg), build_world(0, cfg), build_world(1, cfg)
    assert world_json(a) == world_json(b)
    assert a.documents == b.documents and a.eval_sets == b.eval_sets
    assert a.corpus_hash() != c.corpus_hash()


def test_ground_truth_counts_match_the_corpus():
    cfg = preset_config("tiny").world
    w = build_world(0, cfg)
    fact_docs = [t for k, t in w.documents if k == "fact"]
    for f in w.facts[:30]:
        written = sum(1 for t in fact_docs if f["name"] in t and f" {f['value']} " in f" {t} "
                      and t in [tpl.format(name=f["name"], value=f["value"]) for tpl in f["templates"]])
        assert written == f["count"], f
    counts = sorted({f["count"] for f in w.facts})
    assert counts == [1, 2, 4, 8, 16]
    canary_docs = [t for k, t in w.documents if k == "canary"]
    for c in w.canaries:
        n = sum(1 for t in canary_docs if c["secret"] in t and c["account"] in t)
        assert n == (c["dup"] if c["member"] else 0)
    members = [c for c in w.canaries if c["member"]]
    held = [c for c in w.canaries if not c["member"]]
    assert len(members) == len(held)
    vocab_train = {word for _, t in w.documents for word in t.split()}
    for c in held:  # non-members use only words seen in training
        assert set(c["account"].split()) <= vocab_train


def test_vocabulary_is_the_words_the_model_reads():
    w = build_world(0, preset_config("tiny").world)
    vocab = set(w.vocabulary())
    assert {word for _, t in w.documents for word in t.split()} <= vocab
    for rows in w.eval_sets.values():
        for r in rows:
            for k in ("prompt", "answer", "text", "secret"):
                assert set(str(r.get(k, "")).split()) <= vocab
    # ids and bucket labels are not words: 1,900 of them once made the output layer 3x wider than needed
    assert not {"fact-0", "canary-0", "assoc-0", "dup001", "heldout"} & vocab


def test_passage_distractors_never_add_exposures_of_planted_facts():
    cfg = WorldConfig(**{**preset_config("tiny").world.__dict__, "passage_distractors": (1, 3)})
    w = build_world(0, cfg)
    planted = {t.format(name=f["name"], value=f["value"]) for f in w.facts for t in f["templates"]}
    passages = [t for k, t in w.documents if k in ("override", "openbook")]
    assert max(t.count(" . ") for t in passages) >= 3  # distractor sentences are there
    assert not any(sentence in t for t in passages for sentence in planted)
    for row in w.eval_sets["openbook"][:50]:  # exactly one passage sentence names the asked-about entity
        passage, question = row["prompt"].split(" question : ")
        name = " ".join(question.split(" ? ")[0].removesuffix(" born").split()[-2:])  # names are two words
        about = [sent for sent in passage.removeprefix("passage : ").split(" . ") if name in sent]
        assert len(about) == 1 and f" {row['answer']}" in f" {about[0]} ", (row, about)


def test_exclude_removes_canaries_and_rejects_unknown():
    cfg = preset_config("tiny").world
    w = build_world(0, cfg, exclude_canaries={"canary-0", "canary-5"})
    texts = [t for k, t in w.documents if k == "canary"]
    for c in w.canaries:
        if c["id"] in ("canary-0", "canary-5"):
            assert c["excluded"] and not any(c["secret"] in t for t in texts)
    assert w.facts == build_world(0, cfg).facts
    with pytest.raises(ConfigError, match="do not exist"):
        build_world(0, cfg, exclude_canaries={"canary-9999"})


def test_bad_world_configs():
    with pytest.raises(ConfigError, match="n_entities=0"):
        WorldConfig(n_entities=0)
    with pytest.raises(ConfigError, match="must be"):
        WorldConfig(n_cities=-3)
    with pytest.raises(ConfigError, match="copy_len"):
        WorldConfig(copy_len=(5, 2))
    with pytest.raises(ConfigError, match="assoc_pairs"):
        WorldConfig(assoc_pairs=(0, 3))
    with pytest.raises(ConfigError, match="passage_distractors"):
        WorldConfig(passage_distractors=(2, 1))
    with pytest.raises(ConfigError, match="unknown testbed preset"):
        preset_config("huge")
    # more names than two syllables can spell: refused at once (building the world used to loop for ever)
    with pytest.raises(ConfigError, match="n_entities \\+ n_heldout_entities = 980; allowed: at most 836"):
        WorldConfig(n_entities=640, n_cities=80, n_employers=60, n_heldout_entities=200)
    from llmmem.testbed.world import _unique_words

    with pytest.raises(ConfigError, match="only 0 are left"):
        _unique_words(random.Random(0), 1, 1, {s for s in SYLLABLES})


def test_build_outputs(tiny_testbed):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tiny_testbed
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("the access code for account")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.hidden_size // model.config.num_attention_heads >= 32
    w = json.loads((out / "world.json").read_text())
    assert w["preset"] == "tiny" and w["seed"] == 0
    assert w["training"]["loss_curve"] and w["training"]["loss_curve"][-1]["loss"] < w["training"]["loss_curve"][0]["loss"]
    probes = [p["probe"] for p in w["training"]["loss_curve"] if "probe" in p]
    assert len(probes) >= 20 and set(probes[-1]) == {"recall", "assoc", "override"}
    assert all(0 <= v <= 1 for p in probes for v in p.values())
    assert {"count", "templates", "value"} <= set(w["facts"][0])
    assert {"dup", "member"} <= set(w["canaries"][0])
    names = sorted(p.name for p in (out / "tasks").glob("*.yaml"))
    assert names == sorted(f"testbed_{n}.yaml" for n in ("recall", "canaries", "mia", "assoc", "override", "openbook",
                                                         "classify"))


def test_testbed_tasks_run_through_eval(tiny_testbed, tmp_path, capsys):
    tasks = "testbed_recall,testbed_canaries,testbed_mia,testbed_assoc,testbed_override,testbed_openbook,testbed_classify"
    rc = run_cli(["eval", "--model", tiny_testbed, "--tasks", tasks, "--limit", "40", "--output_path", tmp_path,
                  "--quiet"])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads(next(tmp_path.rglob("results.json")).read_text())
    assert set(doc["metrics"]["testbed_recall"]["buckets"]) <= {"1", "2", "4", "8", "16"}
    assert "heldout" in doc["metrics"]["testbed_canaries"]["buckets"] or doc["n_samples"]["testbed_canaries"] < 40
    assert "exposure" in doc["metrics"]["testbed_canaries"]
    assert 0 <= doc["metrics"]["testbed_mia"]["loss_auc"] <= 1
    assert "follows_context" in doc["metrics"]["testbed_override"]


def test_cli_bad_input(tmp_path, capsys, tiny_testbed):
    def bad(args, *needles):
        cli_error(capsys, ["testbed", "build", *args], *needles)

    bad(["--preset", "huge", "--output", tmp_path / "x"], "unknown testbed preset", "tiny, small")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("world: {n_entities: 0}\n")
    bad(["--preset", "tiny", "--config", cfg, "--output", tmp_path / "x"], "n_entities=0")
    cfg.write_text("world: {n_canaries: 5}\n")
    bad(["--preset", "tiny", "--config", cfg, "--output", tmp_path / "x"], "world: unknown key(s) n_canaries")
    bad(["--preset", "tiny", "--output", tiny_testbed], "not empty", "--overwrite")
    ex = tmp_path / "forget.txt"
    ex.write_text("canary-0\ncanary-777\n")
    bad(["--preset", "tiny", "--exclude", ex, "--output", tmp_path / "y"], "canary-777", "do not exist")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_model_testbed_preset_uses_the_cached_build(tiny_testbed, tmp_path, monkeypatch, capsys):
    """`--model testbed` resolves to $LLMMEM_HOME/models/testbed (built on first use; here pre-placed)."""
    import shutil

    home = tmp_path / "home"
    shutil.copytree(tiny_testbed, home / "models" / "testbed")
    monkeypatch.setenv("LLMMEM_HOME", str(home))
    rc = run_cli(["eval", "--model", "testbed", "--tasks", "testbed_recall", "--limit", "5", "--output_path",
                  tmp_path / "run", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "testbed").is_dir()
    assert run_cli(["ls", "models"]) == 0
    assert "testbed" in capsys.readouterr().out


def test_training_probe_reads_the_last_real_token_of_padded_prompts(tiny_testbed):
    """The probe batches prompts of different lengths (right-padded); each must score as if alone."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmmem.testbed.train import _probe, _probe_sets

    tok = AutoTokenizer.from_pretrained(tiny_testbed)
    model = AutoModelForCausalLM.from_pretrained(tiny_testbed)
    world = build_world(0, preset_config("tiny").world)
    sets = _probe_sets(world, tok, n=12)
    got = _probe(model, sets, tok.pad_token_id)
    for name, rows in sets.items():
        assert len({len(ids) for ids, _ in rows}) > 1 or name == "recall"
        with torch.no_grad():
            alone = [int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax() == a) for ids, a in rows]
        assert got[name] == round(sum(alone) / len(rows), 3), name


def test_build_warns_when_in_context_recall_did_not_form(tmp_path, caplog):
    """A tiny-sized model run under a non-tiny preset name: its associative-recall probe stays low, and the
    user is told so (tiny itself, a test fixture, stays quiet)."""
    import logging

    from llmmem.testbed.train import build_testbed

    cfg = preset_config("tiny", {"train": {"epochs": 1.0}})
    with caplog.at_level(logging.WARNING, logger="llmmem.testbed.train"):
        build_testbed(tmp_path / "tb", preset="small", seed=0, quiet=True, config=cfg)
    assert any("associative recall ended at" in r.getMessage() and "--seed" in r.getMessage()
               for r in caplog.records)


def test_packed_rows_keep_documents_apart():
    """Training rows pack several documents; each must be scored as if it were alone (no cross-document
    attention), including a document cut at the start of a row."""
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmmem.testbed.train import _packed_batches, packed_forward

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2)).train()
    docs = [[1] + [random.Random(i).randrange(4, 40) for _ in range(3 + i % 5)] + [2] for i in range(12)]
    rows, pos = next(_packed_batches(docs, seqlen=15, batch=2, rng=random.Random(0)))
    logits = packed_forward(model, rows, pos).logits
    for r in range(rows.shape[0]):
        starts = [i for i in range(rows.shape[1]) if pos[r, i] == 0] + [rows.shape[1]]
        if starts[0] != 0:  # a document cut by the row boundary: score it as the row's first segment
            starts = [0] + starts
        for a, b in zip(starts, starts[1:]):
            alone = model(input_ids=rows[r:r + 1, a:b], position_ids=pos[r:r + 1, a:b]).logits
            assert torch.allclose(logits[r, a:b], alone[0], atol=1e-5), (r, a, b)
    crossed = model(input_ids=rows, position_ids=pos, use_cache=True).logits  # the trap packed_forward avoids
    assert not torch.allclose(crossed, logits, atol=1e-3)
