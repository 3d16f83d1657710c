#!/usr/bin/env python3
"""Choose the number of clusters k on a short training budget.

    clusterformer-choose-k --data DATA_BIN --ks 1,2,3,4,6,8 --max-update 300 \\
        [--arch clusterformer_iwslt] [--seeds 1] [--tolerance 0.05|auto] \\
        [--schedule inverse_sqrt|anneal [--anneal-over T]] [--out work/choose_k] [--dry-run] \\
        [-- extra fairseq-train arguments, e.g. --max-tokens 4096 --lr 5e-4]

Trains one ClusterFormer per k (``--num-clusters k``; the decoder uses k too unless the extra
arguments give --causal-num-clusters) with fairseq-train, one after the other, all with the same
seed(s), data, model and optimiser settings. The defaults are the small model and the settings of
scripts/experiments (3+3 layers, d 128, FFN 512, 4 heads, Adam, inverse_sqrt, 2048 tokens per
batch); ``--model-args ''`` uses the architecture's own sizes, and arguments after ``--`` override
anything. ``--schedule anneal`` decays the learning rate linearly to zero over the --max-update
budget instead (the schedule of docs/results.md's converged study), so that each short run ends at
the bottom of its own curve rather than part-way down it; with ``--anneal-over T`` the decay runs
over T updates and training stops at --max-update, so that each run is the exact first part of the
T-update run you mean to train (same learning rate at every update; continue the chosen k's run
from its checkpoint with --keep-checkpoints and fairseq-train --max-update T).

For each k it records the best validation nll and loss, the training wall time, fairseq's training
throughput (target tokens/s) and the peak memory of the training process; writes
OUT/choose_k.json and OUT/choose_k.csv, plots quality and cost against k (OUT/choose_k.png) and
prints a recommendation. OUT (default work/choose_k) is relative to the current directory, where
fairseq-train also runs; ``--dry-run`` prints the training commands and the files it would write,
and writes nothing.

The rule: among the k whose best validation nll (mean over seeds) is within --tolerance
(bits/token) of the best k's, recommend the largest. A larger k makes the attention cheaper on
long inputs (each encoder word attends to 2*ceil(L/k) keys of its block and the previous one), so
this is the cheapest setting that loses no more than the tolerance. Set the tolerance to at least
the seed-to-seed spread of the nll at this budget (run --seeds 1,2 to see it): differences
smaller than that are noise. ``--tolerance auto`` (two seeds or more) sets it to that spread as
measured: the pooled standard deviation of the nll over seeds, across the k tried. On short
sentences (MT), the measured speed barely depends on k; the choice matters for long inputs.

With two seeds or more, the recommendation also says whether the k differ at all by more than
the seed noise explains (a one-way analysis of variance of the nll over k, ``stats``): when it
does not, the pick is only the rule's preference for the cheapest k. Early in training the ranking
can reflect how fast each k learns rather than where it ends: on Multi30k, the nll after 245
updates falls with every step of k from 2 to 8 (more local attention learns faster at first), and
that order is gone by 490 updates (docs/results.md, the converged k sweep).
"""

import argparse
import csv
import json
import sys
from pathlib import Path

from . import stats
from .runs import (
    SMALL_MODEL,
    TRAIN_SETTINGS,
    USER_DIR,
    annealed_settings,
    best_valid,
    machine_info,
    parse_train_log,
    run_measured,
    say,
    shell_join,
    split_extra_args,
    train_command,
)


def recommend(rows, tolerance, test=None):
    """rows: [{"k", "valid_nll", ...}] (one per k, nll averaged over seeds); test: the analysis of
    variance over k (``k_test``) or None. Returns (k, sentence)."""
    scored = [r for r in rows if r.get("valid_nll") is not None]
    if not scored:
        raise ValueError("no k has a validation nll")
    best = min(scored, key=lambda r: (r["valid_nll"], r["k"]))
    within = [r for r in scored if r["valid_nll"] <= best["valid_nll"] + tolerance]
    choice = max(within, key=lambda r: r["k"])
    others = ", ".join(f"k={r['k']}: {r['valid_nll']:.3f}" for r in sorted(scored, key=lambda r: r["k"]))
    if choice["k"] == best["k"]:
        larger = [r for r in scored if r["k"] > best["k"]]
        why = f"k={best['k']} has the best validation nll ({best['valid_nll']:.3f} bits/token) and " + (
            f"no larger k is within the tolerance of {tolerance:.3g} bits" if larger else "it is the largest k tried"
        )
    else:
        why = (
            f"k={choice['k']} is the largest k whose validation nll ({choice['valid_nll']:.3f}) is within "
            f"{tolerance:.3g} bits/token of the best (k={best['k']}: {best['valid_nll']:.3f}); larger k means "
            f"smaller blocks, i.e. the cheapest attention for long inputs at no more than that loss"
        )
    speed = [r for r in scored if r.get("tokens_per_s")]
    if speed:
        fastest = max(speed, key=lambda r: r["tokens_per_s"])
        slowest = min(speed, key=lambda r: r["tokens_per_s"])
        why += (
            f". Measured training speed here ranges {slowest['tokens_per_s']:.0f} (k={slowest['k']}) to "
            f"{fastest['tokens_per_s']:.0f} (k={fastest['k']}) target tokens/s"
        )
    if test is not None:
        why += f". At this budget, {stats.describe_test(test)}"
    return choice["k"], f"Recommended k = {choice['k']}: {why}. (All: {others}.)"


