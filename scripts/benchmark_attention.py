"""Time and memory of one attention layer: ClusterAttention against full attention.

Run from the repository root as ``python -m scripts.benchmark_attention``.

Implementations (``--impl``), d=512 / 8 heads by default, q/k/v/out projections included:

  cluster         ClusterAttention, encoder variant: k clusters, blocks of w = ceil(N/k) sorted
                  words attending to their own and the previous block; the clustering and
                  sorting losses are part of the backward pass.
  cluster-causal  ClusterAttention, causal (decoder) variant, window = ceil(N/k) unless --window,
                  with --local-heads local heads (default half, as the fairseq decoder's default).
  full            fairseq.modules.MultiheadAttention(d, heads, self_attention=True), called as
                  fairseq-train calls it: time-first T x B x C, key_padding_mask,
                  need_weights=False. This goes to torch's F.multi_head_attention_forward and on
                  to scaled_dot_product_attention; the script prints the kernels it really ran.
  sdpa            torch F.scaled_dot_product_attention called directly, with the same four
                  nn.Linear projections.
  naive           softmax(Q K^T / sqrt(hd)) V written with matmuls: materialises the N x N scores
                  (what a 2022 Transformer baseline did).
  flash           torch's flash-attention kernel alone: F.scaled_dot_product_attention with no
                  mask (a flash kernel takes none; the inputs have no padding anyway) and only
                  the flash backend enabled (torch.nn.attention.sdpa_kernel), same projections.
                  On CUDA it needs --dtype bfloat16 or float16. Not in the default --impl list.
  proj            not attention: the same four nn.Linear projections with no attention between
                  them: out_proj(v), with q and k summed into the loss at weight 0 so that all
                  four projections run forward and backward. The floor every method above pays; not in the
                  default --impl list.
  lsh-1, lsh-4, lsh-8
                  the Reformer baseline as the fairseq encoder runs it (--self-attention-encoder lsh,
                  fairseq_clusterformer/baselines/lsh.py: reformer-pytorch's LSHSelfAttention with 1, 4
                  or 8 hash rounds), 2 ceil(k/2) buckets of ceil(N / buckets) words from the same k.
  routing         the Routing Transformer baseline as the fairseq encoder runs it
                  (--self-attention-encoder routing, baselines/routing.py: routing-transformer's
                  SelfAttention), k clusters, windows of ceil(N/k), --local-heads local heads; its
                  commitment loss is part of the backward pass. The baselines need the baselines
                  extra and are not in the default --impl list (docs/baselines.md).
  sparse          the Sparse Transformer baseline (--self-attention-encoder sparse,
                  fairseq_clusterformer/baselines/sparse.py): the fixed pattern, blocks of
                  l = ceil(N/k) words (k = sqrt: l about sqrt(N), the paper's choice), each attending
                  to its block and to every block's last word. Torch only.
  sparse-causal   the same, causal (--self-attention-decoder sparse): blocks of --window words
                  (default ceil(N/k)), each word attending to its block up to itself and to the last
                  word of every earlier block.
  cluster-compiled, cluster-causal-compiled
                  cluster and cluster-causal with compile=True (--cluster-compile): the same fast
                  path through torch.compile; its first (compiling) step is run before any
                  measurement. Not in the default --impl list.
  cluster-graphs, cluster-causal-graphs
                  the same with compile="reduce-overhead" (--cluster-compile-mode reduce-overhead):
                  on CUDA each compiled step also replays as a CUDA graph (its compiling, warm-up
                  and recording steps are run before any measurement). Not in the default list.
  cluster-flex, cluster-causal-flex, cluster-flex-compiled, cluster-causal-flex-compiled
                  cluster and cluster-causal with impl="flex" (--cluster-impl flex): every head's
                  block attention as one FlexAttention call (fairseq_clusterformer/modules/flex.py);
                  -compiled: with compile=True too. CUDA only for training steps (the CPU runs
                  FlexAttention forward only: --mode forward). Not in the default list.
  linformer-32, linformer-256
                  the Linformer baseline (--self-attention-encoder linformer, baselines/linformer.py):
                  keys and values projected along the sequence to 32 (the model's default
                  --linformer-k) or 256 rows, with E, F of N x k. Not in the default --impl list.

Every implementation but flash gets a key_padding_mask (all False: every token is real).

Measurements, for each mode and length N:
  memory  each configuration in a fresh subprocess: one step, and the peak resident set size
          during it (VmHWM, reset through /proc/self/clear_refs) minus the resident size just
          before it (after imports, model and input creation): the extra memory that step
          needed, the gradients of the parameters and of the input included. On CUDA:
          torch.cuda.max_memory_allocated minus the memory allocated before the step. That
          step's time is also the check against --time-cap.
          With --in-process (the default on CUDA, where the allocator's counters need no fresh
          process) every configuration runs in one worker process per mode, one N at a time.
  time    one subprocess per (mode, N) holding every configuration still running (with
          --group-lengths: per mode, all lengths together): --warmup rounds, then up to --repeats
          rounds, each round one step of every configuration in turn (side by side, so that load
          from other processes hits all of them alike); the median per configuration. Fewer
          rounds where a round is slow (--budget). On CUDA a step is timed with CUDA events
          recorded around it (elapsed_time after a synchronize).
A configuration whose step runs out of memory (more than --mem-cap-gb of further address space;
a limit set in the worker, so that nothing here wakes the system's OOM killer) or takes longer than --time-cap
is reported once (the memory step's time, one cold step) and not run at larger N.

--dtype runs the layers and inputs in float32 (default), bfloat16 or float16; torch's flash
kernel on CUDA needs one of the half types.

Example:
  python -m scripts.benchmark_attention --lengths 1024,2048 --impl cluster,full,sdpa,naive \\
      --mode train --k sqrt,3 --csv /tmp/attn.csv --plot
On a GPU (scripts/gpu/check.sh runs this):
  python -m scripts.benchmark_attention --device cuda --dtype bfloat16 --k sqrt \\
      --lengths 512,1024,2048,4096,8192,16384,32768,65536 --csv attention_cuda.csv --plot
"""

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from scripts.harness_common import CpuPeak, proc_status

