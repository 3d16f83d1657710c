"""One screen summing up scripts/gpu/check.sh from the files it wrote.

python -m scripts.gpu.summary --status STATUS.tsv --out OUTDIR --log OUTDIR/check.log
"""

import argparse
import csv
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def read_status(path):
    rows = []
    for line in Path(path).read_text().splitlines():
        name, status, seconds = line.split("\t")
        rows.append((name, status, int(seconds)))
    return rows


def pytest_lines(xml_path):
    if not xml_path.exists():
        return ["tests: no junit file (pytest did not run)"]
    root = ET.parse(xml_path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n, fail, err, skip = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    lines = [f"tests: {n - fail - err - skip} passed, {fail} failed, {err} errors, {skip} skipped (of {n})"]
    for case in suite.iter("testcase"):
        for kind in ("failure", "error"):
            bad = case.find(kind)
            if bad is not None:
                msg = (bad.get("message") or "").splitlines()
                lines.append(f"  {kind.upper()} {case.get('name')}: {(msg[0] if msg else '')[:110]}")
    return lines[:12]


def precision_lines(json_path):
    if not json_path.exists():
        return ["precision: no results file"]
    lines = ["precision (tiny fairseq runs; decode = beam-1 hypotheses rescored with --score-reference):"]
    for r in json.loads(json_path.read_text()):
        if not r["trained"]:
            lines.append(f"  {r['precision']:22s} TRAINING FAILED ({r['train']}): {r.get('error', '')[:80]}")
            continue
        diff = r.get("max_abs_diff")
        decode = r.get("decode", "-")
        detail = (
            f"max |diff| {diff:.2g}, tolerance {r['tolerance']:.0e}, {r['decode_dtype']}" if diff is not None else ""
        )
        lines.append(
            f"  {r['precision']:22s} loss {r['first_loss']} -> {r['last_loss']}, overflow skips "
            f"{r['overflow_skips']} ({r['overflow_skips_after_warmup']} after warm-up), decode {decode} ({detail})"
        )
    return lines


ATTN_ORDER = (
    "cluster",
    "cluster-causal",
    "full",
    "sdpa",
    "flash",
    "naive",
    "lsh-1",
    "lsh-4",
    "lsh-8",
    "routing",
    "proj",
)
STOPPED = re.compile(r"^(ERROR|OOM|TIMEOUT|cap)\s+\S+\s+N=\s*(\d+) (.+?)\s+batch\s+(\d+): (.*)$", re.M)


def _short(impl):
    """An implementation's name in 8 characters: cluster-causal-flex-compiled -> cc-flx-c."""
    for long, short in (("cluster-causal", "cc"), ("cluster-", "c-"), ("linformer-", "lin-")):
        if impl.startswith(long) and impl != "cluster-causal":
            impl = short + impl[len(long) :]
    impl = impl.replace("-compiled", "-c").replace("-graphs", "-grf").replace("flex", "flx")
    return {"cluster-causal": "causal", "sparse-causal": "sparse-c"}.get(impl, impl)[:8]


def attention_lines(csv_path, log_text):
    """Per N: time (ms) and extra peak memory (MiB) of each method, and cluster / sdpa and
    cluster / flash ratios of both; then every clustering variant's time and memory as a
    multiple of flash's (or of sdpa's where flash did not run)."""
    if not csv_path.exists():
        return ["attention: no CSV"]
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return ["attention: empty CSV"]
    by_n = {}
    for r in rows:
        by_n.setdefault(int(r["n"]), {})[r["impl"]] = r
    impls = [i for i in ATTN_ORDER if any(i in cells for cells in by_n.values())]
    impls += list(dict.fromkeys(r["impl"] for r in rows if r["impl"] not in impls))  # the others, in run order
    head = " ".join(f"{_short(i):>8s}" for i in impls)
    lines = [
        "attention, training step: time ms | extra peak MiB | cluster/sdpa and cluster/flash (time, mem)",
        f"  {'N':>6s} {'b':>3s} {head} | {head} |",
    ]
    for n in sorted(by_n):
        cells = by_n[n]
        batch = next(iter(cells.values()))["batch"]
        t = " ".join(f"{float(cells[i]['time_ms']):8.3g}" if i in cells else f"{'-':>8s}" for i in impls)
        m = " ".join(f"{float(cells[i]['peak_mb']):8.4g}" if i in cells else f"{'-':>8s}" for i in impls)
        ratios = []
        for base in ("sdpa", "flash"):
            if "cluster" in cells and base in cells:
                rt = float(cells["cluster"]["time_ms"]) / float(cells[base]["time_ms"])
                base_mb = float(cells[base]["peak_mb"])
                rm = f"{float(cells['cluster']['peak_mb']) / base_mb:.2f}" if base_mb >= 0.05 else "-"
                ratios.append(f"{rt:.2f} {rm}")
            else:
                ratios.append("-")
        lines.append(f"  {n:6d} {batch:>3s} {t} | {m} | " + " / ".join(ratios))
    variants = [i for i in impls if i.startswith("cluster")]
    if len(variants) > 1:
        lines.append("  clustering variants / flash (sdpa where flash did not run), time x memory x:")
        for n in sorted(by_n):
            cells = by_n[n]
            base = "flash" if "flash" in cells else "sdpa" if "sdpa" in cells else None
            if base is None:
                continue
            parts = []
            for i in (v for v in variants if v in cells):
                rt = float(cells[i]["time_ms"]) / float(cells[base]["time_ms"])
                base_mb = float(cells[base]["peak_mb"])
                rm = f"{float(cells[i]['peak_mb']) / base_mb:.2f}" if base_mb >= 0.05 else "-"
                parts.append(f"{_short(i)} {rt:.2f} {rm}")
            lines.append(f"    N={n} vs {base}: " + ", ".join(parts))
    exps = re.findall(r"# time exponent \S+\s+\S+ (.+?)\s+(-?[\d.]+|nan)\s+\(N", log_text)
    if exps:
        lines.append("  time exponents: " + ", ".join(f"{name.strip()} {value}" for name, value in exps))
    for status, n, label, batch, msg in STOPPED.findall(log_text)[:6]:
        what = "over the time cap" if status == "cap" else f"{status}: {msg.strip()[:70]}"
        lines.append(f"  stopped: {label.strip()} at N={n}, batch {batch} ({what})")
    return lines


def translation_lines(csv_path):
    if not csv_path.exists():
        return ["translation: no CSV"]
    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if r["arch"].startswith("clusterformer")]
    if not rows:
        return ["translation: no rows"]
    return [
        "translation (clusterformer_iwslt / transformer_iwslt_de_en): "
        + ", ".join(
            f"{r['arch'].replace('clusterformer_iwslt', 'cf')} {r['setting']} {r['phase']} {float(r['ratio']):.2f} "
            f"({float(r['rate']):.4g} {r['unit']})"
            for r in rows
        )
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--status", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--dry-run", default="0")
    p.add_argument("--seconds", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    log_text = Path(args.log).read_text(errors="replace") if Path(args.log).exists() else ""
    status = read_status(args.status)
    dry = args.dry_run == "1"
    head = "GPU CHECK" + (" -- DRY RUN on the CPU (tiny sizes; not GPU numbers)" if dry else "")
    gpu = re.search(r"^(NVIDIA [^\n]+)$", log_text, re.M)
    lines = [f"{head}: {args.seconds} s" + (f" on {gpu.group(1)}" if gpu else "")]
    lines.append("steps: " + ", ".join(f"{n} {s} ({t} s)" for n, s, t in status))
    torch_line = re.search(r"^torch \S+ cuda \S+ fairseq \S+.*$", log_text, re.M)
    if torch_line:
        lines.append("installed: " + torch_line.group(0))
    lines += pytest_lines(out / "pytest_cuda.xml")
    lines += precision_lines(out / "cli_precision.json")
    if dry:
        lines.append(
            "  (dry run: fp16 itself needs CUDA (fairseq's FP16Optimizer); "
            "bf16 and memory-efficient-fp16 ran on the CPU)"
        )
    lines += attention_lines(out / "attention.csv", log_text)
    lines += translation_lines(out / "translation.csv")
    ok = all(s in ("ok",) or s.startswith("skipped") for _, s, _ in status)
    lines.append(f"RESULT: {'all steps ok' if ok else 'SOME STEPS FAILED: see check.log'}; files in {out}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
