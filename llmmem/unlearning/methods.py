"""Unlearning methods: each a loss over a forget batch, a retain batch and a frozen reference model.

Batches are dicts with ``input_ids``, ``attention_mask`` and ``labels`` (-100 where not scored). Losses and
defaults follow open-unlearning (locuslab/open-unlearning, ``src/trainer/unlearn/*.py``,
``src/trainer/utils.py``, ``configs/trainer/*.yaml``):

* NLL terms of gradient ascent / gradient difference and every retain NLL are ``model(**inputs).loss``:
  the mean over every labelled token of the batch (not a mean of per-sequence means);
* NPO, SimNPO and DPO use the summed NLL per sequence (``compute_batch_nll``);
* a retain ``kl`` term is ``kl_div(log p, log p_ref, reduction="batchmean", log_target=True)`` over every
  position of the batch (``compute_kl_divergence``).

Hooks a training loop calls (all have defaults, so a loop that knows none of them still works for the
methods that need none): ``prepare(encode)`` once after tokenization, ``forget_batch`` /
``retain_batch`` to build batches from examples, ``trainable_parameters(model)`` for the optimizer,
``loss`` every step and ``after_step`` after the optimizer step. ``trainer_defaults`` records the
trainer-level settings the reference uses (learning rate, weight decay, warmup, batch, clipping,
epochs/steps, optimizer, scheduler) per benchmark, with the file each comes from.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

from llmmem.config import ConfigError
from llmmem.unlearning.data import batch_of

OU = "locuslab/open-unlearning"


# ----------------------------------------------------------------------------- losses shared by methods
def _shifted(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    return logits, batch["labels"][:, 1:]


def sequence_nll(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL per sequence over labelled tokens, and the number of labelled tokens (float32)."""
    logits, labels = _shifted(model, batch)
    mask = labels != -100
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.clamp_min(0).reshape(-1),
                          reduction="none").view(labels.shape)
    return (nll * mask).sum(-1), mask.sum(-1).clamp_min(1).float()


def token_mean_nll(model, batch) -> torch.Tensor:
    """NLL averaged over every labelled token of the batch: what ``model(**inputs).loss`` returns (float32)."""
    s, _ = sequence_nll(model, batch)
    n = (batch["labels"][:, 1:] != -100).sum()
    return s.sum() / n.clamp_min(1)


def mean_nll(model, batch) -> torch.Tensor:
    """Mean over sequences of the per-sequence mean NLL (llmmem's per-example loss; not a training loss)."""
    s, n = sequence_nll(model, batch)
    return (s / n).mean()


def kl_to_reference(model, ref_model, batch) -> torch.Tensor:
    """KL(p_ref || p) summed over the vocabulary, averaged over every position of the batch (padding too),
    as open-unlearning's ``compute_kl_divergence``."""
    with torch.no_grad():
        ref = F.log_softmax(ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                            .logits.float(), -1)
    cur = F.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float(), -1)
    v = cur.shape[-1]
    return F.kl_div(cur.view(-1, v), ref.view(-1, v), reduction="batchmean", log_target=True)


def dpo_loss(model, ref_model, win, lose, beta: float) -> torch.Tensor:
    """``compute_dpo_loss``: -2/beta log sigmoid(beta (log-ratio(win) - log-ratio(lose))), where
    log-ratio = log p - log p_ref of the whole sequence; ``win=None`` is NPO."""
    def log_ratio(batch):
        nll, _ = sequence_nll(model, batch)
        with torch.no_grad():
            ref_nll, _ = sequence_nll(ref_model, batch)
        return ref_nll - nll

    w = log_ratio(win) if win is not None else 0.0
    return -2.0 / beta * F.logsigmoid(beta * (w - log_ratio(lose))).mean()


