"""Kernel launches and host synchronisations per training step of one attention layer, counted.

On a GPU, a ClusterAttention layer at translation lengths is bound by kernel launches and host
synchronisations, not by arithmetic (docs/benchmarks.md, GPU section). Both are properties of
the code, not of the machine: this script counts them on the CPU, with the CUDA code path (the
block attention through ``F.scaled_dot_product_attention``, as on a GPU; the CPU's own flash
kernel path is switched off). Every aten operation that computes something counts as one launch
(views, reshapes and empty allocations launch nothing on a GPU); ``.item()``, ``bool(tensor)``,
``nonzero`` and the like count as host synchronisations (the CPU waits for the GPU there).

One training step is the layer's forward, its losses and the backward, of the layers that
scripts/benchmark_attention.py builds (``build``), on a batch without padding and on one whose
first sequence ends 7 words early. The ClusterAttention layers are called as the fairseq model
calls them: with a padding mask only when the batch has padding, and then with
``assume_padding`` (the model has checked already). The counts do not depend on the
batch size or on d. They depend on N only through the dense-mask path of short sequences
(N <= 64), and the causal layer's also on the data: its near-tie screen runs a few more
operations where some word is near a tie.

cluster-flex and cluster-causal-flex are the layers with impl="flex" (--cluster-impl flex). Their
FlexAttention call runs on CUDA as torch.compile's Triton code, which the CPU cannot run in a
training step (FlexAttention has no CPU backward): it is counted as one launch forward
(``flex_attention``) and one backward (``flex_attention_backward``), its output a copy of its
values (no attention: deterministic, not meaningful), and everything around it (the orders, the
gathers, the tile lists, the projections, the clustering) is counted as it runs. The CPU's own
additions (its tile mask, its device check) are left out, as on CUDA.

cluster-graphs and cluster-causal-graphs are the layers with compile="reduce-overhead"
(--cluster-compile --cluster-compile-mode reduce-overhead), which on CUDA replays each compiled
function as a recorded CUDA graph. Each such function is counted as its replay: one launch per
pass (``cuda_graph_replay``) and one copy per input that is not a parameter and per incoming
gradient (``cuda_graph_input_copy``: CUDA-graph trees copy inputs into the graph's static
buffers, outputs of an earlier replay excepted, so this is an upper bound); the function runs
eagerly, uncounted, for its values. The kernels inside a graph still take their GPU time; the
count says what the CPU must launch.

--models counts whole fairseq models instead: one training step (forward, the criterion,
backward; no optimizer step) of clusterformer_iwslt and transformer_iwslt_de_en at their
architectures' sizes, built in-process on a 1,000-word dictionary, on a batch of sentence pairs
of N tokens per side (the shorter variant: the last sentence's source ends 7 tokens early);
clusterformer_iwslt+flex is clusterformer_iwslt with --cluster-impl flex, clusterformer_iwslt+graphs
with --cluster-compile --cluster-compile-mode reduce-overhead (counted as above).

--generate counts whole models' beam search (fairseq's SequenceGenerator, beam 5) instead, per
output token: two sources of N tokens (the second 7 shorter), every hypothesis held to N
output tokens, so that both models take the same N + 1 decoder steps (their incremental
decoding: ClusterFormer's decoder keeps its whole prefix until it holds K x window words, then
ring buffers of the last window words per cluster). The encoder's one pass is included, spread
over the steps. (The decoder's steps are the same with --cluster-impl flex.)

  python -m scripts.count_launches --n 512 --impls cluster,cluster-causal,sdpa
  python -m scripts.count_launches --csv docs/data/cpu/launches.csv   # the tables in docs/benchmarks.md
  python -m scripts.count_launches --models --n 64,512 --csv docs/data/cpu/launches_models.csv
  python -m scripts.count_launches --generate --n 64,512 --csv docs/data/cpu/launches_generate.csv
"""

import argparse
import collections
import contextlib
import csv
import math
from typing import List

