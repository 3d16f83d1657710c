"""Significance tests for "system A is better than system B" on a test set, with several seeds each.

Replaces the seed-spread verdict rule of ``claims.py`` (issue 28, item 1) with two tests:

1. **Paired bootstrap over sentences, all seeds kept together** (``paired_bootstrap``). A system is
   its S translations of the test set, one per training seed. Each resample draws n sentence
   indices with replacement; the *same* indices are applied to every seed of both systems, the
   corpus score (sacreBLEU's BLEU or chrF, from summed sentence-level sufficient statistics) of each
   seed is computed on the resample, averaged over the seeds of each system, and
   delta*_r = mean_A - mean_B. The observed delta is mean_A - mean_B on the full test set (with
   the same seeds on both sides: the mean over seeds of the corpus-score differences).

   - Confidence interval: the percentile interval, the (1 - c) / 2 and (1 + c) / 2 quantiles of
     delta*_r (numpy's default linear interpolation), c = 0.95.
   - Two-sided p (Hall & Wilson 1991, "Two guidelines for bootstrap hypothesis testing"): the
     resampled deltas centred on their mean stand for the null "no difference", and
     p = (1 + #{r : |delta*_r - mean_r' delta*_r'| >= |delta_obs|}) / (R + 1): the share of
     centred resamples at least as far from 0, on either side, as the observed delta (+1 so that
     p > 0 and the test keeps its level). Identical systems: every delta*_r is 0, p = 1.
   - ``p_sacrebleu``, kept for comparison with ``sacrebleu --paired-bs`` (Koehn 2004; the Moses
     script bootstrap-hypothesis-difference-significance.pl): it centres the *absolute* deltas,
     p = (1 + #{r : |delta*_r| - mean_r' |delta*_r'| > |delta_obs|}) / (R + 1). With one seed
     per system and the same indices (``rng.choice`` on ``np.random.default_rng(seed)``,
     sacreBLEU's default seed 12345) it is sacreBLEU's p. When no resampled delta crosses 0 it
     counts one tail only (|delta*| - mean |delta*| = +-(delta* - mean delta*)), so it is about
     half the two-sided p; it calls a system against itself significant (p = 1 / (R + 1)). Hence
     not the p the verdict uses.

   The bootstrap measures how much the difference depends on which sentences were tested, for
   these seeds; it says nothing about other seeds.

2. **Seed-level paired t-test** (``paired_t_test``). For each seed s both systems have,
   d_s = score_A(s) - score_B(s) on the full test set; with S common seeds, mean d, standard error
   sd(d) / sqrt(S), t = mean / se on S - 1 degrees of freedom, two-sided p = P(|T| >= |t|), and the
   95 % interval mean +- t_(0.975, S - 1) se. Needs two common seeds or more. It measures how much
   the difference depends on the seed, for this test set. The Student t tail is computed in closed
   form (integer degrees of freedom; Abramowitz & Stegun 26.7.3-4), so the harness needs no scipy;
   the tests check it against scipy.

**Verdict rule** (``verdict``), at level alpha = 0.05: "A better" / "A worse" only when *both*
tests reject (bootstrap p < alpha and t-test p < alpha) and both differences have that sign: the
difference is then robust to resampling the sentences and to changing the seed. When neither
rejects: "no measurable difference (95 % CI [lo, hi])", with the bootstrap interval (where that
percentile interval just excludes 0 while p >= alpha -- they can disagree at the margin -- the
text says so; p decides). Otherwise (only one rejects, the signs disagree, or fewer than two
common seeds leave no t-test): "not established: ..." saying which test rejected. Requiring both
keeps the level at or below alpha; with 2 seeds (1 degree of freedom) the t-test rarely rejects,
so more seeds are what a "better" needs.

Command line (Markdown tables on stdout)::

    python -m scripts.experiments.significance --results docs/results/multi30k_annealed.jsonl \\
        --against transformer/base --test-set test_2016
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[2]

# sacreBLEU's default bootstrap seed (``SACREBLEU_SEED``), so that one-seed results match ``--paired-bs``
DEFAULT_SEED = 12345

# ---------------------------------------------------------------------------------------------
# Student t distribution (integer degrees of freedom), in math only


def t_two_sided_p(t: float, dof: int) -> float:
    """P(|T| >= |t|) for T Student-t distributed with DOF (a positive integer) degrees of freedom.

    Closed form of A(t | dof) = P(|T| <= t) (Abramowitz & Stegun 26.7.3 for odd, 26.7.4 for even
    dof) with theta = atan(t / sqrt(dof)); exact up to rounding, no special functions needed."""
    if int(dof) != dof or dof < 1:
        raise ValueError(f"dof must be a positive integer, got {dof}")
    dof = int(dof)
    if math.isnan(t):
        raise ValueError("t is NaN")
    t = abs(t)
    if math.isinf(t):
        return 0.0
    theta = math.atan(t / math.sqrt(dof))
    cos2 = math.cos(theta) ** 2
    series, term = 1.0, 1.0
    if dof % 2:  # odd: 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), up to cos^(dof-2)
        for k in range(1, (dof - 3) // 2 + 1):
            term *= cos2 * (2 * k) / (2 * k + 1)
            series += term
        inside = theta + (math.sin(theta) * math.cos(theta) * series if dof > 1 else 0.0)
        covered = 2.0 / math.pi * inside
    else:  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), up to cos^(dof-2)
        for k in range(1, (dof - 2) // 2 + 1):
            term *= cos2 * (2 * k - 1) / (2 * k)
            series += term
        covered = math.sin(theta) * series
    return min(1.0, max(0.0, 1.0 - covered))


def t_quantile(q: float, dof: int) -> float:
    """The q-quantile of Student's t with DOF degrees of freedom, 0.5 <= q < 1 (bisection on
    ``t_two_sided_p``; relative error < 1e-12). t_quantile(0.975, dof) is the 95 % interval's."""
    if not 0.5 <= q < 1.0:
        raise ValueError(f"q must lie in [0.5, 1), got {q}")
    alpha = 2.0 * (1.0 - q)  # two-sided tail mass beyond the quantile
    if alpha >= 1.0:
        return 0.0
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, dof) > alpha:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-12 * hi:
        mid = 0.5 * (lo + hi)
        if t_two_sided_p(mid, dof) > alpha:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------------------------------