REPO = Path(__file__).resolve().parents[1]
IMPLS = (
    "cluster",
    "cluster-causal",
    "full",
    "sdpa",
    "naive",
    "proj",
    "flash",
    "lsh-1",
    "lsh-4",
    "lsh-8",
    "routing",
    "cluster-blocks",
    "cluster-causal-blocks",
    "sparse",
    "sparse-causal",
    "linformer-32",
    "linformer-256",
    "cluster-compiled",
    "cluster-causal-compiled",
    "cluster-graphs",
    "cluster-causal-graphs",
    "cluster-flex",
    "cluster-causal-flex",
    "cluster-flex-compiled",
    "cluster-causal-flex-compiled",
)
DEFAULT_IMPLS = IMPLS[:5]
# cluster-blocks / cluster-causal-blocks: the block layout at every length (dense_max_len=0),
# against which the short-sequence dense path (ClusterAttention's dense_max_len) is measured
CLUSTER_IMPLS = (
    "cluster",
    "cluster-causal",
    "cluster-blocks",
    "cluster-causal-blocks",
    "cluster-compiled",
    "cluster-causal-compiled",
    "cluster-graphs",
    "cluster-causal-graphs",
    "cluster-flex",
    "cluster-causal-flex",
    "cluster-flex-compiled",
    "cluster-causal-flex-compiled",
)
BASELINE_IMPLS = ("lsh-1", "lsh-4", "lsh-8", "routing")
SPARSE_IMPLS = ("sparse", "sparse-causal")  # Sparse Transformer: blocks of ceil(N/k) (causal: --window)
K_IMPLS = CLUSTER_IMPLS + BASELINE_IMPLS + SPARSE_IMPLS  # the implementations that take --k
CSV_COLUMNS = ["impl", "n", "k", "batch", "mode", "device", "time_ms", "peak_mb"]
MiB = 1024 * 1024


# ----------------------------------------------------------------------------------------------
# worker side (runs in its own process)
def _limit_memory(cap_gb):
    """From now on, allocating more than cap_gb GiB of further address space raises MemoryError /
    RuntimeError in this process (instead of waking the system's OOM killer). 0: no limit."""
    if cap_gb <= 0:
        return
    import resource

    limit = proc_status("VmSize") + int(cap_gb * 1024**3)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))


def local_head_count(spec, heads):
    """--local-heads: 'half' (heads // 2, the fairseq decoder's default) or an integer in [0, heads]."""
    try:
        count = heads // 2 if spec == "half" else int(spec)
    except ValueError:
        count = -1
    if not 0 <= count <= heads:
        raise ValueError(f"--local-heads must be 'half' or an integer in [0, {heads}], got {spec!r}")
    return count


