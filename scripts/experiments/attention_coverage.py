"""How many words each word's self-attention reaches, in the converged study's trained models.

    python -m scripts.experiments.attention_coverage [--results docs/results/multi30k_annealed.jsonl]
        [--seed 1] [--subset test] [--sentences 1000] [--out docs/results/multi30k_annealed_coverage.json]
    python -m scripts.experiments.attention_coverage --results docs/results/multi30k-docs-mr_documents.jsonl \
        --sentences 5 --jobs 2 --out docs/results/multi30k-docs-mr_coverage.json   # the document study
    python -m scripts.experiments.attention_coverage --seed 2 --systems routing-local-heads=0 --update
        # one system, from another seed's checkpoint, into the existing result (its other rows kept)

Every system of the study cuts a sentence into about k groups (docs/baselines.md), but what a word
then sees differs: ClusterFormer's encoder word sees its sorted block and the one before (2w of
about 3w words at k = 3), Reformer's union over 8 hash rounds, Routing's local heads a window
each side. At Multi30k's lengths (about 15 words) these differences are large fractions of the
sentence, so the study's BLEU comparisons are also comparisons of how much each system attends.
This measures it, on the real sentences and the trained weights of one seed's checkpoints.

The measure is the same for every implementation, including the third-party ones: word j is
reached by word i in a layer when the layer's self-attention output at i depends on its input at
j, i.e. when the gradient of <y_i, r> (r random) with respect to x_j is not exactly zero. Group
assignments (argmax, hashing, top-k) carry no gradient, so this is exactly the set of words with
a non-zero attention weight in some head, plus i itself (its query). Each sentence goes through
the model alone (teacher-forced on its reference for the decoder); each layer's self-attention
is called again on T copies of its recorded input, copy i asking about word i, so one backward
pass gives the whole T x T reach matrix. For the decoder, the available words are those up to
i (a word reached after i would be a causality bug: it is counted and reported, and must be 0).

Writes a JSON file that ``python -m scripts.experiments.run_side_by_side report`` renders in
docs/results.md (the block that names it).
"""

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from scripts.experiments import expkit
from scripts.experiments.expkit import REPO, say
from scripts.experiments.significance import system_name

KIND = "attention_coverage"
DEFAULT_RESULTS = REPO / "docs" / "results" / "multi30k_annealed.jsonl"
DEFAULT_OUT = REPO / "docs" / "results" / "multi30k_annealed_coverage.json"
# the systems of the studies (sentences and documents), by (model, variant) of their records, in the
# order the tables show them; a system without a record of the seed is left out
SYSTEMS = [
    ("transformer", "base", "Transformer"),
    ("clusterformer", "base", "ClusterFormer"),
    ("clusterformer", "decoder-full", "ClusterFormer, full-attention decoder"),
    ("clusterformer", "routing", "Routing (`routing`)"),
    ("clusterformer", "lsh", "Reformer (`lsh`)"),
    ("clusterformer", "k=auto", "ClusterFormer, k = ⌈√L⌉ in the encoder (`k=auto`)"),
    ("clusterformer", "local-heads=half", "ClusterFormer, half of the encoder heads local"),
    ("clusterformer", "routing-local-heads=0", "Routing without local heads"),
    ("clusterformer", "lsh-n-hashes=1", "Reformer, 1 hash round"),
    ("clusterformer", "lsh-n-hashes=2", "Reformer, 2 hash rounds"),
    ("clusterformer", "sparse", "Sparse Transformer (`sparse`)"),
    ("clusterformer", "linformer", "Linformer encoder (`linformer`)"),
]


