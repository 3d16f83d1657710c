"""The k sweep and the chooser check that the appendix of docs/results.md is built with."""

import pytest

from scripts.experiments import claims


def run(model, variant, seed, bleu, nll=2.5, bleu2017=None, k=None):
    tests = [{"label": "test_2016", "sacrebleu": bleu}]
    if bleu2017 is not None:
        tests.append({"label": "test_2017", "sacrebleu": bleu2017})
    return {
        "model": model,
        "variant": variant,
        "seed": seed,
        "best_valid_nll": nll,
        "k": k,
        "tests": tests,
        "tokens_per_s": 1000.0,
    }


def test_chooser_check_within_and_outside_the_seed_noise():
    base = [run("clusterformer", "base", s, 40.0, nll, k=3) for s, nll in ((1, 2.50), (2, 2.52), (3, 2.48))]
    sweep = [run("clusterformer", f"k={k}", 1, 40.0, nll, k=k) for k, nll in ((2, 2.49), (4, 2.47), (8, 2.53))]
    records = base + sweep
    # k = 3's nll over seeds: mean 2.50, sd 0.02; best k = 4 (2.47)
    res, sentence = claims.check_chooser(records, {"recommended_k": 2, "max_update": 150})
    assert res["best_k"] == 4 and res["noise"] == pytest.approx(0.02)
    assert res["gap"] == pytest.approx(0.02) and res["verdict"] == "within"
    assert "k = 2" in sentence and "within the seed noise" in sentence
    res, sentence = claims.check_chooser(records, {"recommended_k": 8, "max_update": 150})
    assert res["gap"] == pytest.approx(0.06) and res["verdict"] == "outside"
    assert "outside the seed noise" in sentence
    # 15.70 * (0.02 / 0.06)^2 = 1.74: two seeds of each k
    assert res["seeds_needed"] == 2 and "takes about 2 seeds of each k" in sentence
    # one seed of k = 8 against one of k = 4: standard error 0.02 * sqrt(2) = 0.028, gap 2.1 of them
    assert res["gap_se"] == pytest.approx(0.02 * 2**0.5)
    assert "2.1 standard errors of a difference between a mean over 1 seed and one over 1 (0.028 bits)" in sentence
    assert "at 150 updates recommends" in sentence and "decayed" not in sentence
    _, sentence = claims.check_chooser(records, {"recommended_k": 8, "max_update": 400, "schedule": "anneal"})
    assert "at 400 updates, learning rate decayed to zero, recommends k = 8" in sentence
    chooser = {"recommended_k": 8, "max_update": 980, "schedule": "anneal", "anneal_over": 3920}
    assert "at 980 updates of a 3920-update linear decay recommends k = 8" in claims.check_chooser(records, chooser)[1]
    res, sentence = claims.check_chooser(records, {"recommended_k": 6, "max_update": 150})
    assert res["verdict"] == "open" and "did not train" in sentence
    res, _ = claims.check_chooser(base[:1] + sweep, {"recommended_k": 8, "max_update": 150})
    assert res["verdict"] == "open"  # no system with two seeds: no noise estimate
    # the noise pools every system's seeds: here a Transformer with sd 0.04 next to k = 3's 0.02
    tf = [run("transformer", "base", s, 39.0, nll) for s, nll in ((1, 2.46), (2, 2.54))]
    noise, pooled, dof = claims.nll_seed_noise(records + tf)
    # pooled over 2 + 1 degrees of freedom: sums of squares 0.0008 (k = 3) and 0.0032 (Transformer)
    assert pooled == 2 and dof == 3 and noise == pytest.approx(((0.0008 + 0.0032) / 3) ** 0.5)
    res, sentence = claims.check_chooser(records + tf, {"recommended_k": 8, "max_update": 150})
    assert res["verdict"] == "outside" and "across the 2 systems" in sentence
    assert claims.k_sweep_test(records + tf)["dof2"] == 3
    assert claims.check_chooser(base, {"recommended_k": 8})[0]["verdict"] == "open"  # no sweep
    table = "\n".join(claims.render_k_sweep(records, {"recommended_k": 8, "max_update": 150}))
    assert "| 3 | 1,2,3 | 2.500 |" in table and "| 8 | 1 | 2.530 |" in table
    assert claims.render_k_sweep(base) == []


def curve(*points):
    return [{"epoch": i + 1, "updates": float(u), "nll_loss": v} for i, (u, v) in enumerate(points)]


def test_k_sweep_test_and_early_phase_table():
    # three k, one seed each, and k = 3 at three seeds; noise from k = 3's seeds (sd 0.01, 2 dof)
    records = [run("clusterformer", "base", s, 40.0, nll, k=3) for s, nll in ((1, 2.50), (2, 2.51), (3, 2.49))]
    for r, c in zip(records, (((245, 5.40), (490, 4.10)), ((245, 5.30), (490, 4.00)), ((245, 5.35), (490, 4.05)))):
        r["curve"] = curve(*c)
    far = [run("clusterformer", f"k={k}", 1, 40.0, nll, k=k) for k, nll in ((2, 2.40), (8, 2.60))]
    far[0]["curve"] = curve((245, 5.50), (490, 4.00))
    far[1]["curve"] = curve((245, 5.20), (490, 4.20))
    test = claims.k_sweep_test(records + far)
    # means 2.40, 2.50 (3 seeds), 2.60; grand mean 2.50; between = (0.01 + 0 + 0.01) / 2 = 0.01
    assert test["f"] == pytest.approx(0.01 / 0.0001) and (test["dof1"], test["dof2"]) == (2, 2)
    assert test["p"] < 0.05
    near = [run("clusterformer", f"k={k}", 1, 40.0, nll, k=k) for k, nll in ((2, 2.505), (8, 2.495))]
    assert claims.k_sweep_test(records + near)["p"] > 0.5
    table = "\n".join(claims.render_k_sweep(records + far))
    # seed 1 is the seed every k has; the best k at each point is in bold; the seed sd row is k = 3's
    assert "during training (seed 1" in table
    assert "| 2 | 5.500 | **4.000** | 2.400 |" in table and "| 8 | **5.200** | 4.200 | 2.600 |" in table
    assert "| seed sd (k = 3, 3 seeds) | 0.050 | 0.050 | 0.010 |" in table
    assert "differ by more than the seed noise" in table
