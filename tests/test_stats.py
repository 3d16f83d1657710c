"""The F test and pooled variance behind the k-sweep and chooser statements (no scipy needed)."""

import math

import pytest

from fairseq_clusterformer.tools import stats


@pytest.mark.parametrize(
    "f, dof1, dof2",
    # 5 % critical values of the F distribution, from printed tables
    [(3.478, 4, 10), (4.965, 1, 10), (5.786, 2, 5), (2.534, 5, 30), (161.45, 1, 1)],
)
def test_f_survival_at_tabulated_critical_values(f, dof1, dof2):
    assert stats.f_survival(f, dof1, dof2) == pytest.approx(0.05, abs=2e-4)


def test_f_survival_closed_forms():
    # F(2, 2): P(F > f) = 1 / (1 + f); F(1, n) is a squared t: P(F > t^2) = two-sided t tail
    for f in (0.1, 1.0, 3.0, 20.0):
        assert stats.f_survival(f, 2, 2) == pytest.approx(1 / (1 + f), rel=1e-10)
    # t with 1 dof is Cauchy: P(|T| > t) = 1 - 2 atan(t) / pi
    for t in (0.5, 2.0, 12.7):
        assert stats.f_survival(t * t, 1, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-10)
    assert stats.f_survival(0.0, 3, 4) == 1.0
    assert stats.betainc(2.0, 3.0, 0.0) == 0.0 and stats.betainc(2.0, 3.0, 1.0) == 1.0
    with pytest.raises(ValueError, match="x must lie in"):
        stats.betainc(1.0, 1.0, 1.5)


def test_pooled_variance_weights_by_degrees_of_freedom():
    var, dof = stats.pooled_variance([[1.0, 3.0], [2.0, 2.0, 5.0], [7.0], [None, 4.0]])
    # sum of squares: 2 + 6 = 8 over 1 + 2 = 3 dof; the single values carry no spread
    assert dof == 3 and var == pytest.approx(8 / 3)
    assert stats.pooled_variance([[1.0], [2.0]]) == (None, 0)


def test_between_settings_test_separates_real_differences_from_noise():
    noise = 0.02**2
    same = stats.between_settings_test([2.50, 2.51, 2.49], [2, 2, 2], noise, 6)
    apart = stats.between_settings_test([2.40, 2.50, 2.60], [2, 2, 2], noise, 6)
    # F = (sum n (m - grand)^2 / (K - 1)) / noise: 2 * 0.0002 / 2 / 0.0004 = 0.5 and 2 * 0.02 / 2 / 0.0004 = 50
    assert same["f"] == pytest.approx(0.5) and apart["f"] == pytest.approx(50.0)
    assert (same["dof1"], same["dof2"]) == (2, 6)
    assert same["p"] > 0.5 and apart["p"] < 1e-3
    assert "within what the seed noise explains" in stats.describe_test(same)
    assert "differ by more than the seed noise" in stats.describe_test(apart)
    assert stats.between_settings_test([2.5], [3], noise, 6) is None
    assert stats.between_settings_test([2.5, 2.6], [1, 1], None, 0) is None


def test_normal_quantile_and_seeds_to_separate():
    assert stats.normal_quantile(0.975) == pytest.approx(1.959964, abs=1e-6)
    assert stats.normal_quantile(0.8) == pytest.approx(0.841621, abs=1e-6)
    assert stats.normal_quantile(0.5) == pytest.approx(0.0, abs=1e-9)
    # 2 (1.96 + 0.84)^2 = 15.70: a difference of one sd needs 16 seeds per setting, of two sds 4
    assert stats.seeds_to_separate(0.02, 0.02) == 16 and stats.seeds_to_separate(0.04, 0.02) == 4
    with pytest.raises(ValueError, match="must be positive"):
        stats.seeds_to_separate(0.0, 0.02)
    with pytest.raises(ValueError, match="must lie in"):
        stats.normal_quantile(1.0)
