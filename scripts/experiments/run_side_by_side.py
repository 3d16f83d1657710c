#!/usr/bin/env python3
"""ClusterFormer vs fairseq's Transformer, side by side, plus the paper's ablations.

Both models get identical settings except the self-attention: the same binarised data and BPE, the
same dimensions (--model-args), optimiser, schedule, number of updates, batch size and seeds. Per
run it records the best valid nll, sacrebleu BLEU (detokenised, after removing BPE) and
fairseq-generate's tokenised BLEU on every test subset, the training wall time and throughput,
the training process's peak resident memory, and the valid learning curve; one JSON line per run
is appended to work/experiments/results.jsonl (and the whole table rewritten as results.csv);
--recipe converged also records chrF and keeps the translations, and appends to
docs/results/<dataset>_converged.jsonl.

    # 0. data (once): Multi30k de-en, and/or the offline IWSLT14 sample (scripts/experiments/prepare_data.py)
    python -m scripts.experiments.run_side_by_side prepare multi30k
    python -m scripts.experiments.run_side_by_side prepare iwslt14 --source ../shared/data/iwslt14

    # 1. side by side, two seeds
    python -m scripts.experiments.run_side_by_side run --dataset multi30k --seeds 1,2 --max-update 500

    # 2. ablations (clusterformer only): loss terms, and k
    python -m scripts.experiments.run_side_by_side run --dataset multi30k --models clusterformer \\
        --variants no-clustering-loss,no-sorting-loss,no-cluster-losses --ks 1,2,4,6,8

    # any other variant: a label and extra fairseq-train arguments after --
    python -m scripts.experiments.run_side_by_side run --dataset multi30k --models clusterformer \\
        --variants base --label no-previous-block -- --no-previous-block

    # 3. trained to convergence (scripts/experiments/recipes.py): stops when the validation nll
    #    has not improved for 3 epochs; a killed run resumes from its checkpoint_last.pt when the
    #    same command is given again; results go to docs/results/multi30k_converged.jsonl and the
    #    translations to docs/results/hyps/ (scripts/experiments/converged_queue.sh runs them all)
    python -m scripts.experiments.run_side_by_side run --recipe converged --dataset multi30k \\
        --models transformer --seeds 1

    # 4. tables, learning curves, paired bootstrap tests and commands into docs/results.md: each
    #    GENERATED block is rebuilt from the committed raw results its marker names, which it only
    #    reads (scripts/experiments/report.py; `run_side_by_side report` runs it)
    python -m scripts.experiments.run_side_by_side report

    # 5. recompute the recorded throughput (and missing repetition rates) of committed records
    #    from the training logs and translations still on this machine, after a parser fix
    python -m scripts.experiments.run_side_by_side refresh [--results docs/results/x.jsonl ...]

A run whose id is already in the results file is skipped (--force runs it again). Runs go one
after the other, each single-threaded (OMP_NUM_THREADS=1 unless set).
"""

import argparse
import csv
import datetime
import fcntl
import json
import os
import re
import shlex
import shutil
import sys
from collections import OrderedDict
from pathlib import Path

from . import expkit, recipes, report
from .expkit import REPO, portable, rel, say

WORK = REPO / "work" / "experiments"
RESULTS = WORK / "results.jsonl"
# The committed raw results: the study recipes append to RAW/<dataset>_<recipe>.jsonl.
RAW = REPO / "docs" / "results"
ARCHS = {"clusterformer": "clusterformer_iwslt", "transformer": "transformer_iwslt_de_en"}
# The paper's ablations (clusterformer only), as fairseq-train arguments.
VARIANTS = OrderedDict(
    [
        ("base", []),
        ("no-clustering-loss", ["--clustering-loss-weight", "0"]),
        ("no-sorting-loss", ["--sorting-loss-weight", "0"]),
        ("no-cluster-losses", ["--clustering-loss-weight", "0", "--sorting-loss-weight", "0"]),
    ]
)


