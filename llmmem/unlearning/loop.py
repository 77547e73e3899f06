"""The unlearning training loop: a method's loss over forget/retain batches, optimised with AdamW.

No evaluation here: the caller passes ``on_eval(step, model)`` (called at step 0, every ``every`` steps and
at the end) and measures what it wants. Before the first update the loop computes the difficulty
predictors that need the model (EL2N, and the summed per-example gradient norms over the first
``grad_norm_steps`` steps).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import random
import time
from collections.abc import Callable

import torch

from llmmem.config import ConfigError
from llmmem.unlearning import METHODS
from llmmem.unlearning.data import Example, tokenize
from llmmem.unlearning.difficulty import el2n_scores, per_example_grad_norm_sq
from llmmem.unlearning.spec import UnlearnSpec

log = logging.getLogger(__name__)


class TokenizerEncoder:
    """``encode(text, add_special_tokens)`` over a Hugging Face tokenizer (what ``tokenize`` needs)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok(text, add_special_tokens=add_special_tokens)["input_ids"]


def check_sets(forget: list[Example], retain: list[Example], nonmember: list[Example] | None = None) -> None:
    """The forget set must be non-empty and disjoint from the retain and never-seen sets (an overlap makes
    the forgetting and membership numbers meaningless)."""
    if not forget:
        raise ConfigError("the forget set is empty")
    f = {e.text for e in forget}
    for name, other in (("retain", retain), ("nonmember", nonmember or [])):
        both = f & {e.text for e in other}
        if both:
            raise ConfigError(f"the forget and {name} sets overlap: {len(both)} example(s) are in both "
                              f"(e.g. {next(iter(both))[:60]!r})")


def lr_factor(step: int, spec: UnlearnSpec) -> float:
    """Learning-rate multiplier at ``step`` (1-based): linear warmup, then constant / linear / cosine decay."""
    if spec.warmup_steps and step <= spec.warmup_steps:
        return step / spec.warmup_steps
    if spec.schedule == "constant":
        return 1.0
    span = max(1, spec.steps - spec.warmup_steps)
    done = (step - spec.warmup_steps) / span
    return max(0.0, 1.0 - done) if spec.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, done)))


def launched_with_accelerate() -> bool:
    """True under ``accelerate launch ... -m llmmem.cli unlearn ...`` (every accelerate launcher sets
    ``ACCELERATE_MIXED_PRECISION`` in the processes it starts)."""
    return "ACCELERATE_MIXED_PRECISION" in os.environ


