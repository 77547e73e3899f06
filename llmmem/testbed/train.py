"""Train a small Llama-architecture model on the synthetic world, and write it with its ground truth.

Output directory: a normal HF checkpoint (config, safetensors, word-level ``tokenizer.json``), ``world.json``
(every fact with its count and templates, every canary with its duplication count or held-out flag,
seeds, preset, training loss curve) and ``tasks/`` in llmmem's task format.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmmem.config import ConfigError
from llmmem.testbed.world import World, WorldConfig, build_world, world_json

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    # 2 layers: the smallest depth with induction heads, and the one where in-context recall formed within the
    # budget (4 layers needed ~1000 steps when it formed at all); see "Testbed training recipe" in DEVELOPERS.md
    layers: int = 2
    hidden: int = 192
    heads: int = 6  # head_dim = hidden / heads >= 32 (vLLM's CPU backend)
    intermediate: int = 512
    seqlen: int = 128
    batch: int = 16
    epochs: float = 6.0
    lr: float = 2e-3
    warmup: float = 0.05
    weight_decay: float = 0.01
    isolate_documents: bool = True  # packed rows, but attention never crosses a document boundary
    # where to train: cpu (default: the same testbed on every machine) | cuda | cuda:N | auto; and the precision:
    # auto = bfloat16 autocast on CUDA (float32 master weights, saved in float32), float32 on the CPU
    device: str = "cpu"
    dtype: str = "auto"
    world: WorldConfig = field(default_factory=WorldConfig)

    def __post_init__(self):
        from llmmem.config import check_device, parse_choice

        self.device = check_device(str(self.device))
        self.dtype = parse_choice("testbed: dtype", self.dtype, TRAIN_DTYPES)
        if self.dtype == "bfloat16" and self.device == "cpu":
            raise ConfigError("testbed: dtype=bfloat16 (autocast) needs a CUDA device (device=cuda); on the CPU the "
                              "testbed trains in float32")
        if self.hidden % self.heads or self.hidden // self.heads < 32:
            raise ConfigError(f"testbed: hidden/heads must be an integer >= 32 (got {self.hidden}/{self.heads})")
        for k in ("layers", "hidden", "heads", "intermediate", "seqlen", "batch"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"testbed: {k} must be > 0")
        if self.epochs <= 0 or self.lr <= 0:
            raise ConfigError("testbed: epochs and lr must be > 0")


TRAIN_DTYPES = ("auto", "float32", "bfloat16")


def train_device(cfg: TrainConfig):
    """(torch device, bf16 autocast?) for a training config; a CUDA device without CUDA is one ConfigError line."""
    import torch

    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"testbed: device={cfg.device} but CUDA is not available here; use device=cpu")
        if ":" in want and int(want.split(":")[1]) >= torch.cuda.device_count():
            raise ConfigError(f"testbed: device={want} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif want != "cpu":
        raise ConfigError(f"testbed: device={cfg.device} is not supported for training; use cpu, cuda, cuda:N or auto")
    dev = torch.device(want)
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and dev.type == "cuda")
    if bf16 and dev.type != "cuda":
        raise ConfigError("testbed: dtype=bfloat16 (autocast) needs a CUDA device; on the CPU the testbed trains in "
                          "float32")
    return dev, bf16


PRESETS = {
    # for tests: well under a minute on 2 CPU cores
    "tiny": lambda: TrainConfig(layers=2, hidden=64, heads=2, intermediate=192, seqlen=64, batch=16, epochs=6.0,
                                lr=3e-3, world=WorldConfig(n_entities=40, n_cities=12, n_employers=10, max_count=16,
                                                           max_dup=16, canaries_per_dup=3, n_assoc=800, n_copy=500,
                                                           n_override=400, n_openbook=200, n_heldout_entities=40,
                                                           n_classify=50)),
    # the default: ~4.5 minutes on one CPU core (budget: 8)
    "small": lambda: TrainConfig(),
}


def _typed(key: str, value, default):
    """A config value parsed as its default's type (int, float, bool, str, or a [min, max] pair of ints)."""
    from llmmem.config import parse_bool, parse_float, parse_int

    if isinstance(default, bool):
        return parse_bool(key, value)
    if isinstance(default, int):
        return parse_int(key, value)
    if isinstance(default, float):
        return parse_float(key, value)
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(default):
            raise ConfigError(f"{key}={value!r} must be a list of {len(default)} integers, e.g. {list(default)}")
        return tuple(parse_int(f"{key}[{i}]", x) for i, x in enumerate(value))
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{key}={value!r} must be a string")
    return value


