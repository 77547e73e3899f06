"""Unlearning methods: each a loss over a forget batch, a retain batch and a frozen reference model.

Batches are dicts with ``input_ids``, ``attention_mask`` and ``labels`` (-100 where not scored). Defaults
follow the papers / open-unlearning: gradient difference weights forget and retain 1:1; NPO beta 0.1
(Zhang et al. 2024) with the retain NLL; SimNPO beta 4.5, delta 0, forget weight 0.125, retain weight 1
(Fan et al. 2024, open-unlearning's config); noisy fine-tuning (Langevin/SGLD) descends the retain NLL and
adds N(0, noise_std^2) to every parameter after each step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sequence_nll(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL per sequence over labelled tokens, and the number of labelled tokens (float32)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.clamp_min(0).reshape(-1),
                          reduction="none").view(labels.shape)
    return (nll * mask).sum(-1), mask.sum(-1).clamp_min(1).float()


def mean_nll(model, batch) -> torch.Tensor:
    s, n = sequence_nll(model, batch)
    return (s / n).mean()


class Method:
    needs_reference = False
    defaults: dict = {}

    def __init__(self, **kw):
        unknown = set(kw) - set(self.defaults)
        if unknown:
            from llmmem.config import ConfigError

            raise ConfigError(f"method_args: unknown key(s) {', '.join(sorted(unknown))} for {type(self).__name__}; "
                              f"allowed: {', '.join(self.defaults) or 'none'}")
        self.args = {**self.defaults, **kw}

    def loss(self, model, forget, retain, ref_model) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, model, lr: float) -> None:
        pass


class GradAscent(Method):
    """Gradient ascent on the forget set's NLL."""

    def loss(self, model, forget, retain, ref_model):
        return -mean_nll(model, forget)


class GradDiff(Method):
    """Gradient difference: ascend the forget NLL, descend the retain NLL (gamma * forget + alpha * retain)."""

    defaults = {"gamma": 1.0, "alpha": 1.0}

    def loss(self, model, forget, retain, ref_model):
        return -self.args["gamma"] * mean_nll(model, forget) + self.args["alpha"] * mean_nll(model, retain)


class NPO(Method):
    """Negative preference optimisation: -2/beta log sigmoid(-beta (log p - log p_ref)) on forget, + retain NLL."""

    needs_reference = True
    defaults = {"beta": 0.1, "gamma": 1.0, "alpha": 1.0}

    def loss(self, model, forget, retain, ref_model):
        nll, _ = sequence_nll(model, forget)
        with torch.no_grad():
            ref_nll, _ = sequence_nll(ref_model, forget)
        beta = self.args["beta"]
        # log p - log p_ref = ref_nll - nll
        forget_loss = -2.0 / beta * F.logsigmoid(-beta * (ref_nll - nll)).mean()
        return self.args["gamma"] * forget_loss + self.args["alpha"] * mean_nll(model, retain)


class SimNPO(Method):
    """SimNPO: reference-free, length-normalised: -2/beta log sigmoid(beta (NLL/|y| - delta)), + retain NLL."""

    defaults = {"beta": 4.5, "delta": 0.0, "gamma": 0.125, "alpha": 1.0}

    def loss(self, model, forget, retain, ref_model):
        nll, n = sequence_nll(model, forget)
        beta = self.args["beta"]
        forget_loss = -2.0 / beta * F.logsigmoid(beta * (nll / n - self.args["delta"])).mean()
        return self.args["gamma"] * forget_loss + self.args["alpha"] * mean_nll(model, retain)


class NoisyFinetune(Method):
    """Langevin / SGLD fine-tuning on the retain set: a retain-NLL step, then Gaussian noise on every weight."""

    defaults = {"noise_std": 1e-3}

    def loss(self, model, forget, retain, ref_model):
        return mean_nll(model, retain)

    @torch.no_grad()
    def after_step(self, model, lr: float) -> None:
        std = self.args["noise_std"]
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * std)