def reach_matrix(call, x, **expand):
    """Which inputs each output position depends on, for one sentence.

    CALL(x_copies, **expanded) runs a self-attention on T x T x C (time, copies, channels) and
    returns its T x T x C output; X: T x 1 x C, the recorded input of one sentence; EXPAND:
    tensors with a batch dimension of 1 at dim 0 (padding mask, centroids) to be repeated per copy.
    Returns a T (query) x T (key) bool matrix: [i, j] is True where output i depends on input j."""
    T = x.size(0)
    copies = x.detach().expand(T, T, x.size(2)).clone().requires_grad_(True)
    kwargs = {name: v.expand(T, *v.shape[1:]) if v is not None else None for name, v in expand.items()}
    with torch.enable_grad():
        y = call(copies, **kwargs)  # T x T x C: y[t, i] is copy i's output at position t
        probe = torch.randn(T, x.size(2), dtype=y.dtype)
        idx = torch.arange(T)
        (y[idx, idx] * probe).sum().backward()  # copy i asks about output i only
    grad = copies.grad  # T (key position j) x T (copy i) x C
    return (grad.abs().sum(-1) > 0).t()  # i x j


class Recorder:
    """Records each self-attention call of a model's layers during one forward: the encoder's
    ``attend(x, mask, centroids)`` calls where the layer makes them (ClusterFormer's layers),
    and module calls (fairseq's MultiheadAttention, every decoder layer) otherwise."""

    def __init__(self, model):
        self.calls = []  # (side, layer, module, "attend"|"forward", args dict)
        self._undo = []
        for side, layers in (("encoder", model.encoder.layers), ("decoder", model.decoder.layers)):
            for i, layer in enumerate(layers):
                attn = layer.self_attn
                if side == "encoder" and hasattr(attn, "attend"):
                    self._wrap_attend(side, i, attn)
                else:
                    hook = attn.register_forward_pre_hook(self._hook(side, i, attn), with_kwargs=True)
                    self._undo.append(hook.remove)

    def _wrap_attend(self, side, i, attn):
        original = attn.attend

        def attend(x, key_padding_mask, centroids=None):
            self.calls.append((side, i, attn, "attend", {"x": x, "mask": key_padding_mask, "centroids": centroids}))
            return original(x, key_padding_mask, centroids)

        attn.attend = attend
        self._undo.append(lambda: delattr(attn, "attend"))

    def _hook(self, side, i, attn):
        def hook(module, args, kwargs):
            if args:
                raise ValueError("expected fairseq's keyword call of self_attn(query=..., key=..., value=...)")
            self.calls.append((side, i, attn, "forward", dict(kwargs)))

        return hook

    def remove(self):
        for undo in self._undo:
            undo()
        self._undo = []


def output_projection(attn):
    """The nn.Linear that maps attn's concatenated heads (head-major, H x head_dim) to the output:
    fairseq's and ClusterAttention's ``out_proj``, reformer-pytorch's and routing-transformer's
    ``to_out``."""
    found = [m for name, m in attn.named_modules() if name.split(".")[-1] in ("out_proj", "to_out")]
    found = [m for m in found if isinstance(m, torch.nn.Linear)]
    if len(found) != 1:
        raise ValueError(f"{type(attn).__name__}: expected one out_proj/to_out Linear, found {len(found)}")
    proj = found[0]
    if proj.in_features % attn.num_heads:
        raise ValueError(f"{type(attn).__name__}: {proj.in_features} inputs do not split into {attn.num_heads} heads")
    return proj


def replay(attn, how, recorded):
    """Per head, the T x T reach matrix of one recorded self-attention call: the call again with
    every other head's columns of the output projection set to zero, so that the output is that
    head's contribution alone (a constant bias aside). A list of H matrices; their OR is the
    layer's reach, since the heads' contributions add."""
    if how == "attend":
        centroids = recorded["centroids"]

        def call(xs, mask, centroids):
            return attn.attend(xs, mask, centroids)[0]

        x = recorded["x"]
        expand = {"mask": recorded["mask"], "centroids": centroids.detach() if centroids is not None else None}
    else:
        kwargs = dict(recorded)
        x = kwargs.pop("query")
        for name in ("key", "value"):
            if kwargs.pop(name, None) is not x:
                raise ValueError("expected a self-attention call (key and value the query)")
        if kwargs.get("incremental_state") is not None:
            raise ValueError("replay needs a full-sequence call, not incremental decoding")
        expand = {"key_padding_mask": kwargs.pop("key_padding_mask", None)}

        def call(xs, key_padding_mask):
            return attn(query=xs, key=xs, value=xs, key_padding_mask=key_padding_mask, **kwargs)[0]

    proj = output_projection(attn)
    H = attn.num_heads
    hd = proj.in_features // H
    kept = proj.weight.detach().clone()
    reaches = []
    try:
        for h in range(H):
            with torch.no_grad():
                proj.weight.zero_()
                proj.weight[:, h * hd : (h + 1) * hd] = kept[:, h * hd : (h + 1) * hd]
            reaches.append(reach_matrix(call, x, **expand))
    finally:
        with torch.no_grad():
            proj.weight.copy_(kept)
    return reaches