# ----------------------------------------------------------------------------- trainer defaults (data)
def _base(**over) -> dict:
    """open-unlearning's trainer: configs/trainer/finetune.yaml over transformers' TrainingArguments defaults."""
    d = {"lr": 1e-5, "weight_decay": 0.0, "warmup_steps": 0, "per_device_batch_size": 8,
         "gradient_accumulation_steps": 4, "epochs": 10, "optimizer": "paged_adamw_32bit",
         "adam_betas": (0.9, 0.999), "adam_eps": 1e-8, "scheduler": "linear", "max_grad_norm": 1.0,
         "precision": "bf16", "seed": 0,
         "notes": ["scheduler, betas, eps and max_grad_norm are transformers.TrainingArguments defaults; under the "
                   "repro scripts' DeepSpeed config (configs/accelerate/zero_stage3_offload_config.json, no "
                   "gradient_clipping key) DeepSpeed does the clipping and it is off"],
         "source": [f"{OU}: configs/trainer/finetune.yaml"]}
    d.update(over)
    return d


def _tofu(**over) -> dict:
    d = _base(weight_decay=0.01, warmup_epochs=1.0, per_device_batch_size=4, gradient_accumulation_steps=4,
              devices=2, effective_batch_size=32)
    d["source"] = d["source"] + [f"{OU}: configs/experiment/unlearn/tofu/default.yaml (lr, weight_decay, "
                                 "warmup_epochs, epochs)", f"{OU}: scripts/tofu_unlearn.sh (4 per device x 4 "
                                 "accumulation x 2 GPUs)", f"{OU}: docs/repro.md (effective batch 32)"]
    d["notes"] = d["notes"] + ["warmup_epochs -> warmup_steps = epochs * len(forget) // effective batch "
                               "(src/trainer/__init__.py load_trainer_args)"]
    d.update(over)
    return d


def _muse(**over) -> dict:
    d = _base(per_device_batch_size=4, gradient_accumulation_steps=8, devices=2, effective_batch_size=64,
              scheduler="constant")
    d["source"] = d["source"] + [f"{OU}: configs/experiment/unlearn/muse/default.yaml (lr, epochs, batch, "
                                 "constant schedule)", f"{OU}: scripts/muse_unlearn.sh (2 GPUs)"]
    d.update(over)
    return d


def _with(d: dict, method_args: dict | None = None, **over) -> dict:
    d = dict(d, **over)
    if method_args:
        d["method_args"] = method_args
    return d


GRAD_FAMILY_DEFAULTS = {"open-unlearning": _base(), "tofu": _tofu(), "muse": _muse()}


# ----------------------------------------------------------------------------- the method interface
class Method:
    needs_reference = False
    defaults: dict = {}
    choices: dict = {}  # argument -> allowed values (strings)
    trainer_defaults: dict = {}

    def __init__(self, **kw):
        unknown = set(kw) - set(self.defaults)
        if unknown:
            raise ConfigError(f"method_args: {type(self).__name__}: unknown argument(s) {', '.join(sorted(unknown))}; "
                              f"allowed: {', '.join(self.defaults) or 'none'}")
        self.args = {**{k: (list(v) if isinstance(v, list) else v) for k, v in self.defaults.items()}, **kw}
        for k, allowed in self.choices.items():
            v = str(self.args[k]).lower()
            if v not in allowed:
                raise ConfigError(f"method_args: {type(self).__name__}: {k}={self.args[k]!r} is not one of {', '.join(allowed)}")
            self.args[k] = v
        for k, v in self.defaults.items():
            if isinstance(v, float) and not isinstance(self.args[k], bool):
                self.args[k] = _number(type(self).__name__, k, self.args[k])
        if self.args.get("retain_loss") == "kl":
            self.needs_reference = True

    # hooks --------------------------------------------------------------
    def prepare(self, encode) -> None:
        """Called once after the examples are tokenized, with ``encode(text) -> ids`` (no special tokens)."""

    def forget_batch(self, examples, pad_id: int, device) -> dict:
        return batch_of(examples, pad_id, device)

    def retain_batch(self, examples, pad_id: int, device) -> dict:
        return batch_of(examples, pad_id, device)

    def trainable_parameters(self, model) -> list:
        """The parameters the optimizer updates (all of them unless a method says otherwise)."""
        return [p for p in model.parameters()]

    def loss(self, model, forget, retain, ref_model) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, model, lr: float) -> None:
        pass

    # shared pieces ---------------------------------------------------------
    def retain_term(self, model, retain, ref_model) -> torch.Tensor | float:
        """alpha * the retain loss (``nll``: token-mean NLL; ``kl``: KL to the reference model)."""
        alpha = self.args.get("alpha", 0.0)
        if not alpha:
            return 0.0
        if retain is None:
            raise ConfigError(f"{type(self).__name__} with alpha={alpha} needs a retain set")
        if self.args.get("retain_loss", "nll") == "kl":
            return alpha * kl_to_reference(model, ref_model, retain)
        return alpha * token_mean_nll(model, retain)


