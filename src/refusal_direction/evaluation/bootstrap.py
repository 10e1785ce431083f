"""Bootstrap intervals over prompts for means and ratios (KL per prompt, CE as Σ nll / Σ tokens).

Percentile intervals of ``n_resamples`` resamples of the prompts with replacement, from a fixed seed, so a
table is reproducible. Values are plain floats (``None`` when there are no prompts).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def bootstrap_ratio(num: Sequence[float], den: Sequence[float] | None = None, confidence: float = 0.95,
                    n_resamples: int = 2000, seed: int = 0) -> dict:
    """Σnum / Σden (den = 1 per prompt: the mean) and its bootstrap interval: ``{"value", "ci95", "n"}``."""
    x = np.asarray(num, dtype=np.float64)
    y = np.ones_like(x) if den is None else np.asarray(den, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"numerators and denominators differ in length: {x.shape} vs {y.shape}")
    if x.size == 0 or y.sum() == 0:
        return {"value": None, "ci95": [None, None], "n": int(x.size)}
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_resamples, x.size))
    sx, sy = x[idx].sum(1), y[idx].sum(1)
    ratios = sx[sy > 0] / sy[sy > 0]
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(ratios, [alpha, 1 - alpha])
    return {"value": float(x.sum() / y.sum()), "ci95": [float(lo), float(hi)], "n": int(x.size)}