def preset_config(name: str, overrides: dict | None = None) -> TrainConfig:
    """A preset's config, with optional overrides ``{"train": {...}, "world": {...}}`` (e.g. from YAML)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown testbed preset {name!r}; choose from: {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    if not overrides:
        return cfg
    from llmmem.config import check_keys

    check_keys("testbed config", overrides, {"train", "world"})
    world_kw = asdict(cfg.world)
    for k, v in check_keys("testbed config: world", overrides.get("world") or {}, world_kw).items():
        world_kw[k] = _typed(f"testbed config: world.{k}", v, world_kw[k])
    train_kw = {k: v for k, v in asdict(cfg).items() if k != "world"}
    for k, v in check_keys("testbed config: train", overrides.get("train") or {}, train_kw).items():
        train_kw[k] = _typed(f"testbed config: train.{k}", v, train_kw[k])
    return TrainConfig(**train_kw, world=WorldConfig(**world_kw))


# ----------------------------------------------------------------------------- tokenizer
def build_tokenizer(world: World):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + world.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=4096)


# ----------------------------------------------------------------------------- training
def _packed_batches(docs_ids: list[list[int]], seqlen: int, batch: int, rng: random.Random,
                    keep: list[bool] | None = None):
    """One epoch: documents shuffled, concatenated (each <s> ... </s>), cut into [batch, seqlen+1] rows, with
    position ids that restart at every document. transformers reads restarting position ids (and no attention
    mask) as packed sequences and masks attention across documents, so no episode sees another's keys.

    With ``keep`` (one flag per document: False = blanked, see :func:`training_stream`) each batch also carries a
    bool mask of the tokens that belong to kept documents; the shuffle is the same either way."""
    import torch

    order = list(range(len(docs_ids)))
    rng.shuffle(order)
    stream: list[int] = []
    pos: list[int] = []
    mask: list[bool] = []
    for i in order:
        stream += docs_ids[i]
        pos += range(len(docs_ids[i]))
        if keep is not None:
            mask += [keep[i]] * len(docs_ids[i])
    n_rows = len(stream) // (seqlen + 1)
    rows = torch.tensor(stream[: n_rows * (seqlen + 1)], dtype=torch.long).view(n_rows, seqlen + 1)
    prow = torch.tensor(pos[: n_rows * (seqlen + 1)], dtype=torch.long).view(n_rows, seqlen + 1)
    mrow = None if keep is None else torch.tensor(mask[: n_rows * (seqlen + 1)]).view(n_rows, seqlen + 1)
    for i in range(0, n_rows - batch + 1, batch):
        if mrow is None:
            yield rows[i:i + batch], prow[i:i + batch]
        else:
            yield rows[i:i + batch], prow[i:i + batch], mrow[i:i + batch]


def training_stream(world: World, tok, blank: set[str] | None = None) -> tuple[list[list[int]], list[bool] | None]:
    """The token ids of every training document (<s> ... </s>), in corpus order, and with ``blank`` (planted item
    ids) a keep flag per document. A blanked document keeps its place and length but its tokens are all
    ``<pad>``: the item's text never reaches the model, and the packing (rows, batches, steps, the learning-rate
    schedule) is the same as with nothing blanked, so models that differ in their items differ in nothing else."""
    eos = tok.eos_token_id
    docs_ids = [tok(text)["input_ids"] + [eos] for _, text in world.documents]
    if blank is None:
        return docs_ids, None
    unknown = set(blank) - set(world.doc_items)
    if unknown:
        raise ValueError(f"blank: items with no document in the corpus: {sorted(unknown)[:5]}")
    keep = [item not in blank for item in world.doc_items]
    pad = tok.pad_token_id
    docs_ids = [ids if k else [pad] * len(ids) for ids, k in zip(docs_ids, keep)]
    return docs_ids, keep


def blanked_loss(model, ids, position_ids, keep):
    """Next-token loss of packed rows where blanked tokens (``keep`` False) neither are predicted nor predict: a
    target counts when it and the token before it belong to kept documents (with attention kept inside
    documents, no counted position reads a blanked token). The sum is divided by the number of target positions
    in the batch, blanked or not, so a blanked document does not re-weight the others: in a batch without one,
    the gradient is bit-identical to that of the same batch with nothing blanked."""
    import torch.nn.functional as F

    logits = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits[:, :-1]
    target = ids[:, 1:]
    weight = (keep[:, 1:] & keep[:, :-1]).to(logits.dtype)
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return (nll * weight.reshape(-1).float()).sum() / target.numel()


def packed_forward(model, ids, position_ids=None):
    """Causal-LM loss over packed rows; with ``position_ids`` restarting per document, attention stays inside
    each document. ``use_cache=False`` matters: with a cache, transformers does not read restarting position
    ids as packed sequences and lets documents attend to each other."""
    return model(input_ids=ids, position_ids=position_ids, labels=ids.clone(), use_cache=False)


def _probe_sets(world: World, tok, n: int = 64) -> dict:
    """Held-out prompts whose answer is one word (one token): the training curve tracks first-token accuracy on
    them, so the world.json shows when recall and in-context abilities appear, not only the loss."""
    out = {}
    for name in ("recall", "assoc", "override"):
        rows = world.eval_sets[name]
        if name == "recall":  # facts seen >= 16 times: the acceptance bucket
            rows = [r for r in rows if r["count"] >= 16] or rows
        rows = random.Random(f"probe:{name}").sample(rows, min(n, len(rows)))
        out[name] = [(tok(r["prompt"])["input_ids"], tok.convert_tokens_to_ids(r["answer"])) for r in rows]
    return out


def _probe(model, probes: dict, pad_id: int, device=None, autocast=None) -> dict:
    import contextlib

    import torch

    was_training = model.training
    model.eval()
    acc = {}
    with torch.no_grad():
        for name, rows in probes.items():
            if not rows:
                continue
            width = max(len(ids) for ids, _ in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, (r, _) in enumerate(rows):
                ids[i, :len(r)] = torch.tensor(r)
                mask[i, :len(r)] = 1
            if device is not None and device.type != "cpu":
                ids, mask = ids.to(device), mask.to(device)
            with autocast() if autocast else contextlib.nullcontext():
                logits = model(input_ids=ids, attention_mask=mask).logits
            last = torch.tensor([len(r) - 1 for r, _ in rows])
            pred = logits[torch.arange(len(rows)), last].argmax(-1).cpu()
            acc[name] = round(float((pred == torch.tensor([a for _, a in rows])).float().mean()), 3)
    model.train(was_training)
    return acc


def train(world: World, cfg: TrainConfig, seed: int, quiet: bool = False, threads: int | None = None,
          blank: set[str] | None = None, probe_curve: bool = True):
    """Train the testbed model on ``cfg.device``: initialised on the CPU from ``seed`` (the same initial weights
    on any device), trained in float32, or with bfloat16 autocast on CUDA (float32 master weights and
    optimizer state); returned on the CPU in float32. ``blank`` (planted item ids; None: off) blanks those items'
    documents in place (:func:`training_stream`) and trains with :func:`blanked_loss` -- also when the set is
    empty, so models with and without blanked items share one loss: the leave-one-out and subsampled models of
    ``llmmem.testbed.memscore``. The default (None) is the plain HF loss, as every testbed build.
    ``probe_curve=False`` probes only at the last step (the probe costs as much as training on a short run)."""
    import contextlib

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmmem.progress import progress

    device, bf16 = train_device(cfg)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else None
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tok = build_tokenizer(world)
    eos = tok.eos_token_id
    docs_ids, keep = training_stream(world, tok, blank)
    kinds = [k for k, _ in world.documents]
    mcfg = LlamaConfig(vocab_size=len(tok), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                       max_position_embeddings=max(512, cfg.seqlen), bos_token_id=tok.bos_token_id, eos_token_id=eos,
                       pad_token_id=tok.pad_token_id, tie_word_embeddings=True, rope_theta=10000.0)
    model = LlamaForCausalLM(mcfg)
    if device.type != "cpu":
        model.to(device)
    tokens_per_epoch = sum(len(d) for d in docs_ids)
    steps_per_epoch = tokens_per_epoch // ((cfg.seqlen + 1) * cfg.batch)
    total = max(1, int(steps_per_epoch * cfg.epochs))
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.dim() < 2 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    warm = max(1, int(total * cfg.warmup))

    def lr_at(step):
        if step < warm:
            return cfg.lr * (step + 1) / warm
        prog = (step - warm) / max(1, total - warm)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))

    rng = random.Random(seed)
    probes = _probe_sets(world, tok)
    probe_every = max(1, total // 25)
    curve = []
    step, t0 = 0, time.time()
    bar = progress(total=total, desc="testbed train", quiet=quiet, unit="step", leave=True)
    model.train()
    ema, last_probe = None, {}
    while step < total:
        for batch, pos, *mask in _packed_batches(docs_ids, cfg.seqlen, cfg.batch, rng, keep):
            if step >= total:
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            if device.type != "cpu":
                batch, pos = batch.to(device, non_blocking=True), pos.to(device, non_blocking=True)
                mask = [m.to(device, non_blocking=True) for m in mask]
            position_ids = pos[:, :-1] if cfg.isolate_documents else None
            with autocast() if autocast else contextlib.nullcontext():
                if keep is None:
                    loss = packed_forward(model, batch[:, :-1], position_ids).loss
                else:
                    loss = blanked_loss(model, batch[:, :-1], position_ids, mask[0][:, :-1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
            probe_now = (probe_curve and step % probe_every == 0) or step == total
            if probe_now or step % max(1, total // 100) == 0:
                point = {"step": step, "loss": round(ema, 4), "lr": round(lr_at(step - 1), 6),
                         "seconds": round(time.time() - t0, 1)}
                if probe_now:
                    point["probe"] = last_probe = _probe(model, probes, tok.pad_token_id, device, autocast)
                curve.append(point)
            if step % max(1, total // 10) == 0 and (quiet is False) and not sys.stderr.isatty():
                log.info("testbed train: step %d/%d loss %.3f %s (%.0fs)", step, total, ema, last_probe, time.time() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.3f}", **last_probe)
    bar.close()
    model.eval()
    if device.type != "cpu":
        model.to("cpu")
    info = {"steps": total, "epochs": cfg.epochs, "tokens_per_epoch": tokens_per_epoch, "seconds": round(time.time() - t0, 1),
            "device": str(device), "precision": "bfloat16 autocast" if bf16 else "float32",
            "params": sum(p.numel() for p in model.parameters()), "loss_curve": curve,
            "documents_by_kind": {k: kinds.count(k) for k in sorted(set(kinds))}}
    if keep is not None:
        info["blanked_documents"] = keep.count(False)
    return model, tok, info


# ----------------------------------------------------------------------------- task files
def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_tasks(world: World, out: Path, exposure_alternatives: int | None = None) -> None:
    """Task YAML + jsonl for llmmem's suites, under ``out/tasks``.

    The canary task declares its secret space (``alphabet``, ``length``, ``separator`` under
    ``options.exposure``: ``secret_digits`` digits joined by spaces, as ``world.py`` writes them) and scores
    each secret against ``exposure_alternatives`` others (default :data:`llmmem.exposure.DEFAULT_ALTERNATIVES`).
    """
    from llmmem.exposure import DEFAULT_ALTERNATIVES

    n_alt = DEFAULT_ALTERNATIVES if exposure_alternatives is None else int(exposure_alternatives)
    t = out / "tasks"
    e = world.eval_sets
    gen = "generation_kwargs: {max_gen_toks: 4, until: [\".\"]}\n"
    lo, hi = world.config.assoc_pairs
    assoc_chance = sum(1 / n for n in range(lo, hi + 1)) / (hi - lo + 1)
    _write(t / "testbed_recall.jsonl", _jsonl(e["recall"]))
    _write(t / "testbed_recall.yaml",
           "task: testbed_recall\nsuite: recall\ndescription: Testbed closed-book recall of planted facts, bucketed "
           "by how many times each fact was written.\ndata: testbed_recall.jsonl\ndoc_to_text: '{{prompt}}'\n"
           "doc_to_target: '{{answer}}'\n" + gen + "metric_list: [exact_match]\nbucket_by: count\nmetadata: {version: 1}\n")
    _write(t / "testbed_canaries.jsonl", _jsonl(e["canaries"]))
    digits = "['0','1','2','3','4','5','6','7','8','9']"
    n_digits = world.config.secret_digits
    _write(t / "testbed_canaries.yaml",
           "task: testbed_canaries\nsuite: extraction\ndescription: Testbed canary extraction "
           f"({n_digits}-digit secrets) and exposure, bucketed by duplication count (heldout = never trained).\n"
           "data: testbed_canaries.jsonl\nbucket_by: group\n"
           "metric_list: [extractable, token_match, prefix_match, tf_accuracy, suffix_nll]\n"
           f"options:\n  prefix_tokens: 8\n  suffix_tokens: {n_digits}\n  text_field: text\n"
           f"  exposure: {{prefix_field: prefix, secret_field: secret, alphabet: {digits}, length: {n_digits}, "
           f"separator: ' ', n_alternatives: {n_alt}}}\nmetadata: {{version: 2}}\n")
    _write(t / "testbed_mia.jsonl", _jsonl(e["canaries"]))
    _write(t / "testbed_mia.yaml",
           "task: testbed_mia\nsuite: mia\ndescription: Testbed membership inference - trained canaries (members) vs "
           "held-out canaries.\ndata: testbed_mia.jsonl\nbucket_by: group\n"
           "options: {text_field: text, label_field: label, k: 0.2}\nmetadata: {version: 1}\n")
    for name, desc, extra in (
        ("assoc", "Testbed associative recall (key value pairs in context, then a key).",
         f"bucket_by: n_pairs\nchance: {assoc_chance:.4f}\n"),
        ("override", "Testbed overriding QA - the passage contradicts a planted fact.",
         "options: {parametric_target: '{{parametric}}'}\nmetric_list: [follows_context, parametric]\n"
         "bucket_by: relation\n"),
        ("openbook", "Testbed open-book QA about entities never seen in training.", "bucket_by: relation\n"),
        ("classify", "Testbed in-context linear classification (pos/neg from a random hyperplane).", "chance: 0.5\n"),
    ):
        _write(t / f"testbed_{name}.jsonl", _jsonl(e[name]))
        _write(t / f"testbed_{name}.yaml",
               f"task: testbed_{name}\nsuite: icl\ndescription: {desc}\ndata: testbed_{name}.jsonl\n"
               "doc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n" + gen + extra
               + ("metric_list: [exact_match]\n" if "metric_list" not in extra else "") + "metadata: {version: 1}\n")


def build_testbed(output: str | Path, preset: str = "small", seed: int = 0, overwrite: bool = False,
                  exclude: list[str] | None = None, quiet: bool = False, threads: int | None = None,
                  config: TrainConfig | None = None) -> Path:
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"--output {out} is not empty; pass --overwrite to replace it")
    cfg = config or preset_config(preset)
    world = build_world(seed, cfg.world, exclude=set(exclude or ()))
    model, tok, info = train(world, cfg, seed, quiet=quiet, threads=threads)
    from llmmem.testbed.acceptance import TARGETS

    final = next((pt["probe"] for pt in reversed(info["loss_curve"]) if "probe" in pt), {})
    target = TARGETS["assoc"][1]
    if preset != "tiny" and final.get("assoc", 1.0) < target:  # tiny is a test fixture: no ICL expected
        # the induction phase change is a bifurcation: some seeds settle on a partial, position-bound solution
        log.warning("testbed seed %d: in-context associative recall ended at %.2f on the training probe (target %.1f): "
                    "the induction circuit did not fully form for this seed; its curve is in world.json "
                    "(training.loss_curve[].probe). Another --seed usually does.", seed, final["assoc"], target)
    from llmmem.results import atomic_directory

    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        extra = {"preset": preset, "train": {k: v for k, v in asdict(cfg).items() if k != "world"},
                 "excluded_canaries": sorted(i for i in exclude or [] if i.startswith("canary-")),
                 "excluded_items": world.excluded, "training": info}
        (tmp / "world.json").write_text(world_json(world, extra))
        write_tasks(world, tmp, exposure_alternatives=_task_alternatives(preset))
    return out


def _task_alternatives(preset: str) -> int | None:
    # tiny is a test fixture: 200 alternatives keep its exposure pass short (noise: llmmem/exposure.py)
    return 200 if preset == "tiny" else None


def preset_tasks(dest: str | Path, preset: str = "small", seed: int = 0, config: TrainConfig | None = None) -> Path:
    """Write into ``dest/tasks`` the tasks ``build_testbed(preset=preset, seed=seed)`` ships, without training
    (the world is a pure function of the seed and its config, ~1 s): commands on a testbed not built yet are
    validated against its real tasks before the minutes of training start."""
    cfg = config or preset_config(preset)
    dest = Path(dest)
    write_tasks(build_world(seed, cfg.world), dest, exposure_alternatives=_task_alternatives(preset))
    return dest / "tasks"
