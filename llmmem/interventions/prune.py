"""The pruning intervention: ``llmmem.pruning`` behind the intervention interface."""

from __future__ import annotations

from llmmem.config import ConfigError
from llmmem.errors import IncompatibleError
from llmmem.interventions import Context, Intervention, PrepareEnv
from llmmem.pruning.spec import PruneSpec, check_calibration_source, parse_structure, resolve_calibration


class Prune(Intervention):
    kind = "prune"
    spec_class = PruneSpec
    section = "pruning"
    grid_keys = ("method", "sparsity", "structure", "profile", "scope", "calibration", "nsamples", "seqlen")
    axis = "sparsity"
    aliases = {"methods": "method", "sparsities": "sparsity", "structures": "structure", "profiles": "profile"}

    def expand(self, raw: dict, where: str = "") -> tuple[list, list[str]]:
        """As the generic grid, with the pruning grid's own rules: an N:M structure fixes the sparsity
        (N/M: the sparsity list does not multiply it), sparsity 0 is the dense model (always a cell of its
        own), and a profile that cannot be combined with a structure is dropped with a warning."""
        raw = {self.aliases.get(k, k): v for k, v in raw.items()}
        sp = raw.get("sparsity")
        if isinstance(sp, list) and not sp:
            raise ConfigError(f"{where}: sparsity is an empty list")
        if isinstance(sp, list):
            raw["sparsity"] = [s for s in sp if not (isinstance(s, (int, float)) and not isinstance(s, bool) and s == 0)]
        structures = raw.get("structure", "unstructured")
        structures = structures if isinstance(structures, list) else [structures]
        groups = [s for s in structures if parse_structure(s)[1] == 0]
        nm = [s for s in structures if parse_structure(s)[1] != 0]
        specs, warnings = [], []
        if groups:
            if raw.get("sparsity") in (None, []):
                if isinstance(sp, list) and sp:
                    if not nm:
                        raise ConfigError(f"{where}: sparsity 0 is the dense model, which every sweep includes; "
                                          f"give sparsities above 0 to prune")
                else:
                    raise ConfigError(f"{where}: sparsity is required for unstructured pruning (a number in [0, 1))")
            else:
                s, w = super().expand(dict(raw, structure=groups if len(groups) > 1 else groups[0]), where)
                specs += s
                warnings += w
        if nm:
            rest = {k: v for k, v in raw.items() if k != "sparsity"}
            try:
                s, w = super().expand(dict(rest, structure=nm if len(nm) > 1 else nm[0]), where)
            except IncompatibleError as e:  # every N:M combination refused (e.g. profile owl only)
                s, w = [], [str(e)]
            specs += s
            warnings += w
        profiles = self._profiles(raw)
        for p in profiles:
            if not any(x.profile == p for x in specs):
                raise ConfigError(f"{where}: profile {p} makes no cell: it cannot be combined with structure(s) "
                                  f"{', '.join(map(str, structures))}")
        return specs, warnings

    @staticmethod
    def _profiles(raw) -> list:
        p = raw.get("profile", "uniform")
        return p if isinstance(p, list) else [p]

    def series(self, spec: PruneSpec) -> str:
        out = spec.method
        if spec.structure != "unstructured":
            out += f" {spec.structure}"
        if spec.profile != "uniform":
            out += f" {spec.profile}"
        if spec.scope == "global":
            out += " global"
        return out

    def prepare(self, spec: PruneSpec, env: PrepareEnv) -> None:
        if spec.needs_calibration:
            check_calibration_source(spec.calibration)
            spec.calibration = resolve_calibration(spec.calibration)

    def calibration_needs(self, spec: PruneSpec) -> list[tuple]:
        return [(spec.calibration, spec.nsamples, spec.seqlen)] if spec.needs_calibration else []

    def apply(self, model, spec: PruneSpec, ctx: Context) -> dict:
        from llmmem.pruning import prune

        calib = ctx.calibration(spec.calibration, spec.nsamples, spec.seqlen) if spec.needs_calibration else None
        report = prune(model, spec, calib, device=ctx.device, batch_size=ctx.batch_size, offload=ctx.offload,
                       quiet=ctx.quiet)
        return report.to_dict()
