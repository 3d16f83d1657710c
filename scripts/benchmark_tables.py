"""Rebuild the tables of docs/benchmarks.md from the raw CSVs committed beside it.

    python -m scripts.benchmark_tables                 # rewrite the generated blocks in place
    python -m scripts.benchmark_tables --check         # exit 1 if the doc differs from the CSVs

Inputs (docs/data/cpu/): the CSVs that ``python -m scripts.benchmark_attention --csv`` and
``python -m scripts.benchmark_translation --csv`` write (attn_train.csv, attn_forward.csv,
attn_scaling_b1.csv, check2048.csv, check2048_t<threads>.csv, short_lengths.csv, translation.csv,
profile_*.txt; launches.csv, launches_models.csv and launches_generate.csv from
``python -m scripts.count_launches``; shapes_multi30k.csv and shapes_multi30k_docs_mr.csv from
``python -m scripts.count_shapes``), and docs/data/gpu/
for the GPU section (bench_attention.csv, translation.csv, compile_attention.csv, translation_512.csv,
cli_precision.json, profile_softmax.txt). Each generated block of the doc sits
between ``<!-- BEGIN GENERATED name -->`` and ``<!-- END GENERATED name -->``; the text around
the blocks is left alone (scripts/harness_common.py rewrites them). A missing or empty CSV is an
error: a table is never replaced by nothing.
"""

import argparse
import csv
import json
import re
import sys
from pathlib import Path

from scripts.benchmark_attention import fit_exponent, read_rows, series_label
from scripts.harness_common import GeneratedBlockError, generated_blocks, rewrite_generated

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
DATA = REPO / "docs" / "data" / "cpu"
DATA_GPU = REPO / "docs" / "data" / "gpu"
ATTENTION_ORDER = [
    "cluster k=sqrt",
    "cluster k=3",
    "cluster-compiled k=sqrt",
    "cluster-causal k=sqrt",
    "cluster-causal k=3",
    "cluster-causal-compiled k=sqrt",
    "cluster-blocks k=3",
    "cluster-causal-blocks k=3",
    "full",
    "sdpa",
    "flash",
    "naive",
    "proj",
    "lsh-1",
    "lsh-4",
    "lsh-8",
    "routing",
    "sparse k=sqrt",
    "sparse k=3",
    "sparse-causal k=sqrt",
    "sparse-causal k=3",
    "linformer-32",
    "linformer-256",
]
HEADINGS = {
    "cluster k=sqrt": "cluster k=√N",
    "cluster-causal k=sqrt": "cluster-causal k=√N",
    "cluster-compiled k=sqrt": "cluster compiled",
    "cluster-causal-compiled k=sqrt": "cluster-causal compiled",
    "sparse k=sqrt": "sparse l≈√N",
    "sparse-causal k=sqrt": "sparse-causal l≈√N",
}


class TableError(Exception):
    pass


def _rows(name, data=DATA):
    path = Path(data) / name
    if not path.exists():
        raise TableError(f"{path} is missing: it holds the raw results behind a table of {DOC.name}")
    rows = (
        read_rows(path)
        if not name.startswith(("translation", "launches", "shapes"))  # benchmark_attention CSVs
        else list(csv.DictReader(path.open()))
    )
    if not rows:
        raise TableError(f"{path} holds no rows: refusing to replace a table with nothing")
    return rows


def _fmt(value):
    if value is None:
        return "—"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def _by_series(rows):
    table = {}
    for r in rows:
        table[(r["n"], series_label(r))] = r
    series = [s for s in ATTENTION_ORDER if any(k[1] == s for k in table)]
    return table, series