def measure(model, samples):
    """Per side and layer: the mean over words of the fraction of available words reached by any
    head and by each head, the mean number reached by any head, and how many decoder words
    reached a later word (must be 0). SAMPLES: an iterable of (source ids, target ids) 1-D
    LongTensors (eos-terminated, no padding)."""
    eos = model.decoder.dictionary.eos()
    sums = {}
    n_sentences = 0
    for src, tgt in samples:
        prev = torch.cat([tgt.new_tensor([eos]), tgt[:-1]])
        recorder = Recorder(model)
        try:
            with torch.no_grad():
                model(src[None], torch.tensor([src.numel()]), prev[None])
        finally:
            recorder.remove()
        for side, layer, attn, how, recorded in recorder.calls:
            heads = replay(attn, how, recorded)
            T = heads[0].size(0)
            s = sums.setdefault(
                (side, layer), {"any": 0.0, "heads": [0.0] * len(heads), "reached": 0.0, "words": 0, "future": 0}
            )
            for h, reach in enumerate([torch.stack(heads).any(0), *heads]):
                if side == "decoder":
                    available = torch.arange(1, T + 1, dtype=torch.float64)
                    reached = torch.tril(reach).sum(-1).double()
                    if h == 0:
                        s["future"] += torch.triu(reach, diagonal=1).any(-1).sum().item()
                else:
                    available = torch.full((T,), float(T), dtype=torch.float64)
                    reached = reach.sum(-1).double()
                fraction = (reached / available).sum().item()
                if h == 0:
                    s["any"] += fraction
                    s["reached"] += reached.sum().item()
                else:
                    s["heads"][h - 1] += fraction
            s["words"] += T
        n_sentences += 1
    out = {"sentences": n_sentences, "encoder": [], "decoder": []}
    for (side, layer), s in sorted(sums.items(), key=lambda kv: (kv[0][0] != "encoder", kv[0][1])):
        out[side].append(
            {
                "layer": layer + 1,
                "any_head_fraction": s["any"] / s["words"],
                "per_head_fraction": [f / s["words"] for f in s["heads"]],
                "any_head_reached": s["reached"] / s["words"],
                "words": s["words"],
                "future_reaching_words": s["future"],
            }
        )
    return out


def test_samples(task, subset, limit):
    """(source, target) of the first LIMIT sentences of SUBSET, in the data set's order."""
    task.load_dataset(subset)
    ds = task.dataset(subset)
    n = len(ds) if limit is None else min(limit, len(ds))
    for i in range(n):
        item = ds[i]
        yield item["source"], item["target"]


def mean_length(task, subset, limit):
    lengths = [(s.numel(), t.numel()) for s, t in test_samples(task, subset, limit)]
    return sum(s for s, _ in lengths) / len(lengths), sum(t for _, t in lengths) / len(lengths)


def system_key(model: str, variant: str) -> str:
    """A system's name in the study's tables (significance.py's naming)."""
    return system_name(f"{model}/{variant}")


def pick_runs(records, seed, only=None):
    """The seed's record of each study system (model, variant), in SYSTEMS order; with ``only``
    (system names, as system_key gives them), of those systems alone."""
    picked = []
    for model, variant, label in SYSTEMS:
        if only is not None and system_key(model, variant) not in only:
            continue
        for r in records:
            if r.get("model") == model and r.get("variant") == variant and r.get("seed") == seed:
                picked.append((label, r))
                break
    return picked