def _nll_by_k(runs):
    by_k = {}
    for r in runs:
        if r.get("valid_nll") is not None:
            by_k.setdefault(r["k"], []).append(r["valid_nll"])
    return by_k


def seed_spread(runs):
    """The pooled standard deviation over seeds of the best validation nll (``stats.pooled_variance``
    over the k trained with two seeds or more). None if no k has two seeds."""
    variance, _ = stats.pooled_variance(_nll_by_k(runs).values())
    return None if variance is None else variance**0.5


def k_test(runs):
    """Whether the k's mean nll differ by more than the seed noise explains: the one-way analysis of
    variance of the runs' nll over k (``stats.between_settings_test``); None without two k or two
    seeds of some k."""
    by_k = _nll_by_k(runs)
    variance, dof = stats.pooled_variance(by_k.values())
    ks = sorted(by_k)
    return stats.between_settings_test(
        [sum(by_k[k]) / len(by_k[k]) for k in ks], [len(by_k[k]) for k in ks], variance, dof
    )


def _anneal_over(run):
    """The length of a stored run's linear decay (None for inverse_sqrt; runs recorded before
    --anneal-over existed decayed over their own budget)."""
    if run.get("schedule", "inverse_sqrt") != "anneal":
        return None
    return run.get("anneal_over") or run["max_update"]


