"""Unlearning: methods (small losses over forget/retain batches), the shared runner, the per-example
tracker, and difficulty predictors. The registry is torch-free (lazy entries)."""

from llmmem.registry import Registry

METHODS: Registry = Registry("unlearning method")
METHODS.register("grad_ascent", "llmmem.unlearning.methods:GradAscent", "gradient ascent on the forget NLL")
METHODS.register("grad_diff", "llmmem.unlearning.methods:GradDiff", "forget ascent + retain descent")
METHODS.register("npo", "llmmem.unlearning.methods:NPO", "negative preference optimisation (beta 0.1) + retain NLL")
METHODS.register("simnpo", "llmmem.unlearning.methods:SimNPO", "reference-free, length-normalised NPO + retain NLL")
METHODS.register("idk_dpo", "llmmem.unlearning.methods:IdkDPO", "DPO: refusal preferred over the forget answer (TOFU IdkDPO)")
METHODS.register("undial", "llmmem.unlearning.methods:UNDIAL", "self-distillation with the label logit lowered (UNDIAL)")
METHODS.register("rmu", "llmmem.unlearning.methods:RMU", "steer a layer's forget activations to a random direction (WMDP RMU)")
METHODS.register("noisy_ft", "llmmem.unlearning.methods:NoisyFinetune", "Langevin/SGLD fine-tuning on the retain set")
METHODS.register("finetune", "llmmem.unlearning.finetune:Finetune", "fine-tuning (NLL descent) on the data: relearning")