# The seed-level paired t-test


@dataclass(frozen=True)
class TTestResult:
    """Paired t-test over seeds: mean of d_s = A(s) - B(s), its confidence interval, t, p."""

    mean: float
    ci_low: float
    ci_high: float
    p: float
    t: float
    dof: int


def paired_t_test(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> TTestResult:
    """Two-sided paired t-test of A - B, A[i] and B[i] being the same seed's scores.

    When every d_s is the same the standard error is 0: p = 1 if that difference is 0, else p = 0
    (scipy returns NaN for the first case)."""
    if len(a) != len(b):
        raise ValueError(f"paired t-test: {len(a)} scores for A but {len(b)} for B; pair them by seed")
    if len(a) < 2:
        raise ValueError(f"paired t-test: needs two seeds or more in common, got {len(a)}")
    _check_confidence(confidence)
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    mean = float(d.mean())
    se = float(d.std(ddof=1)) / math.sqrt(n)
    dof = n - 1
    if se == 0.0:
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
        return TTestResult(mean, mean, mean, 1.0 if mean == 0.0 else 0.0, t, dof)
    t = mean / se
    half = t_quantile(0.5 + confidence / 2, dof) * se
    return TTestResult(mean, mean - half, mean + half, t_two_sided_p(t, dof), t, dof)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Tuple[float, Optional[float]]:
    """(mean, half-width of its t confidence interval) over seeds; half-width None with one value."""
    if not len(values):
        raise ValueError("mean_ci: no values")
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v[0]), None
    return float(v.mean()), t_quantile(0.5 + confidence / 2, len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))


# ---------------------------------------------------------------------------------------------
# Corpus scores from sufficient statistics, vectorised (sacreBLEU's defaults)


def bleu_from_stats(stats) -> np.ndarray:
    """sacreBLEU's corpus BLEU (``BLEU()``: 4-grams, 'exp' smoothing, no effective order) from summed
    sufficient statistics [sys_len, ref_len, correct_1..4, total_1..4] on the last axis; any leading
    shape. Reproduces ``BLEU.compute_bleu`` case by case: brevity penalty 0 for an empty output; a
    precision with no match is 100 / (2^k total), k counting the match-less orders so far; score 0
    without any match or with an order that has no n-gram at all."""
    s = np.asarray(stats, dtype=np.float64)
    if s.shape[-1] != 10:
        raise ValueError(f"BLEU statistics have 10 entries per sentence, got {s.shape[-1]}")
    sys_len, ref_len, correct, total = s[..., 0], s[..., 1], s[..., 2:6], s[..., 6:10]
    zero = correct == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        bp = np.where(sys_len < ref_len, np.where(sys_len > 0, np.exp(1 - ref_len / sys_len), 0.0), 1.0)
        prec = np.where(zero, 100.0 / (np.exp2(np.cumsum(zero, axis=-1)) * total), 100.0 * correct / total)
        score = bp * np.exp(np.log(prec).sum(axis=-1) / 4)
    return np.where((total > 0).all(axis=-1) & ~zero.all(axis=-1), score, 0.0)


def chrf_from_stats(stats) -> np.ndarray:
    """sacreBLEU's corpus chrF (``CHRF()``: character 6-grams, no word n-grams, beta 2, effective-order
    averaging) from summed statistics [hyp, ref, match] x 6 orders on the last axis. As
    ``CHRF._compute_f_score``: precision and recall averaged over the orders that have both
    hypothesis and reference n-grams, then the F_beta of the averages."""
    s = np.asarray(stats, dtype=np.float64)
    if s.shape[-1] != 18:
        raise ValueError(f"chrF statistics have 18 entries per sentence, got {s.shape[-1]}")
    s = s.reshape(s.shape[:-1] + (6, 3))
    hyp, ref, match = s[..., 0], s[..., 1], s[..., 2]
    used = (hyp > 0) & (ref > 0)
    n_used = used.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        prec = np.where(used, match / hyp, 0.0).sum(axis=-1) / n_used
        rec = np.where(used, match / ref, 0.0).sum(axis=-1) / n_used
        prec, rec = np.where(n_used > 0, prec, 0.0), np.where(n_used > 0, rec, 0.0)
        score = 100 * 5 * prec * rec / (4 * prec + rec)  # beta^2 = 4
    return np.where(prec + rec > 0, score, 0.0)