IMPLS = (
    "cluster",
    "cluster-causal",
    "cluster-flex",
    "cluster-causal-flex",
    "cluster-graphs",
    "cluster-causal-graphs",
    "sdpa",
    "full",
)
MODELS = ("clusterformer_iwslt", "clusterformer_iwslt+flex", "clusterformer_iwslt+graphs", "transformer_iwslt_de_en")
# The fairseq options that a model name's "+suffix" adds.
MODEL_OPTIONS = {
    "flex": ["--cluster-impl", "flex"],
    "graphs": ["--cluster-compile", "--cluster-compile-mode", "reduce-overhead"],
}
GENERATE_MODELS = ("clusterformer_iwslt", "transformer_iwslt_de_en")  # +flex decodes as clusterformer_iwslt
CRITERIA = {
    "clusterformer_iwslt": "label_smoothed_cross_entropy_with_clustering",
    "transformer_iwslt_de_en": "label_smoothed_cross_entropy",
}
# Operations that only make views or metadata, or allocate without writing: no kernel on a GPU.
NO_LAUNCH = frozenset(
    (
        "view",
        "_unsafe_view",
        "_reshape_alias",
        "reshape",
        "t",
        "transpose",
        "permute",
        "expand",
        "unsqueeze",
        "squeeze",
        "select",
        "slice",
        "alias",
        "as_strided",
        "unfold",
        "detach",
        "split",
        "split_with_sizes",
        "unbind",
        "chunk",
        "diagonal",
        "lift_fresh",
        "empty",
        "empty_like",
        "new_empty",
        "empty_strided",
        "new_empty_strided",
        "promote_types",
        "result_type",
        "is_same_size",
        "sym_size",
        "sym_stride",
        "sym_numel",
        "sym_storage_offset",
        "_has_compatible_shallow_copy_type",
    )
)
# Operations that make the CPU wait for the device (their result is read on the host, or
# their output's size depends on the data).
HOST_SYNCS = frozenset(("_local_scalar_dense", "nonzero", "is_nonzero", "equal", "unique", "_unique2", "item"))
CSV_COLUMNS = ["impl", "n", "padded", "launches", "host_syncs", "forward_launches", "backward_launches"]
GENERATE_CSV_COLUMNS = ["model", "n", "steps", "launches", "host_syncs", "launches_per_step", "host_syncs_per_step"]