def _side_summary(layers):
    """(any head, mean per head, lowest head, highest head, mean words reached) over LAYERS."""
    heads = [f for layer in layers for f in layer["per_head_fraction"]]
    return (
        sum(layer["any_head_fraction"] for layer in layers) / len(layers),
        sum(heads) / len(heads),
        min(heads),
        max(heads),
        sum(layer["any_head_reached"] for layer in layers) / len(layers),
    )


def render_markdown(result):
    """The generated block's lines: one row per system, each side averaged over its layers."""
    unit = result.get("unit", "sentences")
    lines = [
        f"Share of the words available to a word that its self-attention reaches, mean over the words of "
        f"{result['sentences']} {result['subset_label']} {unit} (mean length {result['mean_source_words']:.1f} "
        f"source and {result['mean_target_words']:.1f} target tokens, end-of-sentence included) and over the "
        "layers; a decoder word's available words are those up to and including itself. *Any head*: reached "
        "by at least one head (in brackets: how many words, on average); *per head*: the mean over heads, "
        "and the lowest and highest head of any layer. Seed-"
        f"{result['seed']} checkpoints of the study (`checkpoint_best.pt`)"
        + (", or the seed a row names" if any(_seed(s, result) != result["seed"] for s in result["systems"]) else "")
        + "; measured from gradients (scripts/experiments/attention_coverage.py).",
        "",
        "| system | encoder: any head | encoder: per head (lowest–highest) "
        "| decoder: any head | decoder: per head (lowest–highest) |",
        "|---|---|---|---|---|",
    ]
    future = 0
    for s in result["systems"]:
        cells = [s["label"] + (f" (seed {_seed(s, result)})" if _seed(s, result) != result["seed"] else "")]
        for side in ("encoder", "decoder"):
            any_head, per_head, low, high, reached = _side_summary(s[side])
            cells += [
                f"{100 * any_head:.0f} % ({reached:.1f})",
                f"{100 * per_head:.0f} % ({100 * low:.0f}–{100 * high:.0f} %)",
            ]
            future += sum(layer["future_reaching_words"] for layer in s[side])
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Decoder words whose output depends on a later word (a causality violation): {future}.",
        "",
        "```bash",
        *result.get("commands", [result.get("command")]),
        "```",
    ]
    return lines


def _seed(system, result) -> int:
    """The seed of a system's checkpoint (results written before rows could differ: the result's)."""
    return system.get("seed", result["seed"])


# what must agree between a result and the rows --update adds to it: the same words measured
_SAME_MEASURE = ("results", "subset", "sentences", "unit")


def merge(old, new):
    """``old`` with ``new``'s systems in place of its rows of the same systems (new ones added, in
    SYSTEMS order), and ``new``'s command after ``old``'s. Refuses results that measure different
    words (another study, test set or number of sentences)."""
    old = {"unit": "sentences", **old}  # results written before the unit was recorded: sentences
    differ = [
        f"{key} {old.get(key)!r} there, {new.get(key)!r} here" for key in _SAME_MEASURE if old.get(key) != new.get(key)
    ]
    if differ:
        raise ValueError("--update: the result to update measured other words: " + "; ".join(differ))
    order = [label for _, _, label in SYSTEMS]
    replaced = {s["label"] for s in new["systems"]}
    kept = [{"seed": old["seed"], **s} for s in old["systems"] if s["label"] not in replaced]
    systems = sorted(
        kept + new["systems"], key=lambda s: order.index(s["label"]) if s["label"] in order else len(order)
    )
    commands = [*old.get("commands", [old.get("command")]), *new["commands"]]
    return {**{k: v for k, v in old.items() if k != "command"}, "systems": systems, "commands": commands}


def _unit(record) -> str:
    """What a line of the record's test sets is: a document in the document study's data sets."""
    return "documents" if record.get("recipe") == "documents" else "sentences"


def _checkpoint(record) -> Path:
    run_dir = Path(record["run_dir"]) if Path(record["run_dir"]).is_absolute() else REPO / record["run_dir"]
    return run_dir / "checkpoints" / "checkpoint_best.pt"