def build(impl, d, heads, k, n, window, device, local_heads="half", dense_max_len=None):
    """Returns (step(x, kpm) -> (out, extra loss or None), time_first, module)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    if impl in CLUSTER_IMPLS:
        from fairseq_clusterformer.modules.cluster_attention import ClusterAttention

        kwargs = {"dense_max_len": 0} if impl.endswith("-blocks") else {}
        if impl.endswith("-compiled"):
            kwargs["compile"] = True
        if impl.endswith("-graphs"):
            kwargs["compile"] = "reduce-overhead"
        if "-flex" in impl:
            kwargs["impl"] = "flex"
        if dense_max_len is not None and not impl.endswith("-blocks"):
            kwargs["dense_max_len"] = dense_max_len
        if impl.startswith("cluster-causal"):
            kwargs.update(
                causal=True,
                window=window or -(-n // k),
                local_heads=local_head_count(local_heads, heads),
            )
        m = ClusterAttention(d, heads, k, max_clusters=max(256, k), **kwargs).to(device)

        def step(x, kpm):
            # The benchmark's batches have no padding: the fairseq model then passes no mask.
            out, info = m(x, None)
            return out, info.clustering_loss + info.sorting_loss

        return step, False, m
    if impl == "full":
        from fairseq.modules import MultiheadAttention

        m = MultiheadAttention(d, heads, self_attention=True).to(device)

        def step(x, kpm):  # x: T x B x C, as fairseq's encoder layer calls it
            out, _ = m(query=x, key=x, value=x, key_padding_mask=kpm, need_weights=False)
            return out, None

        return step, True, m
    if impl in BASELINE_IMPLS:
        if impl == "routing":
            from fairseq_clusterformer.baselines.routing import RoutingEncoderAttention

            m = RoutingEncoderAttention(d, heads, k, local_head_count(local_heads, heads)).to(device)
        else:
            from fairseq_clusterformer.baselines.lsh import LSHEncoderAttention
            from fairseq_clusterformer.models.clusterformer import lsh_buckets

            m = LSHEncoderAttention(d, heads, lsh_buckets(k), int(impl.split("-")[1])).to(device)

        def step(x, kpm):
            return m(x, kpm)  # (out, the routing commitment loss or None)

        return step, False, m
    if impl in SPARSE_IMPLS or impl.startswith("linformer-"):
        if impl == "sparse":
            from fairseq_clusterformer.baselines.sparse import SparseAttention

            m = SparseAttention(d, heads, num_blocks=k).to(device)
        elif impl == "sparse-causal":
            from fairseq_clusterformer.baselines.sparse import SparseAttention

            m = SparseAttention(d, heads, causal=True, block_len=window or -(-n // k)).to(device)
        else:
            from fairseq_clusterformer.baselines.linformer import LinformerAttention

            m = LinformerAttention(d, heads, proj_len=int(impl.split("-")[1]), max_positions=n).to(device)

        def step(x, kpm):
            return m(x, kpm), None

        return step, False, m

    class Projected(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    m = Projected().to(device)
    hd = d // heads

    def qkv(x):
        B, N, _ = x.shape
        return [p(x).view(B, N, heads, hd).transpose(1, 2) for p in (m.q_proj, m.k_proj, m.v_proj)]

    if impl == "sdpa":

        def step(x, kpm):
            q, k_, v = qkv(x)
            out = F.scaled_dot_product_attention(q, k_, v, attn_mask=~kpm[:, None, None, :])
            return m.out_proj(out.transpose(1, 2).reshape(x.shape)), None

        return step, False, m
    if impl == "flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def step(x, kpm):  # kpm is all False here: no mask, so that the flash kernel can run
            q, k_, v = qkv(x)
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                out = F.scaled_dot_product_attention(q, k_, v)
            return m.out_proj(out.transpose(1, 2).reshape(x.shape)), None

        return step, False, m
    if impl == "naive":

        def step(x, kpm):
            q, k_, v = qkv(x)
            scores = torch.matmul(q, k_.transpose(-1, -2)) / math.sqrt(hd)  # B x H x N x N
            scores = scores.masked_fill(kpm[:, None, None, :], float("-inf"))
            out = torch.matmul(torch.softmax(scores, dim=-1), v)
            return m.out_proj(out.transpose(1, 2).reshape(x.shape)), None

        return step, False, m
    if impl == "proj":

        def step(x, kpm):
            q, k_, v = (p(x) for p in (m.q_proj, m.k_proj, m.v_proj))
            return m.out_proj(v), 0.0 * (q.sum() + k_.sum())

        return step, False, m
    raise ValueError(f"unknown impl {impl!r}; choose from {', '.join(IMPLS)}")


class Runner:
    """One configuration, ready to run steps."""

    def __init__(self, cfg, impl, k, n=None, batch=None):
        import torch

        self.torch = torch
        self.device = torch.device(cfg["device"])
        self.train = cfg["mode"] == "train"
        torch.manual_seed(0)
        B, N, d = batch or cfg["batch"], n or cfg["n"], cfg["d"]
        dtype = getattr(torch, cfg.get("dtype", "float32"))
        self.step_fn, time_first, self.module = build(
            impl,
            d,
            cfg["heads"],
            k,
            N,
            cfg["window"],
            self.device,
            cfg.get("local_heads", "half"),
            cfg.get("dense_max_len"),
        )
        self.module.to(dtype).train(self.train)
        self.x = torch.randn(*((N, B, d) if time_first else (B, N, d)), device=self.device, dtype=dtype)
        self.x.requires_grad_(self.train)
        self.kpm = torch.zeros(B, N, dtype=torch.bool, device=self.device)
        if impl.endswith(("-compiled", "-graphs")):
            # torch.compile compiles on the first call (dynamic shapes: once per process and
            # padding case, reused at later N), and with CUDA graphs the next calls warm up and
            # record the graph: those steps are neither timed nor memory-measured.
            for _ in range(3 if impl.endswith("-graphs") else 1):
                self.step()

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def step(self):
        """One step; returns its time in seconds (CUDA events on CUDA, wall clock on the CPU)."""
        torch = self.torch
        self.sync()
        cuda = self.device.type == "cuda"
        if cuda:
            start, end = (
                torch.cuda.Event(enable_timing=True),
                torch.cuda.Event(enable_timing=True),
            )
            start.record()
        t0 = time.perf_counter()
        if self.train:
            out, extra = self.step_fn(self.x, self.kpm)
            (out.float().sum() if extra is None else out.float().sum() + extra).backward()
        else:
            with torch.no_grad():
                out, _ = self.step_fn(self.x, self.kpm)
        if cuda:
            end.record()
        self.sync()
        dt = start.elapsed_time(end) / 1000 if cuda else time.perf_counter() - t0
        del out
        self.module.zero_grad(set_to_none=True)
        self.x.grad = None
        return dt

    def kernels(self):
        """Attention kernels one step runs (to show what `full` really calls)."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            self.step()
        names = {e.key for e in prof.key_averages()}
        return sorted(
            n for n in names if "scaled_dot_product" in n or ("attention" in n.lower() and n.startswith("aten::"))
        )