def _sacrebleu_metric(metric: str, refs: Optional[Sequence[str]] = None):
    from sacrebleu.metrics import BLEU, CHRF

    refs_arg = None if refs is None else [list(refs)]
    if metric == "BLEU":
        return BLEU(references=refs_arg)
    if metric == "chrF":
        return CHRF(references=refs_arg)
    raise ValueError(f"unknown metric {metric!r}: use one of {sorted(METRICS)}")


METRICS = {"BLEU": bleu_from_stats, "chrF": chrf_from_stats}


class SentenceStats:
    """Sentence-level sufficient statistics of translations against one reference set (one reference
    per sentence), with the reference n-grams extracted once (sacreBLEU's own extraction)."""

    def __init__(self, refs: Sequence[str], metric: str = "BLEU"):
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}: use one of {sorted(METRICS)}")
        self.metric, self.n = metric, len(refs)
        # sacreBLEU warns about tokenised-looking output; these are detokenised by construction
        logging.getLogger("sacrebleu").setLevel(logging.ERROR)
        self._scorer = _sacrebleu_metric(metric, refs)

    def __call__(self, hyps: Sequence[str], name: str = "the translations") -> np.ndarray:
        """(n, K) float64 array of the statistics of HYPS, sentence by sentence."""
        if len(hyps) != self.n:
            raise ValueError(f"{name}: {len(hyps)} translations but {self.n} references")
        return np.asarray(self._scorer._extract_corpus_statistics(list(hyps), None), dtype=np.float64)


def sentence_stats(hyps: Sequence[str], refs: Sequence[str], metric: str = "BLEU") -> np.ndarray:
    """(n, K) sentence-level sufficient statistics of HYPS against REFS."""
    return SentenceStats(refs, metric)(hyps)


# ---------------------------------------------------------------------------------------------
# The paired bootstrap, seeds kept together


@functools.lru_cache(maxsize=4)
def resample_indices(n_sentences: int, n_resamples: int, seed: int = DEFAULT_SEED) -> np.ndarray:
    """(n_resamples, n_sentences) sentence indices drawn with replacement, exactly as sacreBLEU's
    paired bootstrap draws them (one ``rng.choice`` call on ``np.random.default_rng(seed)``). Every
    seed of both systems is scored on the same rows. Read-only (cached)."""
    if n_sentences < 1 or n_resamples < 1:
        raise ValueError(f"need at least one sentence and one resample, got {n_sentences} and {n_resamples}")
    idx = np.random.default_rng(seed).choice(n_sentences, size=(n_resamples, n_sentences), replace=True)
    idx.setflags(write=False)
    return idx


def resampled_sums(indices: np.ndarray, stats: np.ndarray, chunk: int = 1000) -> np.ndarray:
    """(R, F): for every resample (row of INDICES), the column sums of STATS (n, F) over its sentences.

    Computed as counts @ stats, counts[r, i] being how often sentence i is in resample r: one
    matrix product instead of gathering R x n x F values. Integer counts in float64: exact."""
    n_resamples, n = indices.shape
    if stats.shape[0] != n:
        raise ValueError(f"statistics for {stats.shape[0]} sentences, resamples of {n}")
    out = np.empty((n_resamples, stats.shape[1]), dtype=np.float64)
    for start in range(0, n_resamples, chunk):
        rows = indices[start : start + chunk]
        m = rows.shape[0]
        counts = np.bincount((rows + n * np.arange(m)[:, None]).ravel(), minlength=m * n).reshape(m, n)
        out[start : start + m] = counts.astype(np.float64) @ stats
    return out


@dataclass(frozen=True)
class BootstrapResult:
    """Paired bootstrap of mean_A - mean_B (see the module's docstring for the definitions)."""

    delta: float
    ci_low: float
    ci_high: float
    p: float  # two-sided, centred resamples (Hall & Wilson)
    p_sacrebleu: float  # sacreBLEU's --paired-bs definition (centred absolute deltas): about one-sided
    n_resamples: int
    seed: int
    deltas: np.ndarray = field(repr=False, compare=False)  # delta*_r of every resample, in order


def _as_seed_stats(stats, name: str) -> np.ndarray:
    arr = np.asarray(stats, dtype=np.float64)
    if arr.ndim == 2:  # one seed
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] == 0:
        raise ValueError(f"{name}: expected statistics shaped (seeds, sentences, K), got shape {arr.shape}")
    return arr


