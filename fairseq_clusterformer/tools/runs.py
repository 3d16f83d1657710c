"""Run fairseq's console scripts the way clusterformer-choose-k does, and read what they log.

Every step runs a fairseq command in a subprocess, as a user would, single-threaded
(OMP_NUM_THREADS=1) unless the caller's environment says otherwise, in the caller's current
directory unless told another one. Nothing here knows where a checkout lives: the only path it
names on its own is this package's folder, the ``--user-dir`` handed to fairseq.

- :func:`train_command` builds a ``fairseq-train`` command line for the small model and the
  optimiser settings of the experiments (:data:`SMALL_MODEL`, :data:`TRAIN_SETTINGS`);
- :func:`run_measured` runs a command, keeps its whole output in a log file, prints a progress
  line for each epoch, and measures the wall time and the peak resident memory of the process;
- :func:`parse_train_log` turns a ``fairseq-train --log-format simple`` log into per-epoch train and
  valid records (the learning curve) and the run's throughput; :func:`best_valid` picks the best.
"""

import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

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


def split_extra_args(argv=None):
    """(our arguments, extra fairseq-train arguments): everything after a lone "--" is passed on."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def say(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------- running

PROGRESS = re.compile(r"\| (train|valid) \| epoch|done training|Error|error:|Traceback")


def run_measured(cmd, log_path, cwd=None, env=None, echo=PROGRESS, poll_s=0.5):
    """Run CMD in CWD (default: the current directory) with stdout+stderr appended to LOG_PATH;
    lines matching ECHO (a regex, or None) are also printed. Returns {"rc", "wall_s",
    "peak_rss_mb", "rss_method"}: the wall time of the process and its peak resident set size (max
    RSS of the process itself, as the kernel counts it, via /usr/bin/time -v; psutil polling of the
    process and its children if that is missing)."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(c) for c in cmd]
    time_bin = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
    time_out = log_path.with_suffix(".time")
    full = ["/usr/bin/time", "-v", "-o", str(time_out)] + cmd if time_bin else cmd
    t0 = time.monotonic()
    with open(log_path, "a", encoding="utf-8", buffering=1) as log:  # line-buffered: follow it live
        log.write("# command: " + shell_join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(
            full, cwd=cwd, env=child_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        poller = None if time_bin else PeakRssPoller(proc.pid, poll_s)
        for line in proc.stdout:
            log.write(line)
            if echo is not None and re.search(echo, line):
                print("    " + _short(line.rstrip()), flush=True)
        rc = proc.wait()
    wall = time.monotonic() - t0
    if time_bin and time_out.exists():
        peak = time_v_peak_mb(time_out.read_text())
        method = "/usr/bin/time -v (ru_maxrss)"
    else:
        peak = poller.stop() if poller else 0
        method = f"psutil polling every {poll_s}s"
    return {"rc": rc, "wall_s": round(wall, 1), "peak_rss_mb": round(peak, 1), "rss_method": method}


def time_v_peak_mb(report):
    """The peak resident memory (MiB) in a ``/usr/bin/time -v`` report; 0 if it has none."""
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", report)
    return int(m.group(1)) / 1024 if m else 0


class PeakRssPoller:
    """The peak resident memory of another process and its children, polled with psutil every
    INTERVAL seconds from a thread (the fallback where /usr/bin/time is missing)."""

    def __init__(self, pid, interval):
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
        """Stop polling; the peak in MiB."""
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


# ------------------------------------------------------------------------------ train commands

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
