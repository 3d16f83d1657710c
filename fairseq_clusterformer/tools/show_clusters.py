#!/usr/bin/env python3
"""Show which tokens each ClusterFormer layer groups together, for one sentence.

    clusterformer-show-clusters --path CHECKPOINT.pt --data DATA_BIN \\
        --sentence "ein hund läuft durch das gras ." [--target "a dog runs through the grass ."] \\
        [--out clusters.png]

The sentence (and target) must already be tokenised and segmented exactly like the training data
(e.g. Moses-tokenised and BPE'd: "ein hun@@ d ..."); with no --sentence it is read from stdin (first
line; a second line, if any, is the target). Prints, per layer, cluster -> tokens (in sentence
order), and draws a PNG: one row per layer (encoder, then decoder when a target is given), one
column per token, the colour of a cell = its cluster id.

With --stats SRC_FILE [--stats-target TGT_FILE] it instead summarises many sentences (one per
line, same segmentation): per layer, the mean number of clusters used per sentence and the mean
share of a sentence's tokens that fall in its largest cluster (1.0 = everything in one cluster).

Encoder clusters are the paper's: the first layer scores words against its learned centroids,
later layers against the previous layer's updated centroids. Decoder clusters come from each
decoder layer's own learned centroids, computed in one teacher-forced forward over
"</s> target..." (the decoder's input: column t shows the token fed at position t, whose cluster
decides which earlier tokens it attends to; see docs/attention.md).
"""

import argparse
import sys
from collections import OrderedDict
from pathlib import Path


def load(path, data, user_dir=None):
    if user_dir:
        from fairseq import utils as fairseq_utils

        fairseq_utils.import_user_module(argparse.Namespace(user_dir=str(user_dir)))
    from fairseq import checkpoint_utils

    import fairseq_clusterformer  # noqa: F401  (registers the model; safe checkpoint loading)

    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(path)], arg_overrides={"data": str(data)})
    model = models[0]
    model.eval()
    return model, task


def _encode(dictionary, text):
    ids = dictionary.encode_line(text, add_if_not_exist=False, append_eos=True).long()
    words = text.split() + ["</s>"]
    unk = [w for w, i in zip(words, ids.tolist()) if i == dictionary.unk()]
    return ids, words, unk


def cluster_assignments(model, task, sentence, target=None):
    """{"encoder": (tokens, [per-layer list of cluster ids]), "decoder": (...) if target}."""
    import torch

    from fairseq_clusterformer.models.clusterformer import ClusterformerModel
    from fairseq_clusterformer.modules import ClusterAttention

    if not isinstance(model, ClusterformerModel):
        raise SystemExit(f"this checkpoint is not a clusterformer model (it is {type(model).__name__})")
    recorded = {"encoder": [], "decoder": []}

    def recorder(side):
        def hook(module, args, output):
            recorded[side].append(output[1].assignments)

        return hook

    hooks = [
        m.register_forward_hook(recorder(side))
        for side in recorded
        for m in getattr(model, side).modules()
        if isinstance(m, ClusterAttention)
    ]
    src_ids, src_words, src_unk = _encode(task.source_dictionary, sentence)
    out = OrderedDict()
    warnings = []
    if src_unk:
        warnings.append(f"source tokens not in the dictionary (shown, but encoded as <unk>): {' '.join(src_unk)}")
    with torch.no_grad():  # the hooks record each clustering layer's assignments, in layer order
        src_tokens = src_ids.unsqueeze(0)
        src_lengths = torch.tensor([src_ids.numel()])
        if target is None:
            model.encoder(src_tokens, src_lengths=src_lengths)
        else:
            tgt_ids, tgt_words, tgt_unk = _encode(task.target_dictionary, target)
            if tgt_unk:
                warnings.append(f"target tokens not in the dictionary: {' '.join(tgt_unk)}")
            eos = task.target_dictionary.eos()
            prev = torch.cat([torch.tensor([eos]), tgt_ids[:-1]]).unsqueeze(0)  # teacher forcing input
            model(src_tokens, src_lengths, prev)
    for h in hooks:
        h.remove()
    out["encoder"] = (src_words, [a[0].tolist() for a in recorded["encoder"]])
    if target is not None:
        dec_words = ["</s>"] + tgt_words[:-1]
        out["decoder"] = (dec_words, [a[0].tolist() for a in recorded["decoder"]])
    for side, (_words, layers) in out.items():
        if not layers:
            warnings.append(f"the {side} has no clustering layers (--self-attention-{side} full)")
    return out, warnings


def text_report(assignments):
    lines = []
    for side, (words, layers) in assignments.items():
        for li, ids in enumerate(layers, start=1):
            groups = OrderedDict()
            for w, c in zip(words, ids):
                if c >= 0:
                    groups.setdefault(c, []).append(w)
            sizes = ", ".join(f"{len(groups[c])}" for c in sorted(groups))
            lines.append(f"{side} layer {li}: {len(groups)} cluster(s) used, sizes {sizes}")
            for c in sorted(groups):
                lines.append(f"  cluster {c}: {' '.join(groups[c])}")
    return "\n".join(lines)