def attention_tables(rows, memory=True):
    """The time table and (unless not MEMORY) the memory table of one sweep (markdown)."""
    table, series = _by_series(rows)
    ns = sorted({n for n, _ in table})
    head = "| N | batch | " + " | ".join(HEADINGS.get(s, s) for s in series) + " |"
    rule = "|" + "---|" * (len(series) + 2)
    out = []
    fields = (("Time per step (ms)", "time_ms"), ("Extra peak memory (MiB)", "peak_mb"))
    for title, field in fields if memory else fields[:1]:
        out += [f"**{title}**", "", head, rule]
        for n in ns:
            batch = next(table[(n, s)]["batch"] for s in series if (n, s) in table)
            cells = [_fmt(table[(n, s)][field]) if (n, s) in table else "—" for s in series]
            out.append(f"| {n} | {batch} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out).rstrip()


def baselines_ratios(rows, n=2048, ours="cluster k=3"):
    """ClusterFormer's time and memory against each baseline at N = n (side by side)."""
    table, series = _by_series(rows)
    base = table.get((n, ours))
    parts = []
    for s in series:
        r = table.get((n, s))
        if base is None or r is None or s == ours:
            continue
        parts.append(
            f"{HEADINGS.get(s, s)}: time **{base['time_ms'] / r['time_ms']:.2f}**, "
            f"memory **{base['peak_mb'] / r['peak_mb']:.2f}**"
        )
    return f"At N = {n}, {HEADINGS.get(ours, ours)} / " + "; ".join(parts) + "."


def exponents(rows, lo=1024, hi=8192):
    """Fitted exponents of time per sequence on lo <= N <= hi, one line per series."""
    table, series = _by_series(rows)
    parts = []
    for s in series:
        pts = sorted((n, r["time_ms"] / r["batch"]) for (n, name), r in table.items() if name == s and lo <= n <= hi)
        if len(pts) >= 2:
            value = fit_exponent([p[0] for p in pts], [p[1] for p in pts])
            parts.append(f"{HEADINGS.get(s, s)} **{value:.2f}**")
    return (
        f"Fitted exponents of time per sequence on {lo} ≤ N ≤ {hi} (least squares on log-log): "
        + ", ".join(parts)
        + "."
    )


def check_table(rows):
    """The N = 2048 side-by-side check: time, rounds, ratios, memory."""
    table, series = _by_series(rows)
    base = table[(2048, "cluster k=sqrt")]
    has_rounds = all(r.get("rounds_ms") for r in table.values())
    out = [
        "| | time (ms) |" + (" rounds |" if has_rounds else "") + " ratio cluster / this | peak memory (MiB) | "
        "ratio cluster / this |",
        "|---|---|" + ("---|" if has_rounds else "") + "---|---|---|",
    ]
    for s in series:
        r = table[(2048, s)]
        t_ratio = "—" if s == "cluster k=sqrt" else f"{base['time_ms'] / r['time_ms']:.3f}"
        m_ratio = "—" if s == "cluster k=sqrt" else f"{base['peak_mb'] / r['peak_mb']:.3f}"
        rounds = f" {r['rounds_ms']} |" if has_rounds else ""
        out.append(
            f"| {HEADINGS.get(s, s)} | {r['time_ms']:.0f} |{rounds} {t_ratio} | {r['peak_mb']:.1f} | {m_ratio} |"
        )
    return "\n".join(out)


def translation_tables(rows):
    """Whole-model rows: the MT-length table and the synthetic-length table."""
    ours, theirs = "clusterformer_iwslt", "transformer_iwslt_de_en"
    index = {(r["setting"], r["phase"], r["arch"]): r for r in rows}
    out = ["| setting | phase | clusterformer_iwslt | transformer_iwslt_de_en | ratio |", "|---|---|---|---|---|"]
    settings = []
    for r in rows:
        if r["setting"] not in settings:
            settings.append(r["setting"])
    for setting in settings:
        for phase in ("train", "generate"):
            # ours: clusterformer_iwslt, or a variant of it ("+auto": --num-clusters auto; "+lsh",
            # "+routing": the baselines' self-attention on both sides)
            mine = next(
                (r for (s, p, a), r in index.items() if (s, p) == (setting, phase) and a.startswith(ours)), None
            )
            other = index.get((setting, phase, theirs))
            if not mine or not other:
                continue
            ratio = float(mine["rate"]) / float(other["rate"])
            variant = mine["arch"][len(ours) :].lstrip("+")
            if variant.startswith("threads"):  # the same models at another torch thread count
                label = f"{setting} ({variant[len('threads') :]} torch threads)"
            else:
                label = {"": setting, "auto": f"{setting} (`--num-clusters auto`)"}.get(
                    variant, f"{setting} ({variant} self-attention on both sides)"
                )
            out.append(
                f"| {label} | {phase} | {float(mine['rate']):.4g} {mine['unit']} | "
                f"{float(other['rate']):.4g} {other['unit']} | **{ratio:.2f}** |"
            )
    return "\n".join(out)


def summary(train, check, translation, check_threads=None):
    """The headline ratios, each from numbers measured side by side in one run. check_threads:
    (thread count, file name, rows) of the N = 2048 check at the default thread count."""
    t, _ = _by_series(check)
    c, f, s = t[(2048, "cluster k=sqrt")], t[(2048, "full")], t[(2048, "sdpa")]
    sweep, _ = _by_series(train)
    naive = sweep.get((2048, "naive"))
    cluster_sweep = sweep.get((2048, "cluster k=sqrt"))
    idx = {(r["setting"], r["phase"], r["arch"]): float(r["rate"]) for r in translation}
    mt_train = idx[("mt", "train", "clusterformer_iwslt")] / idx[("mt", "train", "transformer_iwslt_de_en")]
    mt_gen = idx[("mt", "generate", "clusterformer_iwslt")] / idx[("mt", "generate", "transformer_iwslt_de_en")]
    pts = sorted(
        (n, r["time_ms"] / r["batch"])
        for (n, name), r in sweep.items()
        if name == "cluster k=sqrt" and 1024 <= n <= 8192
    )
    expo = fit_exponent([p[0] for p in pts], [p[1] for p in pts])
    rows = [
        ("N = 2048 training step, 1 thread, cluster / full", f"{c['time_ms'] / f['time_ms']:.2f}", "check2048.csv"),
        ("N = 2048 training step, 1 thread, cluster / sdpa", f"{c['time_ms'] / s['time_ms']:.2f}", "check2048.csv"),
    ]
    if check_threads:
        n_threads, name, rows_t = check_threads
        tt, _ = _by_series(rows_t)
        ct, ft, st = tt[(2048, "cluster k=sqrt")], tt[(2048, "full")], tt[(2048, "sdpa")]
        rows += [
            (
                f"N = 2048 training step, {n_threads} threads, cluster / full",
                f"{ct['time_ms'] / ft['time_ms']:.2f}",
                name,
            ),
            (
                f"N = 2048 training step, {n_threads} threads, cluster / sdpa",
                f"{ct['time_ms'] / st['time_ms']:.2f}",
                name,
            ),
        ]
    rows += [
        ("N = 2048 peak memory, cluster / sdpa", f"{c['peak_mb'] / s['peak_mb']:.2f}", "check2048.csv"),
    ]
    if naive and cluster_sweep:
        rows.append(
            (
                "N = 2048 peak memory, cluster / naive",
                f"{cluster_sweep['peak_mb'] / naive['peak_mb']:.2f}",
                "attn_train.csv",
            )
        )
    rows += [
        ("time exponent of cluster k=√N, 1024 ≤ N ≤ 8192", f"{expo:.2f}", "attn_train.csv"),
        ("MT lengths, training throughput, clusterformer / transformer", f"{mt_train:.2f}", "translation.csv"),
        ("MT lengths, beam-5 generation, clusterformer / transformer", f"{mt_gen:.2f}", "translation.csv"),
    ]
    for (setting, phase, arch), rate in idx.items():  # the same at the default thread count
        if setting.startswith("mt-threads") and arch.startswith("clusterformer_iwslt"):
            n_threads = setting[len("mt-threads") :]
            what = "training throughput" if phase == "train" else "beam-5 generation"
            ratio = rate / idx[(setting, phase, "transformer_iwslt_de_en")]
            rows.append(
                (
                    f"MT lengths, {n_threads} threads, {what}, clusterformer / transformer",
                    f"{ratio:.2f}",
                    "translation.csv",
                )
            )
    out = ["| quantity | measured | raw data |", "|---|---|---|"]
    out += [f"| {a} | **{b}** | `docs/data/cpu/{c}` |" for a, b, c in rows]
    return "\n".join(out)


def ratio_line(rows, ours="cluster k=sqrt", others=("flash", "sdpa")):
    """Time and memory of OURS over each of OTHERS, per N (side by side in one run)."""
    table, _ = _by_series(rows)
    parts = []
    for n in sorted({n for n, _ in table}):
        mine = table.get((n, ours))
        if mine is None:
            continue
        cells = [
            f"{o} {mine['time_ms'] / table[(n, o)]['time_ms']:.2f} / {mine['peak_mb'] / table[(n, o)]['peak_mb']:.2f}"
            for o in others
            if (n, o) in table
        ]
        parts.append(f"| {n} | " + " | ".join(cells) + " |")
    head = "| N | " + " | ".join(f"{HEADINGS.get(ours, ours)} / {o} (time / memory)" for o in others) + " |"
    return "\n".join([head, "|" + "---|" * (len(others) + 1), *parts])


def compile_ratios(rows):
    """Per N, side by side in one run: the compiled layer against the eager one, and both
    against torch's flash kernel (time and extra peak memory, each a ratio)."""
    table, _ = _by_series(rows)
    pairs = (
        ("cluster-compiled k=sqrt", "cluster k=sqrt"),
        ("cluster k=sqrt", "flash"),
        ("cluster-compiled k=sqrt", "flash"),
        ("cluster-causal-compiled k=sqrt", "cluster-causal k=sqrt"),
        ("cluster-causal k=sqrt", "flash"),
        ("cluster-causal-compiled k=sqrt", "flash"),
    )
    head = "| N | " + " | ".join(f"{HEADINGS.get(a, a)} / {HEADINGS.get(b, b)}" for a, b in pairs) + " |"
    out = [head, "|" + "---|" * (len(pairs) + 1)]
    for n in sorted({n for n, _ in table}):
        cells = []
        for a, b in pairs:
            ra, rb = table.get((n, a)), table.get((n, b))
            cells.append(
                "—"
                if ra is None or rb is None
                else f"{ra['time_ms'] / rb['time_ms']:.2f} / {ra['peak_mb'] / rb['peak_mb']:.2f}"
            )
        out.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def softmax_table(text):
    """The CUDA clustering softmax both ways, from scripts/gpu/profile_softmax.sh's output."""
    runs, variant, shape = {}, None, None
    for line in text.splitlines():
        if line.startswith("## variant"):
            variant = line.split()[-1]
        elif m := re.match(r"# N (\d+), batch (\d+),.* k (\d+),", line):
            shape = tuple(int(g) for g in m.groups())
        elif m := re.match(r"step ([\d.]+) ms .*GPU busy ([\d.]+) ms of it; (\d+) kernels", line):
            runs[(shape, variant)] = [float(m.group(1)), float(m.group(2)), int(m.group(3))]
        elif line.startswith("| aten::_softmax |") and (shape, variant) in runs:
            runs[(shape, variant)].append(float(line.split("|")[2]))
    shapes = sorted({k[0] for k in runs})
    if not shapes:
        raise TableError("profile_softmax.txt holds no profiled steps")
    out = [
        "| N | batch | k | step, strided softmax (ms) | its softmax (GPU ms) | step, transposed (ms) | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for shape in shapes:
        a, b = runs.get((shape, "strided")), runs.get((shape, "transposed"))
        if not a or not b:
            continue
        soft = f"{a[3]:.2f}" if len(a) > 3 else "< top 6"
        out.append(
            f"| {shape[0]} | {shape[1]} | {shape[2]} | {a[0]:.2f} | {soft} | {b[0]:.2f} | **{a[0] / b[0]:.2f}×** |"
        )
    return "\n".join(out)


def precision_table(runs):
    out = [
        "| precision | fairseq command | loss, first → last log | overflow skips after warm-up | decoding "
        "vs `--score-reference` (max abs diff, tolerance) |",
        "|---|---|---|---|---|",
    ]
    for r in runs:
        out.append(
            f"| {r['precision']} | `{r['train']}` | {r['first_loss']} → {r['last_loss']} | "
            f"{r['overflow_skips_after_warmup']} | {r['decode']} ({r['max_abs_diff']:.2g}, {r['tolerance']:g}, "
            f"{r['decode_dtype']}) |"
        )
    return "\n".join(out)


def profile_tables(text):
    """The markdown tables a profiler printed (python -m scripts.profile_attention, or
    python -m scripts.benchmark_translation --profile), each under its header line in italics."""
    out = []
    for line in text.splitlines():
        if line.startswith(("# N ", "# profile:")):
            out += ["", f"*{line[2:].strip()}*", ""]
        elif line.startswith("|"):
            out.append(line)
        elif line.startswith("mt ") and " ratio " in line:  # benchmark_translation's timing lines
            out += ([] if out and out[-1] == "" else [""]) + [f"`{line.strip()}`", ""]
    if not any(line.startswith("|") for line in out):
        raise TableError("a profile file holds no table")
    return "\n".join(out).strip()


def launches_table(rows, what="layer"):
    """The launch counts of scripts/count_launches.py (the rows of its --csv), one row per layer
    (or model, WHAT names the column) and length."""
    cells = {(r["impl"], r["n"], r["padded"]): r for r in rows}
    lines = [
        f"| {what} | N | launches, no padding (forward + backward) | with padding "
        "| host syncs (no padding / padding) |",
        "|---|---|---|---|---|",
    ]
    for impl, n in dict.fromkeys((r["impl"], r["n"]) for r in rows):
        a, b = cells.get((impl, n, "0")), cells.get((impl, n, "1"))

        def launches(r):
            return "—" if r is None else f"{r['launches']} ({r['forward_launches']} + {r['backward_launches']})"

        syncs = " / ".join("—" if r is None else r["host_syncs"] for r in (a, b))
        lines.append(f"| {impl} | {n} | {launches(a)} | {launches(b)} | {syncs} |")
    return "\n".join(lines)


def generation_launches_table(rows, baseline="transformer_iwslt_de_en"):
    """The per-output-token launch counts of beam search (the rows of scripts/count_launches.py
    --generate --csv), one row per model and length, with each model's launches as a multiple
    of BASELINE's at the same length."""
    base = {r["n"]: float(r["launches_per_step"]) for r in rows if r["model"] == baseline}
    lines = [
        "| model | N (source and output tokens) | launches per output token | × the Transformer's "
        "| host syncs per output token |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{float(r['launches_per_step']) / base[r['n']]:.2f}" if r["n"] in base else "—"
        lines.append(f"| {r['model']} | {r['n']} | {r['launches_per_step']} | {ratio} | {r['host_syncs_per_step']} |")
    return "\n".join(lines)


def _text(name, data):
    path = Path(data) / name
    if not path.exists():
        raise TableError(f"{path} is missing: it holds the raw results behind a table of {DOC.name}")
    return path.read_text()


def gpu_blocks(data=DATA_GPU):
    attention = _rows("bench_attention.csv", data)
    translation = _rows("translation.csv", data)
    return {
        "gpu_train": attention_tables(attention)
        + "\n\n"
        + exponents(attention, 4096, 65536)
        + "\n\n"
        + ratio_line(attention),
        "gpu_translation": translation_tables(translation),
        "gpu_compile": attention_tables(_rows("compile_attention.csv", data))
        + "\n\n**Ratios (time / extra peak memory)**\n\n"
        + compile_ratios(_rows("compile_attention.csv", data)),
        "gpu_translation_now": translation_tables(_rows("translation_512.csv", data)),
        "gpu_precision": precision_table(json.loads(_text("cli_precision.json", data))),
        "gpu_softmax": softmax_table(_text("profile_softmax.txt", data)),
    }


def _check_threads(data):
    """(threads, file name, rows) of the one check2048_t<threads>.csv in DATA, or None."""
    found = sorted(Path(data).glob("check2048_t*.csv"))
    if len(found) > 1:
        raise TableError(f"more than one default-thread check in {data}: {', '.join(p.name for p in found)}")
    if not found:
        return None
    return found[0].stem[len("check2048_t") :], found[0].name, _rows(found[0].name, data)


def blocks(data=DATA, data_gpu=DATA_GPU):
    train, forward = _rows("attn_train.csv", data), _rows("attn_forward.csv", data)
    scaling, check = _rows("attn_scaling_b1.csv", data), _rows("check2048.csv", data)
    translation = _rows("translation.csv", data)
    baselines = _rows("baselines_train.csv", data)
    fixed = _rows("baselines_fixed_train.csv", data)
    return {
        "baselines_fixed": attention_tables(fixed)
        + "\n\n"
        + exponents(fixed, 512, 2048)
        + "\n\n"
        + baselines_ratios(fixed),
        "baselines_fixed_long": attention_tables(_rows("baselines_fixed_long.csv", data))
        + "\n\n"
        + exponents(_rows("baselines_fixed_long.csv", data), 4096, 16384)
        + "\n\n"
        + baselines_ratios(_rows("baselines_fixed_long.csv", data), 16384, "cluster k=sqrt"),
        "baselines": attention_tables(baselines)
        + "\n\n"
        + exponents(baselines, 512, 2048)
        + "\n\n"
        + baselines_ratios(baselines),
        "summary": summary(train, check, translation, _check_threads(data)),
        "train": attention_tables(train) + "\n\n" + exponents(train),
        "scaling": attention_tables(scaling) + "\n\n" + exponents(scaling),
        "check2048": check_table(check),
        "forward": attention_tables(forward) + "\n\n" + exponents(forward),
        "translation": translation_tables(translation),
        "short": attention_tables(_rows("short_lengths.csv", data), memory=False),
        "profile_layer": "\n\n".join(profile_tables(_text(f"profile_2048_t{t}.txt", data)) for t in (1, 2)),
        "profile_mt": "\n\n".join(profile_tables(_text(f"profile_mt_t{t}.txt", data)) for t in (1, 2)),
        "launches": launches_table(_rows("launches.csv", data)),
        "launches_models": launches_table(_rows("launches_models.csv", data), "model"),
        "launches_generate": generation_launches_table(_rows("launches_generate.csv", data)),
        "shapes": shapes_table(_rows("shapes_multi30k.csv", data) + _rows("shapes_multi30k_docs_mr.csv", data)),
        **gpu_blocks(data_gpu),
    }


def shapes_table(rows):
    """The distinct batch shapes of an epoch (scripts/count_shapes.py --csv rows, several files
    concatenated): one row per data set, batching and --required-seq-len-multiple."""
    lines = [
        "| data | --max-tokens, --required-batch-size-multiple | --required-seq-len-multiple | batches "
        "| encoder shapes | decoder shapes | median sentences per batch |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        data = Path(r["data"])
        name = data.parent.name if data.name == "data-bin" else data.name
        lines.append(
            f"| {name} | {r['max_tokens']}, {r['required_batch_size_multiple']} | {r['required_seq_len_multiple']} "
            f"| {r['batches']} | {r['encoder_shapes']} | {r['decoder_shapes']} | {r['median_batch_size']} |"
        )
    return "\n".join(lines)


def render(text, generated):
    """TEXT with the body of each generated block named in GENERATED (name -> markdown) replaced."""
    try:
        present = {block.tag for block in generated_blocks(text)}
    except GeneratedBlockError as err:
        raise TableError(f"{DOC.name}: {err}") from None
    for name in generated:
        if name not in present:
            begin, end = f"<!-- BEGIN GENERATED {name} -->", f"<!-- END GENERATED {name} -->"
            raise TableError(f"{DOC.name} has no '{begin}' ... '{end}' block for the {name} table")
    return rewrite_generated(text, generated)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the doc's tables differ from the CSVs")
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--data", type=Path, default=DATA, help="folder of the raw CSVs (default: %(default)s)")
    parser.add_argument("--data-gpu", type=Path, default=DATA_GPU, help="the GPU section's (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        text = args.doc.read_text()
        new = render(text, blocks(args.data, args.data_gpu))
    except TableError as err:
        print(f"benchmark_tables: {err}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            print(f"benchmark_tables: {args.doc} differs from docs/data; run python -m scripts.benchmark_tables")
            return 1
        print(f"{args.doc}: tables match the CSVs")
        return 0
    args.doc.write_text(new)
    print(f"rewrote the generated tables of {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