def _tolerance(text):
    """argparse type of --tolerance: 'auto' or a non-negative number of bits/token."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of bits/token or 'auto', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text!r}")
    return value


def aggregate(runs):
    """Per k: mean over seeds of nll, loss, wall time, tokens/s; max peak RSS."""
    by_k = {}
    for r in runs:
        by_k.setdefault(r["k"], []).append(r)

    def mean(rs, key):
        vals = [x[key] for x in rs if x.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    rows = []
    for k in sorted(by_k):
        rs = by_k[k]
        rows.append(
            {
                "k": k,
                "seeds": ",".join(str(x["seed"]) for x in rs),
                "valid_nll": mean(rs, "valid_nll"),
                "valid_nll_min": min(x["valid_nll"] for x in rs),
                "valid_nll_max": max(x["valid_nll"] for x in rs),
                "valid_loss": mean(rs, "valid_loss"),
                "wall_s": mean(rs, "wall_s"),
                "train_wall_s": mean(rs, "train_wall_s"),
                "tokens_per_s": mean(rs, "tokens_per_s"),
                "peak_rss_mb": max(x["peak_rss_mb"] for x in rs),
            }
        )
    return rows


def render_markdown(result):
    """A choose_k result (OUT/choose_k.json) as markdown lines: the table of k against validation
    nll and cost, and the recommendation."""
    rows = result["per_k"]
    seeds = ",".join(str(s) for s in result.get("seeds", []))
    schedule = ""
    if result.get("schedule") == "anneal":
        over = result.get("anneal_over") or result["max_update"]
        schedule = (
            " with the learning rate decayed to zero"
            if over == result["max_update"]
            else f" of a linear decay over {over} updates"
        )
    if result.get("tolerance_rule") == "auto":
        tolerance = f"tolerance {result['tolerance']:.3f} bits/token: the seed spread, `--tolerance auto`"
    else:
        tolerance = f"tolerance {result['tolerance']:g} bits/token"
    lines = [
        "| k | " + " | ".join(str(r["k"]) for r in rows) + " |",
        "|---|" + "---|" * len(rows),
        f"| valid nll at {result['max_update']} updates{schedule} (bits/token, mean over seeds {seeds}) | "
        + " | ".join(f"{r['valid_nll']:.3f}" for r in rows)
        + " |",
        "| training target tokens/s | " + " | ".join(f"{r['tokens_per_s'] or 0:.0f}" for r in rows) + " |",
        "| training wall time (s) | " + " | ".join(f"{r['wall_s']:.0f}" for r in rows) + " |",
        "",
        f"{result['recommendation']} ({tolerance})",
    ]
    return lines


def plot(rows, path, title):
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq may have set the root to DEBUG
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["k"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=80)
    nll = [r["valid_nll"] for r in rows]
    err = [[r["valid_nll"] - r["valid_nll_min"] for r in rows], [r["valid_nll_max"] - r["valid_nll"] for r in rows]]
    ax1.errorbar(ks, nll, yerr=err, marker="o", capsize=3)
    ax1.set_xlabel("k (clusters)")
    ax1.set_ylabel("best valid nll (bits/token)")
    ax1.set_title("quality (lower is better)", fontsize=9)
    ax1.set_xticks(ks)
    ax1.grid(alpha=0.3)
    ax2.plot(ks, [r["tokens_per_s"] or 0 for r in rows], marker="o", color="C1", label="train tokens/s")
    ax2.set_xlabel("k (clusters)")
    ax2.set_ylabel("target tokens/s", color="C1")
    ax2.set_xticks(ks)
    ax2.grid(alpha=0.3)
    ax3 = ax2.twinx()
    ax3.plot(ks, [r["wall_s"] / 60 for r in rows], marker="s", color="C2", label="wall minutes")
    ax3.set_ylabel("training wall time (min)", color="C2")
    ax2.set_title("cost", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    argv, extra = split_extra_args(argv)
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--data", required=True, help="binarised data (fairseq-preprocess output)")
    p.add_argument("--ks", default="1,2,3,4,6,8", help="comma-separated k values (default: %(default)s)")
    p.add_argument("--max-update", type=int, required=True, help="updates per k")
    p.add_argument("--arch", default="clusterformer_iwslt")
    p.add_argument("--seeds", default="1", help="comma-separated seeds; the nll is averaged over them")
    p.add_argument(
        "--tolerance",
        type=_tolerance,
        default=0.05,
        help="bits/token of validation nll a larger k may lose, or 'auto': the measured seed spread "
        "(needs two seeds or more) (default: %(default)s)",
    )
    p.add_argument(
        "--schedule",
        choices=("inverse_sqrt", "anneal"),
        default="inverse_sqrt",
        help="learning-rate schedule of every run: inverse_sqrt (the quick setting's) or anneal (linear "
        "decay to zero over --max-update, the converged study's) (default: %(default)s)",
    )
    p.add_argument(
        "--anneal-over",
        type=int,
        default=None,
        metavar="T",
        help="with --schedule anneal: decay the learning rate over T updates (>= --max-update) and stop at "
        "--max-update, so that each run is the first part of a T-update run (default: --max-update)",
    )
    p.add_argument(
        "--model-args",
        default=None,
        help=f"model size arguments (default: {' '.join(SMALL_MODEL)}; '' for the arch's)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("work") / "choose_k",
        help="output folder, relative to the current directory (default: %(default)s)",
    )
    p.add_argument("--user-dir", default=USER_DIR, help="fairseq's --user-dir (default: this package, %(default)s)")
    p.add_argument("--keep-checkpoints", action="store_true", help="save checkpoints (default: --no-save)")
    p.add_argument("--force", action="store_true", help="train again the (k, seed) pairs already in OUT")
    p.add_argument(
        "--dry-run", action="store_true", help="print the fairseq-train commands and the output files; write nothing"
    )
    a = p.parse_args(argv)
    try:
        ks = [int(k) for k in a.ks.split(",") if k]
    except ValueError:
        p.error("--ks takes integers (for 'auto', compare it separately with --num-clusters auto)")
    if not ks or min(ks) < 1:
        p.error("--ks needs positive integers")
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s]
    except ValueError:
        p.error(f"--seeds takes comma-separated integers, got {a.seeds!r}")
    if not seeds:
        p.error("--seeds needs at least one seed")
    if a.anneal_over is not None:
        if a.schedule != "anneal":
            p.error("--anneal-over sets the length of the linear decay: it needs --schedule anneal")
        if a.anneal_over < a.max_update:
            p.error(f"--anneal-over ({a.anneal_over}) must be at least --max-update ({a.max_update})")
    anneal_over = (a.anneal_over or a.max_update) if a.schedule == "anneal" else None
    if a.tolerance == "auto" and len(set(seeds)) < 2:
        p.error("--tolerance auto measures the seed spread: give two seeds or more (e.g. --seeds 1,2)")
    model_args = SMALL_MODEL if a.model_args is None else a.model_args.split()
    if not a.dry_run:
        a.out.mkdir(parents=True, exist_ok=True)
    store = a.out / "choose_k.json"
    stored = json.loads(store.read_text()) if store.exists() else {}

    def this_sweep(r):  # a stored run this call can reuse: same data, budget, schedule and arguments
        return (
            r["k"] in ks
            and r["seed"] in seeds
            and r.get("data") == str(a.data)
            and r.get("max_update") == a.max_update
            and r.get("schedule", "inverse_sqrt") == a.schedule
            and _anneal_over(r) == anneal_over
            and r.get("extra") == extra
        )

    stored_runs = stored.get("runs", []) + stored.get("other_runs", [])
    # runs of other sweeps stay in the file (under other_runs); --force trains this sweep's again
    other_runs = [r for r in stored_runs if not this_sweep(r)]
    runs = [] if a.force else [r for r in stored_runs if this_sweep(r)]
    have = {(r["k"], r["seed"]) for r in runs}
    settings = TRAIN_SETTINGS if a.schedule == "inverse_sqrt" else annealed_settings(anneal_over)
    for seed in seeds:
        for k in ks:
            if (k, seed) in have:
                say(f"k={k} seed {seed}: already in {store}, skipping (--force trains again)")
                continue
            run_dir = a.out / f"k{k}.s{seed}"
            log = run_dir / "train.log"
            if log.exists() and not a.dry_run:
                log.unlink()
            cmd = train_command(
                a.data,
                run_dir / "checkpoints",
                a.arch,
                a.max_update,
                seed,
                model_args=model_args,
                train_settings=settings,
                extra=["--num-clusters", str(k), *extra],
                save=a.keep_checkpoints,
                user_dir=a.user_dir,
            )
            over = f" of {anneal_over}" if anneal_over and anneal_over != a.max_update else ""
            if a.dry_run:
                say(f"k={k} seed {seed}: would train {a.max_update}{over} updates ({a.schedule}), log {log}")
                print("    " + shell_join(cmd), flush=True)
                continue
            say(f"k={k} seed {seed}: training {a.max_update}{over} updates ({a.schedule})")
            measured = run_measured(cmd, log, echo=r"done training|Error|error:|Traceback")
            parsed = parse_train_log(log.read_text())
            if measured["rc"] != 0 or not parsed["done"]:
                sys.exit(f"fairseq-train failed for k={k} (exit {measured['rc']}); see {log}")
            best = best_valid(parsed) or {}
            run = {
                "k": k,
                "seed": seed,
                "data": str(a.data),
                "max_update": a.max_update,
                "schedule": a.schedule,
                "anneal_over": anneal_over,
                "extra": extra,
                "valid_nll": best.get("nll_loss"),
                "valid_loss": best.get("loss"),
                "valid_updates": best.get("num_updates"),
                "wall_s": measured["wall_s"],
                "train_wall_s": parsed["train_wall_s"],
                "tokens_per_s": parsed["tokens_per_s"],
                "peak_rss_mb": measured["peak_rss_mb"],
                "command": shell_join(cmd),
            }
            say(
                f"k={k} seed {seed}: valid nll {run['valid_nll']} | {run['wall_s']:.0f} s | "
                f"{run['tokens_per_s']} tokens/s | peak RSS {run['peak_rss_mb']:.0f} MB"
            )
            runs.append(run)
            # keep partial progress
            store.write_text(json.dumps({"runs": runs, "other_runs": other_runs}, indent=2) + "\n")
    if a.dry_run:
        files = ", ".join(str(Path.cwd() / a.out / name) for name in ("choose_k.json", "choose_k.csv", "choose_k.png"))
        print(f"dry run: nothing trained or written; would write {files}")
        return 0
    rows = aggregate(runs)
    tolerance = seed_spread(runs) if a.tolerance == "auto" else a.tolerance
    test = k_test(runs)
    k, sentence = recommend(rows, tolerance, test)
    result = {
        "invocation": shell_join(["clusterformer-choose-k", *argv, *(["--", *extra] if extra else [])]),
        "runs": runs,
        "other_runs": other_runs,
        "per_k": rows,
        "tolerance": tolerance,
        "tolerance_rule": "auto" if a.tolerance == "auto" else "fixed",
        "recommended_k": k,
        "recommendation": sentence,
        "arch": a.arch,
        "max_update": a.max_update,
        "schedule": a.schedule,
        "anneal_over": anneal_over,
        "k_test": test,
        "seeds": seeds,
        "machine": machine_info(),
    }
    store.write_text(json.dumps(result, indent=2) + "\n")
    with open(a.out / "choose_k.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(
        rows,
        a.out / "choose_k.png",
        f"{a.arch}, {a.max_update} updates ({a.schedule}), seeds {a.seeds}: {Path(a.data).name}",
    )
    print()
    print(f"{'k':>3} {'valid nll':>10} {'loss':>8} {'wall s':>8} {'tok/s':>8} {'RSS MB':>8}")
    for r in rows:
        print(
            f"{r['k']:>3} {r['valid_nll']:>10.3f} {r['valid_loss'] or float('nan'):>8.3f} {r['wall_s']:>8.0f} "
            f"{(r['tokens_per_s'] or 0):>8.0f} {r['peak_rss_mb']:>8.0f}"
        )
    print(f"\nwrote {store}, {a.out / 'choose_k.csv'}, {a.out / 'choose_k.png'}")
    print(sentence)
    return 0


if __name__ == "__main__":
    sys.exit(main())
