"""Plain fine-tuning (descend the NLL of the given examples): what a relearning attack does after unlearning
(Hu et al. 2024; Lynch et al. 2024). Used by the ``relearn`` intervention through the unlearning loop."""

from __future__ import annotations

from llmmem.unlearning.methods import Method, mean_nll


class Finetune(Method):
    """Fine-tuning on the examples given as the "forget" batch (the loop's training data); no retain term."""

    def loss(self, model, forget, retain, ref_model):
        return mean_nll(model, forget)
