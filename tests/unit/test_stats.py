import json
import math

import pytest
from scipy.stats import binomtest

from refusal_direction.evaluation.stats import agreement_table, cohen_kappa, mcnemar, rate, wilson_interval


def wilson_reference(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Textbook Wilson formula: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)."""
    p = k / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return centre - half, centre + half


@pytest.mark.parametrize("k,n", [(13, 57), (3, 7), (50, 100), (1, 1000)])
def test_wilson_matches_formula(k, n):
    assert wilson_interval(k, n) == pytest.approx(wilson_reference(k, n), abs=1e-12)


def test_wilson_known_values():
    # worked by hand: centre 0.894832, half-width 0.057095 (statsmodels is not installed here)
    assert wilson_interval(91, 100) == pytest.approx((0.837738, 0.951927), abs=1e-6)
    # the classic 0/10 upper bound, 0.2775
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-6)
    # 90%: z = Φ⁻¹(0.95)
    assert wilson_interval(91, 100, confidence=0.90) == pytest.approx(
        wilson_reference(91, 100, z=1.6448536269514722), abs=1e-12)


def test_wilson_edges():
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    assert wilson_interval(5, 5)[0] == pytest.approx(1 - wilson_interval(0, 5)[1])
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_rate_is_json_ready():
    r = rate([True, 0, 1, 1])
    assert r["rate"] == 0.75 and r["k"] == 3 and r["n"] == 4
    assert r["ci95"] == pytest.approx(list(wilson_interval(3, 4)))
    json.dumps(r, allow_nan=False)
    json.dumps(rate([]), allow_nan=False)
    assert rate([])["rate"] is None
    with pytest.raises(ValueError, match="not binary"):
        rate([1, None])


def test_mcnemar_matches_binomtest():
    a = [1] * 30 + [0] * 10 + [1] * 5 + [0] * 55
    b = [1] * 30 + [1] * 10 + [0] * 5 + [0] * 55
    out = mcnemar(a, b)
    assert (out["n01"], out["n10"], out["statistic"], out["method"]) == (10, 5, 5, "exact")
    assert out["p_value"] == pytest.approx(binomtest(5, 15, 0.5).pvalue, rel=1e-12)
    assert mcnemar([1, 0], [1, 0])["p_value"] == 1.0
    assert mcnemar([0] * 20, [1] * 20)["p_value"] == pytest.approx(2 * 0.5**20)
    with pytest.raises(ValueError, match="equal lengths"):
        mcnemar([1], [1, 0])


def test_kappa():
    a = [1, 0, 1, 1, 0, 0, 1, 0]
    assert cohen_kappa(a, a) == 1.0
    assert cohen_kappa(a, [1 - x for x in a]) == -1.0
    assert cohen_kappa([1, 1, 0, 0], [1, 0, 1, 0]) == 0.0  # independent raters
    assert math.isnan(cohen_kappa([1, 1, 1], [1, 1, 1]))  # both constant: undefined


def test_agreement_table_textbook():
    # Wikipedia's example: 50 items, 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no -> po 0.7, pe 0.5, kappa 0.4
    a = [1] * 20 + [1] * 5 + [0] * 10 + [0] * 15
    b = [1] * 20 + [0] * 5 + [1] * 10 + [0] * 15
    t = agreement_table(a, b)
    assert (t["both_1"], t["a1_b0"], t["a0_b1"], t["both_0"], t["n"]) == (20, 5, 10, 15, 50)
    assert t["agreement"] == pytest.approx(0.7) and t["kappa"] == pytest.approx(0.4)
    assert agreement_table([0, 0], [0, 0])["kappa"] is None
    json.dumps(agreement_table([0, 0], [0, 0]), allow_nan=False)
