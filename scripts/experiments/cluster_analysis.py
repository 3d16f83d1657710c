#!/usr/bin/env python3
"""What the clusters of a trained ClusterFormer group, per layer, over a whole test set.

    python -m scripts.experiments.cluster_analysis --path RUN/checkpoints/checkpoint_best.pt \\
        --data work/experiments/data/multi30k/data-bin \\
        --source work/experiments/data/multi30k/bpe/test_2016_flickr.de \\
        --target work/experiments/data/multi30k/bpe/test_2016_flickr.en \\
        --out docs/results/multi30k_annealed_clusters.json

Every sentence goes through the model once (the decoder teacher-forced on its reference); each
clustering layer's assignment of every token is read (clusterformer-show-clusters' recorder).
Per layer, over all tokens of the test set:

- clusters used per sentence, and the share of a sentence in its largest cluster (1: one cluster);
- position: normalised mutual information (NMI, 0 to 1) between a token's cluster and which third
  of its sentence it is in; 1 means the clusters are the sentence's beginning, middle and end;
- token class: NMI between the cluster and the token's class, punctuation / frequent word (the
  test set's 50 most frequent words) / other; 1 means the clusters are those classes;
- identity: NMI between the cluster and the token itself (whole words, BPE marks removed);
- per cluster, its share of the tokens and the words most over-represented in it (count in the
  cluster relative to the layer's, at least 5 occurrences; ties to the more frequent word).

NMI is I(C; Y) / sqrt(H(C) H(Y)), 0 when either side is constant. The JSON (kind
"cluster_analysis") is what docs/results.md's generated block and figure are rebuilt from
(scripts/experiments/report.py); nothing in the document is computed from a checkpoint.
"""

import argparse
import json
import math
import string
import sys
from collections import Counter, OrderedDict
from pathlib import Path

POSITION_BINS = 3
FREQUENT_WORDS = 50
TOP_WORDS = 6
MIN_COUNT = 5


def nmi(xs, ys):
    """Normalised mutual information I(X; Y) / sqrt(H(X) H(Y)) of two equally long label lists
    (0 when either is constant)."""
    if len(xs) != len(ys):
        raise ValueError(f"nmi needs equally long lists, got {len(xs)} and {len(ys)}")
    n = len(xs)
    if n == 0:
        return 0.0
    joint, px, py = Counter(zip(xs, ys)), Counter(xs), Counter(ys)
    hx = -sum(c / n * math.log(c / n) for c in px.values())
    hy = -sum(c / n * math.log(c / n) for c in py.values())
    if hx <= 0 or hy <= 0:
        return 0.0
    mi = sum(c / n * math.log(c * n / (px[x] * py[y])) for (x, y), c in joint.items())
    return max(0.0, min(1.0, mi / math.sqrt(hx * hy)))


def merge_bpe(tokens, ids):
    """Whole words from BPE tokens ("hun@@ d" -> "hund"), each with the cluster of its first piece."""
    words, clusters, current = [], [], ""
    for tok, c in zip(tokens, ids):
        if not current:
            clusters.append(c)
        if tok.endswith("@@"):
            current += tok[:-2]
            continue
        words.append(current + tok)
        current = ""
    if current:  # a dangling continuation mark
        words.append(current)
    return words, clusters


def token_class(word, frequent):
    if word == "</s>":
        return "end"
    if all(ch in string.punctuation for ch in word):
        return "punctuation"
    return "frequent" if word in frequent else "other"


