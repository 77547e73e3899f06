"""``QuantizeSpec``: one weight-only quantization intervention (torch-free, so bad input fails before any import).

Defaults follow llm-compressor's ``W4A16`` preset (int4, symmetric, group 128 along the input dimension,
weight-only) and its ``GPTQModifier`` (``block_size`` 128, ``dampening_frac`` 0.01, activation ordering
``static``/``weight`` on by default).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from llmmem.config import ConfigError, parse_bool

QUANT_METHODS = ("rtn", "gptq")
BITS = (2, 3, 4, 8)


def _int(key: str, value, minimum: int) -> int:
    """A strict integer: ints or integer strings, never bools or 4.5."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"{key}={value!r} is not an integer")
    try:
        n = int(str(value).strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{key}={value!r} is not an integer") from None
    if n < minimum:
        raise ConfigError(f"{key}={n} must be >= {minimum}")
    return n


@dataclass
class QuantizeSpec:
    method: str  # rtn | gptq
    bits: int = 4
    group_size: int | None = 128  # None (or -1): one scale per output channel
    symmetric: bool = True
    act_order: bool | None = None  # gptq only; None -> on for gptq (GPTQModifier's default "static")
    dampening_frac: float = 0.01  # fraction of mean(diag H) added to the Hessian diagonal
    block_size: int = 128  # GPTQ column block
    calibration: str = "auto"  # as PruneSpec: auto | self | token/text file | hf:PATH[:CONFIG[:SPLIT]] | c4
    nsamples: int | None = None  # default 128 (or the token file's rows)
    seqlen: int | None = None  # default 2048 (or the token file's columns)
    keep_sparsity: bool = True  # weights exactly 0 before quantization are exactly 0 after
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.method, str) or self.method.strip().lower() not in QUANT_METHODS:
            raise ConfigError(f"method={self.method!r} is not a quantization method; choose from: "
                              f"{', '.join(QUANT_METHODS)}")
        self.method = self.method.strip().lower()
        try:
            bits = _int("bits", self.bits, 1)
        except ConfigError:
            bits = None
        if bits not in BITS:
            raise ConfigError(f"bits={self.bits!r} is not supported; choose from: {', '.join(map(str, BITS))}")
        self.bits = bits
        if self.group_size is not None and str(self.group_size).strip().lower() in ("-1", "none", "channel"):
            self.group_size = None
        if self.group_size is not None:
            try:
                self.group_size = _int("group_size", self.group_size, 1)
            except ConfigError:
                raise ConfigError(f"group_size={self.group_size!r} is not valid; use an integer > 0, or -1 / "
                                  "None for one scale per output channel") from None
        self.symmetric = parse_bool("symmetric", self.symmetric)
        if self.act_order is None:
            self.act_order = self.method == "gptq"
        else:
            self.act_order = parse_bool("act_order", self.act_order)
            if self.act_order and self.method != "gptq":
                raise ConfigError(f"act_order=true applies to method gptq only, not {self.method}")
        try:
            frac = float(self.dampening_frac)
        except (TypeError, ValueError):
            frac = math.nan
        if isinstance(self.dampening_frac, bool) or not math.isfinite(frac) or frac <= 0:
            raise ConfigError(f"dampening_frac={self.dampening_frac!r} must be a finite number > 0")
        self.dampening_frac = frac
        self.block_size = _int("block_size", self.block_size, 1)
        if not isinstance(self.calibration, str) or not self.calibration.strip():
            raise ConfigError(f"calibration={self.calibration!r} must be a source: auto, self, c4, "
                              "hf:PATH[:CONFIG[:SPLIT]] or a token/text file")
        if self.nsamples is not None:
            self.nsamples = _int("nsamples", self.nsamples, 1)
        if self.seqlen is not None:
            self.seqlen = _int("seqlen", self.seqlen, 1)
        self.keep_sparsity = parse_bool("keep_sparsity", self.keep_sparsity)
        self.seed = _int("seed", self.seed, 0)

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq"

    @property
    def levels(self) -> int:
        return 2 ** self.bits

    def label(self) -> str:
        """Short name, e.g. ``rtn-w4g32``, ``gptq-w4g128-act``, ``rtn-w8ch-asym``."""
        out = f"{self.method}-w{self.bits}" + (f"g{self.group_size}" if self.group_size else "ch")
        if not self.symmetric:
            out += "-asym"
        if self.act_order:
            out += "-act"
        if not self.keep_sparsity:
            out += "-nokeep"
        return out

    def to_dict(self) -> dict:
        return asdict(self)
