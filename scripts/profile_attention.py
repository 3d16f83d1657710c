"""Where one training step of the ClusterAttention layer spends its time, or its peak memory.

Default: torch.profiler over --steps training steps (after --warmup), self CPU time by operator,
grouped into projection GEMMs, the flash kernel, copies/adds/fills, clustering matmuls, row
gathers and the rest (the table in docs/benchmarks.md). --memory instead runs one step in this
fresh process and prints the peak resident memory above the resident memory before it (as
benchmark_attention.py measures it), with --backward-chunk-mib setting the size of the chunks
the flash path's backward runs over. Run it from the repository root, once per chunk size:

  for c in 1 4 16 64; do python -m scripts.profile_attention --memory --backward-chunk-mib $c; done
"""

import argparse
import importlib
import math
import os

GROUPS = {
    "projection GEMMs": ("aten::mm", "aten::addmm"),
    "flash kernel": (
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    ),
    "copies, adds, fills": (
        "aten::copy_",
        "aten::add_",
        "aten::fill_",
        "aten::masked_fill_",
        "aten::zero_",
    ),
    "clustering matmuls": ("aten::bmm", "aten::baddbmm", "aten::baddbmm_"),
    "row gathers": ("aten::index_select",),
}


def _chunk_holder():
    """The module that holds the flash backward's chunk size (_BACKWARD_CHUNK_BYTES), or None."""
    for name in (
        "fairseq_clusterformer.modules.kernels",
        "fairseq_clusterformer.modules.cluster_attention",
    ):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "_BACKWARD_CHUNK_BYTES"):
            return module
    return None


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--k", type=int, default=0, help="clusters (default ceil(sqrt N))")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, or cuda: then the table is GPU time per operator")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--top", type=int, default=15, help="operators listed with --device cuda")
    p.add_argument(
        "--memory",
        action="store_true",
        help="peak memory of one step instead of a profile",
    )
    p.add_argument(
        "--backward-chunk-mib",
        type=float,
        default=0,
        help="flash backward chunk size (0: the module's)",
    )
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    import fairseq_clusterformer.modules.cluster_attention as ca

    holder = _chunk_holder()
    if args.backward_chunk_mib:
        if holder is None:
            p.error("--backward-chunk-mib: this version of the module has no backward chunk size")
        holder._BACKWARD_CHUNK_BYTES = int(args.backward_chunk_mib * 2**20)
    chunks = "n/a" if holder is None else f"{holder._BACKWARD_CHUNK_BYTES / 2**20:.3g} MiB"
    k = args.k or math.ceil(math.sqrt(args.n))
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    m = ca.ClusterAttention(args.d, args.heads, k, max_clusters=max(256, k)).to(device, dtype)
    x = torch.randn(args.batch, args.n, args.d, requires_grad=True, device=device, dtype=dtype)
    kpm = torch.zeros(args.batch, args.n, dtype=torch.bool, device=device)

    def step():
        out, info = m(x, kpm)
        (out.float().sum() + info.clustering_loss + info.sorting_loss).backward()
        x.grad = None
        m.zero_grad(set_to_none=True)

    print(
        f"# N {args.n}, batch {args.batch}, d {args.d}, heads {args.heads}, k {k}, threads {args.threads}, "
        f"device {args.device}, dtype {args.dtype}, "
        f"backward chunks of {chunks}, load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    if args.memory:
        from scripts.harness_common import CpuPeak

        meter = CpuPeak()
        meter.start()
        step()
        print(f"peak memory of one step: {meter.stop() / 2**20:.1f} MiB ({meter.method})")
        return
    from torch.profiler import profile

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        _profile_cuda(step, args.steps, args.top)
        return
    total = {}
    for _ in range(args.steps):
        with profile() as prof:
            step()
        for e in prof.key_averages():
            total[e.key] = total.get(e.key, 0.0) + e.self_cpu_time_total / 1000 / args.steps
    whole = sum(total.values())
    print("| part of the step | self CPU (ms) | share |\n|---|---|---|")
    used = 0.0
    for name, keys in GROUPS.items():
        ms = sum(total.get(key, 0.0) for key in keys)
        used += ms
        print(f"| {name} | {ms:.0f} | {100 * ms / whole:.0f} % |")
    print(f"| everything else | {whole - used:.0f} | {100 * (whole - used) / whole:.0f} % |")
    print(f"| total | {whole:.0f} | |")


def _profile_cuda(step, steps, top):
    """GPU time and kernel launches per step, by operator: on a GPU a step of small operators is
    bound by launches, which a CPU profile does not show."""
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t0) * 1000 / steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(getattr(e, "device_time", 0.0) for e in kernels) / 1000 / steps
    wall = {}
    for e in prof.key_averages():
        if e.key.startswith("aten::") or e.key.startswith("ProfilerStep"):
            wall[e.key] = (e.self_device_time_total / 1000 / steps, e.count / steps)
    rows = sorted(wall.items(), key=lambda kv: -kv[1][0])[:top]
    print(
        f"step {step_ms:.2f} ms (unprofiled); GPU busy {gpu_ms:.2f} ms of it; "
        f"{len(kernels) / steps:.0f} kernels per step"
    )
    print("| operator | GPU ms per step | calls per step |\n|---|---|---|")
    for name, (ms, calls) in rows:
        print(f"| {name} | {ms:.3f} | {calls:.0f} |")


if __name__ == "__main__":
    main()
