"""Shared pieces of the experiment tools (clusterformer-choose-k, scripts/experiments/*.py).

Every step runs fairseq's console scripts in a subprocess, as a user would, single-threaded
(OMP_NUM_THREADS=1) unless the caller's environment says otherwise:

- :func:`run_measured` runs a command, keeps its whole output in a log file and measures its wall
  time and peak resident memory (``/usr/bin/time -v`` when present, else psutil polling);
- :func:`parse_train_log` turns a ``fairseq-train --log-format simple`` log into per-epoch train and
  valid records (the learning curve) and the run's throughput;
- :func:`generate_and_score` translates a subset with ``fairseq-generate``, keeps fairseq's
  tokenised BLEU line and computes sacrebleu on detokenised text against a raw reference.
"""

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import mt_prep  # network-free tokeniser, BPE, detokeniser, generate-output parser

REPO = Path(__file__).resolve().parents[2]  # the checkout (the package is installed editable)
# --user-dir for fairseq: the package folder itself, so runs work from any directory.
USER_DIR = str(Path(__file__).resolve().parents[1])

# The small model of the experiments: the same for both architectures (only attention differs).
# Sized for ~10 minutes of single-threaded training on a shared 2-core machine (docs/results.md).
SMALL_MODEL = [
    "--encoder-layers",
    "3",
    "--decoder-layers",
    "3",
    "--encoder-embed-dim",
    "128",
    "--decoder-embed-dim",
    "128",
    "--encoder-ffn-embed-dim",
    "512",
    "--decoder-ffn-embed-dim",
    "512",
    "--encoder-attention-heads",
    "4",
    "--decoder-attention-heads",
    "4",
    "--share-all-embeddings",
]
# Optimisation, identical for both architectures (scripts/demo.sh's, with a shorter warmup and
# smaller batches for short runs).
TRAIN_SETTINGS = [
    "--optimizer",
    "adam",
    "--adam-betas",
    "(0.9, 0.98)",
    "--clip-norm",
    "0.0",
    "--lr",
    "0.002",
    "--lr-scheduler",
    "inverse_sqrt",
    "--warmup-updates",
    "100",
    "--warmup-init-lr",
    "1e-07",
    "--dropout",
    "0.1",
    "--weight-decay",
    "0.0001",
    "--label-smoothing",
    "0.1",
    "--max-tokens",
    "2048",
    "--required-batch-size-multiple",
    "1",
]
CLUSTER_CRITERION = ["--criterion", "label_smoothed_cross_entropy_with_clustering"]
PLAIN_CRITERION = ["--criterion", "label_smoothed_cross_entropy"]


def tool(name):
    """A console script installed beside this interpreter (the venv), else on PATH."""
    path = Path(sys.executable).with_name(name)
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found beside {sys.executable} nor on PATH (run scripts/bootstrap.sh)")
    return found


def child_env(extra=None):
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env["PYTHONWARNINGS"] = "ignore"
    env.setdefault("PYTHONUNBUFFERED", "1")  # live progress lines through the pipe
    env.setdefault("TQDM_DISABLE", "1")
    env.update(extra or {})
    return env