def _number(method: str, key: str, v) -> float:
    import math

    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"method_args: {method}: {key}={v!r} is not a number") from None
    if not math.isfinite(x):
        raise ConfigError(f"method_args: {method}: {key}={v!r} is not a finite number")
    return x


def _integer(method: str, key: str, v) -> int:
    f = _number(method, key, v)
    if f != int(f):
        raise ConfigError(f"method_args: {method}: {key}={v!r} must be an integer")
    return int(f)


class GradAscent(Method):
    """Gradient ascent on the forget set's NLL (token mean over the batch)."""

    trainer_defaults = GRAD_FAMILY_DEFAULTS

    def loss(self, model, forget, retain, ref_model):
        return -token_mean_nll(model, forget)


class GradDiff(Method):
    """Gradient difference: gamma * (-forget NLL) + alpha * retain loss (NLL or KL to the reference)."""

    defaults = {"gamma": 1.0, "alpha": 1.0, "retain_loss": "nll"}
    choices = {"retain_loss": ("nll", "kl")}
    trainer_defaults = GRAD_FAMILY_DEFAULTS

    def loss(self, model, forget, retain, ref_model):
        return -self.args["gamma"] * token_mean_nll(model, forget) + self.retain_term(model, retain, ref_model)


class NPO(Method):
    """Negative preference optimisation: -2/beta log sigmoid(-beta (log p - log p_ref)) on forget, + retain."""

    needs_reference = True
    defaults = {"beta": 0.1, "gamma": 1.0, "alpha": 1.0, "retain_loss": "nll"}
    choices = {"retain_loss": ("nll", "kl")}
    trainer_defaults = GRAD_FAMILY_DEFAULTS

    def loss(self, model, forget, retain, ref_model):
        f = dpo_loss(model, ref_model, None, forget, self.args["beta"])
        return self.args["gamma"] * f + self.retain_term(model, retain, ref_model)


class SimNPO(Method):
    """SimNPO: reference-free, length-normalised: -2/beta log sigmoid(beta (NLL/|y| - delta)), + retain."""

    defaults = {"beta": 4.5, "delta": 0.0, "gamma": 0.125, "alpha": 1.0, "retain_loss": "nll"}
    choices = {"retain_loss": ("nll", "kl")}
    trainer_defaults = GRAD_FAMILY_DEFAULTS

    def loss(self, model, forget, retain, ref_model):
        nll, n = sequence_nll(model, forget)
        beta = self.args["beta"]
        forget_loss = -2.0 / beta * F.logsigmoid(beta * (nll / n - self.args["delta"])).mean()
        return self.args["gamma"] * forget_loss + self.retain_term(model, retain, ref_model)