def _oom_result(e):
    msg = str(e)
    oom = isinstance(e, MemoryError) or "memory" in msg.lower() or "alloc" in msg.lower()
    return {
        "status": "oom" if oom else "error",
        "error": (msg.splitlines() or [type(e).__name__])[0][:300],
    }


def memory_worker(cfg):
    """One step of one configuration in this fresh process: extra peak memory and time."""
    import torch

    torch.set_num_threads(cfg["threads"])
    result = {"threads": torch.get_num_threads()}
    try:
        run = Runner(cfg, cfg["impl"], cfg["k"])
        if run.device.type == "cpu":
            _limit_memory(cfg["mem_cap_gb"])
        run.sync()
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
            base = torch.cuda.memory_allocated(run.device)
            result["step_s"] = run.step()
            peak = torch.cuda.max_memory_allocated(run.device) - base
            result["mem_method"] = "cuda.max_memory_allocated"
        else:
            meter = CpuPeak()
            meter.start()
            result["step_s"] = run.step()
            peak = meter.stop()
            result["mem_method"] = meter.method
        result.update(status="ok", peak_mb=peak / MiB)
        if cfg.get("kernels"):
            result["kernels"] = run.kernels()
    except (
        MemoryError,
        RuntimeError,
    ) as e:  # RLIMIT_AS and CUDA OOM surface as one of these
        result.update(_oom_result(e))
    print("RESULT " + json.dumps(result), flush=True)


def time_worker(cfg):
    """Several configurations (one mode), timed side by side: round-robin steps."""
    import torch

    torch.set_num_threads(cfg["threads"])
    runs, out = {}, {}
    for name, impl, k, n, batch in cfg["configs"]:
        try:
            runs[name] = Runner(cfg, impl, k, n, batch)
        except (MemoryError, RuntimeError) as e:
            out[name] = _oom_result(e)
    if cfg["device"] == "cpu":
        _limit_memory(cfg["mem_cap_gb"])
    times = {name: [] for name in runs}
    t_start = time.perf_counter()
    rounds = 0
    for r in range(cfg["warmup"] + cfg["repeats"]):
        if r > cfg["warmup"] and time.perf_counter() - t_start > cfg["budget"]:
            break  # at least one timed round; more while within the budget
        for name, run in list(runs.items()):
            try:
                dt = run.step()
            except (MemoryError, RuntimeError) as e:
                out[name] = _oom_result(e)
                del runs[name]
                continue
            if r >= cfg["warmup"]:
                times[name].append(dt)
        if r == cfg["warmup"] - 1:
            t_start = time.perf_counter()  # the budget counts timed rounds only
        rounds += r >= cfg["warmup"]
    for name in runs:
        out[name] = {
            "status": "ok",
            "time_ms": statistics.median(times[name]) * 1000,
            "times_ms": [round(t * 1000, 1) for t in times[name]],
        }
    print(
        "RESULT " + json.dumps({"threads": torch.get_num_threads(), "rounds": rounds, "results": out}),
        flush=True,
    )


def _emit(kind, payload):
    print(f"{kind} " + json.dumps(payload), flush=True)


