"""Tiny fairseq training runs in reduced precision, each checked by decoding exactly.

For each precision: train a small ClusterFormer on a toy corpus (written here), count the loss
scaler's overflow skips (after the warm-up too), translate the test set with beam 1 and score
those same hypotheses with ``--score-reference``: the per-token scores of incremental decoding
must equal those of the full forward pass, within a tolerance stated per precision.

  fp16                   fairseq-train --fp16; fairseq-generate --fp16
  memory-efficient-fp16  fairseq-train --memory-efficient-fp16; fairseq-generate --fp16
  bf16                   fairseq-hydra-train ... common.bf16=true; fairseq-generate (fp32)
  fp32                   fairseq-train; fairseq-generate (the CPU stand-in for fp16)

Why bf16 goes through fairseq-hydra-train: in these fairseq builds ``fairseq-train --bf16``
implies ``--tpu`` (fairseq/options.py) and fails without torch_xla; the hydra entry point
does not add that implication, and fairseq-generate has no bf16 switch, so a bf16-trained
model is decoded in fp32.

Run from the repository root (scripts/gpu/check.sh does):
  python -m scripts.gpu.cli_precision --device cuda --work /tmp/cli --json cli.json
"""

import argparse
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
USER_DIR = str(REPO / "fairseq_clusterformer")
TINY = {
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_embed_dim": 64,
    "decoder_embed_dim": 64,
    "encoder_ffn_embed_dim": 128,
    "decoder_ffn_embed_dim": 128,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
}
# Max |incremental - full forward| of a per-token log-probability, as fairseq-generate prints it
# (4 decimals): fp32 decoding 2e-4 (the printing), fp16 decoding 2e-2 (11 mantissa bits on
# log-probabilities of magnitude up to ~5, computed in a different order).
DECODE_TOL = {"fp32": 2e-4, "fp16": 2e-2}
PRECISIONS = ("fp16", "bf16", "memory-efficient-fp16", "fp32")
LINE = re.compile(r"^([STHP])-(\d+)\t(.*)$")
_LOG_LOCK = threading.Lock()


