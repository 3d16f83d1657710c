"""The significance tests of scripts/experiments/significance.py: the Student t maths and the seed
t-test against scipy, the vectorised BLEU/chrF against sacreBLEU, the seed-aware paired bootstrap
against sacreBLEU's ``--paired-bs`` in the one-seed case, its behaviour on constructed systems,
the verdict rule, input validation and the loaders."""

import gzip
import json
import logging
import math
import time

import numpy as np
import pytest
from scipy import stats as scipy_stats

from scripts.experiments import significance as sig

sacrebleu_metrics = pytest.importorskip("sacrebleu.metrics")
sacrebleu_significance = pytest.importorskip("sacrebleu.significance")

logging.getLogger("sacrebleu").setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------------------
# A synthetic test set: references, and systems that copy them with some words replaced


def corpus(n=200, seed=0):
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(60)]
    return [" ".join(rng.choice(vocab, size=rng.integers(4, 16))) + " ." for _ in range(n)]


def system(refs, noise, seed):
    """Each word of each reference replaced by a random one with probability NOISE."""
    rng = np.random.default_rng(seed)
    out = []
    for ref in refs:
        words = ref.split()
        out.append(" ".join(f"x{rng.integers(60)}" if rng.random() < noise else w for w in words))
    return out


REFS = corpus()


# ---------------------------------------------------------------------------------------------
# Student t


@pytest.mark.parametrize("dof", [1, 2, 3, 4, 5, 7, 10, 15, 30, 101])
def test_t_two_sided_p_matches_scipy(dof):
    for t in (0.0, 0.1, 0.7, 1.0, 2.0, 2.776, 4.3, 12.706, 40.0, -3.0):
        expected = 2 * scipy_stats.t.sf(abs(t), dof)
        assert sig.t_two_sided_p(t, dof) == pytest.approx(expected, rel=1e-9, abs=1e-13)
    assert sig.t_two_sided_p(math.inf, dof) == 0.0


@pytest.mark.parametrize("dof", [1, 2, 3, 4, 9, 30])
def test_t_quantile_matches_scipy_and_closed_forms(dof):
    for q in (0.5, 0.75, 0.9, 0.975, 0.995):
        assert sig.t_quantile(q, dof) == pytest.approx(scipy_stats.t.ppf(q, dof), rel=1e-10, abs=1e-12)
    # closed forms: Cauchy for 1 dof, t = (2q - 1) / sqrt(2 q (1 - q)) for 2 dof
    q = 0.975
    assert sig.t_quantile(q, 1) == pytest.approx(math.tan(math.pi * (q - 0.5)), rel=1e-10)
    assert sig.t_quantile(q, 2) == pytest.approx((2 * q - 1) / math.sqrt(2 * q * (1 - q)), rel=1e-10)


def test_t_functions_reject_bad_arguments():
    with pytest.raises(ValueError, match="positive integer"):
        sig.t_two_sided_p(1.0, 0)
    with pytest.raises(ValueError, match="positive integer"):
        sig.t_two_sided_p(1.0, 2.5)
    with pytest.raises(ValueError, match="q must lie"):
        sig.t_quantile(0.2, 3)


# ---------------------------------------------------------------------------------------------
# The seed-level paired t-test