def analyse(sentences):
    """SENTENCES: [(side, layer, words, clusters)] (whole words, -1 never). Returns the per-layer
    statistics (an OrderedDict keyed "side layer")."""
    counts = Counter(w for _side, _layer, words, _ in sentences for w in words)
    frequent = {w for w, _ in counts.most_common(FREQUENT_WORDS + 1) if w != "</s>"}
    by_layer = OrderedDict()
    for side, layer, words, clusters in sentences:
        acc = by_layer.setdefault(f"{side} {layer}", {"c": [], "pos": [], "cls": [], "word": [], "used": [], "big": []})
        n = len(words)
        acc["c"] += clusters
        acc["pos"] += [min(POSITION_BINS - 1, i * POSITION_BINS // n) for i in range(n)]
        acc["cls"] += [token_class(w, frequent) for w in words]
        acc["word"] += words
        sizes = Counter(clusters)
        acc["used"].append(len(sizes))
        acc["big"].append(max(sizes.values()) / n)
    out = OrderedDict()
    for key, acc in by_layer.items():
        total = Counter(acc["word"])
        clusters = []
        for c, size in sorted(Counter(acc["c"]).items()):
            inside = Counter(w for w, ci in zip(acc["word"], acc["c"]) if ci == c)
            lift = {
                w: (k / size) / (total[w] / len(acc["c"])) for w, k in inside.items() if k >= MIN_COUNT and w != "</s>"
            }
            # ties (words always in this cluster) go to the more frequent word
            top = sorted(lift, key=lambda w: (-round(lift[w], 9), -inside[w], w))[:TOP_WORDS]
            clusters.append({"cluster": c, "share": size / len(acc["c"]), "top_words": top})
        out[key] = {
            "tokens": len(acc["c"]),
            "sentences": len(acc["used"]),
            "clusters_used": sum(acc["used"]) / len(acc["used"]),
            "largest_share": sum(acc["big"]) / len(acc["big"]),
            "nmi_position": nmi(acc["c"], acc["pos"]),
            "nmi_token_class": nmi(acc["c"], acc["cls"]),
            "nmi_word": nmi(acc["c"], acc["word"]),
            "clusters": clusters,
        }
    return out


def collect(model, task, sources, targets, limit=None):
    """[(side, layer, words, clusters)] for each sentence pair and clustering layer."""
    from fairseq_clusterformer.tools.show_clusters import cluster_assignments

    rows = []
    for i, (src, tgt) in enumerate(list(zip(sources, targets))[:limit]):
        if not src.strip() or not tgt.strip():
            continue
        assignments, _ = cluster_assignments(model, task, src.strip(), tgt.strip())
        for side, (tokens, layers) in assignments.items():
            for li, ids in enumerate(layers, start=1):
                words, clusters = merge_bpe(tokens, ids)
                rows.append((side, li, words, clusters))
        if (i + 1) % 200 == 0:
            print(f"[cluster_analysis] {i + 1} sentences", file=sys.stderr, flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--path", required=True, type=Path, help="a clusterformer checkpoint")
    p.add_argument("--data", required=True, type=Path, help="its data-bin (dictionaries)")
    p.add_argument("--source", required=True, type=Path, help="test sentences, segmented like the training data")
    p.add_argument("--target", required=True, type=Path, help="their references, segmented the same way")
    p.add_argument("--limit", type=int, default=None, help="only the first N sentences")
    p.add_argument("--label", default=None, help="what the checkpoint is (default: its run folder's name)")
    p.add_argument("--out", required=True, type=Path, help="the JSON result")
    a = p.parse_args(argv)
    for f in (a.path, a.source, a.target):
        if not f.is_file():
            p.error(f"no such file: {f}")
    from fairseq_clusterformer.tools.show_clusters import load

    model, task = load(a.path, a.data)
    sources = a.source.read_text(encoding="utf-8").splitlines()
    targets = a.target.read_text(encoding="utf-8").splitlines()
    if len(sources) != len(targets):
        p.error(f"{a.source} has {len(sources)} lines, {a.target} {len(targets)}")
    layers = analyse(collect(model, task, sources, targets, a.limit))
    result = {
        "kind": "cluster_analysis",
        "model": a.label or a.path.parent.parent.name,
        "test_set": a.source.name,
        "position_bins": POSITION_BINS,
        "frequent_words": FREQUENT_WORDS,
        "layers": layers,
        "command": "python -m scripts.experiments.cluster_analysis " + " ".join(argv or sys.argv[1:]),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"[cluster_analysis] wrote {a.out} ({len(layers)} layers)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
