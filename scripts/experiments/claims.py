"""The k sweep of a study and the check of clusterformer-choose-k's pick, on run records.

Pure functions over the runner's records (one dict per run, as in docs/results/*.jsonl), so that
the tables in the appendix are rebuilt by ``run_side_by_side report``. The paper's claims are
tested by significance.py (a paired bootstrap over sentences and a seed-level t-test).
"""

from fairseq_clusterformer.tools import stats


def score(record, label, key="sacrebleu"):
    """A test set's score in a run record (None if the run has no such test)."""
    for t in record.get("tests", []):
        if t["label"] == label:
            return t.get(key)
    return None


def _std(values):
    if len(values) < 2:
        return None
    m = sum(values) / len(values)
    return (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def _num(x, nd=2, sign=False):
    if x is None:
        return "–"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def per_seed(records, system, value):
    """{seed: value(record)} for SYSTEM's runs (None values left out)."""
    out = {}
    for r in records:
        if (r["model"], r["variant"]) == system:
            v = value(r)
            if v is not None:
                out[r["seed"]] = v
    return out


def k_sweep(records):
    """{k: {"nll": {seed: v}, "bleu": {seed: v}, "bleu2017": ...}} for ClusterFormer at its defaults
    (k = 3) and the sweep's variants named k=K."""
    out = {}
    for r in records:
        if r["model"] != "clusterformer":
            continue
        if r["variant"] == "base":
            k = r.get("k") or 3
        elif r["variant"].startswith("k=") and r["variant"][2:].isdigit():
            k = int(r["variant"][2:])
        else:
            continue
        entry = out.setdefault(k, {"nll": {}, "bleu": {}, "bleu2017": {}, "tok_s": {}, "curve": {}})
        entry["nll"][r["seed"]] = r.get("best_valid_nll")
        entry["bleu"][r["seed"]] = score(r, "test_2016")
        entry["bleu2017"][r["seed"]] = score(r, "test_2017")
        entry["tok_s"][r["seed"]] = r.get("tokens_per_s")
        entry["curve"][r["seed"]] = {
            int(c["updates"]): c["nll_loss"] for c in r.get("curve") or [] if c.get("updates") and c.get("nll_loss")
        }
    return out


def _mean(d):
    vals = [v for v in d.values() if v is not None]
    return sum(vals) / len(vals) if vals else None


def nll_seed_noise(records):
    """The seed noise of the best validation nll under the study's recipe: the pooled standard
    deviation over seeds (``stats.pooled_variance``) across every system (model, variant) with two
    seeds or more. Three seeds of one system give a poor estimate of a spread (the main table's
    range from 0.006 to 0.029 bits), and the recipe is the same for all, so they are pooled.
    Returns (noise or None, number of systems pooled, degrees of freedom)."""
    systems = {}
    for r in records:
        if r.get("best_valid_nll") is not None:
            systems.setdefault((r["model"], r["variant"]), []).append(r["best_valid_nll"])
    groups = [v for v in systems.values() if len(v) >= 2]
    variance, dof = stats.pooled_variance(groups)
    if variance is None:
        return None, 0, 0
    return variance**0.5, len(groups), dof


def k_sweep_test(records):
    """Whether the converged k sweep separates the k at all: ``stats.between_settings_test`` on the
    mean validation nll of each k, with the pooled seed noise of the study (``nll_seed_noise``) as
    the within-k variance. None without two k or a noise estimate."""
    nll = {k: _mean(v["nll"]) for k, v in k_sweep(records).items()}
    counts = {k: sum(x is not None for x in v["nll"].values()) for k, v in k_sweep(records).items()}
    ks = [k for k in sorted(nll) if nll[k] is not None]
    noise, _, dof = nll_seed_noise(records)
    if noise is None:
        return None
    return stats.between_settings_test([nll[k] for k in ks], [counts[k] for k in ks], noise**2, dof)


def check_chooser(records, chooser):
    """Whether CHOOSER's short-budget pick (the choose_k result: recommended_k, max_update) is within
    the seed noise (``nll_seed_noise``) of the best converged k on validation nll. Returns (dict,
    sentence)."""
    sweep = k_sweep(records)
    res = {"chosen_k": chooser.get("recommended_k") if chooser else None, "verdict": "open"}
    if len(sweep) < 2:
        return res, "The k sweep has not run at convergence yet, so the chooser cannot be checked."
    nll = {k: _mean(v["nll"]) for k, v in sweep.items() if _mean(v["nll"]) is not None}
    best = min(nll, key=lambda k: (nll[k], k))
    noise, pooled, _ = nll_seed_noise(records)
    res.update(best_k=best, best_nll=nll[best], noise=noise, nll=nll)
    head = (
        f"Best converged k on validation nll: k = {best} ({nll[best]:.3f}; "
        + ", ".join(f"k = {k}: {nll[k]:.3f}" for k in sorted(nll))
        + ")."
    )
    if chooser is None:
        return res, head + " No committed choose_k result to check against."
    chosen = res["chosen_k"]
    schedule = ""
    if chooser.get("schedule") == "anneal":
        over = chooser.get("anneal_over") or chooser.get("max_update")
        decayed = over == chooser.get("max_update")
        schedule = ", learning rate decayed to zero," if decayed else f" of a {over}-update linear decay"
    budget = f"`clusterformer-choose-k` at {chooser.get('max_update')} updates{schedule} recommends k = {chosen}"
    if chosen not in nll:
        return res, f"{head} {budget}, which the sweep did not train."
    if noise is None:
        return res, f"{head} {budget} ({nll[chosen]:.3f}); the seed noise needs a system with two seeds."
    gap = nll[chosen] - nll[best]
    res.update(gap=gap, verdict="within" if gap <= noise else "outside")
    where = "within" if gap <= noise else "outside"
    sentence = (
        f"{head} {budget}: {nll[chosen]:.3f}, {gap:.3f} bits above the best, {where} the seed noise "
        f"({noise:.3f} bits: the pooled standard deviation of the best validation nll over seeds, across the "
        f"{pooled} systems run with two seeds or more)."
    )
    if gap > 0:
        # the rule above compares the gap with the noise of one run; the gap itself is a difference
        # of two means, of n_chosen and n_best seeds, whose standard error is larger
        n_chosen, n_best = (sum(x is not None for x in sweep[k]["nll"].values()) for k in (chosen, best))
        res["gap_se"] = noise * (1 / n_chosen + 1 / n_best) ** 0.5
        res["seeds_needed"] = stats.seeds_to_separate(gap, noise)
        sentence += (
            f" The gap is {gap / res['gap_se']:.1f} standard errors of a difference between a mean over "
            f"{n_chosen} seed{'s' if n_chosen > 1 else ''} and one over {n_best} ({res['gap_se']:.3f} bits). "
            f"Telling a difference of {gap:.3f} bits from the seed noise (5 % level, 80 % power) takes about "
            f"{res['seeds_needed']} seeds of each k."
        )
    return res, sentence


EARLY_UPDATES = (245, 490, 980, 1960)  # the validation points the early-phase table shows (epochs 1, 2, 4, 8)


def render_k_sweep(records, chooser=None):
    """Markdown lines: the k sweep at convergence, the validation nll of each k early in training
    (from the runs' own curves, at the seed every k has run) and the chooser check (empty if no
    sweep)."""
    sweep = k_sweep(records)
    if len(sweep) < 2:
        return []
    lines = [
        "ClusterFormer's number of clusters k at convergence (k = 3 is the default, the main table's row; "
        "means over the seeds run):",
        "",
        "| k | seeds | valid nll | test_2016 sacre | test_2017 sacre | tok/s |",
        "|---|---|---|---|---|---|",
    ]
    for k in sorted(sweep):
        v = sweep[k]
        lines.append(
            f"| {k} | {','.join(str(s) for s in sorted(v['nll']))} | {_num(_mean(v['nll']), 3)} "
            f"| {_num(_mean(v['bleu']))} | {_num(_mean(v['bleu2017']))} | {_num(_mean(v['tok_s']), 0)} |"
        )
    common = set.intersection(*(set(v["curve"]) for v in sweep.values()))
    if common:
        seed = min(common)
        curves = {k: v["curve"][seed] for k, v in sweep.items()}
        points = [u for u in EARLY_UPDATES if all(u in c for c in curves.values())]
        if points:
            final = {k: _num(sweep[k]["nll"].get(seed), 3) for k in curves}
            lines += [
                "",
                f"Validation nll of each k during training (seed {seed}, the same runs; "
                "the best k at each point in bold):",
                "",
                "| k | " + " | ".join(f"{u} updates" for u in points) + " | best (end) |",
                "|---|" + "---|" * (len(points) + 1),
            ]
            best_at = {u: min(curves, key=lambda k, u=u: curves[k][u]) for u in points}
            for k in sorted(curves):
                cells = [f"**{curves[k][u]:.3f}**" if best_at[u] == k else f"{curves[k][u]:.3f}" for u in points]
                lines.append(f"| {k} | " + " | ".join(cells) + f" | {final[k]} |")
            # the seed spread at the same points, from the k run with the most seeds
            most = max(sweep, key=lambda k: (len(sweep[k]["curve"]), -k))
            runs = [c for c in sweep[most]["curve"].values() if all(u in c for u in points)]
            if len(runs) >= 2:
                sds = [_std([c[u] for c in runs]) for u in points]
                ends = [v for v in sweep[most]["nll"].values() if v is not None]
                lines.append(
                    f"| seed sd (k = {most}, {len(runs)} seeds) | "
                    + " | ".join(f"{s:.3f}" for s in sds)
                    + f" | {_num(_std(ends), 3)} |"
                )
    _, sentence = check_chooser(records, chooser)
    test = k_sweep_test(records)
    if test is not None:  # is there a best k to find at all?
        sentence += f" Over the whole sweep at convergence, {stats.describe_test(test)}."
    return lines + ["", sentence, ""]
