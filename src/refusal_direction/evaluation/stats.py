"""Statistics for binary scores: Wilson intervals, McNemar's paired test, Cohen's kappa.

Pure functions over sequences of 0/1 (bools allowed). Results meant for JSON (``rate``, ``mcnemar``,
``agreement_table``) hold plain Python floats and ints, with ``None`` where a value is undefined
(no items; kappa when both raters are constant); ``wilson_interval`` and ``cohen_kappa`` return
``nan`` there instead.
"""

from __future__ import annotations

import math
from typing import Sequence

from scipy.stats import binomtest, norm


def _binary(values: Sequence[int | bool], name: str = "values") -> list[int]:
    """``values`` as a list of 0/1 ints; raises ValueError for anything else (None included)."""
    out = []
    for i, v in enumerate(values):
        if v not in (0, 1):
            raise ValueError(f"{name}[{i}] = {v!r} is not binary (expected 0/1 or a bool)")
        out.append(int(v))
    return out


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials; ``(nan, nan)`` when ``n == 0``."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return math.nan, math.nan
    z = float(norm.ppf(0.5 + confidence / 2))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def rate(values: Sequence[int | bool]) -> dict:
    """Share of 1s with its 95% Wilson interval: ``{"rate", "k", "n", "ci95": [lo, hi]}``."""
    xs = _binary(values)
    k, n = sum(xs), len(xs)
    if n == 0:
        return {"rate": None, "k": 0, "n": 0, "ci95": [None, None]}
    lo, hi = wilson_interval(k, n)
    return {"rate": k / n, "k": k, "n": n, "ci95": [lo, hi]}


def mcnemar(a: Sequence[int | bool], b: Sequence[int | bool]) -> dict:
    """McNemar's test for paired binary outcomes ``a[i]``, ``b[i]`` of the same items.

    Always exact: under H0 the discordant pairs split Binomial(n01 + n10, 1/2), and the p-value is the
    two-sided binomial test (``scipy.stats.binomtest``); ``p_value = 1.0`` with no discordant pair.
    ``n01`` counts items with a=0, b=1 and ``n10`` items with a=1, b=0; ``statistic = min(n01, n10)``,
    as in statsmodels' exact McNemar.
    """
    xa, xb = _binary(a, "a"), _binary(b, "b")
    if len(xa) != len(xb):
        raise ValueError(f"paired outcomes need equal lengths, got {len(xa)} and {len(xb)}")
    n01 = sum(x == 0 and y == 1 for x, y in zip(xa, xb))
    n10 = sum(x == 1 and y == 0 for x, y in zip(xa, xb))
    p = float(binomtest(min(n01, n10), n01 + n10, 0.5).pvalue) if n01 + n10 else 1.0
    return {"n01": n01, "n10": n10, "statistic": min(n01, n10), "p_value": p, "method": "exact"}


def _table(a: Sequence[int | bool], b: Sequence[int | bool]) -> tuple[int, int, int, int]:
    """2x2 counts (both_1, a1_b0, a0_b1, both_0) of two binary raters on the same items."""
    xa, xb = _binary(a, "a"), _binary(b, "b")
    if len(xa) != len(xb):
        raise ValueError(f"two raters need equal lengths, got {len(xa)} and {len(xb)}")
    pairs = list(zip(xa, xb))
    return pairs.count((1, 1)), pairs.count((1, 0)), pairs.count((0, 1)), pairs.count((0, 0))


def _kappa(both_1: int, a1_b0: int, a0_b1: int, both_0: int) -> float:
    n = both_1 + a1_b0 + a0_b1 + both_0
    if n == 0:
        return math.nan
    po = (both_1 + both_0) / n
    pa, pb = (both_1 + a1_b0) / n, (both_1 + a0_b1) / n
    pe = pa * pb + (1 - pa) * (1 - pb)
    return math.nan if pe == 1 else (po - pe) / (1 - pe)


def cohen_kappa(a: Sequence[int | bool], b: Sequence[int | bool]) -> float:
    """Cohen's kappa of two binary raters; ``nan`` when undefined (no items, or chance agreement is 1)."""
    return _kappa(*_table(a, b))


def agreement_table(a: Sequence[int | bool], b: Sequence[int | bool]) -> dict:
    """2x2 counts, raw agreement and Cohen's kappa of two binary raters (``None`` where undefined)."""
    both_1, a1_b0, a0_b1, both_0 = _table(a, b)
    n = both_1 + a1_b0 + a0_b1 + both_0
    kappa = _kappa(both_1, a1_b0, a0_b1, both_0)
    return {"both_1": both_1, "a1_b0": a1_b0, "a0_b1": a0_b1, "both_0": both_0, "n": n,
            "agreement": (both_1 + both_0) / n if n else None,
            "kappa": None if math.isnan(kappa) else kappa}
