"""The pruning spec: what to prune, how much, and with which calibration (torch-free; validated on creation)."""

from __future__ import annotations

from dataclasses import dataclass

from llmmem.config import ConfigError, parse_choice, parse_float, parse_positive_int
from llmmem.errors import IncompatibleError
from llmmem.pruning import METHODS

PROFILES = ("uniform", "owl")
SCOPES = ("layer", "global")


def parse_structure(structure) -> tuple[int, int]:
    """``unstructured`` -> (0, 0); ``N:M`` -> (N, M) with 0 < N < M."""
    s = str(structure).strip().lower()
    if s == "unstructured":
        return 0, 0
    parts = s.replace("of", ":").split(":")
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        n, m = int(parts[0]), int(parts[1])
        if 0 < n < m:
            return n, m
        raise ConfigError(f"structure={structure!r}: N:M needs 0 < N < M")
    raise ConfigError(f"structure={structure!r} is not valid; use unstructured or N:M (e.g. 2:4)")


@dataclass
class PruneSpec:
    """One pruning intervention. ``sparsity`` may be None only for N:M (then it is N/M).

    The calibration sample's seed is the cell's seed (``Context.seed``), not part of this spec."""

    method: str
    sparsity: float | None = None
    structure: str = "unstructured"
    profile: str = "uniform"
    scope: str = "layer"  # magnitude only: one threshold per matrix (layer) or over all (global)
    calibration: str = "auto"  # auto | self | token/text file | hf:PATH[:CONFIG[:SPLIT]] | c4
    nsamples: int | None = None  # default 128 (or the token file's rows)
    seqlen: int | None = None  # default 2048 (or the token file's columns)
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    blocksize: int = 128  # SparseGPT column block
    percdamp: float = 0.01  # SparseGPT dampening, fraction of mean(diag H)

    def __post_init__(self):
        self.method = METHODS.check(str(self.method))
        self.profile = parse_choice("profile", self.profile, PROFILES)
        self.scope = parse_choice("scope", self.scope, SCOPES)
        if self.scope == "global" and self.method != "magnitude":
            raise IncompatibleError(f"scope=global applies to magnitude pruning only, not method={self.method}")
        n, m = parse_structure(self.structure)
        self.structure = "unstructured" if m == 0 else f"{n}:{m}"
        if self.sparsity is not None:
            self.sparsity = parse_float("sparsity", self.sparsity, low=0.0, high=1.0, high_open=True)
        if m:
            if self.sparsity is None:
                self.sparsity = n / m
            elif abs(self.sparsity - n / m) > 1e-9:
                raise ConfigError(f"sparsity={self.sparsity:g} does not match structure {n}:{m} (= {n / m:g})")
            if self.profile != "uniform":
                raise IncompatibleError(f"profile={self.profile} cannot be combined with structure {n}:{m}: N:M fixes "
                                  f"every row's sparsity; use profile=uniform")
        elif self.sparsity is None:
            raise ConfigError("sparsity is required for unstructured pruning (a number in [0, 1))")
        if not str(self.calibration).strip():
            raise ConfigError("calibration is empty; use auto, self, c4, hf:PATH[:CONFIG[:SPLIT]] or a file")
        self.calibration = str(self.calibration)
        if self.nsamples is not None:
            self.nsamples = parse_positive_int("nsamples", self.nsamples)
        if self.seqlen is not None:
            self.seqlen = parse_positive_int("seqlen", self.seqlen)
        self.owl_lambda = parse_float("owl_lambda", self.owl_lambda, low=0.0, high=0.5, low_open=True, high_open=True)
        self.owl_m = parse_float("owl_m", self.owl_m, low=0.0, low_open=True)
        self.percdamp = parse_float("percdamp", self.percdamp, low=0.0, low_open=True)
        self.blocksize = parse_positive_int("blocksize", self.blocksize)

    @property
    def nm(self) -> tuple[int, int]:
        return parse_structure(self.structure)

    @property
    def needs_calibration(self) -> bool:
        return self.method != "magnitude" or self.profile == "owl"

    def canonical(self) -> dict:
        """The fields that decide the pruned weights (for a cell's config and hash)."""
        out = {"method": self.method, "sparsity": round(float(self.sparsity), 6), "structure": self.structure,
               "profile": self.profile}
        if self.method == "magnitude":
            out["scope"] = self.scope
        if self.needs_calibration:
            out.update(calibration=self.calibration, nsamples=self.nsamples, seqlen=self.seqlen)
        if self.profile == "owl":
            out.update(owl_m=self.owl_m, owl_lambda=self.owl_lambda)
        if self.method == "sparsegpt":
            out.update(blocksize=self.blocksize, percdamp=self.percdamp)
        return out

    def label(self) -> str:
        """``wanda-unstructured-s0.5``, ``sparsegpt-2of4-s0.5``, ``magnitude-unstructured-s0.6-owl``."""
        s = f"{float(self.sparsity):.2f}".rstrip("0").rstrip(".") if self.sparsity else "0"
        out = f"{self.method}-{self.structure.replace(':', 'of')}-s{s}"
        if self.profile != "uniform":
            out += f"-{self.profile}"
        if self.scope == "global":
            out += "-global"
        return out


TOKEN_SUFFIXES = (".safetensors", ".pt", ".npy")
TEXT_SUFFIXES = (".txt", ".jsonl")


def check_calibration_source(source: str) -> None:
    """Cheap checks that need no model and no torch (run before anything is loaded)."""
    from pathlib import Path

    if source in ("auto", "self", "c4") or source.startswith("hf:"):
        if source.startswith("hf:") and not source[3:].split(":")[0]:
            raise ConfigError(f"calibration={source!r}: hf: needs a dataset path, e.g. hf:allenai/c4:en:train")
        if source == "c4" or source.startswith("hf:") and not Path(source[3:].split(":")[0]).exists():
            from llmmem.presets import hub_reachable

            if not hub_reachable():
                raise ConfigError(f"calibration={source!r} needs the Hugging Face hub, which is unreachable; use "
                                  "self, auto or a local token/text file")
        return
    p = Path(source).expanduser()
    if p.suffix not in TOKEN_SUFFIXES + TEXT_SUFFIXES:
        raise ConfigError(f"calibration={source!r}: expected self, auto, c4, hf:PATH[:CONFIG[:SPLIT]], a token "
                          f"file ({', '.join(TOKEN_SUFFIXES)}) or a text file ({', '.join(TEXT_SUFFIXES)})")
    if not p.is_file():
        raise ConfigError(f"calibration file {source!r} does not exist")


def resolve_calibration(source: str) -> str:
    """``auto`` -> ``c4`` when the Hugging Face hub is reachable, else ``self``; other sources as given."""
    if source != "auto":
        return source
    from llmmem.presets import hub_reachable

    return "c4" if hub_reachable() else "self"
