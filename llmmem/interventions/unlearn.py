"""The unlearning intervention: ``llmmem.unlearning`` (a method's loss, optimised in a loop) behind the
intervention interface. What is measured while it runs comes from the evaluation side through
``ctx.hooks["unlearn_eval"]`` (``llmmem/tracking.py``)."""

from __future__ import annotations

from llmmem.config import ConfigError
from llmmem.interventions import Context, Intervention, PrepareEnv
from llmmem.unlearning.spec import TRACKING_KEYS, TRAINING_KEYS, RelearnSpec, UnlearnSpec


def load_sets(spec: UnlearnSpec, include_path: str | None) -> tuple[list, list, list]:
    """The forget, retain and never-seen examples of a spec (torch-free), checked for overlap."""
    from llmmem.unlearning.data import load_examples
    from llmmem.unlearning.loop import check_sets

    forget = load_examples(spec.forget, include_path, spec.forget_ids, spec.forget_filter)
    retain = load_examples(spec.retain, include_path, filt=spec.retain_filter) if spec.retain else []
    nonmember = load_examples(spec.nonmember, include_path, filt=spec.nonmember_filter) if spec.nonmember else []
    check_sets(forget, retain, nonmember)
    if spec.method_needs_retain() and not retain:
        raise ConfigError(f"the retain set {spec.retain} is empty after filtering")
    return forget, retain, nonmember


def check_method(spec: UnlearnSpec):
    """The spec's method built with its ``method_args`` (unknown names, bad values and bad choices are refused
    with one line before any model loads); returns the method object."""
    from llmmem.unlearning import METHODS

    return METHODS.get(spec.method)(**spec.method_args)


class Unlearn(Intervention):
    kind = "unlearn"
    spec_class = UnlearnSpec
    section = "unlearning"
    grid_keys = ("method", "steps", "lr")
    axis = "steps"

    def keys(self) -> set:
        return set(TRAINING_KEYS) | set(TRACKING_KEYS)

    def series(self, spec: UnlearnSpec) -> str:
        return spec.method

    def prepare(self, spec: UnlearnSpec, env: PrepareEnv) -> None:
        from llmmem.unlearning.spec import secret_space

        check_method(spec)  # unknown method_args, bad values: one line, before any load
        forget, _, nonmember = load_sets(spec, env.include_path)
        secret_space(spec, env.include_path, [e.secret for e in forget + nonmember if e.secret])

    def apply(self, model, spec: UnlearnSpec, ctx: Context) -> dict:
        from llmmem.unlearning.loop import unlearn

        forget, retain, _ = load_sets(spec, ctx.include_path)
        hook = ctx.hooks.get("unlearn_eval")
        return unlearn(model, spec, forget, retain, tokenizer=ctx.tokenizer, device=ctx.device, seed=ctx.seed,
                       quiet=ctx.quiet, on_eval=hook)


class Relearn(Intervention):
    """Fine-tuning steps on a data set (relearning attack), e.g. after unlearning: ``steps: 0`` is the cell it
    starts from, so a series of steps shows how fast forgotten examples come back."""

    kind = "relearn"
    spec_class = RelearnSpec
    section = "relearning"
    grid_keys = ("steps", "lr", "data")
    axis = "steps"

    def expand(self, raw: dict, where: str = "") -> tuple[list, list[str]]:
        """As the generic grid; ``steps: 0`` is the cell the relearning starts from (a cell of its own already)."""
        st = raw.get("steps")
        if isinstance(st, list):
            raw = dict(raw, steps=[s for s in st if not (isinstance(s, int) and not isinstance(s, bool) and s == 0)])
            if not raw["steps"]:
                raise ConfigError(f"{where or self.kind}: steps 0 is the model relearning starts from; give steps > 0")
        return super().expand(raw, where)

    def series(self, spec: RelearnSpec) -> str:
        return f"relearn {spec.short}"

    def prepare(self, spec: RelearnSpec, env: PrepareEnv) -> None:
        from llmmem.unlearning.data import load_examples

        if not load_examples(spec.data, env.include_path, spec.ids, spec.filter):
            raise ConfigError(f"relearn data {spec.data} is empty after ids/filter")

    def apply(self, model, spec: RelearnSpec, ctx: Context) -> dict:
        from llmmem.unlearning.data import load_examples
        from llmmem.unlearning.loop import unlearn

        data = load_examples(spec.data, ctx.include_path, spec.ids, spec.filter)
        report = unlearn(model, spec.training_spec(), data, [], tokenizer=ctx.tokenizer, device=ctx.device,
                         seed=ctx.seed, quiet=ctx.quiet)
        return {"steps": spec.steps, "data": spec.data, "n_examples": len(data), "lr": spec.lr,
                "loss_curve": report["loss_curve"], "seconds": report["seconds"]}