@pytest.mark.parametrize("n", [2, 3, 5, 12])
def test_paired_t_test_matches_scipy_ttest_rel(n):
    rng = np.random.default_rng(n)
    a = 40 + rng.normal(0, 0.5, n)
    b = a - 0.3 + rng.normal(0, 0.4, n)
    res = sig.paired_t_test(a, b)
    ref = scipy_stats.ttest_rel(a, b)
    assert res.t == pytest.approx(ref.statistic, rel=1e-12)
    assert res.p == pytest.approx(ref.pvalue, rel=1e-9)
    assert res.dof == n - 1 and res.mean == pytest.approx(np.mean(a - b), rel=1e-12)
    # the interval: mean +- t.ppf(0.975, n - 1) sd / sqrt(n), and scipy's own interval
    half = scipy_stats.t.ppf(0.975, n - 1) * np.std(a - b, ddof=1) / math.sqrt(n)
    assert (res.ci_low, res.ci_high) == pytest.approx((res.mean - half, res.mean + half), rel=1e-10)
    ci = ref.confidence_interval(0.95)
    assert (res.ci_low, res.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert sig.paired_t_test(a, b, confidence=0.9).ci_low > res.ci_low  # a 90 % interval is narrower


def test_paired_t_test_constant_differences_and_validation():
    # every seed's difference the same: no spread, so p is 0 (nonzero difference) or 1 (none)
    res = sig.paired_t_test([41.0, 42.0, 43.0], [40.0, 41.0, 42.0])
    assert res.p == 0.0 and res.t == math.inf and res.ci_low == res.ci_high == pytest.approx(1.0)
    assert sig.paired_t_test([40.0, 41.0], [40.0, 41.0]).p == 1.0
    with pytest.raises(ValueError, match="3 scores for A but 2 for B"):
        sig.paired_t_test([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="two seeds or more"):
        sig.paired_t_test([1.0], [2.0])


def test_mean_ci_over_seeds():
    mean, half = sig.mean_ci([39.9, 40.1, 40.1])
    assert mean == pytest.approx(40.0333333) and half == pytest.approx(
        scipy_stats.t.ppf(0.975, 2) * np.std([39.9, 40.1, 40.1], ddof=1) / math.sqrt(3)
    )
    assert sig.mean_ci([40.0]) == (40.0, None)


# ---------------------------------------------------------------------------------------------
# Corpus scores from sufficient statistics


def random_stats(metric, rng, count=400):
    """Summed statistics with the corner cases sacreBLEU treats specially."""
    if metric == "BLEU":
        total = rng.integers(0, 50, size=(count, 4)).cumsum(axis=1)[:, ::-1]  # fewer longer n-grams
        correct = np.minimum(total, rng.integers(0, 30, size=(count, 4)))
        correct[rng.random((count, 4)) < 0.3] = 0  # orders without a match: 'exp' smoothing
        total[rng.random(count) < 0.05, 3] = 0  # no 4-gram at all
        lens = np.stack([total[:, 0], total[:, 0] + rng.integers(-10, 10, count)], axis=1).clip(0)
        lens[:5, 0] = 0  # empty output
        st = np.concatenate([lens, correct, total], axis=1)
        st[-3:, 2:6] = 0  # no match at all
        return st
    hyp = rng.integers(0, 40, size=(count, 6))
    ref = rng.integers(0, 40, size=(count, 6))
    match = np.minimum(np.minimum(hyp, ref), rng.integers(0, 30, size=(count, 6)))
    hyp[rng.random((count, 6)) < 0.1] = 0
    ref[rng.random((count, 6)) < 0.1] = 0
    st = np.stack([hyp, ref, match], axis=-1).reshape(count, 18)
    st[-3:] = 0  # nothing at all
    return st


@pytest.mark.parametrize("metric", ["BLEU", "chrF"])
def test_vectorised_scores_equal_sacrebleus(metric):
    rng = np.random.default_rng(1)
    stats = random_stats(metric, rng)
    scorer = sacrebleu_metrics.BLEU() if metric == "BLEU" else sacrebleu_metrics.CHRF()
    expected = [scorer._compute_score_from_stats([int(x) for x in row]).score for row in stats]
    assert sig.METRICS[metric](stats) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # and a real corpus score from sentence statistics
    hyps = system(REFS, 0.3, seed=5)
    expected = scorer.corpus_score(hyps, [REFS]).score
    assert float(sig.METRICS[metric](sig.sentence_stats(hyps, REFS, metric).sum(axis=0))) == pytest.approx(
        expected, rel=1e-12
    )


# ---------------------------------------------------------------------------------------------
# The paired bootstrap


@pytest.mark.parametrize("metric", ["BLEU", "chrF"])
def test_one_seed_bootstrap_reproduces_sacrebleu_paired_bs(metric, monkeypatch):
    # sacreBLEU scores its resamples from float32 statistics (about 1e-6 BLEU off ours), so a
    # resample lying that close to the threshold could count differently: tolerance one resample
    monkeypatch.setenv("SACREBLEU_SEED", "12345")
    base, other = system(REFS, 0.3, seed=1), system(REFS, 0.27, seed=2)
    scorer = sacrebleu_metrics.BLEU() if metric == "BLEU" else sacrebleu_metrics.CHRF()
    _, scores = sacrebleu_significance.PairedTest(
        [("base", base), ("other", other)], {metric: scorer}, [REFS], test_type="bs", n_samples=1000
    )()
    key = [k for k in scores if k != "System"][0]
    expected = scores[key][1]
    res = sig.paired_bootstrap(
        sig.sentence_stats(other, REFS, metric), sig.sentence_stats(base, REFS, metric), metric, 1000, 12345
    )
    assert res.p_sacrebleu == pytest.approx(expected.p_value, abs=1 / 1001)
    assert res.delta == pytest.approx(expected.score - scores[key][0].score, abs=1e-9)
    assert res.ci_low < res.delta < res.ci_high


def test_one_seed_bootstrap_on_the_committed_runs_matches_sacrebleu():
    # the report's own --paired-bs table: seed 1, test_2016, ClusterFormer against the Transformer
    records = sig.load_records(sig.REPO / "docs/results/multi30k_annealed.jsonl")
    ids = ["multi30k.transformer.base.s1.ann3920", "multi30k.clusterformer.base.s1.ann3920"]
    try:
        refs, hyps = sig.load_translations(records, ids, "test_2016")
    except (OSError, ValueError) as e:
        pytest.skip(f"committed translations not available: {e}")
    _, scores = sacrebleu_significance.PairedTest(
        [(i, hyps[i]) for i in ids], {"BLEU": sacrebleu_metrics.BLEU()}, [refs], test_type="bs", n_samples=1000
    )()
    extract = sig.SentenceStats(refs)
    res = sig.paired_bootstrap(extract(hyps[ids[1]]), extract(hyps[ids[0]]), "BLEU", 1000, 12345)
    assert res.p_sacrebleu == pytest.approx(scores["BLEU"][1].p_value, abs=1 / 1001)
    # sacreBLEU's count is one-sided here, the two-sided p is larger
    assert res.p > res.p_sacrebleu


def test_bootstrap_resamples_match_a_direct_recomputation_with_shared_indices():
    # delta*_r recomputed by hand: the SAME resampled sentences for every seed of both systems,
    # each seed scored by sacreBLEU's corpus BLEU, averaged per system
    hyps_a = [system(REFS, 0.2, seed=s) for s in (1, 2)]
    hyps_b = [system(REFS, 0.3, seed=s) for s in (3, 4, 5)]
    stats_a = np.stack([sig.sentence_stats(h, REFS) for h in hyps_a])
    stats_b = np.stack([sig.sentence_stats(h, REFS) for h in hyps_b])
    res = sig.paired_bootstrap(stats_a, stats_b, "BLEU", n_resamples=50, seed=7)
    idx = sig.resample_indices(len(REFS), 50, 7)
    bleu = sacrebleu_metrics.BLEU()
    for r in (0, 17, 49):
        refs_r = [REFS[i] for i in idx[r]]
        mean_a, mean_b = (
            np.mean([bleu.corpus_score([h[i] for i in idx[r]], [refs_r]).score for h in hyps])
            for hyps in (hyps_a, hyps_b)
        )
        assert res.deltas[r] == pytest.approx(mean_a - mean_b, abs=1e-9)


def test_seeds_are_resampled_together():
    # A's seeds are B's in another order: on every resample the two seed means are the same
    # numbers, so every delta* is exactly 0 -- which holds only if all seeds share the indices
    x, y = (sig.sentence_stats(system(REFS, q, seed=s), REFS) for q, s in ((0.1, 1), (0.5, 2)))
    res = sig.paired_bootstrap(np.stack([x, y]), np.stack([y, x]), "BLEU", n_resamples=500)
    assert np.all(res.deltas == 0.0) and res.delta == 0.0
    assert (res.ci_low, res.ci_high, res.p) == (0.0, 0.0, 1.0)
    # while the seeds themselves differ a lot on the resamples (x is far better than y)
    alone = sig.paired_bootstrap(x, y, "BLEU", n_resamples=500)
    assert alone.ci_low > 10


def test_identical_systems_give_p_one_and_a_better_system_a_small_p():
    seeds = {s: system(REFS, 0.3, seed=s) for s in (1, 2, 3)}
    same = sig.compare_systems(seeds, seeds, REFS, n_resamples=1000)
    assert same.delta == 0.0 and same.bootstrap.p == 1.0 and same.ttest.p == 1.0
    assert same.bootstrap.p_sacrebleu == pytest.approx(1 / 1001)  # sacreBLEU's '>' on a tie
    assert sig.verdict(same).startswith("no measurable difference (95 % CI [+0.00, +0.00])")

    better = {s: system(REFS, 0.1, seed=10 + s) for s in (1, 2, 3)}
    cmp = sig.compare_systems(better, seeds, REFS, n_resamples=1000)
    assert cmp.delta > 10 and cmp.bootstrap.p == pytest.approx(1 / 1001) and cmp.ttest.p < 0.01
    assert cmp.bootstrap.ci_low <= cmp.delta <= cmp.bootstrap.ci_high
    assert cmp.ttest.ci_low > 0
    assert sig.verdict(cmp, name="A") == "A better"
    assert sig.verdict(sig.compare_systems(seeds, better, REFS, n_resamples=200), name="A") == "A worse"


def test_close_systems_ci_contains_the_observed_delta_and_p_is_large():
    a = {s: system(REFS, 0.30, seed=s) for s in (1, 2)}
    b = {s: system(REFS, 0.30, seed=20 + s) for s in (1, 2)}
    res = sig.compare_systems(a, b, REFS, n_resamples=2000).bootstrap
    assert res.ci_low < res.delta < res.ci_high and res.ci_low < 0 < res.ci_high
    assert res.p > 0.05
    # the two-sided p: share of centred resamples at least as far from 0 as the observed delta
    expected = (1 + np.count_nonzero(np.abs(res.deltas - res.deltas.mean()) >= abs(res.delta))) / 2001
    assert res.p == expected
    assert np.quantile(res.deltas, [0.025, 0.975]) == pytest.approx([res.ci_low, res.ci_high])


def test_bootstrap_is_seeded():
    x, y = (sig.sentence_stats(system(REFS, q, seed=s), REFS) for q, s in ((0.3, 1), (0.32, 2)))
    one, two = (sig.paired_bootstrap(x, y, n_resamples=300, seed=3) for _ in range(2))
    assert one == two and np.array_equal(one.deltas, two.deltas)
    assert not np.array_equal(one.deltas, sig.paired_bootstrap(x, y, n_resamples=300, seed=4).deltas)


def test_bootstrap_takes_seconds_at_full_size():
    # 10,000 resamples of 1,000 sentences x 3 seeds x 2 systems (BLEU and chrF statistics)
    rng = np.random.default_rng(0)
    for metric in ("BLEU", "chrF"):
        a = np.stack([random_stats(metric, rng, 1000) for _ in range(3)])
        b = np.stack([random_stats(metric, rng, 1000) for _ in range(3)])
        start = time.perf_counter()
        sig.paired_bootstrap(a, b, metric, n_resamples=10000, seed=11)
        assert time.perf_counter() - start < 30  # about a second on one core


# ---------------------------------------------------------------------------------------------
# Input validation


def test_mismatched_inputs_raise_clear_errors():
    good = {1: system(REFS, 0.3, seed=1), 2: system(REFS, 0.3, seed=2)}
    short = {1: good[1], 2: good[2][:-1]}
    with pytest.raises(ValueError, match="system A, seed 2: 199 translations but 200 references"):
        sig.compare_systems(short, good, REFS)
    with pytest.raises(ValueError, match="system B has no seeds"):
        sig.compare_systems(good, {}, REFS)
    x = sig.sentence_stats(good[1], REFS)
    with pytest.raises(ValueError, match="system A has 199 sentences per seed, system B 200: not the same test set"):
        sig.paired_bootstrap(x[:-1], x)
    with pytest.raises(ValueError, match="seeds translate different numbers of sentences"):
        sig.compare_stats({1: x, 2: x[:-1]}, {1: x})
    with pytest.raises(ValueError, match="10 statistics per sentence, system B 18"):
        sig.paired_bootstrap(x, sig.sentence_stats(good[1], REFS, "chrF"))
    with pytest.raises(ValueError, match="unknown metric 'TER'"):
        sig.paired_bootstrap(x, x, "TER")
    with pytest.raises(ValueError, match="confidence must lie in"):
        sig.paired_bootstrap(x, x, confidence=95)
    with pytest.raises(ValueError, match="one resample"):
        sig.paired_bootstrap(x, x, n_resamples=0)


# ---------------------------------------------------------------------------------------------
# The verdict rule


def comparison(delta, boot_p, t_mean=None, t_p=None, seeds=(1, 2, 3)):
    boot = sig.BootstrapResult(delta, delta - 0.5, delta + 0.5, boot_p, boot_p, 1000, 1, np.zeros(0))
    tt = None if t_p is None else sig.TTestResult(t_mean, t_mean - 1, t_mean + 1, t_p, 3.0, len(seeds) - 1)
    return sig.Comparison("BLEU", {}, {}, boot, tt, tuple(seeds) if tt else (1,))


def test_verdict_needs_both_tests_to_reject():
    assert sig.verdict(comparison(0.8, 0.001, 0.8, 0.01), name="X") == "X better"
    assert sig.verdict(comparison(-0.8, 0.001, -0.8, 0.049), name="X") == "X worse"
    assert sig.verdict(comparison(0.4, 0.2, 0.4, 0.3)) == "no measurable difference (95 % CI [-0.10, +0.90])"
    only_boot = sig.verdict(comparison(0.8, 0.004, 0.8, 0.11))
    assert only_boot == "not established: only the bootstrap rejects (bootstrap p = 0.004, t-test p = 0.110)"
    assert sig.verdict(comparison(0.3, 0.16, 0.4, 0.006)).startswith("not established: only the seed t-test")
    assert sig.verdict(comparison(0.8, 0.001, -0.2, 0.01)).startswith("not established: the two tests reject with")
    # one common seed: no t-test; the bootstrap alone never gives a verdict
    assert sig.verdict(comparison(0.8, 0.001)).startswith("not established: only the bootstrap rejects")
    assert sig.verdict(comparison(0.1, 0.5)) == "no measurable difference (95 % CI [-0.40, +0.60])"
    assert sig.verdict(comparison(-1.3, 0.0004, -1.2, 0.11)) == (
        "not established: only the bootstrap rejects (bootstrap p < 0.001, t-test p = 0.110)"
    )
    # rejecting means p strictly below alpha; a percentile interval excluding 0 is then pointed out
    assert sig.verdict(comparison(0.8, 0.05, 0.8, 0.05)) == (
        "no measurable difference (bootstrap p = 0.050, t-test p = 0.050; the percentile 95 % CI [+0.30, +1.30] "
        "just excludes 0)"
    )


# ---------------------------------------------------------------------------------------------
# The committed-runs loader and the command line


def write_runs(tmp_path, runs, n=None):
    """Records and gzipped files laid out as the runner commits them; RUNS: (model, variant, seed, hyps)."""
    (tmp_path / "hyps").mkdir()
    with gzip.open(tmp_path / "ref.en.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(REFS) + "\n")
    records = []
    for model, variant, seed, hyps in runs:
        rid = f"toy.{model}.{variant}.s{seed}"
        with gzip.open(tmp_path / "hyps" / f"{rid}.test_2016.detok.gz", "wt", encoding="utf-8") as f:
            f.write("\n".join(hyps) + "\n")
        test = {"label": "test_2016", "hyp_file": f"hyps/{rid}.test_2016.detok.gz", "ref": "ref.en.gz"}
        records.append({"run_id": rid, "model": model, "variant": variant, "seed": seed, "tests": [test]})
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path, records


def test_load_translations_reads_the_committed_layout(tmp_path):
    hyps = system(REFS, 0.2, seed=1)
    _, records = write_runs(tmp_path, [("m", "base", 1, hyps), ("m", "base", 2, hyps[:-1])])
    refs, got = sig.load_translations(records, ["toy.m.base.s1"], "test_2016", repo=tmp_path)
    assert refs == REFS and got == {"toy.m.base.s1": hyps}
    with pytest.raises(ValueError, match="toy.m.base.s2, test_2016: 199 translations but 200 references"):
        sig.load_translations(records, ["toy.m.base.s1", "toy.m.base.s2"], "test_2016", repo=tmp_path)
    with pytest.raises(ValueError, match="no record for run"):
        sig.load_translations(records, ["nope"], "test_2016", repo=tmp_path)
    with pytest.raises(ValueError, match="has no test set 'test_2017'"):
        sig.load_translations(records, ["toy.m.base.s1"], "test_2017", repo=tmp_path)
    assert sig.system_runs(records, "m/base").keys() == {1, 2}


def test_read_lines_splits_on_newline_only(tmp_path):
    path = tmp_path / "x.gz"
    with gzip.open(path, "wb") as f:
        f.write("a\rb\u2028c\n\nd\n".encode())
    assert sig.read_lines(path) == ["a\rb\u2028c", "", "d"]


def test_command_line_prints_the_answer_tables(tmp_path, capsys, monkeypatch):
    runs = [("ref", "base", s, system(REFS, 0.3, seed=s)) for s in (1, 2)]
    runs += [("good", "base", s, system(REFS, 0.05, seed=10 + s)) for s in (1, 2, 3)]
    runs += [("good", "one", 1, system(REFS, 0.3, seed=30))]
    path, _ = write_runs(tmp_path, runs)
    monkeypatch.setattr(sig, "REPO", tmp_path)  # the records name files relative to the repository
    assert (
        sig.main(
            ["--results", str(path), "--against", "ref/base", "--system", "good/base", "--versus", "good/one"]
            + ["--resamples", "500"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "#### test_2016: every system against ref base (BLEU)" in out
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert rows["ref base"].endswith("| (reference) |")
    # 'good base' beats 'ref base' on every resample, but the t-test has one dof (seeds 1, 2)
    assert "| 1,2,3 |" in rows["good base"] and "(1,2)" in rows["good base"]
    assert "| – (under two common seeds) | – |" in rows["good one"]
    assert "#### test_2016: good base against each system (BLEU; Δ = good base − system)" in out


def test_answer_tables_agree_with_direct_comparisons():
    """The answer block's rows are the comparisons of compare_stats on the committed runs; a claim
    whose systems have no runs says so instead of a verdict."""
    records = sig.load_records(sig.REPO / "docs/results/multi30k_annealed.jsonl")
    lines = sig.answer_markdown(records, n_resamples=200)
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in lines if line.startswith("| ")}
    ids = [r["run_id"] for r in records if r["variant"] == "base"]
    refs, hyps = sig.load_translations(records, ids, "test_2016")
    by = {
        m: {r["seed"]: hyps[r["run_id"]] for r in records if r["variant"] == "base" and r["model"] == m}
        for m in ("clusterformer", "transformer")
    }
    c = sig.compare_systems(by["clusterformer"], by["transformer"], refs, n_resamples=200)
    cells = rows["clusterformer"]
    assert cells[4] == f"{c.delta:+.2f} [{c.bootstrap.ci_low:+.2f}, {c.bootstrap.ci_high:+.2f}]"
    assert cells[7] == sig.verdict(c, name="clusterformer")
    assert "k=4" not in rows and "no-sorting-loss" not in rows  # settings of ClusterFormer: claims table only
    claim = rows["ClusterFormer is better than the Transformer"]
    assert claim[2] == cells[4] and claim[5] == cells[7]
    # the second test set: its own comparison and verdict, the same as the claims table's
    refs17, hyps17 = sig.load_translations(records, ids, "test_2017")
    by17 = {
        m: {r["seed"]: hyps17[r["run_id"]] for r in records if r["variant"] == "base" and r["model"] == m}
        for m in ("clusterformer", "transformer")
    }
    c17 = sig.compare_systems(by17["clusterformer"], by17["transformer"], refs17, n_resamples=200)
    assert cells[8] == f"{c17.delta:+.2f} [{c17.bootstrap.ci_low:+.2f}, {c17.bootstrap.ci_high:+.2f}]"
    assert cells[9].rstrip(" |") == sig.verdict(c17, name="clusterformer") == claim[6].rstrip(" |")
    absent = [r for r in lines if "Sparse Transformer" in r]
    if not any(r["variant"] == "sparse" for r in records):
        assert absent and "not run yet (sparse)" in absent[0]