def cluster_stats(model, task, sources, targets=None, limit=None):
    """{(side, layer): {"clusters_used": mean, "largest_share": mean, "n": sentences}}."""
    sums = OrderedDict()
    pairs = list(zip(sources, targets if targets is not None else [None] * len(sources)))
    for src, tgt in pairs[:limit]:
        if not src.strip():
            continue
        assignments, _ = cluster_assignments(model, task, src.strip(), tgt.strip() if tgt else None)
        for side, (_words, layers) in assignments.items():
            for li, ids in enumerate(layers, start=1):
                real = [c for c in ids if c >= 0]
                counts = [real.count(c) for c in set(real)]
                acc = sums.setdefault((side, li), [0.0, 0.0, 0])
                acc[0] += len(counts)
                acc[1] += max(counts) / len(real)
                acc[2] += 1
    return OrderedDict(
        (key, {"clusters_used": a / n, "largest_share": b / n, "n": n}) for key, (a, b, n) in sums.items()
    )


def draw(assignments, out_path, title=None):
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq may have set the root to DEBUG
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    panels = [(side, w, layers) for side, (w, layers) in assignments.items() if layers]
    if not panels:
        raise SystemExit("nothing to draw: no clustering layers")
    n_clusters = max(max(max(ids) for ids in layers) for _s, _w, layers in panels) + 1
    palette = plt.get_cmap("tab10" if n_clusters <= 10 else "tab20").colors
    cmap = ListedColormap(["#ffffff"] + list(palette[: max(n_clusters, 1)]))
    norm = BoundaryNorm(np.arange(-1.5, n_clusters + 0.5), cmap.N)
    max_cols = max(len(w) for _s, w, _l in panels)
    heights = [len(layers) for _s, _w, layers in panels]
    fig, axes = plt.subplots(
        len(panels),
        1,
        squeeze=False,
        dpi=80,
        figsize=(min(2 + 0.55 * max_cols, 18), 1.3 + 0.45 * sum(heights) + 0.9 * len(panels)),
        gridspec_kw={"height_ratios": heights},
    )
    for ax, (side, words, layers) in zip(axes[:, 0], panels):
        grid = np.array(layers)
        ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto")
        for (r, c), v in np.ndenumerate(grid):
            if v >= 0:
                ax.text(c, r, str(v), ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(words)))
        ax.set_xticklabels(words, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels([f"{side} L{i}" for i in range(1, len(layers) + 1)], fontsize=8)
        ax.set_xticks(np.arange(-0.5, len(words)), minor=True)
        ax.set_yticks(np.arange(-0.5, len(layers)), minor=True)
        ax.grid(which="minor", color="#888888", linewidth=0.5)
        ax.tick_params(which="minor", length=0)
    handles = [Patch(facecolor=palette[i], edgecolor="#888888", label=f"cluster {i}") for i in range(n_clusters)]
    fig.legend(handles=handles, loc="upper right", fontsize=8, ncol=min(n_clusters, 8), frameon=False)
    if title:
        fig.suptitle(title, fontsize=9, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--path", required=True, help="a clusterformer checkpoint (.pt)")
    p.add_argument("--data", required=True, help="the binarised data folder (for the dictionaries)")
    p.add_argument("--user-dir", default=None, help="fairseq --user-dir (default: import fairseq_clusterformer)")
    p.add_argument("--sentence", default=None, help="source sentence, tokenised and BPE'd (default: stdin)")
    p.add_argument("--target", default=None, help="target sentence (tokenised, BPE'd): also show the decoder")
    p.add_argument("--out", default="clusters.png", help="PNG to write (default: %(default)s); '' for none")
    p.add_argument("--title", default=None)
    p.add_argument("--stats", default=None, help="summarise the clusters of every line of this source file")
    p.add_argument("--stats-target", default=None, help="with --stats: the matching target file (decoder too)")
    p.add_argument("--limit", type=int, default=None, help="with --stats: only the first N lines")
    a = p.parse_args(argv)
    if a.stats:
        model, task = load(a.path, a.data, a.user_dir)
        sources = Path(a.stats).read_text(encoding="utf-8").splitlines()
        targets = Path(a.stats_target).read_text(encoding="utf-8").splitlines() if a.stats_target else None
        stats = cluster_stats(model, task, sources, targets, a.limit)
        print(f"{'layer':<12} {'sentences':>9} {'clusters used':>14} {'largest cluster share':>22}")
        for (side, li), st in stats.items():
            print(f"{side + ' L' + str(li):<12} {st['n']:>9} {st['clusters_used']:>14.2f} {st['largest_share']:>22.2f}")
        return 0
    sentence, target = a.sentence, a.target
    if sentence is None:
        lines = [line.strip() for line in sys.stdin.read().splitlines() if line.strip()]
        if not lines:
            p.error("no sentence given (--sentence or stdin)")
        sentence = lines[0]
        if target is None and len(lines) > 1:
            target = lines[1]
    model, task = load(a.path, a.data, a.user_dir)
    assignments, warnings = cluster_assignments(model, task, sentence, target)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(text_report(assignments))
    if a.out:
        draw(assignments, a.out, a.title or f"{Path(a.path).name}: cluster of each token, per layer")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