def run(cmd, cwd, log, timeout=600):
    """Run a command, append its output to the log file, return (returncode, output)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    Path(cwd).mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(
            [str(c) for c in cmd],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        code, out = 124, f"timed out after {timeout} s: {e}"
    with _LOG_LOCK, open(log, "a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n# exit {code} in {time.perf_counter() - t0:.1f} s\n{out}")
    return code, out


def write_corpus(dest: Path, n_train=600, n_valid=40, n_test=40, seed=1):
    """A toy language pair: source word s<i> maps to target word t<i>, in order."""
    dest.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        src, tgt = [], []
        for _ in range(n):
            ids = [rng.randrange(24) for _ in range(rng.randint(2, 12))]
            src.append(" ".join(f"s{i}" for i in ids))
            tgt.append(" ".join(f"t{i}" for i in ids))
        (dest / f"{split}.src").write_text("\n".join(src) + "\n")
        (dest / f"{split}.tgt").write_text("\n".join(tgt) + "\n")
    return dest


def preprocess(raw, dest, log, splits=("train", "valid", "test"), dict_dir=None):
    cmd = [sys.executable, "-m", "fairseq_cli.preprocess", "--source-lang", "src", "--target-lang", "tgt"]
    cmd += ["--destdir", dest, "--workers", "1"]
    for split in splits:
        cmd += [f"--{split}pref", Path(raw) / split]
    if dict_dir is None:
        cmd += ["--joined-dictionary"]
    else:
        cmd += ["--srcdict", Path(dict_dir) / "dict.src.txt", "--tgtdict", Path(dict_dir) / "dict.tgt.txt"]
    code, out = run(cmd, REPO, log)
    if code:
        raise RuntimeError(f"fairseq-preprocess failed: {out[-2000:]}")
    return Path(dest)


def train_command(precision, data_bin, save_dir, args):
    """(command, cwd, how) of a training run in this precision."""
    device = ["--cpu"] if args.device == "cpu" else []
    if precision == "bf16":
        overrides = [
            f"task.data={data_bin}",
            "task.source_lang=src",
            "task.target_lang=tgt",
            f"checkpoint.save_dir={save_dir}",
            "checkpoint.no_epoch_checkpoints=true",
            f"optimization.max_update={args.max_update}",
            "optimization.max_epoch=0",
            "optimization.lr=[0.005]",
            f"lr_scheduler.warmup_updates={args.warmup}",
            "dataset.max_tokens=1000",
            "dataset.num_workers=0",
            "dataset.disable_validation=true",
            "model.causal_window=8",
            "model.dropout=0.0",
            "common.bf16=true",
            "common.log_interval=1",
            "common.seed=1",
            f"common.user_dir={USER_DIR}",
            *[f"+model.{k}={v}" for k, v in TINY.items()],
            *(["common.cpu=true"] if args.device == "cpu" else []),
        ]
        config = ["--config-dir", REPO / "examples" / "translation" / "config", "--config-name", "clusterformer_iwslt"]
        return (
            [sys.executable, "-m", "fairseq_cli.hydra_train", *config, *overrides],
            save_dir,
            "fairseq-hydra-train common.bf16=true",
        )
    flag = {"fp16": ["--fp16"], "memory-efficient-fp16": ["--memory-efficient-fp16"], "fp32": []}[precision]
    cmd = [sys.executable, "-m", "fairseq_cli.train", data_bin, "--user-dir", USER_DIR, "--arch", "clusterformer_iwslt"]
    for k, v in TINY.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    cmd += ["--share-all-embeddings", "--causal-window", "8"]
    cmd += ["--criterion", "label_smoothed_cross_entropy_with_clustering", "--label-smoothing", "0.1"]
    cmd += ["--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", "0.005"]
    cmd += ["--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(args.warmup)]
    cmd += ["--max-tokens", "1000", "--max-update", str(args.max_update), "--dropout", "0.0", "--seed", "1"]
    cmd += ["--num-workers", "0", "--log-format", "simple", "--log-interval", "1", "--no-progress-bar"]
    cmd += ["--required-batch-size-multiple", "1", "--disable-validation", "--no-epoch-checkpoints"]
    cmd += ["--save-dir", save_dir, *device, *flag]
    return cmd, REPO, f"fairseq-train {' '.join(flag)}".strip()


def overflow_skips(log, warmup):
    """(all, after warm-up): the loss scaler's 'gradient overflow detected' skips, each placed at
    the last update number logged before it (log interval 1)."""
    last, total, late = 0, 0, 0
    for line in log.splitlines():
        m = re.search(r"num_updates[ =](\d+)", line)
        if m:
            last = int(m.group(1))
        if "gradient overflow detected" in line or "overflow detected, setting scale" in line:
            total += 1
            late += last >= warmup
    return total, late


def losses(log):
    return [float(v) for v in re.findall(r"(?<![\w])loss[ =](-?\d+(?:\.\d+)?)", log)]


def parse_generate(out):
    sents = {}
    for line in out.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        kind, idx, rest = m.group(1), int(m.group(2)), m.group(3)
        entry = sents.setdefault(idx, {})
        if kind == "H":
            entry["H"] = rest.split("\t", 1)[1]
        elif kind == "P":
            entry["P"] = [float(x) for x in rest.split()]
        else:
            entry[kind] = rest
    return sents


def check_decoding(precision, data_bin, checkpoint, work, args, log):
    """Beam-1 hypotheses, then the same tokens under --score-reference: max |difference|."""
    half = ["--fp16"] if precision in ("fp16", "memory-efficient-fp16") and args.device == "cuda" else []
    common = [sys.executable, "-m", "fairseq_cli.generate"]
    opts = ["--user-dir", USER_DIR, "--path", checkpoint, "--gen-subset", "test", "--beam", "1"]
    opts += ["--batch-size", "16", "--required-batch-size-multiple", "1", *half]
    opts += ["--cpu"] if args.device == "cpu" else []
    code, out = run([*common, data_bin, *opts], REPO, log)
    if code:
        return {"decode": "generate failed"}
    gen = parse_generate(out)
    raw = work / "scored-raw"
    raw.mkdir(parents=True, exist_ok=True)
    order = sorted(gen)
    (raw / "test.src").write_text("".join(gen[i]["S"] + "\n" for i in order))
    (raw / "test.tgt").write_text("".join(gen[i]["H"] + "\n" for i in order))
    scored_bin = preprocess(raw, work / "scored-bin", log, splits=("test",), dict_dir=data_bin)
    code, out = run([*common, scored_bin, *opts, "--score-reference"], REPO, log)
    if code:
        return {"decode": "score-reference failed"}
    scored = parse_generate(out)
    if sorted(scored) != order or any(len(scored[i]["P"]) != len(gen[i]["P"]) for i in order):
        return {"decode": "score-reference returned other sentences or lengths"}
    diff = max(abs(a - b) for i in order for a, b in zip(gen[i]["P"], scored[i]["P"]))
    tol = DECODE_TOL["fp16" if half else "fp32"]
    return {
        "decode": "exact" if diff <= tol else "differs",
        "sentences": len(order),
        "max_abs_diff": diff,
        "tolerance": tol,
        "decode_dtype": "fp16" if half else "fp32",
    }


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument(
        "--precisions", default="fp16,bf16,memory-efficient-fp16", help=f"comma-separated, from {', '.join(PRECISIONS)}"
    )
    p.add_argument("--max-update", type=int, default=60)
    p.add_argument(
        "--warmup", type=int, default=20, help="warm-up updates (overflow skips after them are counted apart)"
    )
    p.add_argument("--jobs", type=int, default=1, help="precisions run side by side (each its own processes)")
    p.add_argument("--work", default="/tmp/clusterformer-cli-precision")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--log", default=None, help="append every command's output here (default WORK/commands.log)")
    args = p.parse_args(argv)
    precisions = [v.strip() for v in args.precisions.split(",") if v.strip()]
    bad = [v for v in precisions if v not in PRECISIONS]
    if bad:
        p.error(f"unknown precision {bad}; choose from {', '.join(PRECISIONS)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = Path(args.log or work / "commands.log")
    data_bin = preprocess(write_corpus(work / "raw"), work / "bin", log)

    def one(precision):
        t0 = time.perf_counter()
        save = work / f"ckpt-{precision}"
        cmd, cwd, how = train_command(precision, data_bin, save, args)
        code, out = run(cmd, cwd, log)
        res = {"precision": precision, "train": how, "device": args.device}
        trained = code == 0 and "done training" in out
        ls = losses(out)
        total, late = overflow_skips(out, args.warmup)
        res.update(
            trained=trained,
            exit=code,
            overflow_skips=total,
            overflow_skips_after_warmup=late,
            first_loss=ls[0] if ls else None,
            last_loss=ls[-1] if ls else None,
        )
        if not trained:
            tail = [line for line in out.strip().splitlines() if line.strip()][-3:]
            res["error"] = " | ".join(tail)[-500:]
        else:
            res.update(
                check_decoding(precision, data_bin, save / "checkpoint_last.pt", work / f"dec-{precision}", args, log)
            )
        res["seconds"] = round(time.perf_counter() - t0, 1)
        ok = trained and res.get("decode") == "exact"
        print(
            f"{'ok  ' if ok else 'FAIL'} {precision:22s} {how:40s} overflow skips {total} ({late} after warm-up), "
            f"loss {res['first_loss']} -> {res['last_loss']}, decode {res.get('decode', '-')} "
            f"(max |diff| {res.get('max_abs_diff', float('nan')):.2g} <= {res.get('tolerance', float('nan')):.0e}?), "
            f"{res['seconds']} s" + (f"  ERROR: {res['error']}" if "error" in res else ""),
            flush=True,
        )
        return res

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(one, precisions))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0 if all(r["trained"] and r.get("decode") == "exact" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
