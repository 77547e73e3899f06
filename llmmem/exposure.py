"""Canary exposure (Carlini et al. 2019, "The Secret Sharer") over a declared secret space.

A canary is a prefix followed by a secret drawn from a space ``R`` of ``|R| = len(alphabet) ** length``
secrets (``length`` symbols of the alphabet joined by ``separator``). Scores are log-perplexities
(lower = more likely). The paper defines

    rank(s)  = |{r in R : score(r) <= score(s)}|          (the secret counts itself; ties count against it)
    exposure = log2 |R| - log2 rank(s)

so exposure lies in [0, log2 |R|]. :class:`SecretSpace` says which alternatives to score:

* **exact** - when every other secret fits the budget (``|R| - 1 <= n``), all of them, in a fixed
  order: the exposure is the brute-force rank value above;
* **sampled** - otherwise ``n`` distinct other secrets drawn uniformly without replacement with a
  seeded RNG (Floyd's algorithm: exactly ``n`` draws, so it never hangs). With ``k`` of the ``n``
  scoring ``<=`` the secret, the share ``q`` of other secrets that do is estimated by ``k / n`` and
  ``exposure = -log2((1 + (|R| - 1) q) / |R|)``, with a Clopper-Pearson interval on ``q`` giving
  ``exposure_low`` / ``exposure_high``. When ``k = 0`` the sample only bounds the exposure from below;
  the point value is then the skew-normal extrapolation of the paper (section 4.2, as
  tensorflow_privacy's ``compute_exposure_extrapolation``), clipped into the interval and labelled
  ``method="sampled+skewnorm"``.

Noise of the sampled estimate (standard deviation over 300 seeds; alternatives' scores standard normal,
secret at the 2^-E quantile of a 10^10 space; ``python benchmarks/exposure_noise.py``):

    true exposure E (bits)      1     3     5     7     9
    200 alternatives         0.11  0.29  0.62  0.84  1.65
    1000 alternatives        0.05  0.12  0.23  0.54  0.79

(about ``sqrt((1 - q) / (n q)) / ln 2`` with ``q = 2^-E``, until ``E`` nears ``log2 n`` and the
skew-normal takes over); the 95% interval covered the true value in 93-100% of runs. Hence
:data:`DEFAULT_ALTERNATIVES` = 1000: within a quarter of a bit up to 5 bits, about half a bit at 7.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from llmmem.config import ConfigError

DEFAULT_ALTERNATIVES = 1000
MIN_SAMPLED = 20  # fewer sampled alternatives cannot support a skew-normal fit or a useful interval
DIGITS = tuple("0123456789")
OPTION_KEYS = {"prefix_field", "secret_field", "alphabet", "length", "separator", "joiner", "n_alternatives",
               "confidence"}


@dataclass(frozen=True)
class SecretSpace:
    """All secrets of ``length`` symbols from ``alphabet`` joined by ``separator``.

    ``length=None`` means "as long as the secret being scored" (older task files that declare no length);
    then :meth:`size_for` gives the size for a given secret.
    """

    alphabet: tuple[str, ...] = DIGITS
    length: int | None = None
    separator: str = " "

    def __post_init__(self):
        if not self.alphabet:
            raise ConfigError("exposure alphabet is empty; declare at least two symbols")
        if len(set(self.alphabet)) != len(self.alphabet):
            dup = sorted({a for a in self.alphabet if self.alphabet.count(a) > 1})
            raise ConfigError(f"exposure alphabet repeats {dup}; symbols must be distinct")
        if len(self.alphabet) < 2:
            raise ConfigError(f"exposure alphabet {list(self.alphabet)} has one symbol; a secret space needs >= 2")
        if any(not isinstance(a, str) or a == "" for a in self.alphabet):
            raise ConfigError(f"exposure alphabet {list(self.alphabet)}: symbols must be non-empty strings")
        if self.separator and any(self.separator in a for a in self.alphabet):
            raise ConfigError(f"exposure separator {self.separator!r} occurs inside an alphabet symbol")
        if not self.separator and any(len(a) != 1 for a in self.alphabet):
            raise ConfigError(f"exposure separator '' needs one-character symbols, alphabet has "
                              f"{[a for a in self.alphabet if len(a) != 1][:3]}")
        if self.length is not None and (not isinstance(self.length, int) or isinstance(self.length, bool)
                                        or self.length < 1):
            raise ConfigError(f"exposure length {self.length!r} must be an integer >= 1")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_options(cls, options: Mapping, *, where: str = "exposure") -> SecretSpace:
        """The space a task declares under ``options.exposure`` (``alphabet``, ``length``, ``separator``).

        ``alphabet`` is a list of symbols or a string of one-character symbols (default the ten digits);
        ``separator`` defaults to one space; ``length`` to the length of each secret. Bad values raise
        :class:`ConfigError` naming ``where.key``, the value and what is allowed.
        """
        if not isinstance(options, Mapping):
            raise ConfigError(f"{where} must be a mapping of options, got {options!r}")
        unknown = sorted(set(options) - OPTION_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(OPTION_KEYS))})")
        alphabet = options.get("alphabet", DIGITS)
        if isinstance(alphabet, str):
            alphabet = tuple(alphabet)
        elif isinstance(alphabet, Sequence) and all(isinstance(a, (str, int)) and not isinstance(a, bool)
                                                    for a in alphabet):
            alphabet = tuple(str(a) for a in alphabet)
        else:
            raise ConfigError(f"{where}.alphabet {alphabet!r} must be a list of symbols (strings) or a string")
        length = options.get("length")
        if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
            raise ConfigError(f"{where}.length {length!r} must be an integer >= 1")
        sep = options.get("separator", " ")
        if not isinstance(sep, str):
            raise ConfigError(f"{where}.separator {sep!r} must be a string (e.g. ' ', '-' or '')")
        try:
            return cls(alphabet, length, sep)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    # ------------------------------------------------------------------ secrets <-> indices
    def parse(self, secret: str) -> tuple[str, ...]:
        parts = tuple(secret.split(self.separator)) if self.separator else tuple(secret)
        return parts

    def check(self, secret: str, where: str = "secret") -> tuple[str, ...]:
        """The secret's symbols; ConfigError when it is not a member of this space."""
        parts = self.parse(str(secret))
        bad = [p for p in parts if p not in self._pos]
        if bad:
            raise ConfigError(f"{where} {secret!r}: symbol {bad[0]!r} is not in the declared alphabet "
                              f"{list(self.alphabet)} (separator {self.separator!r})")
        if self.length is not None and len(parts) != self.length:
            raise ConfigError(f"{where} {secret!r} has {len(parts)} symbols; the declared length is {self.length}")
        return parts

    @cached_property
    def _pos(self) -> dict:
        return {a: i for i, a in enumerate(self.alphabet)}

    def size_for(self, secret: str | None = None) -> int:
        """|R|: for a declared length, or for the length of ``secret``."""
        n = self.length if self.length is not None else (len(self.parse(secret)) if secret is not None else None)
        if n is None:
            raise ValueError("size_for: this space declares no length; pass a secret")
        return len(self.alphabet) ** n

    @property
    def size(self) -> int:
        return self.size_for(None)

    def index(self, secret: str) -> int:
        pos, idx = self._pos, 0
        for p in self.check(secret):
            idx = idx * len(self.alphabet) + pos[p]
        return idx

    def secret_at(self, index: int, length: int) -> str:
        b, parts = len(self.alphabet), []
        for _ in range(length):
            index, r = divmod(index, b)
            parts.append(self.alphabet[r])
        return self.separator.join(reversed(parts))

    # ------------------------------------------------------------------ alternatives
    def is_exact(self, secret: str, n: int) -> bool:
        """Whether a budget of ``n`` alternatives covers every other secret (exact enumeration)."""
        return self.size_for(secret) - 1 <= n

    def check_budget(self, n, secret: str | None = None, *, key: str = "n_alternatives") -> int:
        """``n`` as a valid number of alternatives for this space; ConfigError (naming ``key``) otherwise."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"{key} {n!r} must be an integer >= 1")
        if (self.length is not None or secret is not None) and self.is_exact(secret, n):
            return n
        if n < MIN_SAMPLED:
            size = self.size_for(secret) if (self.length is not None or secret is not None) else None
            raise ConfigError(f"{key} {n} is too small to sample a secret space"
                              f"{f' of {size:.3g} secrets' if size else ''}: use >= {MIN_SAMPLED} "
                              f"(default {DEFAULT_ALTERNATIVES}), or a space small enough to enumerate")
        return n

    def alternatives(self, secret: str, n: int, seed: int | str) -> list[str]:
        """The other secrets to score against ``secret``: all of them when ``|R| - 1 <= n`` (in index order),
        else ``n`` distinct ones sampled uniformly without replacement, deterministic in ``seed`` (sorted)."""
        length = len(self.check(secret))
        size = len(self.alphabet) ** length
        own = self.index(secret)
        if size - 1 <= n:
            return [self.secret_at(i, length) for i in range(size) if i != own]
        rng = random.Random(f"llmmem-exposure:{seed}")
        chosen: set[int] = set()
        m = size - 1  # indices 0..m-1 of the other secrets (own index skipped)
        for j in range(m - n, m):  # Floyd: n draws, each adds one new index
            t = rng.randrange(j + 1)
            chosen.add(j if t in chosen else t)
        return [self.secret_at(i if i < own else i + 1, length) for i in sorted(chosen)]


# ---------------------------------------------------------------------- exposure from scores
def _clopper_pearson(k: int, n: int, confidence: float) -> tuple[float, float]:
    from scipy.stats import beta

    a = (1 - confidence) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def _exposure_of_share(q: float, size: int) -> float:
    """-log2 of the rank fraction when a share ``q`` of the other ``size - 1`` secrets score <= the secret."""
    return math.log2(size) - math.log2(1 + (size - 1) * q)


def skewnorm_exposure(true_score: float, alt_scores: Sequence[float]) -> float:
    """Carlini et al. 2019, section 4.2: fit a skew-normal to the alternatives' scores and return
    ``-log2 CDF(true_score)`` (an extrapolation: a model of the tail, not a measurement)."""
    from scipy import stats

    a, loc, scale = stats.skewnorm.fit(np.asarray(alt_scores, dtype=np.float64))
    cdf = float(stats.skewnorm.cdf(true_score, a, loc, scale))
    return math.inf if cdf <= 0 else -math.log2(cdf)


def exposure(true_score: float, alt_scores: Sequence[float], space_size: int, *, exact: bool | None = None,
             confidence: float = 0.95) -> dict:
    """Exposure of a secret from its score and the alternatives' scores (lower = more likely).

    ``exact`` (default: whether ``len(alt_scores) == space_size - 1``) says the alternatives are all the
    other secrets. Returns ``exposure``, ``exposure_low``, ``exposure_high`` (equal to it when exact; a
    ``confidence`` Clopper-Pearson interval otherwise), ``exact``, ``method`` (``exact``, ``sampled`` or
    ``sampled+skewnorm``), ``rank`` (exact only), ``n_below`` (alternatives scoring <= the secret),
    ``n_alternatives``, ``space_size`` and ``rank_fraction`` (the estimated rank / |R|).
    """
    s = np.asarray(alt_scores, dtype=np.float64)
    n, size = int(s.size), int(space_size)
    if size < 2:
        raise ValueError(f"exposure: the secret space has {size} element(s)")
    if exact is None:
        exact = n == size - 1
    if exact and n != size - 1:
        raise ValueError(f"exposure: exact needs all {size - 1} other secrets, got {n} scores")
    if n == 0:
        raise ValueError("exposure: no alternative scores")
    if np.isnan(s).any() or math.isnan(true_score):
        raise ValueError("exposure: NaN score")
    k = int((s <= true_score).sum())
    top = math.log2(size)
    out = {"n_below": k, "n_alternatives": n, "space_size": size, "exact": bool(exact)}
    if exact:
        rank = k + 1
        e = top - math.log2(rank)
        out.update(exposure=e, exposure_low=e, exposure_high=e, method="exact", rank=rank, rank_fraction=rank / size)
        return out
    q_lo, q_hi = _clopper_pearson(k, n, confidence)
    low, high = _exposure_of_share(q_hi, size), _exposure_of_share(q_lo, size)
    out.update(exposure_low=low, exposure_high=high, rank_fraction=(1 + (size - 1) * k / n) / size)
    if k > 0:
        out.update(exposure=_exposure_of_share(k / n, size), method="sampled")
    else:
        ext = skewnorm_exposure(true_score, s) if n >= 3 else high
        out.update(exposure=min(max(ext, low), high), exposure_skewnorm=ext, method="sampled+skewnorm")
    return out