def _counting_mode():
    """A TorchDispatchMode that counts, in ``.ops``, the aten operators dispatched under it (made
    here, so that importing this module does not import torch)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    return Count()


_FLEX_STAND_INS = []


def _flex_stand_ins():
    """Two custom operators that the counting mode sees as one launch each (``flex_attention``,
    ``flex_attention_backward``), whose outputs are copies of an input: no attention, but
    determined by the inputs (an uninitialised output would make a whole model's later
    data-dependent operations, the decoder's near-tie screen, vary from run to run)."""
    if not _FLEX_STAND_INS:
        import torch

        @torch.library.custom_op("count_launches::flex_attention", mutates_args=())
        def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return v.clone()  # the counting mode is off inside: not counted

        @torch.library.custom_op("count_launches::flex_attention_backward", mutates_args=())
        def kernel_backward(grad: torch.Tensor) -> List[torch.Tensor]:
            return [grad.clone() for _ in range(3)]

        kernel.register_autograd(lambda ctx, grad: tuple(kernel_backward(grad)))
        _FLEX_STAND_INS.extend((kernel, kernel_backward))
    return _FLEX_STAND_INS


@contextlib.contextmanager
def _flex_as_one_kernel_per_pass():
    """impl="flex" on the CPU as on CUDA, for counting: the FlexAttention call an uncomputed
    stand-in (one launch per pass, _flex_stand_ins), without the CPU-only tile mask and device
    check."""
    from fairseq_clusterformer.modules import flex

    kernel, _ = _flex_stand_ins()
    saved = flex._flex, flex._within_tiles, flex.check_device
    flex._flex = lambda q, k, v, block_mask: kernel(q, k, v)
    flex._within_tiles = lambda mask_mod, *args: mask_mod
    flex.check_device = lambda attn, x: None
    try:
        yield
    finally:
        flex._flex, flex._within_tiles, flex.check_device = saved


def _bump(op: str, n: int = 1):
    """Counts N launches of OP in the counting mode that is active (if any)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    mode = _get_current_dispatch_mode()
    if n and mode is not None and hasattr(mode, "ops"):
        mode.ops[op] += n


def _replayed(fn):
    """FN (a ClusterAttention fast-path function: fn(module, *args)) counted as a recorded CUDA
    graph replays it: one launch forward (``cuda_graph_replay``) and one backward, plus one copy
    (``cuda_graph_input_copy``) per input tensor that is not a parameter and per incoming
    gradient (torch's CUDA-graph trees copy inputs into the graph's static buffers; an output of
    an earlier replay needs none, so this is an upper bound). FN runs eagerly, uncounted, for its
    values; its backward runs through torch.autograd.grad, uncounted, and the parameters' gradients
    leave the graph as real ones do (their accumulation is counted where it runs)."""
    import torch
    from torch.utils import _pytree as pytree
    from torch.utils._python_dispatch import _disable_current_modes

    def call(module, *args):
        flat, spec = pytree.tree_flatten(args)
        at = [i for i, a in enumerate(flat) if isinstance(a, torch.Tensor)]
        params = [p for p in module.parameters() if p.requires_grad]
        n_in = len(at)
        holder = {}

        class Replay(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *tensors):
                inner = list(flat)
                with _disable_current_modes(), torch.enable_grad():
                    for i, t in zip(at, tensors[:n_in]):
                        inner[i] = t.detach().requires_grad_(t.requires_grad)
                    out = fn(module, *pytree.tree_unflatten(inner, spec))
                outs, holder["spec"] = pytree.tree_flatten(out)
                ctx.inner_inputs = [inner[i] for i in at]
                ctx.outs = outs
                result = tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in outs)
                ctx.mark_non_differentiable(
                    *(o for o in result if isinstance(o, torch.Tensor) and not o.is_floating_point())
                )
                return result

            @staticmethod
            def backward(ctx, *grads):
                given = [
                    (o, g)
                    for o, g in zip(ctx.outs, grads)
                    if g is not None and isinstance(o, torch.Tensor) and o.requires_grad
                ]
                _bump("cuda_graph_replay")
                _bump("cuda_graph_input_copy", len(given))
                wrt = [t for t in ctx.inner_inputs if t.requires_grad] + params
                with _disable_current_modes():
                    found = (
                        torch.autograd.grad([o for o, _ in given], wrt, [g for _, g in given], allow_unused=True)
                        if given and wrt
                        else [None] * len(wrt)
                    )
                found = iter(found)
                return tuple(next(found) if t.requires_grad else None for t in ctx.inner_inputs) + tuple(
                    next(found) for _ in params
                )

        _bump("cuda_graph_replay")
        _bump("cuda_graph_input_copy", n_in)
        result = Replay.apply(*(flat[i] for i in at), *params)
        return pytree.tree_unflatten(list(result), holder["spec"])

    return call


@contextlib.contextmanager
def _compiled_as_graph_replays():
    """compile="reduce-overhead" as on CUDA, for counting: every compiled fast-path function one
    recorded CUDA graph (_replayed), nothing compiled (inductor skips CUDA graphs on the CPU)."""
    from fairseq_clusterformer.modules.cluster_attention import ClusterAttention

    saved = ClusterAttention._fast_path

    def fast_path(self, name):
        fn = getattr(ClusterAttention, name)
        return _replayed(fn) if self.compile_mode == "reduce-overhead" else fn

    ClusterAttention._fast_path = fast_path
    try:
        yield
    finally:
        ClusterAttention._fast_path = saved


@contextlib.contextmanager
def _as_on_cuda(name):
    """The stand-ins that make NAME's step count as on CUDA: FlexAttention ("flex" in the name)
    and CUDA-graph replays ("graphs"); both switch off the CPU's own flash kernel path."""
    from fairseq_clusterformer.modules import kernels

    saved = kernels.USE_FLASH_CPU_KERNEL, kernels.HEAD_GROUPS_IN_ONE_CALL_ON_CPU
    kernels.USE_FLASH_CPU_KERNEL = False  # the block attention as on a GPU: through sdpa,
    kernels.HEAD_GROUPS_IN_ONE_CALL_ON_CPU = True  # both kinds of head in one call
    try:
        with contextlib.ExitStack() as stack:
            if "flex" in name:
                stack.enter_context(_flex_as_one_kernel_per_pass())
            if "graphs" in name:
                stack.enter_context(_compiled_as_graph_replays())
            yield
    finally:
        kernels.USE_FLASH_CPU_KERNEL, kernels.HEAD_GROUPS_IN_ONE_CALL_ON_CPU = saved


def _summary(fwd, bwd):
    def launches(counter):
        return sum(v for op, v in counter.items() if op not in NO_LAUNCH)

    ops = fwd + bwd
    return {
        "launches": launches(ops),
        "host_syncs": sum(v for op, v in ops.items() if op in HOST_SYNCS),
        "forward_launches": launches(fwd),
        "backward_launches": launches(bwd),
        "ops": collections.Counter({op: v for op, v in ops.items() if op not in NO_LAUNCH}),
    }


def _build_model(arch, n):
    """(task, model, criterion) of ARCH ("+flex": with --cluster-impl flex) at its full size, on a
    1,000-word dictionary, for sequences of up to N tokens per side."""
    import tempfile
    from pathlib import Path

    import torch
    from fairseq import options, tasks

    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as data:
        for lang in ("src", "tgt"):
            Path(data, f"dict.{lang}.txt").write_text("".join(f"w{i} 1\n" for i in range(1000)))
        parser = options.get_training_parser()
        args = options.parse_args_and_arch(
            parser,
            [data, "--task", "translation", "--source-lang", "src", "--target-lang", "tgt"]
            + ["--arch", arch.split("+")[0]]
            + MODEL_OPTIONS.get(arch.partition("+")[2], [])
            + [
                "--criterion",
                CRITERIA[arch.split("+")[0]],
                "--label-smoothing",
                "0.1",
                "--user-dir",
                str(repo / "fairseq_clusterformer"),
            ]
            + ["--max-source-positions", str(n + 8), "--max-target-positions", str(n + 8), "--cpu"],
        )
        task = tasks.setup_task(args)
    torch.manual_seed(0)
    return task, task.build_model(args), task.build_criterion(args)


def count_model_step(arch, n, padded, batch=2):
    """Counts of one training step of a fairseq model (forward, criterion, backward) after one
    warm-up step, on BATCH pairs of N tokens per side (padded: the last source 7 tokens shorter)."""
    import torch

    task, model, criterion = _build_model(arch, n)
    model.train()
    d = task.source_dictionary
    g = torch.Generator().manual_seed(0)
    src = torch.randint(d.nspecial, len(d), (batch, n), generator=g)
    src[:, -1] = d.eos()
    if padded:  # left-padded, as fairseq's collater pads sources
        src[-1, :7] = d.pad()
    tgt = torch.randint(d.nspecial, len(d), (batch, n), generator=g)
    tgt[:, -1] = d.eos()
    prev = torch.cat([tgt[:, -1:], tgt[:, :-1]], dim=1)
    sample = {
        "id": torch.arange(batch),
        "nsentences": batch,
        "ntokens": batch * n,
        "net_input": {"src_tokens": src, "src_lengths": src.ne(d.pad()).sum(1), "prev_output_tokens": prev},
        "target": tgt,
    }
    with _as_on_cuda(arch):
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            with _counting_mode() as fwd:
                loss, _, _ = criterion(model, sample)
            with _counting_mode() as bwd:
                loss.backward()
    return _summary(fwd.ops, bwd.ops)


def count_generation(arch, n, beam=5, batch=2):
    """Counts of beam search (fairseq's SequenceGenerator, beam BEAM) over BATCH sources of N
    tokens (the last 7 shorter, left-padded), every hypothesis held to N output tokens (min and
    max length N: N + 1 decoder steps, the last one the forced end of sentence), after one
    warm-up run: a dict with launches, host_syncs, steps, launches_per_step, host_syncs_per_step
    and ``ops``. Per step includes the encoder's one pass, spread over the steps."""
    import torch
    from fairseq.sequence_generator import SequenceGenerator

    task, model, _ = _build_model(arch, n)
    model.eval()
    d = task.source_dictionary
    src = torch.randint(d.nspecial, len(d), (batch, n), generator=torch.Generator().manual_seed(0))
    src[:, -1] = d.eos()
    src[-1, :7] = d.pad()
    sample = {"net_input": {"src_tokens": src, "src_lengths": src.ne(d.pad()).sum(1)}}
    generator = SequenceGenerator([model], task.target_dictionary, beam_size=beam, max_len_a=0, max_len_b=n, min_len=n)
    with _as_on_cuda(arch), torch.no_grad():
        for _ in range(2):
            with _counting_mode() as count:
                hypos = generator.generate([model], sample)
    if any(len(h[0]["tokens"]) != n + 1 for h in hypos):
        raise RuntimeError(f"{arch}: beam search did not run the {n + 1} steps it was held to")
    c = _summary(count.ops, collections.Counter())
    steps = n + 1
    return {
        "launches": c["launches"],
        "host_syncs": c["host_syncs"],
        "steps": steps,
        "launches_per_step": round(c["launches"] / steps, 1),
        "host_syncs_per_step": round(c["host_syncs"] / steps, 2),
        "ops": c["ops"],
    }


def count_step(impl, n, padded, batch=2, d=64, heads=4, k=None, window=None):
    """Counts of one training step after one warm-up step: a dict with launches, host_syncs,
    forward_launches, backward_launches and ``ops`` (a Counter of launching operators)."""
    import torch

    from scripts.benchmark_attention import build

    k = k or math.ceil(math.sqrt(n))
    torch.manual_seed(0)
    step, time_first, module = build(impl, d, heads, k, n, window, "cpu")
    x = torch.randn(batch, n, d)
    kpm = torch.zeros(batch, n, dtype=torch.bool)
    if padded:
        kpm[0, -7:] = True
    if time_first:
        x = x.transpose(0, 1)
    x = x.contiguous().requires_grad_()

    if impl.startswith("cluster"):
        # As the fairseq model calls the layer: a mask only when the batch has padding, and then
        # with assume_padding (the model has checked; the layer skips its own check's host sync).
        def step(x, kpm):
            out, info = module(x, kpm if padded else None, assume_padding=padded)
            return out, info.clustering_loss + info.sorting_loss

    with _as_on_cuda(impl):
        for _ in range(2):  # the first step fills caches (e.g. the decoder's C W_C); count the second
            x.grad = None
            module.zero_grad(set_to_none=True)
            batch_mask = kpm.clone()  # each step a new batch (impl="flex" builds tiles once per mask)
            with _counting_mode() as fwd:
                out, extra = step(x, batch_mask)
                loss = out.sum() if extra is None else out.sum() + extra
            with _counting_mode() as bwd:
                loss.backward()
    return _summary(fwd.ops, bwd.ops)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--n", default="512,2048", help="comma-separated sequence lengths")
    p.add_argument(
        "--impls",
        help=f"comma-separated, from {', '.join(IMPLS)} (default all; with --models: {', '.join(MODELS)}; "
        f"with --generate: {', '.join(GENERATE_MODELS)})",
    )
    p.add_argument("--models", action="store_true", help="count whole fairseq models' training steps")
    p.add_argument(
        "--generate", action="store_true", help="count whole fairseq models' beam search (beam 5), per output token"
    )
    p.add_argument("--window", type=int, default=64, help="the causal layer's window")
    p.add_argument("--csv", help="write the rows here")
    p.add_argument("--verbose", action="store_true", help="list the launching operators of each row")
    args = p.parse_args(argv)
    known = GENERATE_MODELS if args.generate else MODELS if args.models else IMPLS
    impls = [i for i in (args.impls or ",".join(known)).split(",") if i]
    for impl in impls:
        if impl not in known:
            p.error(
                f"--impls: unknown {'model' if known is not IMPLS else 'implementation'} {impl!r}; "
                f"choose from {', '.join(known)}"
            )
    lengths = [int(v) for v in args.n.split(",") if v]
    if args.generate:
        return _generation_rows(impls, lengths, args)
    rows = []
    print("| impl | N | padding | launches (forward + backward) | host syncs |\n|---|---|---|---|---|")
    for impl in impls:
        for n in lengths:
            for padded in (False, True):
                c = (
                    count_model_step(impl, n, padded)
                    if args.models
                    else count_step(impl, n, padded, window=args.window)
                )
                rows.append({"impl": impl, "n": n, "padded": int(padded), **{k: c[k] for k in CSV_COLUMNS[3:]}})
                print(
                    f"| {impl} | {n} | {'yes' if padded else 'no'} | {c['launches']} "
                    f"({c['forward_launches']} + {c['backward_launches']}) | {c['host_syncs']} |",
                    flush=True,
                )
                if args.verbose:
                    _print_ops(c)
    return _write_csv(args.csv, CSV_COLUMNS, rows)


def _generation_rows(models, lengths, args):
    rows = []
    print("| model | N | launches per output token | host syncs per output token |\n|---|---|---|---|")
    for model in models:
        for n in lengths:
            c = count_generation(model, n)
            rows.append({"model": model, "n": n, **{k: c[k] for k in GENERATE_CSV_COLUMNS[2:]}})
            print(f"| {model} | {n} | {c['launches_per_step']} | {c['host_syncs_per_step']} |", flush=True)
            if args.verbose:
                _print_ops(c)
    return _write_csv(args.csv, GENERATE_CSV_COLUMNS, rows)


def _print_ops(counts):
    print("    " + ", ".join(f"{op} {v}" for op, v in counts["ops"].most_common()))


def _write_csv(path, columns, rows):
    """ROWS written to PATH (if given) as a CSV of COLUMNS; returns ROWS."""
    if path:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