# ------------------------------------------------------------------------------------------- run


def _dataset_json(name_or_dir, work=WORK):
    """The dataset.json of a prepared data set: in the folder NAME_OR_DIR, else in WORK/data/NAME."""
    path = Path(name_or_dir)
    if not (path / "dataset.json").exists():
        path = Path(work) / "data" / str(name_or_dir)
    return path / "dataset.json"


def load_dataset(name_or_dir, work=WORK):
    meta_path = _dataset_json(name_or_dir, work)
    if not meta_path.exists():
        sys.exit(f"no prepared data set at {meta_path.parent} (run: {Path(__file__).name} prepare {name_or_dir})")
    return json.loads(meta_path.read_text())


def plan_runs(models, variants, ks, seeds, label=None, extra=()):
    """[(model, variant label, extra fairseq-train args, k or None, seed)] in running order:
    seed-major, so a budget cut after the first seed still leaves complete comparisons."""
    plan = []
    for seed in seeds:
        for model in models:
            for variant in variants:
                if variant not in VARIANTS:
                    sys.exit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)} (or --label + args)")
                if model == "transformer" and variant != "base":
                    continue  # the ablations concern the clustering model only
                name = variant if not label else (label if variant == "base" else f"{variant}+{label}")
                plan.append((model, name, [*VARIANTS[variant], *extra], None, seed))
            if model == "clusterformer":
                for k in ks:
                    name = f"k={k}" if not label else f"k={k}+{label}"
                    plan.append((model, name, ["--num-clusters", str(k), *extra], k, seed))
    return plan


def run_id(dataset, model, variant, seed, max_update, recipe="quick", device="cpu"):
    """<dataset>.<model>.<variant>.s<seed>.<budget>, and .<device> for a run not on the CPU (its
    speed and memory do not compare with the CPU runs')."""
    rid = f"{dataset}.{model}.{variant}.s{seed}.{recipes.budget_tag(recipe, max_update)}"
    return rid if device == "cpu" else f"{rid}.{device}"


def parse_segments(text):
    """parse_train_log over a train.log that may hold several fairseq-train processes (a run
    resumed from checkpoint_last.pt after an interruption): each process starts with the
    "# command:" line run_measured writes. An epoch logged twice (the process was killed after
    its summary but before its checkpoint) counts once, with the later record."""
    parts = [p for p in re.split(r"^# command: .*$", text, flags=re.M) if p.strip()] or [text]
    train, valid = OrderedDict(), OrderedDict()
    for part in parts:
        parsed = expkit.parse_train_log(part)
        for rec in parsed["train"]:
            train[rec["epoch"]] = rec
        for rec in parsed["valid"]:
            valid[(rec["epoch"], rec.get("num_updates"))] = rec
    merged = expkit.parse_train_log("")
    merged["train"], merged["valid"] = list(train.values()), list(valid.values())
    merged["done"] = "done training" in parts[-1]
    tokens, prev = 0.0, 0.0
    for rec in merged["train"]:
        n = rec.get("num_updates", prev)
        tokens += rec.get("wpb", 0.0) * (n - prev)
        prev = n
    wall = sum(rec.get("train_wall", 0.0) for rec in merged["train"]) if merged["train"] else None
    merged.update(
        updates=int(prev),
        train_wall_s=wall,
        train_tokens=int(tokens),
        tokens_per_s=round(tokens / wall, 1) if wall else None,
        segments=len(parts),
        early_stop="early stop since valid performance" in text,
    )
    return merged