def make_accelerator(spec: UnlearnSpec):
    """An ``accelerate.Accelerator`` for this run: the spec's precision decides (it is part of the cell), the
    launcher's settings decide the rest (processes, FSDP). Several processes need FSDP version 2 (the model
    is sharded in place, so the tracker evaluates the same module on every rank) or plain data parallelism,
    and at least one forget example per process in a batch."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    mp = "bf16" if spec.precision == "bf16" else "no"
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched not in ("no", mp):
        log.warning("accelerate launch --mixed_precision %s is not used: the unlearning spec's precision=%s decides "
                    "(it is part of the cell)", launched, spec.precision)
    acc = Accelerator(mixed_precision=mp)
    if acc.num_processes > 1:
        if spec.batch_size < acc.num_processes:
            raise ConfigError(f"batch_size={spec.batch_size} is smaller than the {acc.num_processes} processes "
                              f"accelerate launched; each process takes a slice of every batch")
        if acc.distributed_type == DistributedType.FSDP and getattr(acc.state.fsdp_plugin, "fsdp_version", 1) != 2:
            raise ConfigError("unlearning under FSDP needs FSDP version 2 (accelerate config: fsdp_version: 2): the "
                              "tracker evaluates the sharded model in place on every process")
    return acc


def unlearn(model, spec: UnlearnSpec, forget: list[Example], retain: list[Example], *, tokenizer, device,
            seed: int = 0, quiet: bool = True, on_eval: Callable[[int, object], None] | None = None,
            eval_every: int | None = None) -> dict:
    """Run ``spec.steps`` optimiser steps of ``spec.method`` on the model, in place; return the report.

    ``precision: bf16`` runs the forward passes under bfloat16 autocast on the model's device (float32 master
    weights and AdamW state). Under ``accelerate launch`` the loop uses ``accelerate.Accelerator``: the model and
    optimizer are prepared (e.g. sharded with FSDP), the backward pass and clipping go through it, each process
    takes its slice of every batch, the logged loss is the mean over processes, and the evaluation hook runs
    on every process (the caller writes results on the main process only)."""
    from llmmem.progress import progress

    method = METHODS.get(spec.method)(**spec.method_args)
    enc = TokenizerEncoder(tokenizer)
    for s in (forget, retain):
        tokenize(s, enc)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ref_model = None
    if method.needs_reference:
        ref_model = copy.deepcopy(model).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)
    method.prepare(lambda text: enc.encode(text, add_special_tokens=False))  # e.g. IdkDPO's refusal answers
    every = eval_every or spec.eval_every
    make_forget, make_retain = method.forget_batch, method.retain_batch

    acc = make_accelerator(spec) if launched_with_accelerate() else None
    rank, world = (acc.process_index, acc.num_processes) if acc is not None else (0, 1)
    autocast = contextlib.nullcontext
    if acc is None and spec.precision == "bf16":
        dev_type = torch.device(device).type if not isinstance(device, torch.device) else device.type
        autocast = lambda: torch.autocast(dev_type, dtype=torch.bfloat16)  # noqa: E731
    grad_norm_steps = spec.grad_norm_steps
    if world > 1 and grad_norm_steps:
        log.warning("per-example gradient norms (grad_norm_steps) are not computed with %d processes", world)
        grad_norm_steps = 0

    t0 = time.time()
    if on_eval:
        on_eval(0, model)
    el2n = dict(zip([e.id for e in forget], el2n_scores(model, forget, pad, device)))
    grad_sq = {e.id: 0.0 for e in forget}

    model.train()
    if spec.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    for p in model.parameters():
        p.requires_grad_(True)
    # the method chooses what is updated (RMU: e.g. three MLP projections; the others: every parameter)
    opt = torch.optim.AdamW(method.trainable_parameters(model), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i + 1, spec))
    train_model = model
    if acc is not None:
        # the scheduler stays ours (stepped once per optimizer step; a prepared one steps once per process)
        train_model, opt = acc.prepare(model, opt)
        if ref_model is not None and world > 1:
            ref_model = acc.prepare(ref_model)
    rng = random.Random(seed)
    f_order: list[int] = []
    r_order: list[int] = []
    losses = []
    bar = progress(total=spec.steps, desc=f"unlearn {spec.method}", quiet=quiet, leave=True)
    for step in range(1, spec.steps + 1):
        if step <= grad_norm_steps:
            for i, g in zip([e.id for e in forget], per_example_grad_norm_sq(model, forget, pad, device)):
                grad_sq[i] += g
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(spec.grad_accum):
            if len(f_order) < spec.batch_size:
                f_order += rng.sample(range(len(forget)), len(forget))
            fb = [forget[i] for i in f_order[: spec.batch_size]]
            f_order = f_order[spec.batch_size:]
            rb_batch = None
            if retain:
                if len(r_order) < spec.batch_size:
                    r_order += rng.sample(range(len(retain)), len(retain))
                rb = [retain[i] for i in r_order[: spec.batch_size]]
                r_order = r_order[spec.batch_size:]
                rb_batch = make_retain(rb[rank::world], pad, device)
            with autocast():
                loss = method.loss(train_model, make_forget(fb[rank::world], pad, device), rb_batch,
                                   ref_model) / spec.grad_accum
            if acc is not None:
                acc.backward(loss)
            else:
                loss.backward()
            total += float(loss.detach())
        if world > 1:
            total = float(acc.reduce(torch.tensor(total, device=acc.device), reduction="mean"))
        if not math.isfinite(total):
            raise RuntimeError(f"unlearning loss became {total} at step {step} (lr {spec.lr:g}): lower the lr")
        if spec.grad_clip:
            if acc is not None:
                acc.clip_grad_norm_(train_model.parameters(), spec.grad_clip)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        opt.step()
        sched.step()
        method.after_step(model, spec.lr)
        losses.append(round(total, 6))
        bar.update(1)
        bar.set_postfix(loss=f"{total:.3f}")
        if on_eval and (step % every == 0 or step == spec.steps):
            train_model.eval()
            on_eval(step, model)
            train_model.train()
    bar.close()
    if acc is not None:
        acc.wait_for_everyone()
        acc.unwrap_model(train_model, keep_fp32_wrapper=False)  # the model's own forward again (no autocast)
        acc.free_memory()
        train_model = model
    if spec.gradient_checkpointing and hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    del ref_model, opt
    report = {"method": spec.method, "args": method.args, "steps": spec.steps, "lr": spec.lr,
              "batch_size": spec.batch_size, "grad_accum": spec.grad_accum, "weight_decay": spec.weight_decay,
              "warmup_steps": spec.warmup_steps, "schedule": spec.schedule, "grad_clip": spec.grad_clip,
              "precision": spec.precision, "gradient_checkpointing": spec.gradient_checkpointing,
              "n_forget": len(forget), "n_retain": len(retain), "loss_curve": losses,
              "seconds": round(time.time() - t0, 2),
              "predictors_before": {e.id: {"el2n": el2n[e.id],
                                           "grad_norm_sq": grad_sq[e.id] if grad_norm_steps else None}
                                    for e in forget}}
    if acc is not None:
        report["accelerate"] = {"processes": world, "distributed_type": str(acc.distributed_type),
                                "mixed_precision": acc.mixed_precision}
    return report