def inprocess_worker(cfg):
    """--in-process: every configuration of one mode in this process, one N at a time. Per N:
    each configuration's first step measures its extra peak memory (CUDA: max_memory_allocated
    above the memory allocated before it; CPU: CpuPeak, only indicative here, since the other
    configurations' buffers share the heap); then the survivors are timed side by side as in
    time_worker. Prints a ROW line per result as it goes, so a crash keeps what was measured."""
    import torch

    torch.set_num_threads(cfg["threads"])
    stopped, kernels_shown = set(), not cfg.get("kernels")
    for n in cfg["lengths"]:
        batch = cfg["batches"][str(n)]
        base = dict(cfg, n=n, batch=batch)
        runs, mems = {}, {}
        for impl, ks in cfg["series"]:
            k = k_value(ks, n) if ks else None
            name = impl + (f" k={k}" if k else "")
            if (impl, ks) in stopped or name in runs:
                continue
            row = {"impl": impl, "n": n, "k": k, "batch": batch, "label": name}
            try:
                run = Runner(base, impl, k)
                run.sync()
                if run.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(run.device)
                    before = torch.cuda.memory_allocated(run.device)
                    step_s = run.step()
                    peak, method = (
                        torch.cuda.max_memory_allocated(run.device) - before,
                        "cuda.max_memory_allocated",
                    )
                else:
                    meter = CpuPeak()
                    meter.start()
                    step_s = run.step()
                    peak, method = meter.stop(), meter.method + " (in-process)"
            except (MemoryError, RuntimeError) as e:
                stopped.add((impl, ks))
                _emit("ROW", dict(row, **_oom_result(e)))
                run = None
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            if step_s > cfg["time_cap"]:
                stopped.add((impl, ks))
                _emit(
                    "ROW",
                    dict(
                        row,
                        status="cap",
                        time_ms=step_s * 1000,
                        peak_mb=peak / MiB,
                        mem_method=method,
                    ),
                )
                del run
                continue
            if impl == "full" and not kernels_shown:
                kernels_shown = True
                _emit(
                    "LOG",
                    {"text": f"# full ({cfg['mode']}) runs: {', '.join(run.kernels())}"},
                )
            runs[name] = (run, row, (impl, ks))
            mems[name] = (peak / MiB, method)
        times = {name: [] for name in runs}
        t_start = time.perf_counter()
        for r in range(cfg["warmup"] + cfg["repeats"]):
            if r > cfg["warmup"] and time.perf_counter() - t_start > cfg["budget"]:
                break
            for name, (run, row, key) in list(runs.items()):
                try:
                    dt = run.step()
                except (MemoryError, RuntimeError) as e:
                    stopped.add(key)
                    _emit("ROW", dict(row, **_oom_result(e)))
                    del runs[name]
                    continue
                if r >= cfg["warmup"]:
                    times[name].append(dt)
            if r == cfg["warmup"] - 1:
                t_start = time.perf_counter()
        for name, (_run, row, _) in runs.items():
            ts = times[name]
            _emit(
                "ROW",
                dict(
                    row,
                    status="ok",
                    time_ms=statistics.median(ts) * 1000,
                    times_ms=[round(t * 1000, 2) for t in ts],
                    peak_mb=mems[name][0],
                    mem_method=mems[name][1],
                    threads=torch.get_num_threads(),
                ),
            )
        del runs
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# driver
def auto_batch(n, args):
    """The paper's batch 20 where every method fits. On the CPU, above N = 2048 the largest batch
    at which naive's N x N score tensors still fit as at N = 2048 (B * N^2 <= 20 * 2048^2: 5 at
    4096, 1 at 8192; at 16384 naive does not fit even at batch 1 and the others run at batch 1).
    On CUDA the same rule from N = 8192 on (5 at 16384, 1 at 32768 and 65536)."""
    if args.batch:
        return args.batch
    ref = 8192 if args.device == "cuda" else 2048
    return max(1, min(20, (20 * ref * ref) // (n * n)))


def k_value(spec, n):
    return math.ceil(math.sqrt(n)) if spec == "sqrt" else int(spec)


def _run_worker(kind, cfg, args, timeout):
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    env["PYTHONWARNINGS"] = "ignore"
    cfg = dict(cfg, mem_cap_gb=args.mem_cap_gb)
    cmd = [
        sys.executable,
        "-m",
        "scripts.benchmark_attention",
        f"--_{kind}",
        json.dumps(cfg),
    ]
    try:
        proc = subprocess.run(
            cmd,
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"worker exceeded {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    status = "oom" if proc.returncode in (-9, 137) or any("memory" in t.lower() for t in tail) else "error"
    return {
        "status": status,
        "error": f"worker exit {proc.returncode}: {' | '.join(tail)[:400]}",
    }


def fit_exponent(ns, values):
    """Least-squares slope of log(value) on log(n)."""
    if len(ns) < 2:
        return float("nan")
    xs = [math.log(n) for n in ns]
    ys = [math.log(v) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((a - mx) ** 2 for a in xs)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sxx if sxx else float("nan")


def read_rows(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["n"], r["batch"] = int(r["n"]), int(r["batch"])
        r["time_ms"], r["peak_mb"] = float(r["time_ms"]), float(r["peak_mb"])
    return rows


def series_label(r):
    """'cluster k=sqrt' / 'cluster k=3' / 'full'."""
    if r["impl"] not in CLUSTER_IMPLS + SPARSE_IMPLS:
        return r["impl"]
    k = int(r["k"])
    return f"{r['impl']} k={'sqrt' if k == math.ceil(math.sqrt(r['n'])) and k != 3 else k}"


def exponents(rows, lo, hi, metric="time_ms"):
    """{(mode, device, label): slope of the per-sequence metric against N over lo <= N <= hi}."""
    groups = {}
    for r in rows:
        if lo <= r["n"] <= hi and r[metric] > 0:
            groups.setdefault((r["mode"], r["device"], series_label(r)), []).append(r)
    return {
        key: fit_exponent([r["n"] for r in g], [r[metric] / r["batch"] for r in g])
        for key, g in groups.items()
        if len({r["n"] for r in g}) >= 2
    }


def plot(rows, out_dir, fit_lo, fit_hi, stem="attention"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    styles = {
        "cluster": "-",
        "cluster-causal": "--",
        "full": "-",
        "sdpa": ":",
        "naive": "-.",
        "proj": ":",
        "flash": "--",
    }
    for mode, device in sorted({(r["mode"], r["device"]) for r in rows}):
        sub = [r for r in rows if r["mode"] == mode and r["device"] == device]
        batches = sorted({(r["n"], r["batch"]) for r in sub})
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, metric, title in (
            (axes[0], "time_ms", "time per sequence (ms)"),
            (axes[1], "peak_mb", "extra peak memory per sequence (MiB)"),
        ):
            slopes = exponents(sub, fit_lo, fit_hi, metric)
            for label in sorted({series_label(r) for r in sub}):
                pts = sorted(
                    (r["n"], r[metric] / r["batch"]) for r in sub if series_label(r) == label and r[metric] > 0
                )
                if not pts:
                    continue
                s = slopes.get((mode, device, label), float("nan"))
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    styles.get(label.split()[0], "-"),
                    marker="o",
                    ms=3,
                    label=label if math.isnan(s) else f"{label} (slope {s:.2f})",
                )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length N")
            ax.set_title(f"{title}: {mode}, {device}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        per_n = ", ".join(f"{n}:{b}" for n, b in sorted(dict(batches).items()))
        fig.suptitle(
            f"slopes fitted on {fit_lo} <= N <= {fit_hi}; values divided by the batch (N:batch {per_n})",
            fontsize=8,
        )
        fig.tight_layout()
        path = out_dir / f"{stem}_{mode}_{device}.png"
        fig.savefig(path, dpi=72)
        plt.close(fig)
        written.append(path)
    return written


def _write_row(writer, f, impl, n, k, batch, mode, device, time_ms, peak_mb):
    """One CSV row (CSV_COLUMNS), flushed so that a crash later keeps it."""
    writer.writerow(
        [
            impl,
            n,
            "" if k is None else k,
            batch,
            mode,
            device,
            f"{time_ms:.3f}",
            f"{peak_mb:.1f}",
        ]
    )
    f.flush()


def _time_pending(pending, base, args, writer, f, stopped, mode):
    """Time the configurations that passed their memory step, side by side, and write their rows."""
    if not pending:
        return
    cfg = dict(
        base,
        configs=[(name, impl, k, n, batch) for name, impl, _, k, n, batch, _ in pending],
        warmup=args.warmup,
        repeats=args.repeats,
        budget=args.budget,
    )
    round_s = sum(res["step_s"] for *_, res in pending)
    timed = _run_worker("time", cfg, args, timeout=round_s * (args.warmup + args.repeats) * 3 + 300)
    results = timed.get("results", {})
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    for name, impl, ks, k, n, batch, mem in pending:
        label = name.rsplit(" N=", 1)[0]
        res = results.get(
            name,
            {"status": timed.get("status", "error"), "error": timed.get("error", "")},
        )
        if res["status"] != "ok":
            stopped[(impl, ks)] = f"{res['status']} at N={n} (timing)"
            print(
                f"{res['status'].upper():5s} {mode:7s} N={n:6d} {label:22s} batch {batch} (timing): "
                f"{res.get('error', '')}",
                flush=True,
            )
            continue
        _write_row(
            writer,
            f,
            impl,
            n,
            k,
            batch,
            mode,
            args.device,
            res["time_ms"],
            mem["peak_mb"],
        )
        print(
            f"ok    {mode:7s} N={n:6d} {label:22s} batch {batch:2d}: {res['time_ms']:10.1f} ms "
            f"{mem['peak_mb']:9.1f} MiB  (median of {len(res['times_ms'])}: {res['times_ms']}; "
            f"{timed['threads']} threads, {mem['mem_method']}; load average {load})",
            flush=True,
        )


def run_in_process(args, modes, lengths, kspecs, impls, writer, f):
    """--in-process: one worker per mode; its ROW lines become CSV rows as they arrive."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    env["PYTHONWARNINGS"] = "ignore"
    series = []
    for impl in impls:
        series += [(impl, ks) for ks in dict.fromkeys(kspecs)] if impl in K_IMPLS else [(impl, None)]
    for mode in modes:
        cfg = {
            "mode": mode,
            "device": args.device,
            "dtype": args.dtype,
            "d": args.d,
            "heads": args.heads,
            "window": args.window,
            "local_heads": args.local_heads,
            "dense_max_len": args.dense_max_len,
            "threads": args.threads,
            "lengths": lengths,
            "series": series,
            "batches": {str(n): auto_batch(n, args) for n in lengths},
            "warmup": args.warmup,
            "repeats": args.repeats,
            "budget": args.budget,
            "time_cap": args.time_cap,
            "kernels": True,
        }
        cmd = [
            sys.executable,
            "-m",
            "scripts.benchmark_attention",
            "--_inprocess",
            json.dumps(cfg),
        ]
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for line in proc.stdout:
            kind, _, payload = line.partition(" ")
            if kind == "LOG":
                print(json.loads(payload)["text"], flush=True)
                continue
            if kind != "ROW":
                continue
            r = json.loads(payload)
            label, n, batch = r["label"], r["n"], r["batch"]
            if r["status"] in ("ok", "cap"):
                _write_row(
                    writer,
                    f,
                    r["impl"],
                    n,
                    r["k"],
                    batch,
                    mode,
                    args.device,
                    r["time_ms"],
                    r["peak_mb"],
                )
            if r["status"] == "ok":
                print(
                    f"ok    {mode:7s} N={n:6d} {label:22s} batch {batch:2d}: {r['time_ms']:10.2f} ms "
                    f"{r['peak_mb']:9.1f} MiB  (median of {len(r['times_ms'])}: {r['times_ms']}; {r['mem_method']})",
                    flush=True,
                )
            elif r["status"] == "cap":
                print(
                    f"cap   {mode:7s} N={n:6d} {label:22s} batch {batch:2d}: {r['time_ms']:10.1f} ms (ONE cold step: "
                    f"over the {args.time_cap:g} s time cap; not run at larger N)",
                    flush=True,
                )
            else:
                print(
                    f"{r['status'].upper():5s} {mode:7s} N={n:6d} {label:22s} batch {batch}: {r.get('error', '')} "
                    "(not run at larger N)",
                    flush=True,
                )
        err = proc.stderr.read()
        if proc.wait():
            tail = " | ".join(err.strip().splitlines()[-3:])[:400]
            print(f"ERROR {mode:7s} worker exit {proc.returncode}: {tail}", flush=True)


def run_benchmark(args, p):
    impls = [i.strip() for i in args.impl.split(",") if i.strip()]
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        p.error(f"unknown impl {bad}; choose from {', '.join(IMPLS)}")
    try:
        local_head_count(args.local_heads, args.heads)
    except ValueError as e:
        p.error(str(e))
    modes = [m.strip() for m in args.mode.split(",")]
    if any(m not in ("train", "forward") for m in modes):
        p.error("--mode must be train, forward or train,forward")
    lengths = sorted(int(v) for v in args.lengths.split(","))
    kspecs = [v.strip() for v in args.k.split(",")]
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    in_process = args.in_process if args.in_process is not None else args.device == "cuda"
    gpu = f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""
    print(
        f"# torch {torch.__version__}, device {args.device}{gpu}, dtype {args.dtype}, "
        f"{'in-process' if in_process else 'a process per configuration'}, threads {args.threads} "
        f"(os.cpu_count {os.cpu_count()}), d {args.d}, heads {args.heads}, cluster-causal local heads "
        f"{local_head_count(args.local_heads, args.heads)}, warmup {args.warmup}, "
        f"repeats <= {args.repeats}, time cap {args.time_cap:g} s/step, budget {args.budget:g} s of timed "
        f"rounds per (mode, N), mem cap {args.mem_cap_gb:g} GiB",
        flush=True,
    )
    t_all = time.perf_counter()
    csv_path = Path(args.csv)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        f.flush()
        shown_kernels = set()
        for mode in modes if not in_process else ():
            series = []  # (impl, kspec); each stops at its first OOM / over-cap length
            for impl in impls:
                series += [(impl, ks) for ks in dict.fromkeys(kspecs)] if impl in K_IMPLS else [(impl, None)]
            stopped = {}
            pending = []  # (name, impl, ks, k, n, batch, memory result) waiting to be timed
            for n in lengths:
                batch = auto_batch(n, args)
                base = {
                    "n": n,
                    "batch": batch,
                    "mode": mode,
                    "device": args.device,
                    "dtype": args.dtype,
                    "d": args.d,
                    "heads": args.heads,
                    "window": args.window,
                    "local_heads": args.local_heads,
                    "dense_max_len": args.dense_max_len,
                    "threads": args.threads,
                }
                done = set()
                for impl, ks in series:
                    k = k_value(ks, n) if ks else None
                    name = impl + (f" k={k}" if k else "")
                    if (impl, ks) in stopped:
                        print(
                            f"skip  {mode:7s} N={n:6d} {name:22s} ({stopped[(impl, ks)]})",
                            flush=True,
                        )
                        continue
                    if name in done:  # k=sqrt and k=3 coincide
                        continue
                    done.add(name)
                    cfg = dict(
                        base,
                        impl=impl,
                        k=k,
                        kernels=impl == "full" and mode not in shown_kernels,
                    )
                    res = _run_worker("memory", cfg, args, timeout=args.time_cap * 4 + 300)
                    if res.get("kernels") is not None:
                        shown_kernels.add(mode)
                        print(
                            f"# full ({mode}) runs: {', '.join(res['kernels'])}",
                            flush=True,
                        )
                    if res["status"] != "ok":
                        stopped[(impl, ks)] = f"{res['status']} at N={n}, batch {batch}"
                        print(
                            f"{res['status'].upper():5s} {mode:7s} N={n:6d} {name:22s} batch {batch}: "
                            f"{res.get('error', '')}",
                            flush=True,
                        )
                        continue
                    if res["step_s"] > args.time_cap:
                        stopped[(impl, ks)] = f"one step took {res['step_s']:.0f} s > {args.time_cap:g} s at N={n}"
                        _write_row(
                            writer,
                            f,
                            impl,
                            n,
                            k,
                            batch,
                            mode,
                            args.device,
                            res["step_s"] * 1000,
                            res["peak_mb"],
                        )
                        print(
                            f"cap   {mode:7s} N={n:6d} {name:22s} batch {batch:2d}: {res['step_s'] * 1000:10.1f} ms "
                            f"{res['peak_mb']:9.1f} MiB  (ONE cold step: over the {args.time_cap:g} s time cap; "
                            f"not run at larger N)",
                            flush=True,
                        )
                        continue
                    pending.append((f"{name} N={n}", impl, ks, k, n, batch, res))
                if not args.group_lengths or n == lengths[-1]:
                    _time_pending(pending, base, args, writer, f, stopped, mode)
                    pending = []
        if in_process:
            run_in_process(args, modes, lengths, kspecs, impls, writer, f)
    print(f"# wrote {csv_path} in {time.perf_counter() - t_all:.0f} s")


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "--lengths",
        default="256,512,1024,2048,4096,8192,16384",
        help="comma-separated N",
    )
    p.add_argument(
        "--impl",
        default=",".join(DEFAULT_IMPLS),
        help=f"comma-separated, from {', '.join(IMPLS)}",
    )
    p.add_argument(
        "--mode",
        default="train",
        help="train (forward+backward), forward, or both: train,forward",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="of the layers and inputs (flash attention on CUDA needs bfloat16 or float16)",
    )
    p.add_argument(
        "--in-process",
        dest="in_process",
        action="store_true",
        default=None,
        help="all configurations of a mode in one worker process (default on CUDA)",
    )
    p.add_argument(
        "--no-in-process",
        dest="in_process",
        action="store_false",
        help="a fresh process per configuration's memory step (default on the CPU)",
    )
    p.add_argument("--csv", default="attention_benchmark.csv", help="output CSV (overwritten)")
    p.add_argument(
        "--batch",
        type=int,
        default=0,
        help="fixed batch (default: 20, lowered above N=2048, see docs)",
    )
    p.add_argument(
        "--k",
        default="sqrt,3",
        help="clusters for the cluster impls: sqrt (= ceil(sqrt N)) and/or integers",
    )
    p.add_argument(
        "--window",
        type=int,
        default=0,
        help="cluster-causal window and sparse-causal block length (default ceil(N/k))",
    )
    p.add_argument(
        "--local-heads",
        default="half",
        help="cluster-causal: heads that attend to the last window words of any cluster: 'half' "
        "(the fairseq decoder's default, --causal-local-heads) or an integer (0: all clustered)",
    )
    p.add_argument(
        "--dense-max-len",
        type=int,
        default=None,
        help="cluster / cluster-causal: ClusterAttention's dense_max_len (default: the module's); "
        "the -blocks impls always use the block layout",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed rounds at most")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count(),
        help="torch threads (default: all cores)",
    )
    p.add_argument(
        "--time-cap",
        type=float,
        default=60.0,
        help="seconds: a configuration whose step is slower is measured once and not run at larger N",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=60.0,
        help="seconds of timed rounds per (mode, N): stop adding rounds after it (at least one)",
    )
    p.add_argument(
        "--mem-cap-gb",
        type=float,
        default=12.0,
        help="CPU: address space a worker may allocate beyond its state after setup (model, input); "
        "beyond it counts as out of memory (0: no limit)",
    )
    p.add_argument(
        "--group-lengths",
        action="store_true",
        help="time all lengths of a mode side by side in one process (a scaling fit that load drift "
        "between lengths cannot bend; use with a fixed --batch)",
    )
    p.add_argument(
        "--plot",
        nargs="?",
        const="",
        default=None,
        help="write PNGs to DIR (no DIR: next to the CSV)",
    )
    p.add_argument("--fit", default="1024,8192", help="N range of the fitted exponents")
    p.add_argument(
        "--plot-only",
        action="store_true",
        help="only summarise / plot an existing --csv",
    )
    p.add_argument("--_memory", help=argparse.SUPPRESS)
    p.add_argument("--_time", help=argparse.SUPPRESS)
    p.add_argument("--_inprocess", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._inprocess:
        return inprocess_worker(json.loads(args._inprocess))
    if args._memory:
        return memory_worker(json.loads(args._memory))
    if args._time:
        return time_worker(json.loads(args._time))

    if not args.plot_only:
        run_benchmark(args, p)
    fit_lo, fit_hi = (int(v) for v in args.fit.split(","))
    rows = read_rows(args.csv)
    for (mode, device, label), s in sorted(exponents(rows, fit_lo, fit_hi).items()):
        print(f"# time exponent {mode:7s} {device} {label:22s} {s:.2f}  (N {fit_lo}..{fit_hi}, per sequence)")
    if args.plot is not None:
        out_dir = Path(args.plot) if args.plot else Path(args.csv).parent
        for path in plot(rows, out_dir, fit_lo, fit_hi, stem=Path(args.csv).stem):
            print(f"# plot {path}")


if __name__ == "__main__":
    sys.exit(main())