def killed_process_walls(log_text, n_recorded):
    """The training time of each fairseq-train process of a resumed run that was killed before the
    runner could record it (N_RECORDED: the processes segments.jsonl records; the others are the
    earliest that did not finish): fairseq's wall clock at its last epoch summary, which it logs
    just before saving that epoch's checkpoint. Work after that was lost and done again, so it is
    not counted; nor is the process's start-up."""
    parts = [p for p in re.split(r"^# command: .*$", log_text, flags=re.M) if p.strip()]
    unrecorded = len(parts) - n_recorded
    walls = []
    for part in parts:
        if unrecorded <= 0:
            break
        if "done training" in part:
            continue
        logged = re.findall(r"\| wall (\d+(?:\.\d+)?)", part)  # epoch summaries ("wall=" is per interval)
        walls.append(float(logged[-1]) if logged else 0.0)
        unrecorded -= 1
    return walls


def train_settings(a):
    settings = recipes.train_settings(a.recipe, recipes.max_update(a.recipe, a.max_update))
    for flag, value in (("--max-tokens", a.max_tokens), ("--lr", a.lr), ("--warmup-updates", a.warmup)):
        if value is not None:
            settings[settings.index(flag) + 1] = str(value)
    return settings


def one_run(a, meta, model, variant, extra, k, seed):
    rid = run_id(meta["name"], model, variant, seed, a.max_update, a.recipe, a.device)
    runs = Path(a.work) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    # One process per run: a second queue (or a second lane of another queue) that reaches a run
    # in progress would resume it from the same checkpoints and interleave their logs.
    with open(runs / f"{rid}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"{rid}: another process is running it ({runs / (rid + '.lock')}), skipping")
            return None
        return _one_run(a, meta, model, variant, extra, k, seed, rid)


def _one_run(a, meta, model, variant, extra, k, seed, rid):
    recipe = recipes.RECIPES[a.recipe]
    max_update = recipes.max_update(a.recipe, a.max_update)
    done = {r["run_id"] for r in expkit.read_jsonl(a.results)}
    if rid in done and not a.force:
        say(f"{rid}: already in {a.results}, skipping (--force runs it again)")
        return None
    run_dir = Path(a.work) / "runs" / rid
    code_dir, code_sha = a.code_dir, a.code_sha
    resume = (
        recipe["resumable"]
        and not a.force
        and (run_dir / "checkpoints" / "checkpoint_last.pt").exists()
        and (run_dir / "run.json").exists()
    )
    if resume:
        # the interrupted run goes on from its checkpoint_last.pt with the code it started with
        pinned = json.loads((run_dir / "run.json").read_text())
        if pinned["code_sha"]:
            code_dir, code_sha = expkit.code_snapshot(pinned["code_sha"], Path(a.work) / "code")
        say(f"{rid}: resuming from {run_dir / 'checkpoints' / 'checkpoint_last.pt'}")
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an interrupted quick run is started over (its timing would be wrong)
        run_dir.mkdir(parents=True)
        (run_dir / "run.json").write_text(json.dumps({"code_sha": code_sha, "recipe": a.recipe}) + "\n")
    arch = ARCHS[model]
    model_args = a.model_args.split() if a.model_args else list(recipe["model_args"])
    settings = train_settings(a)
    extra_all = [*extra, *recipe["stopping"], *a.extra]
    if a.validate_interval_updates:
        extra_all += ["--validate-interval-updates", str(a.validate_interval_updates)]
    user_dir = str(code_dir / "fairseq_clusterformer") if code_dir else expkit.USER_DIR
    env = expkit.code_env(code_dir)
    cmd = expkit.train_command(
        meta["data_bin"],
        run_dir / "checkpoints",
        arch,
        max_update,
        seed,
        model_args=model_args,
        train_settings=settings,
        extra=extra_all,
        user_dir=user_dir,
        device=a.device,
    )
    info = expkit.machine_info(a.device)
    say(f"{rid}: training ({arch}, {a.recipe} recipe, seed {seed})")
    say("  " + expkit.shell_join(cmd))
    if resume and (run_dir / "segments.jsonl").exists() and parse_segments((run_dir / "train.log").read_text())["done"]:
        say(f"{rid}: training had finished; translating and scoring")  # e.g. killed while translating
        measured = {"rc": 0, **expkit.read_jsonl(run_dir / "segments.jsonl")[-1]}
    else:
        measured = expkit.run_measured(cmd, run_dir / "train.log", env=env)
        expkit.append_jsonl(run_dir / "segments.jsonl", {**measured, "loadavg_start": info.get("loadavg_start")})
    segments = expkit.read_jsonl(run_dir / "segments.jsonl")
    log_text = (run_dir / "train.log").read_text()
    parsed = parse_segments(log_text)
    if measured["rc"] != 0 or not parsed["done"]:
        sys.exit(f"{rid}: fairseq-train failed (exit {measured['rc']}); see {run_dir / 'train.log'}")
    killed = killed_process_walls(log_text, len(segments))
    if len(segments) > 1 or killed:
        measured = {
            **measured,
            "wall_s": round(sum(seg["wall_s"] for seg in segments) + sum(killed), 1),
            "peak_rss_mb": max(seg["peak_rss_mb"] for seg in segments),
        }
        info["loadavg_start"] = segments[0].get("loadavg_start")
    best = expkit.best_valid(parsed) or {}
    ckpt = run_dir / "checkpoints" / "checkpoint_best.pt"
    tests = []
    for t in meta["tests"]:
        refs = expkit.mt_prep.read_lines(t["ref"])
        say(f"{rid}: translating {t['label']} ({len(refs)} sentences, beam {a.beam})")
        res = expkit.generate_and_score(
            meta["data_bin"],
            ckpt,
            t["subset"],
            run_dir / "output",
            meta["detok_lang"],
            refs,
            beam=a.beam,
            label=t["label"],
            user_dir=user_dir,
            env=env,
            device=a.device,
            # the data set's own generation settings first (documents: a length bound above
            # fairseq's default 200 tokens), then the command line's
            extra=shlex.split(meta.get("generate_args", "")) + shlex.split(a.generate_args),
        )
        res["command"] = _env_prefix(env) + res["command"]
        res["ref"] = rel(t["ref"])
        hyps = expkit.mt_prep.read_lines(run_dir / "output" / f"hyp.{t['label']}.detok")
        res["chrf"] = round(sacrebleu_chrf(hyps, refs), 2)
        if a.hyp_dir:
            res["hyp_file"] = rel(save_hyps(hyps, Path(a.hyp_dir) / f"{rid}.{t['label']}.detok.gz"))
        say(f"    sacrebleu {res['sacrebleu']} | chrF {res['chrf']} | tokenised {res['bleu_tok']}")
        tests.append(res)
    if not a.keep_checkpoints:
        for p in (run_dir / "checkpoints").glob("checkpoint_last.pt"):
            p.unlink()
    try:
        info["loadavg_end"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    record = {
        "run_id": rid,
        "dataset": meta["name"],
        "model": model,
        "arch": arch,
        "variant": variant,
        "k": k if k is not None else (None if model == "transformer" else _k_from_args(cmd)),
        "seed": seed,
        "recipe": a.recipe,
        "device": a.device,
        # the plugin's defaults: the base variant with no extra fairseq-train arguments
        "defaults": model == "clusterformer" and variant == "base" and not extra_all_user(a),
        "max_update": "conv" if a.recipe == "converged" else max_update,
        "updates": parsed["updates"],
        "epochs": parsed["train"][-1]["epoch"] if parsed["train"] else None,
        "params": expkit.count_parameters_from_log(log_text),
        "best_valid_nll": best.get("nll_loss"),
        "best_valid_loss": best.get("loss"),
        "best_valid_updates": best.get("num_updates"),
        "final_valid_nll": parsed["valid"][-1].get("nll_loss") if parsed["valid"] else None,
        "curve": [
            {
                "epoch": v["epoch"],
                "updates": v.get("num_updates"),
                "nll_loss": v.get("nll_loss"),
                "loss": v.get("loss"),
                "clustering_loss": v.get("clustering_loss"),
                "sorting_loss": v.get("sorting_loss"),
            }
            for v in parsed["valid"]
        ],
        "best_epoch": best.get("epoch"),
        "stopped_by_patience": parsed["early_stop"],
        "train_processes": parsed["segments"],  # fairseq-train processes (more than 1: resumed)
        # of which killed before they were measured: their time up to their last checkpoint, as
        # fairseq logged it, is part of train_wall_clock_s (their peak memory is unknown)
        "killed_processes_wall_s": killed,
        "train_wall_clock_s": measured["wall_s"],
        "train_wall_s": parsed["train_wall_s"],
        "tokens_per_s": parsed["tokens_per_s"],
        "train_tokens": parsed["train_tokens"],
        "peak_rss_mb": measured["peak_rss_mb"],
        "rss_method": measured["rss_method"],
        "tests": tests,
        "train_command": _env_prefix(env) + expkit.shell_join(cmd),
        "run_dir": str(run_dir),
        "machine": info,
        "git": code_sha or expkit.git_commit(),
        "code": "snapshot of the commit (git archive)" if code_dir else "working tree",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    expkit.append_jsonl(a.results, portable(record))
    write_csv(a.results)
    say(
        f"{rid}: best valid nll {record['best_valid_nll']} | "
        + " | ".join(f"{t['label']} sacrebleu {t['sacrebleu']} tok {t['bleu_tok']}" for t in tests)
        + f" | {measured['wall_s'] / 60:.1f} min | peak RSS {measured['peak_rss_mb']:.0f} MB"
    )
    return record


def extra_all_user(a):
    return list(a.extra) + (["--model-args"] if a.model_args else [])


def sacrebleu_chrf(hyps, refs):
    import sacrebleu

    return sacrebleu.CHRF().corpus_score(list(hyps), [list(refs)]).score


def save_hyps(hyps, path):
    """The detokenised translations, gzipped, beside the raw results (for the paired test)."""
    import gzip

    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write("".join(h + "\n" for h in hyps).encode("utf-8"))
    return path


def _env_prefix(env):
    return "".join(f"{k}={expkit.shell_join([v])} " for k, v in sorted(env.items()))


def _k_from_args(cmd):
    if "--num-clusters" in cmd:
        value = cmd[len(cmd) - 1 - cmd[::-1].index("--num-clusters") + 1]
        return int(value) if str(value).isdigit() else value
    return 3  # clusterformer_iwslt's default


def write_csv(results_path):
    records = expkit.read_jsonl(results_path)
    rows = [flat_row(r) for r in records]
    if not rows:
        return
    keys = list(OrderedDict.fromkeys(k for row in rows for k in row))
    with open(Path(results_path).with_suffix(".csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def flat_row(r):
    row = {
        k: r.get(k)
        for k in (
            "run_id",
            "dataset",
            "model",
            "variant",
            "k",
            "seed",
            "max_update",
            "updates",
            "epochs",
            "params",
            "best_valid_nll",
            "best_valid_updates",
            "train_wall_clock_s",
            "train_wall_s",
            "tokens_per_s",
            "peak_rss_mb",
        )
    }
    for t in r.get("tests", []):
        row[f"{t['label']}_sacrebleu"] = t["sacrebleu"]
        row[f"{t['label']}_bleu_tok"] = t["bleu_tok"]
    row["loadavg_start"] = r.get("machine", {}).get("loadavg_start")
    row["loadavg_end"] = r.get("machine", {}).get("loadavg_end")
    return row


# --------------------------------------------------------------------------------------- refresh


def refresh_train_stats(records):
    """Recompute the throughput fields from each run's saved train.log, where it is still on this
    machine (so that a parser fix applies to runs recorded before it), and fill in the repetition
    rate from the saved hypotheses where a record lacks it. Returns True if anything changed."""
    changed = False
    for r in records:
        log = expkit.run_dir(r) / "train.log"
        if not log.is_file():
            continue
        parsed = parse_segments(log.read_text())
        for key in ("train_wall_s", "tokens_per_s", "train_tokens"):
            if parsed.get(key) is not None and parsed[key] != r.get(key):
                r[key] = parsed[key]
                changed = True
        for t in r.get("tests", []):
            hyp = expkit.run_dir(r) / "output" / f"hyp.{t['label']}.tok"
            if "repeat_pct" not in t and hyp.is_file():
                t["repeat_pct"] = expkit.repetition_rate(hyp.read_text(encoding="utf-8").splitlines())
                changed = True
    return changed


def refresh(paths):
    """refresh_train_stats on each results file; rewrite those that changed. Returns their paths."""
    rewritten = []
    for path in paths:
        recs = expkit.read_jsonl(path)
        if refresh_train_stats(recs):
            Path(path).write_text("".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in recs))
            rewritten.append(path)
        say(f"{rel(path)}: {'refreshed' if path in rewritten else 'unchanged'} ({len(recs)} records)")
    return rewritten


# ------------------------------------------------------------------------------------------ CLI


def main(argv=None):
    argv, extra = expkit.split_extra_args(argv)
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("prepare", help="prepare a data set (python -m scripts.experiments.prepare_data)")
    s.add_argument("dataset", choices=("multi30k", "iwslt14"))
    s.add_argument("--work", type=Path, default=WORK)
    s.add_argument(
        "--source", default=None, help="iwslt14: the offline IWSLT14 material (scripts/experiments/prepare_data.py)"
    )

    s = sub.add_parser("run", help="train + translate + score, one run at a time; append to the results")
    s.add_argument("--dataset", required=True, help="multi30k, iwslt14, or a folder with a dataset.json")
    s.add_argument("--models", default="clusterformer,transformer")
    s.add_argument(
        "--variants",
        default="base",
        help=f"comma list of {', '.join(VARIANTS)} (ablations: clusterformer only); '' for none",
    )
    s.add_argument("--ks", default="", help="also run clusterformer with --num-clusters K for each K")
    s.add_argument("--seeds", default="1")
    s.add_argument(
        "--recipe",
        choices=tuple(recipes.RECIPES),
        default="quick",
        help="quick: --max-update updates; converged: until the validation nll stops improving "
        f"(--patience {recipes.PATIENCE}, at most {recipes.MAX_EPOCH} epochs), resumable, raw results "
        "appended to docs/results/<dataset>_converged.jsonl (scripts/experiments/recipes.py)",
    )
    s.add_argument("--max-update", type=int, default=500, help="the quick recipe's number of updates")
    s.add_argument("--model-args", default=None, help=f"model size arguments (default: {' '.join(expkit.SMALL_MODEL)})")
    s.add_argument("--max-tokens", type=int, default=None, help="default 2048")
    s.add_argument("--lr", type=float, default=None, help="default 0.002")
    s.add_argument("--warmup", type=int, default=None, help="inverse_sqrt warmup updates (default 100)")
    s.add_argument(
        "--validate-interval-updates",
        type=int,
        default=0,
        help="also validate every N updates (finer learning curves); default: per epoch",
    )
    s.add_argument("--label", default=None, help="name for the extra fairseq-train arguments after --")
    s.add_argument("--beam", type=int, default=5)
    s.add_argument(
        "--generate-args",
        default="",
        help="more fairseq-generate arguments, one string (e.g. '--lenpen 1.2'); recorded in each test's command",
    )
    s.add_argument(
        "--device",
        choices=expkit.DEVICES,
        default="cpu",
        help="train and translate on the CPU (default) or the GPU; a GPU run's id ends in .cuda",
    )
    s.add_argument("--work", type=Path, default=WORK)
    s.add_argument(
        "--results",
        type=Path,
        default=None,
        help="default: WORK/results.jsonl (quick), docs/results/<dataset>_converged.jsonl (converged)",
    )
    s.add_argument(
        "--hyp-dir",
        type=Path,
        default=None,
        help="also keep each test set's detokenised translations, gzipped, here "
        "(default for the converged recipe: docs/results/hyps)",
    )
    s.add_argument("--keep-checkpoints", action="store_true", help="keep checkpoint_last.pt too")
    s.add_argument("--force", action="store_true", help="run again even if the run id is recorded")
    s.add_argument(
        "--dry-run",
        action="store_true",
        help="print the planned runs and stop (exports no code snapshot; needs no prepared data)",
    )
    s.add_argument(
        "--code",
        default="HEAD",
        help="run the plugin as committed in this revision (exported with git archive to "
        "WORK/code/<sha>; default: HEAD), or 'worktree' for the working tree as it is",
    )

    s = sub.add_parser(
        "refresh",
        help="recompute the recorded throughput of run records from the training logs still on this machine",
        description="Recompute train_wall_s, tokens_per_s and train_tokens of each record from its run's saved "
        "train.log (and a missing repetition rate from its saved translations), where they are still on this "
        "machine, and rewrite the results files that change.",
    )
    s.add_argument(
        "--results",
        type=Path,
        nargs="+",
        default=None,
        help="default: the committed raw results report reads ("
        + ", ".join(rel(p) for p in report.REPORT_RESULTS)
        + ")",
    )

    report.add_arguments(
        sub.add_parser(
            "report",
            help="rebuild the tables, plots and commands of docs/results.md from the committed raw results "
            "(python -m scripts.experiments.report)",
            description=report.DESCRIPTION,
        )
    )
    a = p.parse_args(argv)

    if a.cmd == "prepare":
        from . import prepare_data

        return prepare_data.main(
            [a.dataset, "--work", str(a.work / "data"), *(["--source", a.source] if a.source else [])]
        )
    if a.cmd == "report":
        return report.run(a)
    if a.cmd == "refresh":
        refresh(a.results or report.REPORT_RESULTS)
        return 0
    a.extra = extra
    if extra and not a.label:
        p.error("extra fairseq-train arguments after -- need a --label naming the variant")
    if a.device == "cuda" and not a.dry_run:
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no GPU here (torch.cuda.is_available() is False)")
    if a.dry_run and not _dataset_json(a.dataset, a.work).exists():
        meta = {"name": Path(a.dataset).name}  # a dry run plans without the prepared data
        say(f"dry run: no prepared data set {a.dataset} yet (run ids use the name {meta['name']})")
    else:
        meta = load_dataset(a.dataset, a.work)
    if recipes.RECIPES[a.recipe]["study"]:
        a.results = a.results or RAW / f"{meta['name']}_{a.recipe}.jsonl"
        a.hyp_dir = a.hyp_dir or RAW / "hyps"
    a.results = a.results or a.work / "results.jsonl"
    if a.code == "worktree":
        a.code_dir, a.code_sha = None, None
    elif a.dry_run:  # nothing is exported
        a.code_dir, a.code_sha = None, a.code
        say(f"dry run: the runs would use the plugin as committed in {a.code}")
    else:
        a.code_dir, a.code_sha = expkit.code_snapshot(a.code, a.work / "code")
        say(f"plugin code: commit {a.code_sha[:12]} exported to {a.code_dir}")
    models = [m for m in a.models.split(",") if m]
    for m in models:
        if m not in ARCHS:
            p.error(f"unknown model {m!r} (choose from {', '.join(ARCHS)})")
    variants = [v for v in a.variants.split(",") if v]
    ks = [int(k) for k in a.ks.split(",") if k]
    seeds = [int(x) for x in a.seeds.split(",") if x]
    plan = plan_runs(models, variants, ks, seeds, a.label)
    say(
        f"{len(plan)} run(s) planned on {meta['name']}: "
        + ", ".join(run_id(meta["name"], m, v, s, a.max_update, a.recipe, a.device) for m, v, _, _, s in plan)
    )
    if a.dry_run:
        return 0
    for model, variant, args, k, seed in plan:
        one_run(a, meta, model, variant, args, k, seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