def paired_bootstrap(
    stats_a,
    stats_b,
    metric: str = "BLEU",
    n_resamples: int = 1000,
    seed: int = DEFAULT_SEED,
    confidence: float = 0.95,
) -> BootstrapResult:
    """Paired bootstrap over sentences of mean_A - mean_B, every seed of both systems on the same resamples.

    STATS_A, STATS_B: sentence-level statistics shaped (seeds, sentences, K) (or (sentences, K) for one
    seed), e.g. ``np.stack([sentence_stats(h, refs) for h in hyps_per_seed])``; the seed counts may
    differ, the sentences must be the same test set."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: use one of {sorted(METRICS)}")
    _check_confidence(confidence)
    a, b = _as_seed_stats(stats_a, "system A"), _as_seed_stats(stats_b, "system B")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"system A has {a.shape[1]} sentences per seed, system B {b.shape[1]}: not the same test set")
    if a.shape[2] != b.shape[2]:
        raise ValueError(f"system A has {a.shape[2]} statistics per sentence, system B {b.shape[2]}")
    score = METRICS[metric]
    (s_a, n, k), s_b = a.shape, b.shape[0]
    both = np.concatenate([a, b])  # (S_A + S_B, n, K)
    sums = resampled_sums(resample_indices(n, n_resamples, seed), both.transpose(1, 0, 2).reshape(n, -1))
    scores = score(sums.reshape(n_resamples, s_a + s_b, k))  # (R, S_A + S_B)
    deltas = scores[:, :s_a].mean(axis=1) - scores[:, s_a:].mean(axis=1)
    observed = score(both.sum(axis=1))
    delta = float(observed[:s_a].mean() - observed[s_a:].mean())
    lo, hi = np.quantile(deltas, [(1 - confidence) / 2, (1 + confidence) / 2])
    extreme = np.count_nonzero(np.abs(deltas - deltas.mean()) >= abs(delta))
    folded = np.abs(deltas)
    extreme_sacrebleu = np.count_nonzero(folded - folded.mean() > abs(delta))  # '>' as sacreBLEU has it
    return BootstrapResult(
        delta,
        float(lo),
        float(hi),
        (int(extreme) + 1) / (n_resamples + 1),
        (int(extreme_sacrebleu) + 1) / (n_resamples + 1),
        n_resamples,
        seed,
        deltas,
    )


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")


# ---------------------------------------------------------------------------------------------
# Both tests on two systems, and the verdict


@dataclass(frozen=True)
class Comparison:
    """A against B on one test set and metric: per-seed corpus scores, both tests."""

    metric: str
    scores_a: Dict[int, float]
    scores_b: Dict[int, float]
    bootstrap: BootstrapResult
    ttest: Optional[TTestResult]  # None with fewer than two common seeds
    common_seeds: Tuple[int, ...]

    @property
    def delta(self) -> float:
        return self.bootstrap.delta


def compare_stats(
    stats_a: Mapping[int, np.ndarray],
    stats_b: Mapping[int, np.ndarray],
    metric: str = "BLEU",
    n_resamples: int = 1000,
    seed: int = DEFAULT_SEED,
    confidence: float = 0.95,
) -> Comparison:
    """``compare_systems`` on precomputed sentence statistics {seed: (n, K) array}."""
    for name, st in (("system A", stats_a), ("system B", stats_b)):
        if not st:
            raise ValueError(f"{name} has no seeds")
        sizes = {s: len(v) for s, v in st.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"{name}'s seeds translate different numbers of sentences: {sizes}")
    seeds_a, seeds_b = sorted(stats_a), sorted(stats_b)
    a = np.stack([np.asarray(stats_a[s], dtype=np.float64) for s in seeds_a])
    b = np.stack([np.asarray(stats_b[s], dtype=np.float64) for s in seeds_b])
    boot = paired_bootstrap(a, b, metric, n_resamples, seed, confidence)
    score = METRICS[metric]
    scores_a = dict(zip(seeds_a, score(a.sum(axis=1)).tolist()))
    scores_b = dict(zip(seeds_b, score(b.sum(axis=1)).tolist()))
    common = tuple(s for s in seeds_a if s in scores_b)
    ttest = None
    if len(common) >= 2:
        ttest = paired_t_test([scores_a[s] for s in common], [scores_b[s] for s in common], confidence)
    return Comparison(metric, scores_a, scores_b, boot, ttest, common)


def compare_systems(
    hyps_a: Mapping[int, Sequence[str]],
    hyps_b: Mapping[int, Sequence[str]],
    refs: Sequence[str],
    metric: str = "BLEU",
    n_resamples: int = 1000,
    seed: int = DEFAULT_SEED,
    confidence: float = 0.95,
) -> Comparison:
    """A against B: HYPS_A, HYPS_B map a training seed to that run's translations of the test set
    (in test-set order), REFS its references. The bootstrap uses every seed of each system; the
    t-test the seeds both have."""
    extract = SentenceStats(refs, metric)
    stats_a = {s: extract(h, f"system A, seed {s}") for s, h in hyps_a.items()}
    stats_b = {s: extract(h, f"system B, seed {s}") for s, h in hyps_b.items()}
    return compare_stats(stats_a, stats_b, metric, n_resamples, seed, confidence)


def verdict(comparison: Comparison, alpha: float = 0.05, name: str = "A") -> str:
    """The verdict rule of the module's docstring: NAME better / worse only if both tests reject at
    ALPHA (p < ALPHA) with the same sign; "no measurable difference (95 % CI [lo, hi])" if neither
    does; "not established: ..." otherwise (one test rejects, opposite signs, no t-test)."""
    boot, tt = comparison.bootstrap, comparison.ttest
    boot_rejects = boot.p < alpha
    ps = f"bootstrap {_p_text(boot.p)}" + (f", t-test {_p_text(tt.p)}" if tt else "")
    if tt is not None and boot_rejects and tt.p < alpha:
        if boot.delta > 0 and tt.mean > 0:
            return f"{name} better"
        if boot.delta < 0 and tt.mean < 0:
            return f"{name} worse"
        return f"not established: the two tests reject with opposite signs ({ps})"
    if not boot_rejects and (tt is None or tt.p >= alpha):
        ci = f"95 % CI [{boot.ci_low:+.2f}, {boot.ci_high:+.2f}]"
        if boot.ci_low > 0 or boot.ci_high < 0:
            # the percentile interval and the centred p can disagree at the margin; the p decides
            return f"no measurable difference ({ps}; the percentile {ci} just excludes 0)"
        return f"no measurable difference ({ci})"
    if tt is None:
        return f"not established: only the bootstrap rejects ({ps}); fewer than two common seeds, no t-test"
    which = "bootstrap" if boot_rejects else "seed t-test"
    return f"not established: only the {which} rejects ({ps})"


def _fmt_p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


# ---------------------------------------------------------------------------------------------
# The committed runs


def read_lines(path) -> List[str]:
    """Lines of a text file, gzipped if its name ends in .gz, split on '\\n' only (as the runner's
    ``expkit.mt_prep.read_lines`` reads references)."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="\n") as f:
        text = f.read()
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def load_records(path) -> List[dict]:
    """The run records of a results file (one JSON object a line)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _test_entry(record: dict, test_set: str) -> dict:
    for t in record.get("tests", []):
        if t.get("label") == test_set:
            return t
    raise ValueError(f"run {record.get('run_id')} has no test set {test_set!r}")


def load_translations(
    records: Sequence[dict], run_ids: Sequence[str], test_set: str, repo=None
) -> Tuple[List[str], Dict[str, List[str]]]:
    """(references, {run id: translations}) of TEST_SET for RUN_IDS, from the committed files the
    records name (``hyp_file``: gzipped detokenised translations; ``ref``: the raw references),
    relative to REPO (default: this repository)."""
    repo = REPO if repo is None else repo
    by_id = {r["run_id"]: r for r in records}
    missing = [i for i in run_ids if i not in by_id]
    if missing:
        raise ValueError(f"no record for run(s) {missing}")
    entries = {i: _test_entry(by_id[i], test_set) for i in run_ids}
    refs_named = {e.get("ref") for e in entries.values()}
    if len(refs_named) != 1 or None in refs_named:
        raise ValueError(f"{test_set}: the runs name different or no reference files: {sorted(map(str, refs_named))}")
    refs = read_lines(Path(repo) / refs_named.pop())
    hyps = {}
    for i, e in entries.items():
        if not e.get("hyp_file"):
            raise ValueError(f"run {i} kept no translations of {test_set} (no hyp_file)")
        hyps[i] = read_lines(Path(repo) / e["hyp_file"])
        if len(hyps[i]) != len(refs):
            raise ValueError(f"run {i}, {test_set}: {len(hyps[i])} translations but {len(refs)} references")
    return refs, hyps


def system_runs(records: Sequence[dict], system: str) -> Dict[int, dict]:
    """{seed: record} of SYSTEM, written model/variant (e.g. transformer/base)."""
    model, _, variant = system.partition("/")
    runs: Dict[int, dict] = {}
    for r in records:
        if r["model"] == model and r["variant"] == variant:
            if r["seed"] in runs:
                raise ValueError(f"{system}: two runs with seed {r['seed']}")
            runs[r["seed"]] = r
    if not runs:
        raise ValueError(f"no runs of {system}")
    return runs


# ---------------------------------------------------------------------------------------------
# Command line: the answer tables


def _fmt_mean(values: Sequence[float]) -> str:
    mean, half = mean_ci(values)
    return f"{mean:.2f}" if half is None else f"{mean:.2f} ± {half:.2f}"


def _row(name: str, scores: Dict[int, float], cmp: Optional[Comparison], alpha: float, who: str) -> str:
    seeds = ",".join(str(s) for s in sorted(scores))
    cells = [name, seeds, _fmt_mean(list(scores.values()))]
    if cmp is None:
        cells += ["–"] * 5 + ["(reference)"]
    else:
        b, t = cmp.bootstrap, cmp.ttest
        cells += [f"{b.delta:+.2f}", f"[{b.ci_low:+.2f}, {b.ci_high:+.2f}]", _fmt_p(b.p)]
        if t is None:
            cells += ["– (under two common seeds)", "–"]
        else:
            common = ",".join(map(str, cmp.common_seeds))
            cells += [f"{t.mean:+.2f} [{t.ci_low:+.2f}, {t.ci_high:+.2f}] ({common})", _fmt_p(t.p)]
        cells.append(verdict(cmp, alpha, who))
    return "| " + " | ".join(cells) + " |"


def _header(metric: str, against: str) -> List[str]:
    return [
        f"| system | seeds | {metric}: mean ± 95 % CI over seeds | Δ vs {against} | bootstrap 95 % CI | bootstrap p "
        "| seed t-test: mean d [95 % CI] (common seeds) | t-test p | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--results", default="docs/results/multi30k_annealed.jsonl", help="run records (JSON lines)")
    ap.add_argument("--against", default="transformer/base", help="the reference system, model/variant")
    ap.add_argument("--system", default="clusterformer/base", help="the system of the second table")
    ap.add_argument(
        "--versus",
        default="transformer/base,clusterformer/lsh,clusterformer/routing,clusterformer/no-clustering-loss,"
        "clusterformer/no-sorting-loss,clusterformer/no-cluster-losses",
        help="comma-separated systems --system is compared with in the second table ('' for none)",
    )
    ap.add_argument("--test-set", action="append", help="test set label (repeatable; default test_2016)")
    ap.add_argument("--metric", choices=sorted(METRICS), default="BLEU")
    ap.add_argument("--resamples", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help="bootstrap seed")
    ap.add_argument("--alpha", type=float, default=0.05)
    a = ap.parse_args(argv)
    records = load_records(a.results)
    systems = list(dict.fromkeys(f"{r['model']}/{r['variant']}" for r in records))
    runs = {s: system_runs(records, s) for s in systems}
    versus = [v for v in a.versus.split(",") if v]
    for name in [a.against, a.system, *versus]:
        if name not in runs:
            raise SystemExit(f"no runs of {name} in {a.results}; systems: {', '.join(systems)}")
    out = []
    for test_set in a.test_set or ["test_2016"]:
        ids = [r["run_id"] for s in systems for r in runs[s].values()]
        refs, hyps = load_translations(records, ids, test_set)
        extract = SentenceStats(refs, a.metric)
        stats = {s: {seed: extract(hyps[r["run_id"]], r["run_id"]) for seed, r in runs[s].items()} for s in systems}
        key = {"BLEU": "sacrebleu", "chrF": "chrf"}[a.metric]
        for s in systems:  # the recomputed scores must be the recorded ones (2 decimals)
            for seed, r in runs[s].items():
                got, recorded = float(METRICS[a.metric](stats[s][seed].sum(axis=0))), _test_entry(r, test_set).get(key)
                if recorded is not None and abs(got - recorded) > 0.006:
                    print(
                        f"warning: {r['run_id']} {test_set}: {a.metric} {got:.3f}, recorded {recorded}", file=sys.stderr
                    )

        def cmp(x, y, stats=stats):
            return compare_stats(stats[x], stats[y], a.metric, a.resamples, a.seed)

        label = a.against.replace("/", " ")
        out += [
            f"#### {test_set}: every system against {label} ({a.metric})",
            "",
            *_header(a.metric, label),
        ]
        for s in systems:
            c = None if s == a.against else cmp(s, a.against)
            scores = (
                c.scores_a if c else {seed: float(METRICS[a.metric](st.sum(axis=0))) for seed, st in stats[s].items()}
            )
            out.append(_row(s.replace("/", " "), scores, c, a.alpha, s.replace("/", " ")))
        if versus:
            me = a.system.replace("/", " ")
            out += ["", f"#### {test_set}: {me} against each system ({a.metric}; Δ = {me} − system)", ""]
            out += _header(a.metric, "the system")
            for v in versus:
                c = cmp(a.system, v)
                out.append(_row(v.replace("/", " "), c.scores_b, c, a.alpha, me))
        out += [
            "",
            f"Δ: mean over each system's seeds of its corpus {a.metric}, A − B; bootstrap: {a.resamples:,} "
            f"paired resamples of the sentences (seed {a.seed}), the same for every seed of both systems, "
            "percentile CI, two-sided p of the centred resamples; seed t-test: over the seeds both systems have. "
            f"Verdict: better/worse only if both tests reject at {a.alpha}. Definitions: "
            "scripts/experiments/significance.py.",
            "",
        ]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ---------------------------------------------------------------------------------------------
# The answer block of docs/results.md (rendered by the report)

# What each system of the converged study is, in the settings that differ from ClusterFormer's.
SYSTEM_NOTES = {
    "transformer/base": "fairseq's Transformer, full attention",
    "clusterformer/base": "ClusterFormer, k = 3 (the paper's MT setting), losses weighted 0.01",
    "clusterformer/decoder-full": "ClusterFormer's encoder, full-attention decoder",
    "clusterformer/lsh": "Reformer: LSH attention, 8 hash rounds (the package default)",
    "clusterformer/lsh-n-hashes=1": "Reformer: LSH attention, 1 hash round",
    "clusterformer/lsh-n-hashes=2": "Reformer: LSH attention, 2 hash rounds",
    "clusterformer/routing": "Routing Transformer: half of the encoder heads local, with rotary positions",
    "clusterformer/routing-local-heads=0": "Routing Transformer without encoder local heads",
    "clusterformer/local-heads=half": "ClusterFormer with half of its encoder heads local (routing's budget)",
    "clusterformer/sparse": "Sparse Transformer: fixed pattern, blocks of ⌈L/3⌉ words",
    "clusterformer/linformer": "Linformer encoder (k = 32), ClusterFormer's decoder",
    "clusterformer/k=2": "ClusterFormer, k = 2",
    "clusterformer/k=4": "ClusterFormer, k = 4",
    "clusterformer/k=6": "ClusterFormer, k = 6",
    "clusterformer/k=8": "ClusterFormer, k = 8",
    "clusterformer/no-clustering-loss": "ClusterFormer without the clustering loss",
    "clusterformer/no-sorting-loss": "ClusterFormer without the sorting loss",
    "clusterformer/no-cluster-losses": "ClusterFormer without either loss",
}

SETTINGS_ONLY = {s for s in SYSTEM_NOTES if s.startswith(("clusterformer/k=", "clusterformer/no-"))}

# Whether routing's rotary local heads, which ClusterFormer lacks, explain its lead: routing
# without them, and ClusterFormer given as many local heads. Claims in both studies.
LIKE_FOR_LIKE_ROUTING = (
    (
        "ClusterFormer is better than routing without its local heads",
        "clusterformer/base",
        "clusterformer/routing-local-heads=0",
    ),
    (
        "at routing's local-head budget, ClusterFormer is better than routing",
        "clusterformer/local-heads=half",
        "clusterformer/routing",
    ),
    # what the local heads do within each system: the explanation of the first two claims
    ("routing's rotary local heads help routing", "clusterformer/routing", "clusterformer/routing-local-heads=0"),
    ("local heads help ClusterFormer's encoder", "clusterformer/local-heads=half", "clusterformer/base"),
)

# The paper's claims (and the like-for-like checks of its baselines): (claim, system A, system B).
CLAIMS = (
    ("ClusterFormer is better than the Transformer", "clusterformer/base", "transformer/base"),
    ("ClusterFormer is better than Reformer (8 hash rounds)", "clusterformer/base", "clusterformer/lsh"),
    ("ClusterFormer is better than Reformer (1 hash round)", "clusterformer/base", "clusterformer/lsh-n-hashes=1"),
    ("ClusterFormer is better than Reformer (2 hash rounds)", "clusterformer/base", "clusterformer/lsh-n-hashes=2"),
    ("ClusterFormer is better than the Routing Transformer", "clusterformer/base", "clusterformer/routing"),
    *LIKE_FOR_LIKE_ROUTING,
    ("ClusterFormer is better than the Sparse Transformer", "clusterformer/base", "clusterformer/sparse"),
    ("ClusterFormer is better than the Linformer encoder", "clusterformer/base", "clusterformer/linformer"),
    ("the clustering loss helps", "clusterformer/base", "clusterformer/no-clustering-loss"),
    ("the sorting loss helps", "clusterformer/base", "clusterformer/no-sorting-loss"),
    ("the two losses help", "clusterformer/base", "clusterformer/no-cluster-losses"),
)


# The document-level study (scripts/experiments/documents_queue.sh, the `documents` recipe): its
# systems and the claims it tests, on documents of 200-500 tokens (any of the queue's DATASETs).
DOCUMENT_NOTES = {
    "transformer/base": "fairseq's Transformer, full attention",
    "clusterformer/base": "ClusterFormer, k = 3 (the paper's MT setting), losses weighted 0.01",
    "clusterformer/k=auto": "ClusterFormer, k = ⌈√L⌉ per document in the encoder, 3 in the decoder",
    "clusterformer/decoder-full": "ClusterFormer's encoder, full-attention decoder",
    "clusterformer/routing": "Routing Transformer, k = 3: half of the encoder heads local, with rotary positions",
    "clusterformer/lsh-n-hashes=2": "Reformer: LSH attention, 2 hash rounds",
    "clusterformer/sparse": "Sparse Transformer: fixed pattern, blocks of ⌈L/3⌉ words",
    "clusterformer/linformer": "Linformer encoder (k = 32), ClusterFormer's decoder",
    "clusterformer/routing-local-heads=0": "Routing Transformer, k = 3, without encoder local heads",
    "clusterformer/local-heads=half": "ClusterFormer with half of its encoder heads local (routing's budget)",
}
DOCUMENT_CLAIMS = (
    ("ClusterFormer is better than the Transformer", "clusterformer/base", "transformer/base"),
    ("ClusterFormer with k = ⌈√L⌉ is better than the Transformer", "clusterformer/k=auto", "transformer/base"),
    ("k = ⌈√L⌉ is better than k = 3", "clusterformer/k=auto", "clusterformer/base"),
    ("ClusterFormer's clustered decoder is better than a full one", "clusterformer/base", "clusterformer/decoder-full"),
    ("ClusterFormer is better than the Routing Transformer", "clusterformer/base", "clusterformer/routing"),
    ("ClusterFormer is better than Reformer (2 hash rounds)", "clusterformer/base", "clusterformer/lsh-n-hashes=2"),
    ("ClusterFormer is better than the Sparse Transformer", "clusterformer/base", "clusterformer/sparse"),
    ("ClusterFormer is better than the Linformer encoder", "clusterformer/base", "clusterformer/linformer"),
    *LIKE_FOR_LIKE_ROUTING,
)


def system_name(system: str) -> str:
    """A system's name in the study's tables: "model/variant" -> the model for its base variant,
    else the variant (shared by the report, the coverage tables and the queues' labels)."""
    model, _, variant = system.partition("/")
    return model if variant == "base" else variant


def answer_markdown(
    records: Sequence[dict],
    test_sets: Sequence[str] = ("test_2016", "test_2017"),
    against: str = "transformer/base",
    n_resamples: int = 10000,
    seed: int = DEFAULT_SEED,
    alpha: float = 0.05,
    repo=None,
    notes: Mapping[str, str] = SYSTEM_NOTES,
    claims: Sequence[Tuple[str, str, str]] = CLAIMS,
    settings_only=SETTINGS_ONLY,
    unit: str = "sentences",
) -> List[str]:
    """The systems table (sacreBLEU on the first test set, mean and 95 % CI over seeds, Δ against
    AGAINST with both tests and a verdict, Δ and verdict on the other test sets) and the claims table, as
    Markdown lines. NOTES: the systems in order, with what each is (default: the Multi30k study's);
    CLAIMS: (claim, A, B); SETTINGS_ONLY: systems left out of the systems table (claims only); UNIT:
    what a line of a test set is (the bootstrap resamples them). Systems without records are left
    out; claims without them say so."""
    systems = [s for s in notes if any(f"{r['model']}/{r['variant']}" == s for r in records)]
    runs = {s: system_runs(records, s) for s in systems}
    stats = {}
    for test_set in test_sets:
        ids = [r["run_id"] for s in systems for r in runs[s].values()]
        refs, hyps = load_translations(records, ids, test_set, repo)
        extract = SentenceStats(refs, "BLEU")
        stats[test_set] = {s: {k: extract(hyps[r["run_id"]], r["run_id"]) for k, r in runs[s].items()} for s in systems}

    def cmp(a, b, test_set):
        return compare_stats(stats[test_set][a], stats[test_set][b], "BLEU", n_resamples, seed)

    main, others = test_sets[0], test_sets[1:]
    ref_name = system_name(against)
    out = [
        f"| system | what it is | seeds | {main} BLEU, mean ± 95 % CI over seeds | Δ vs {ref_name} "
        f"[bootstrap 95 % CI] | bootstrap p | t-test p | verdict | "
        + " | ".join(f"Δ on {t} [bootstrap 95 % CI] | verdict on {t}" for t in others)
        + (" |" if others else ""),
        "|---|---|---|---|---|---|---|---|" + "---|---|" * len(others),
    ]
    for s in systems:
        if s in settings_only:  # ClusterFormer's k and loss ablations: the claims table and the appendix
            continue
        scores = {k: float(bleu_from_stats(st.sum(axis=0))) for k, st in stats[main][s].items()}
        cells = [system_name(s), notes[s], ",".join(map(str, sorted(scores))), _fmt_mean(list(scores.values()))]
        if s == against:
            cells += ["–", "–", "–", "(reference)"] + ["–", "–"] * len(others)
        else:
            c = cmp(s, against, main)
            b, t = c.bootstrap, c.ttest
            cells += [
                f"{b.delta:+.2f} [{b.ci_low:+.2f}, {b.ci_high:+.2f}]",
                _fmt_p(b.p),
                "–" if t is None else _fmt_p(t.p),
                verdict(c, alpha, system_name(s)),
            ]
            for other in others:
                c = cmp(s, against, other)
                o = c.bootstrap
                cells += [f"{o.delta:+.2f} [{o.ci_low:+.2f}, {o.ci_high:+.2f}]", verdict(c, alpha, system_name(s))]
        out.append("| " + " | ".join(cells) + " |")
    out += [
        "",
        f"| claim | A vs B | Δ = A − B on {main} [bootstrap 95 % CI] | bootstrap p | t-test p (common seeds) "
        f"| verdict on {main} | " + " | ".join(f"verdict on {t}" for t in others) + (" |" if others else ""),
        "|---|---|---|---|---|---|" + "---|" * len(others),
    ]
    for claim, a, b in claims:
        pair = f"{system_name(a)} vs {system_name(b)}"
        if a not in runs or b not in runs:
            missing = " and ".join(system_name(x) for x in (a, b) if x not in runs)
            out.append("| " + " | ".join([claim, pair, f"not run yet ({missing})"] + [""] * (3 + len(others))) + " |")
            continue
        c = cmp(a, b, main)
        bt, t = c.bootstrap, c.ttest
        tt = "–" if t is None else f"{_fmt_p(t.p)} ({','.join(map(str, c.common_seeds))})"
        cells = [claim, pair, f"{bt.delta:+.2f} [{bt.ci_low:+.2f}, {bt.ci_high:+.2f}]", _fmt_p(bt.p), tt]
        cells.append(verdict(c, alpha, system_name(a)))
        cells += [verdict(cmp(a, b, other), alpha, system_name(a)) for other in others]
        out.append("| " + " | ".join(cells) + " |")
    out += [
        "",
        f"BLEU: sacreBLEU on detokenised output. Δ: mean over each system's seeds of its corpus BLEU, A − B. "
        f"Bootstrap: {n_resamples:,} paired resamples of the test {unit} (seed {seed}), the same indices for "
        "every seed of both systems; percentile CI; two-sided p of the centred resamples. t-test: paired over "
        f"the seeds both systems have. A verdict names a better or worse system only where both tests reject at "
        f"{alpha}; otherwise it says so (scripts/experiments/significance.py).",
    ]
    return out