def code_snapshot(rev="HEAD", root=None):
    """Export the committed tree REV (``git archive``) to work/experiments/code/<sha>/ once and
    return (folder, full sha). Experiments run the plugin from there (``--user-dir`` and
    PYTHONPATH), so their numbers belong to one commit even while the working tree is being
    edited."""
    root = Path(root) if root else REPO / "work" / "experiments" / "code"
    sha = subprocess.run(
        ["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    dest = root / sha[:12]
    if not (dest / ".done").exists():
        # extracted beside it and renamed into place: parallel runners never see a half-written tree
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{sha[:12]}.", dir=root))
        archive = subprocess.run(["git", "archive", "--format=tar", sha], cwd=REPO, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
        (tmp / ".done").write_text(sha + "\n")
        if (dest / ".done").exists():  # another runner finished first
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(dest, ignore_errors=True)
            try:
                tmp.rename(dest)
            except OSError:  # another runner renamed its copy into place meanwhile
                shutil.rmtree(tmp)
    return dest, sha


def code_env(code_dir):
    """Environment that makes `import fairseq_clusterformer` resolve to CODE_DIR (None: the repo)."""
    if code_dir is None:
        return {}
    return {"PYTHONPATH": os.pathsep.join([str(code_dir), *filter(None, [os.environ.get("PYTHONPATH")])])}


def split_extra_args(argv=None):
    """(our arguments, extra fairseq-train arguments): everything after a lone "--" is passed on."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def say(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


PROGRESS = re.compile(r"\| (train|valid) \| epoch|done training|Error|error:|Traceback")


def run_measured(cmd, log_path, cwd=REPO, env=None, echo=PROGRESS, poll_s=0.5):
    """Run CMD with stdout+stderr appended to LOG_PATH; lines matching ECHO (a regex, or None) are
    also printed. Returns {"rc", "wall_s", "peak_rss_mb", "rss_method"}: the wall time of the
    process and its peak resident set size (max RSS of the process itself, as the kernel counts it,
    via /usr/bin/time -v; psutil polling of the process and its children if that is missing)."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(c) for c in cmd]
    time_bin = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
    time_out = log_path.with_suffix(".time")
    full = ["/usr/bin/time", "-v", "-o", str(time_out)] + cmd if time_bin else cmd
    peak = 0
    t0 = time.monotonic()
    with open(log_path, "a", encoding="utf-8", buffering=1) as log:  # line-buffered: follow it live
        log.write("# command: " + " ".join(_quote(c) for c in cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(
            full, cwd=cwd, env=child_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        poller = None
        if not time_bin:
            poller = _RssPoller(proc.pid, poll_s)
        for line in proc.stdout:
            log.write(line)
            if echo is not None and re.search(echo, line):
                print("    " + _short(line.rstrip()), flush=True)
        rc = proc.wait()
    wall = time.monotonic() - t0
    if time_bin and time_out.exists():
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_out.read_text())
        peak = int(m.group(1)) / 1024 if m else 0
        method = "/usr/bin/time -v (ru_maxrss)"
    else:
        peak = poller.stop() if poller else 0
        method = f"psutil polling every {poll_s}s"
    return {"rc": rc, "wall_s": round(wall, 1), "peak_rss_mb": round(peak, 1), "rss_method": method}


class _RssPoller:
    def __init__(self, pid, interval):
        import threading

        import psutil

        self.peak = 0
        self._stop = threading.Event()

        def loop():
            try:
                p = psutil.Process(pid)
                while not self._stop.is_set():
                    rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                    self.peak = max(self.peak, rss)
                    time.sleep(interval)
            except psutil.Error:
                pass

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)
        return self.peak / 2**20


def _short(line):
    return re.sub(r"^[0-9-]+ [0-9:]+ \| [A-Z]+ \| [a-z_.]+ \| ", "", line)


def _quote(arg):
    return arg if re.fullmatch(r"[A-Za-z0-9_./:=,+@-]+", arg) else "'" + arg.replace("'", "'\\''") + "'"


def shell_join(cmd):
    return " ".join(_quote(str(c)) for c in cmd)


# ----------------------------------------------------------------------------------- train logs

_EPOCH_LINE = re.compile(r"\| (train|valid) \| epoch (\d+) \| (.*)$")


def _fields(rest):
    out = {}
    for part in rest.split(" | "):
        bits = part.strip().split(" ")
        if len(bits) == 2:
            try:
                out[bits[0]] = float(bits[1])
            except ValueError:
                pass
    return out


def parse_train_log(text):
    """{"train": [per-epoch train stats], "valid": [per-validation stats], "done": bool,
    "train_wall_s", "train_tokens", "tokens_per_s", "updates"} from a simple-format fairseq log.
    Validation records carry epoch and num_updates; tokens/s = target tokens trained on / fairseq's
    train_wall summed over the epochs (time inside training steps, excluding validation and
    checkpoint writing; whole seconds per epoch)."""
    train, valid = [], []
    for line in text.splitlines():
        m = _EPOCH_LINE.search(line)
        if not m:
            continue
        rec = {"epoch": int(m.group(2)), **_fields(m.group(3))}
        (train if m.group(1) == "train" else valid).append(rec)
    tokens, prev = 0.0, 0.0
    for rec in train:
        n = rec.get("num_updates", prev)
        tokens += rec.get("wpb", 0.0) * (n - prev)
        prev = n
    # fairseq's train_wall in an epoch summary counts that epoch only: sum them
    train_wall = sum(rec.get("train_wall", 0.0) for rec in train) if train else None
    return {
        "train": train,
        "valid": valid,
        "done": "done training" in text,
        "updates": int(prev),
        "train_wall_s": train_wall,
        "train_tokens": int(tokens),
        "tokens_per_s": round(tokens / train_wall, 1) if train_wall else None,
    }


def best_valid(parsed, key="nll_loss"):
    vals = [v for v in parsed["valid"] if key in v]
    if not vals:
        return None
    return min(vals, key=lambda v: v[key])


DEVICES = ("cpu", "cuda")


def device_args(device):
    """fairseq-train / fairseq-generate arguments that select DEVICE: fairseq uses the GPU unless
    told ``--cpu``."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r} (choose from {', '.join(DEVICES)})")
    return ["--cpu"] if device == "cpu" else []


def annealed_settings(total_updates, settings=TRAIN_SETTINGS):
    """SETTINGS with the inverse-square-root decay replaced by a linear decay of the learning rate
    to zero at update TOTAL_UPDATES after the same warm-up (fairseq's polynomial_decay, power 1),
    so that a run of that many updates ends at the bottom of its curve."""
    s = list(settings)
    at = s.index("--lr-scheduler")
    s[at + 1] = "polynomial_decay"
    at = s.index("--warmup-init-lr")  # polynomial_decay warms up from 0; it has no such option
    del s[at : at + 2]
    return s + ["--total-num-update", str(total_updates), "--end-learning-rate", "0", "--power", "1"]


def train_command(
    data_bin,
    save_dir,
    arch,
    max_update,
    seed,
    model_args=SMALL_MODEL,
    train_settings=TRAIN_SETTINGS,
    criterion=None,
    extra=(),
    save=True,
    log_interval=50,
    user_dir=USER_DIR,
    device="cpu",
):
    """The fairseq-train command line (a list). The best checkpoint is chosen by valid nll_loss,
    which both criteria log on the same scale (the clustering criterion's `loss` also contains the
    two clustering terms, which are negative). DEVICE: "cpu" (``--cpu``) or "cuda" (fairseq's
    default device, in float32 like the CPU runs)."""
    if criterion is None:
        criterion = CLUSTER_CRITERION if arch.startswith("clusterformer") else PLAIN_CRITERION
    cmd = [
        tool("fairseq-train"),
        data_bin,
        "--user-dir",
        user_dir,
        "--arch",
        arch,
        *model_args,
        *train_settings,
        *criterion,
        "--max-update",
        str(max_update),
        "--seed",
        str(seed),
        *device_args(device),
        "--num-workers",
        "0",
        "--log-format",
        "simple",
        "--log-interval",
        str(log_interval),
        "--no-progress-bar",
        "--best-checkpoint-metric",
        "nll_loss",
    ]
    if save:
        cmd += ["--save-dir", save_dir, "--no-epoch-checkpoints"]
    else:
        cmd += ["--save-dir", save_dir, "--no-save"]
    return cmd + [str(e) for e in extra]


def count_parameters_from_log(text):
    m = re.search(r"num\. (?:shared )?(?:model )?params: ([\d,]+)", text)
    return int(m.group(1).replace(",", "")) if m else None


# ---------------------------------------------------------------------------------- generation

_BLEU_LINE = re.compile(r"Generate (\S+) with beam=(\d+): (BLEU4? = ([\d.]+).*)$")


def generate_and_score(
    data_bin,
    checkpoint,
    subset,
    out_dir,
    detok_lang,
    raw_refs,
    beam=5,
    batch_size=128,
    remove_bpe="subword_nmt",
    extra=(),
    label=None,
    user_dir=USER_DIR,
    env=None,
    device="cpu",
):
    """Translate SUBSET on DEVICE ("cpu" or "cuda"), score it two ways, return a dict:

    - bleu_tok: fairseq-generate's own BLEU line (on the tokenised text after BPE removal, against
      fairseq's tokenised reference: the classic "tokenised BLEU");
    - sacrebleu: sacrebleu's default BLEU on Moses-detokenised hypotheses against RAW_REFS (a list of
      untokenised reference lines, one per sentence id), with its signature.
    """
    import sacrebleu

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    label = label or subset
    cmd = [
        tool("fairseq-generate"),
        data_bin,
        "--user-dir",
        user_dir,
        "--path",
        checkpoint,
        "--gen-subset",
        subset,
        "--beam",
        str(beam),
        "--batch-size",
        str(batch_size),
        "--required-batch-size-multiple",
        "1",
        *device_args(device),
        "--num-workers",
        "0",
        "--remove-bpe",
        "@@ " if remove_bpe == "subword_nmt" else remove_bpe,
        *extra,
    ]
    gen_out = out_dir / f"generate.{label}.out"
    t0 = time.monotonic()
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO, env=child_env(env), capture_output=True, text=True)
    wall = time.monotonic() - t0
    gen_out.write_text(proc.stdout)
    (out_dir / f"generate.{label}.log").write_text(proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"fairseq-generate failed ({proc.returncode}) on {subset}:\n{proc.stderr[-3000:]}")
    parsed = mt_prep.parse_generate(proc.stdout.splitlines())
    ids = sorted(parsed["H"])
    if ids != list(range(len(raw_refs))):
        raise RuntimeError(
            f"fairseq-generate translated {len(ids)} sentences of {subset}, expected ids 0..{len(raw_refs) - 1}"
        )
    hyps_tok = [parsed["H"][i] for i in ids]
    hyps = list(mt_prep.detokenize(hyps_tok, detok_lang))
    mt_prep.write_lines(out_dir / f"hyp.{label}.tok", hyps_tok)
    mt_prep.write_lines(out_dir / f"hyp.{label}.detok", hyps)
    m = None
    for line in proc.stdout.splitlines() + proc.stderr.splitlines():
        m = _BLEU_LINE.search(line) or m
    metric = sacrebleu.BLEU()
    bleu = metric.corpus_score(hyps, [list(raw_refs)])
    signature = str(metric.get_signature())
    return {
        "subset": subset,
        "label": label,
        "n": len(ids),
        "bleu_tok": float(m.group(4)) if m else None,
        "bleu_tok_line": m.group(3) if m else None,
        "sacrebleu": round(bleu.score, 2),
        "sacrebleu_verbose": str(bleu),
        "sacrebleu_signature": signature,
        "repeat_pct": repetition_rate(hyps_tok),
        "generate_wall_s": round(wall, 1),
        "command": shell_join(cmd),
    }


def repetition_rate(hyps, n=3, times=3):
    """Percentage of hypotheses in which some n-gram occurs at least TIMES times: a rough count of
    degenerate repetition loops ("a group of a group of a group of ...")."""
    from collections import Counter

    if not hyps:
        return 0.0
    loops = 0
    for h in hyps:
        w = h.split()
        grams = Counter(tuple(w[i : i + n]) for i in range(len(w) - n + 1))
        loops += bool(grams) and max(grams.values()) >= times
    return round(100.0 * loops / len(hyps), 1)


# ----------------------------------------------------------------------------------- bookkeeping


def machine_info(device="cpu"):
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1 (set by the runner)"),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if device == "cuda" and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        info["loadavg_start"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def git_commit():
    """The checkout's commit; in a copy without .git (a GPU machine's), CLUSTERFORMER_GIT_COMMIT."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        sha = ""
    return sha or os.environ.get("CLUSTERFORMER_GIT_COMMIT") or None


def append_jsonl(path, record):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def read_jsonl(path):
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
