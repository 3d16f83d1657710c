"""Small statistics for comparing runs over seeds, in the standard library only (the plugin does not
depend on scipy): the pooled seed variance and a one-way analysis of variance (F test) of whether
a setting (k, say) changes a score by more than changing the seed does."""

import math


def pooled_variance(groups):
    """groups: lists of values (one list per setting, one value per seed). Returns (variance, dof):
    the pooled within-group sample variance sum((n_i - 1) s_i^2) / sum(n_i - 1) over the groups
    with two values or more, and its degrees of freedom; (None, 0) if no group has two values."""
    ss = dof = 0
    for vals in groups:
        vals = [v for v in vals if v is not None]
        if len(vals) >= 2:
            m = sum(vals) / len(vals)
            ss += sum((v - m) ** 2 for v in vals)
            dof += len(vals) - 1
    return (ss / dof, dof) if dof else (None, 0)


def _beta_continued_fraction(a, b, x, max_iter=500, eps=1e-15):
    # the continued fraction of the incomplete beta function, by the modified Lentz method
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta did not converge (a={a}, b={b}, x={x})")


def betainc(a, b, x):
    """The regularised incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must lie in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):  # the fraction converges fast on this side; use symmetry on the other
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def f_survival(f, dof1, dof2):
    """P(F > f) for F distributed as F(dof1, dof2)."""
    if f <= 0:
        return 1.0
    return betainc(dof2 / 2, dof1 / 2, dof2 / (dof2 + dof1 * f))


def between_settings_test(means, counts, within_variance, within_dof):
    """One-way analysis of variance with the within-setting (seed) variance given: whether the
    settings' mean scores differ by more than the seed noise explains.

    means[i]: the mean score of setting i over counts[i] seeds; within_variance: the seed variance
    of one run's score, estimated with within_dof degrees of freedom (``pooled_variance``, from
    these runs or from other systems trained with the same recipe). Returns a dict with the F
    statistic, its degrees of freedom and p = P(F(dof1, dof2) > F) under "no setting matters";
    None if there are fewer than two settings or no variance."""
    if len(means) < 2 or not within_variance or within_dof < 1:
        return None
    total = sum(counts)
    grand = sum(m * n for m, n in zip(means, counts)) / total
    dof1 = len(means) - 1
    between = sum(n * (m - grand) ** 2 for m, n in zip(means, counts)) / dof1
    f = between / within_variance
    return {"f": f, "dof1": dof1, "dof2": within_dof, "p": f_survival(f, dof1, within_dof)}


def normal_quantile(q):
    """The q-quantile of the standard normal distribution (bisection on erfc; |error| < 1e-12)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must lie in (0, 1), got {q}")
    lo, hi = -40.0, 40.0
    while hi - lo > 1e-12:
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(-mid / math.sqrt(2)) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def seeds_to_separate(difference, sd, alpha=0.05, power=0.8):
    """Seeds per setting that a two-sided comparison of two settings' means needs to detect a true
    DIFFERENCE, given the seed standard deviation SD of one run: the normal approximation
    n = 2 (z_(1 - alpha/2) + z_power)^2 sd^2 / difference^2, rounded up."""
    if difference <= 0 or sd <= 0:
        raise ValueError(f"difference and sd must be positive, got {difference} and {sd}")
    z = normal_quantile(1 - alpha / 2) + normal_quantile(power)
    return math.ceil(2 * z * z * sd * sd / (difference * difference))


def describe_test(test, what="k"):
    """One sentence saying whether TEST (``between_settings_test``) separates the settings."""
    verdict = (
        f"the {what} differ by more than the seed noise explains"
        if test["p"] < 0.05
        else f"the differences between the {what} are within what the seed noise explains"
    )
    f_text = f"F({test['dof1']}, {test['dof2']}) = {test['f']:.2f}"
    return f"{verdict} (one-way analysis of variance: {f_text}, p = {test['p']:.2g})"
