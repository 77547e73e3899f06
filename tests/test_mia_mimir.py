"""MIA scores equal MIMIR's, token for token, for tokenizers with and without BOS, short and long texts.

The reference is MIMIR's code re-implemented here from its source (github.com/iamgroot42/mimir):
``mimir/models.py`` ``Model.get_probabilities`` (windows of max_length every max_length // 2, labels =
``tokenizer(text).input_ids`` shifted by one) and ``get_ll``; ``mimir/attacks/loss.py``, ``zlib.py``,
``min_k.py``, ``min_k_plus_plus.py``, ``reference.py`` (``_attack``).
"""

import json
import math
import zlib

import numpy as np
import pytest
import torch

import tiny
from llmmem.backends.hf import HFBackend
from llmmem.models import wrap_model
from llmmem.suites import run_task
from llmmem.tasks import load_task_file

LONG = " ".join(tiny.CORPUS) * 6  # well over the tiny models' 128 positions
TEXTS = [
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "Alice was born in Lyon and works for Acme.",
    "Four score and seven years ago our fathers brought forth on this continent a new nation.",
    "In the beginning God created the heaven and the earth.",
    "key1 = 17 ; key2 = 42 ; key3 = 99 . Question: what is key2? Answer: 42",
    "Bob was born in Kyoto and works in Tokyo, the capital of Japan.",
    LONG,
    LONG[40:] + " The end.",
]


def mimir_probabilities(model, tok, text, max_length):
    """mimir/models.py Model.get_probabilities(text, return_all_probs=True), re-implemented."""
    labels = torch.tensor([tok(text)["input_ids"]])
    stride = max_length // 2  # load_model_properties: self.stride = self.max_length // 2
    target_token_log_prob, all_token_log_prob = [], []
    for i in range(0, labels.size(1), stride):
        begin_loc = max(i + stride - max_length, 0)
        end_loc = min(i + stride, labels.size(1))
        trg_len = end_loc - i
        input_ids = labels[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            logits = model(input_ids).logits
        log_probabilities = torch.log_softmax(logits[..., :-1, :].float(), dim=-1)
        labels_processed = target_ids[..., 1:][0]
        for j, token_id in enumerate(labels_processed):
            if token_id != -100:
                target_token_log_prob.append(log_probabilities[0, j, token_id].item())
                all_token_log_prob.append(log_probabilities[0, j])
    assert len(target_token_log_prob) == labels.size(1) - 1
    return target_token_log_prob, torch.stack(all_token_log_prob)


def mimir_scores(model, tok, text, max_length, k=0.2):
    probs, all_probs = mimir_probabilities(model, tok, text, max_length)
    loss = -np.mean(probs)  # get_ll; LOSSAttack
    zlib_score = loss / len(zlib.compress(bytes(text, "utf-8")))  # ZLIBAttack
    min_k = -np.mean(sorted(probs)[: int(len(probs) * k)])  # MinKProbAttack, window 1, stride 1
    mu = (torch.exp(all_probs) * all_probs).sum(-1)  # MinKPlusPlusAttack
    sigma = (torch.exp(all_probs) * torch.square(all_probs)).sum(-1) - torch.square(mu)
    scores = (np.array(probs) - mu.numpy()) / sigma.sqrt().numpy()
    min_k_pp = -np.mean(sorted(scores)[: int(len(scores) * k)])
    return {"loss": loss, "zlib": zlib_score, "min_k": min_k, "min_k_pp": min_k_pp, "n_tokens": len(probs)}


def _backend(arch, bos, seed=0):
    tok = tiny.make_tokenizer(bos=bos)
    return HFBackend(wrap_model(tiny.make_model(arch, vocab=len(tok), seed=seed), tok, f"{arch}-{bos}"), batch_size=3)


@pytest.fixture(scope="module")
def mia_task(tmp_path_factory):
    d = tmp_path_factory.mktemp("mia")
    (d / "m.jsonl").write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(TEXTS)))
    (d / "m.yaml").write_text("task: m\nsuite: mia\ndata: m.jsonl\noptions: {k: 0.2}\n")
    return load_task_file(d / "m.yaml")


@pytest.mark.parametrize("arch,bos", [("llama", True), ("gpt2", False), ("gpt_neox", False)])
def test_mia_scores_equal_mimir(arch, bos, mia_task):
    b = _backend(arch, bos)
    first = b.tok(TEXTS[0])["input_ids"][0]
    assert (first == b.tok.bos_token_id) == bos  # without BOS the first scored-as-context token is text
    assert len(b.tok(LONG)["input_ids"]) > 2 * b.max_length  # several MIMIR windows
    res = run_task(mia_task, b)
    for text, row in zip(TEXTS, res.rows):
        ref = mimir_scores(b.model, b.tok, text, b.max_length)
        assert row["n_tokens"] == ref["n_tokens"] == len(b.tok(text)["input_ids"]) - 1
        for key in ("loss", "zlib", "min_k", "min_k_pp"):
            assert math.isclose(row[key], ref[key], rel_tol=1e-4, abs_tol=1e-5), (text[:30], key, row[key], ref[key])
        assert row["truncated"] == (len(b.tok(text)["input_ids"]) > b.max_length)
    assert res.n_truncated == 2  # the two long texts, scored in windows and counted
    assert "mimir" in res.conventions["mia_scored_tokens"]


def test_reference_score_uses_the_reference_models_own_tokens(mia_task):
    """MIMIR's ReferenceAttack: loss - ref_model.get_ll(text), each model with its own tokenizer and windows."""
    target, ref = _backend("llama", True), _backend("gpt2", False, seed=3)
    res = run_task(mia_task, target, ref_backend=ref)
    for text, row in zip(TEXTS, res.rows):
        expected = (mimir_scores(target.model, target.tok, text, target.max_length)["loss"]
                    - mimir_scores(ref.model, ref.tok, text, ref.max_length)["loss"])
        assert math.isclose(row["ref"], expected, rel_tol=1e-4, abs_tol=1e-5)


def test_no_bos_first_token_is_context_only():
    """The old convention (EOS prepended, first text token scored) differs; MIMIR's never scores token 0."""
    b = _backend("gpt2", False)
    from llmmem.backends.base import LoglikelihoodRequest
    from llmmem.suites.mia import mimir_request

    ids = b.tok(TEXTS[0])["input_ids"]
    new = b.loglikelihood([mimir_request(b, TEXTS[0])])[0]
    old = b.loglikelihood([LoglikelihoodRequest(context="", continuation=TEXTS[0], token_logprobs=True)])[0]
    assert new.n_tokens == len(ids) - 1 and old.n_tokens == len(ids)
    assert new.continuation_ids == ids[1:]
    assert abs(old.logprob - new.logprob) > 1e-3  # the old one adds log p(first token | EOS)


def test_too_short_text_is_a_config_error(tmp_path):
    from llmmem.config import ConfigError

    (tmp_path / "s.jsonl").write_text(json.dumps({"text": "The", "label": 1}) + "\n"
                                      + json.dumps({"text": "The capital", "label": 0}) + "\n")
    (tmp_path / "s.yaml").write_text("task: s\nsuite: mia\ndata: s.jsonl\n")
    with pytest.raises(ConfigError, match="row 1.*at least 2"):
        run_task(load_task_file(tmp_path / "s.yaml"), _backend("gpt2", False))