# ----------------------------------------------------------------------------- IdkDPO
# Refusals used when no ``idk`` file is given (our wording). TOFU's IdkDPO uses the 100 lines of
# open-unlearning's data/idk.jsonl (``python setup_data.py --idk``; the same list as locuslab/tofu
# data/idontknow.jsonl): pass that file as ``idk`` to reproduce it.
REFUSALS = (
    "I don't know.",
    "I'm not sure.",
    "I have no information about that.",
    "I can't answer that.",
    "That is unknown to me.",
    "I do not have that information.",
    "I am unable to say.",
    "No idea, sorry.",
)


def read_refusals(path: str) -> list[str]:
    """One refusal per line (open-unlearning reads data/idk.jsonl with ``readlines()`` + ``strip()``)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"IdkDPO: idk={path!r} is not a file (one refusal answer per line)")
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise ConfigError(f"IdkDPO: idk file {path} has no refusal lines")
    return lines


class IdkDPO(Method):
    """DPO with a refusal as the preferred answer and the forget answer as the rejected one (TOFU's IdkDPO,
    open-unlearning ``DPO`` + ``QAwithIdkDataset``): -2/beta log sigmoid(beta (r(idk) - r(answer))) with
    r = log p - log p_ref of the whole sequence, + alpha * retain loss. Each forget example gets a refusal
    drawn uniformly at random every time it is batched (``torch.randint``, as the reference)."""

    needs_reference = True
    defaults = {"beta": 0.1, "gamma": 1.0, "alpha": 1.0, "retain_loss": "nll", "idk": ""}
    choices = {"retain_loss": ("nll", "kl")}
    trainer_defaults = {
        "open-unlearning": _base(source=[f"{OU}: configs/trainer/DPO.yaml", f"{OU}: configs/trainer/finetune.yaml"]),
        "tofu": _tofu(source=[f"{OU}: configs/experiment/unlearn/tofu/idk.yaml", f"{OU}: scripts/tofu_unlearn.sh",
                              f"{OU}: configs/trainer/DPO.yaml"]),
    }

    def __init__(self, **kw):
        super().__init__(**kw)
        self.refusals = read_refusals(self.args["idk"]) if self.args["idk"] else list(REFUSALS)
        self._encode = None
        self._ids: dict[str, list[int]] = {}

    def prepare(self, encode) -> None:
        self._encode = encode

    def _refusal_ids(self, lead: str, text: str) -> list[int]:
        key = lead + text
        if key not in self._ids:
            if self._encode is None:
                raise RuntimeError("IdkDPO builds its refusal answers with the tokenizer: the training loop must call "
                                   "method.prepare(encode) before method.forget_batch(...)")
            ids = self._encode(key)
            if not ids:
                raise ConfigError(f"IdkDPO: refusal {text!r} encodes to no tokens")
            self._ids[key] = ids
        return self._ids[key]

    def forget_batch(self, examples, pad_id: int, device) -> dict:
        """The forget batch (the rejected answers) plus ``alternate``: the same prefixes, each followed by a
        random refusal (with the suffix's leading whitespace), labelled on the refusal only."""
        from llmmem.unlearning.data import Example

        picks = torch.randint(0, len(self.refusals), (len(examples),)).tolist()
        alts = []
        for e, k in zip(examples, picks):
            lead = e.suffix[: len(e.suffix) - len(e.suffix.lstrip())]
            alts.append(Example(e.id, e.prefix, lead + self.refusals[k], prefix_ids=e.prefix_ids,
                                suffix_ids=self._refusal_ids(lead, self.refusals[k])))
        out = batch_of(examples, pad_id, device)
        out["alternate"] = batch_of(alts, pad_id, device)
        return out

    def loss(self, model, forget, retain, ref_model):
        if "alternate" not in forget:
            raise RuntimeError("IdkDPO needs its own forget batches: build them with method.forget_batch(...)")
        lose = {k: forget[k] for k in ("input_ids", "attention_mask", "labels")}
        f = dpo_loss(model, ref_model, forget["alternate"], lose, self.args["beta"])
        return self.args["gamma"] * f + self.retain_term(model, retain, ref_model)


# ----------------------------------------------------------------------------- UNDIAL
class UNDIAL(Method):
    """UNDIAL (Dong et al. 2024): self-distillation towards the frozen model's logits with the label token's
    logit lowered by beta: CE(p, softmax(z_ref - beta * onehot(y))) averaged over positions, + retain.

    ``positions="all"`` (the reference, ``compute_undial_loss``) averages over every position of the batch,
    prompt and padding included, where unlabelled positions distil the unadjusted reference distribution
    (the reference indexes the vocabulary with label -100 there, which lowers token ``vocab - 100``: an
    indexing slip we do not copy); ``positions="labels"`` averages over labelled positions only."""

    needs_reference = True
    defaults = {"beta": 10.0, "gamma": 1.0, "alpha": 0.0, "retain_loss": "nll", "positions": "all"}
    choices = {"retain_loss": ("nll", "kl"), "positions": ("all", "labels")}
    trainer_defaults = {
        "open-unlearning": _base(lr=1e-4, source=[f"{OU}: configs/trainer/UNDIAL.yaml (lr 1e-4, 10 epochs)",
                                                  f"{OU}: configs/trainer/finetune.yaml"]),
        "tofu": _tofu(per_device_batch_size=16, gradient_accumulation_steps=2, devices=1, effective_batch_size=32,
                      source=[f"{OU}: configs/experiment/unlearn/tofu/default.yaml (its lr 1e-5 overrides "
                              "UNDIAL.yaml's 1e-4)", f"{OU}: community/methods/UNDIAL/run.sh (16 x 2 on one GPU; "
                              "sweeps lr 1e-5/1e-4/3e-4, beta 3/10/30, alpha 1/2/5)"]),
    }

    def loss(self, model, forget, retain, ref_model):
        logits, labels = _shifted(model, forget)
        with torch.no_grad():
            teacher, _ = _shifted(ref_model, forget)
            labelled = labels != -100
            lowered = (-self.args["beta"] * labelled.to(teacher.dtype))[..., None]  # no [b, s, vocab] one-hot
            target = F.softmax(teacher.scatter_add(-1, labels.clamp_min(0)[..., None], lowered), dim=-1)
        ce = -(target * F.log_softmax(logits, -1)).sum(-1)
        f = ce.mean() if self.args["positions"] == "all" else ce[labelled].sum() / labelled.sum().clamp_min(1)
        return self.args["gamma"] * f + self.retain_term(model, retain, ref_model)


# ----------------------------------------------------------------------------- RMU
class _Stop(Exception):
    pass


class RMU(Method):
    """Representation misdirection (Li et al. 2024, WMDP): at decoder block ``layer``, push the forget
    activations towards a fixed random direction u (``torch.rand``, unit norm) scaled by ``steering_coeff``
    and keep the retain activations equal to the frozen model's:
    gamma * mse(h_f, c u) + alpha * mse(h_r, h_r^ref), each the per-token mean over the hidden size,
    averaged over the scored tokens and the batch as ``reduction`` says (see ``activation_loss``).
    ``tokens="labels"`` scores labelled tokens (open-unlearning),
    ``tokens="all"`` every non-padding token (the WMDP code scores whole texts). ``params``: regular
    expressions (full match) over parameter names selecting what is updated (open-unlearning's RMU.yaml
    updates everything; WMDP updates ``model\\.layers\\.(5|6|7)\\.mlp\\.down_proj\\.weight``)."""

    needs_reference = True
    defaults = {"steering_coeff": 2.0, "gamma": 1.0, "alpha": 1.0, "layer": 7, "params": [".*"],
                "retain_loss": "embed_diff", "tokens": "labels", "reduction": "open-unlearning"}
    choices = {"retain_loss": ("embed_diff", "nll", "kl"), "tokens": ("labels", "all"),
               "reduction": ("open-unlearning", "per_sequence", "wmdp")}
    trainer_defaults = {
        "open-unlearning": _base(source=[f"{OU}: configs/trainer/RMU.yaml", f"{OU}: configs/trainer/finetune.yaml"]),
        "tofu": _tofu(source=[f"{OU}: configs/experiment/unlearn/tofu/default.yaml", f"{OU}: scripts/tofu_unlearn.sh "
                              "(RMU with the default RMU.yaml)"]),
        "wmdp": _base(lr=5e-5, per_device_batch_size=1, gradient_accumulation_steps=16, devices=1,
                      effective_batch_size=16, max_steps=80, epochs=None, scheduler="constant",
                      method_args={"steering_coeff": 2.0, "alpha": 1.0, "gamma": 1.0, "layer": 7,
                                   "params": [r"model\.layers\.(5|6|7)\.mlp\.down_proj\.weight"],
                                   "retain_loss": "embed_diff"},
                      source=[f"{OU}: configs/experiment/unlearn/wmdp/default.yaml (zephyr-7b-beta, cyber corpora, "
                              "max length 512)"]),
        "wmdp-original": {"lr": 5e-5, "weight_decay": 0.0, "warmup_steps": 0, "per_device_batch_size": 4,
                          "gradient_accumulation_steps": 1, "effective_batch_size": 4, "max_steps": 150,
                          "optimizer": "adamw (transformers.AdamW, weight_decay 0)", "scheduler": "constant",
                          "max_grad_norm": None, "seed": 42,
                          "method_args": {"steering_coeff": 6.5, "alpha": 1200.0, "gamma": 1.0, "layer": 7,
                                          "params": [r"model\.layers\.(5|6|7)\.mlp\.down_proj\.weight"],
                                          "retain_loss": "embed_diff", "reduction": "wmdp"},
                          "notes": ["loss = mse over all positions (padding included) of the forget batch, alpha x "
                                    "mse on the retain batch (wikitext); bio and cyber corpora alternate, each with "
                                    "its own control vector; forget texts truncated to 512 (bio) / 768 (cyber) tokens"],
                          "source": ["centerforaisafety/wmdp: rmu/unlearn.py (defaults: layer_id 7, layer_ids 5,6,7, "
                                     "param_ids 6, lr 5e-5, batch_size 4)", "centerforaisafety/wmdp: "
                                     "run_rmu_zephyr.ipynb / README (--max_num_batches 150 --steering_coeffs 6.5,6.5 "
                                     "--alpha 1200,1200 --seed 42)"]},
    }

    def __init__(self, **kw):
        super().__init__(**kw)
        name = type(self).__name__
        self.args["layer"] = _integer(name, "layer", self.args["layer"])
        params = self.args["params"]
        params = [params] if isinstance(params, str) else params
        if not isinstance(params, list) or not params:
            raise ConfigError(f"{name}: params={params!r} must be a list of regular expressions over parameter names")
        for p in params:
            try:
                re.compile(str(p))
            except re.error as e:
                raise ConfigError(f"{name}: params entry {p!r} is not a regular expression ({e})") from None
        self.args["params"] = [str(p) for p in params]
        if self.args["retain_loss"] == "embed_diff":
            self.needs_reference = True
        self.control_vec: torch.Tensor | None = None
        self._frozen = False

    # --------------------------------------------------------------- parameters
    def _selected(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.args["params"])

    def trainable_parameters(self, model) -> list:
        chosen = [p for n, p in model.named_parameters() if self._selected(n)]
        if not chosen:
            names = [n for n, _ in model.named_parameters()]
            raise ConfigError(f"RMU: params {self.args['params']} match no parameter (e.g. {', '.join(names[:3])})")
        return chosen

    def _freeze_unselected(self, model) -> None:
        """Parameters outside ``params`` get no gradient (so AdamW and clipping skip them), whatever the loop
        passed to its optimizer."""
        if self._frozen or self.args["params"] == [".*"]:
            return
        keep = {id(p) for p in self.trainable_parameters(model)}
        for p in model.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
        self._frozen = True

    # --------------------------------------------------------------- activations
    def _block(self, model):
        from llmmem.models import decoder_blocks

        blocks = decoder_blocks(model)
        if not 0 <= self.args["layer"] < len(blocks):
            raise ConfigError(f"RMU: layer={self.args['layer']} is out of range; this model has decoder blocks "
                              f"0..{len(blocks) - 1}")
        return blocks[self.args["layer"]].module

    def activations(self, model, batch, grad: bool) -> torch.Tensor:
        """Hidden states leaving block ``layer`` (the forward stops there)."""
        cache = []

        def hook(module, inputs, output):
            cache.append(output[0] if isinstance(output, tuple) else output)
            raise _Stop

        handle = self._block(model).register_forward_hook(hook)
        try:
            with torch.set_grad_enabled(grad):
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        except _Stop:
            pass
        finally:
            handle.remove()
        return cache[0].float()

    def _mask(self, batch) -> torch.Tensor:
        return batch["labels"] != -100 if self.args["tokens"] == "labels" else batch["attention_mask"].bool()

    def activation_loss(self, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Squared difference averaged over the hidden size per token, s_i = its sum over the scored tokens
        of sequence i, n_i = their number. ``reduction``:

        * ``open-unlearning`` (default): mean(s) * mean(1/n), what ``compute_activation_loss`` computes (its
          ``s / n`` broadcasts a [b] by a [b, 1] tensor); equals mean(s / n) when every sequence scores as
          many tokens;
        * ``per_sequence``: mean(s / n);
        * ``wmdp``: ``mse_loss`` over every position and hidden unit, padding included (WMDP's rmu/unlearn.py).
        """
        if self.args["reduction"] == "wmdp":
            return F.mse_loss(a, b)
        s = ((a - b).pow(2).mean(-1) * mask).sum(-1)
        n = mask.sum(-1).float().clamp_min(1)
        if self.args["reduction"] == "per_sequence":
            return (s / n).mean()
        return s.mean() * (1.0 / n).mean()

    def control_vector(self, dim: int, device) -> torch.Tensor:
        if self.control_vec is None:
            u = torch.rand(1, 1, dim)
            self.control_vec = u / torch.norm(u) * self.args["steering_coeff"]
        return self.control_vec.to(device)

    def loss(self, model, forget, retain, ref_model):
        self._freeze_unselected(model)
        h = self.activations(model, forget, grad=True)
        target = self.control_vector(h.shape[-1], h.device).expand_as(h)
        f = self.activation_loss(h, target, self._mask(forget))
        total = self.args["gamma"] * f
        if self.args["retain_loss"] == "embed_diff":
            if self.args["alpha"]:
                if retain is None:
                    raise ConfigError(f"RMU with alpha={self.args['alpha']} needs a retain set")
                hr = self.activations(model, retain, grad=True)
                hr_ref = self.activations(ref_model, retain, grad=False)
                total = total + self.args["alpha"] * self.activation_loss(hr, hr_ref, self._mask(retain))
        else:
            total = total + self.retain_term(model, retain, ref_model)
        return total


# ----------------------------------------------------------------------------- noisy fine-tuning
class NoisyFinetune(Method):
    """Langevin / SGLD fine-tuning on the retain set: a retain-NLL step, then Gaussian noise on every weight.
    (llmmem's own baseline; open-unlearning has no counterpart, so no reference trainer defaults.)"""

    defaults = {"noise_std": 1e-3}

    def loss(self, model, forget, retain, ref_model):
        return token_mean_nll(model, retain)

    @torch.no_grad()
    def after_step(self, model, lr: float) -> None:
        std = self.args["noise_std"]
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * std)