def measure_run(label, record, subset, sentences, data=None):
    """One system: (its result entry, the test set's label, the mean source and target lengths)."""
    from fairseq_clusterformer.tools.show_clusters import load

    torch.manual_seed(0)  # the probes; per system, so that a result does not depend on --jobs
    torch.set_num_threads(1)
    started = time.time()
    model, task = load(
        _checkpoint(record), data or REPO / "work" / "experiments" / "data" / record["dataset"] / "data-bin"
    )
    lengths = mean_length(task, subset, sentences)
    subset_label = next((t["label"] for t in record.get("tests", []) if t.get("subset") == subset), subset)
    say(f"{record['run_id']}: measuring on {sentences} {subset_label} {_unit(record)}")
    measured = measure(model, test_samples(task, subset, sentences))
    say(f"{record['run_id']}: done in {time.time() - started:.0f} s")
    return {"label": label, "run_id": record["run_id"], **measured}, subset_label, lengths


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="the study's run records (jsonl)")
    p.add_argument("--seed", type=int, default=1, help="whose checkpoints (default: %(default)s)")
    p.add_argument("--subset", default="test", help="fairseq subset (default: %(default)s, test_2016)")
    p.add_argument("--sentences", type=int, default=1000, help="the first N sentences (default: %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--data", type=Path, default=None, help="data-bin (default: the runner's, from the records)")
    p.add_argument("--jobs", type=int, default=1, help="systems measured at once, one process each (default: 1)")
    p.add_argument(
        "--systems",
        help="measure only these systems, comma-separated, named as in the study's tables "
        "(transformer, clusterformer, routing, lsh-n-hashes=2, ...; default: every system with a record)",
    )
    p.add_argument(
        "--update",
        action="store_true",
        help="add the rows measured now to the result already in --out, in place of its rows of the same "
        "systems, keeping the others (each row names its seed)",
    )
    a = p.parse_args(argv)
    if a.sentences < 1:
        p.error("--sentences must be at least 1")
    if a.jobs < 1:
        p.error("--jobs must be at least 1")
    only = None
    if a.systems is not None:
        only = {name.strip() for name in a.systems.split(",") if name.strip()}
        known = {system_key(model, variant) for model, variant, _ in SYSTEMS}
        if not only or only - known:
            p.error(
                f"--systems: unknown system(s) {sorted(only - known) or a.systems!r}; known: {', '.join(sorted(known))}"
            )
    if a.update and not a.out.is_file():
        p.error(f"--update: no result at {a.out} to update")
    records = expkit.read_jsonl(a.results)
    runs = pick_runs(records, a.seed, only)
    if not runs:
        sys.exit(f"no runs of seed {a.seed} in {a.results}" + (f" for {a.systems}" if only else ""))
    for _, r in runs:
        if not _checkpoint(r).is_file():
            sys.exit(f"{r['run_id']}: no checkpoint at {_checkpoint(r)} (train the run first)")
    jobs = [(label, r, a.subset, a.sentences, a.data) for label, r in runs]
    if a.jobs == 1:
        measured = [measure_run(*job) for job in jobs]
    else:  # one system a process; spawned, so that no worker inherits the parent's torch state
        with ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            measured = list(pool.map(measure_run, *zip(*jobs)))
    machine = expkit.machine_info()
    # each row names its seed, and the machine that measured it (rows of one result may come from
    # several runs, --update)
    where = {key: machine.get(key) for key in ("cpu", "torch")}
    systems = [{**system, "seed": a.seed, "machine": where} for system, _, _ in measured]
    _, subset_label, lengths = measured[0]
    result = {
        "kind": KIND,
        "results": str(a.results),
        "seed": a.seed,
        "subset": a.subset,
        "subset_label": subset_label,
        "sentences": systems[0]["sentences"],
        "unit": _unit(runs[0][1]),
        "mean_source_words": lengths[0],
        "mean_target_words": lengths[1],
        "systems": systems,
        "commands": [
            expkit.shell_join(["python", "-m", "scripts.experiments.attention_coverage", *(argv or sys.argv[1:])])
        ],
        "machine": machine,
    }
    result = expkit.portable(result)
    if a.update:
        try:
            result = merge(json.loads(a.out.read_text()), result)
        except ValueError as e:
            sys.exit(str(e))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(render_markdown(result)))
    say(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
