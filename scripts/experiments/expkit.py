"""The experiment harness's pieces on top of the product's runner (fairseq_clusterformer/tools/runs.py).

scripts/experiments/*.py use this module; it knows the checkout (``REPO``): the committed code
that runs are pinned to (:func:`code_snapshot`, ``git archive``), the commit a record names
(:func:`git_commit`), and the working directory of every fairseq command (the checkout, so that
the paths in the records are relative to it). On top of the product's runner it adds:

- :func:`run_measured`: :func:`fairseq_clusterformer.tools.runs.run_measured` run from the checkout;
- :func:`generate_and_score` translates a subset with ``fairseq-generate``, keeps fairseq's
  tokenised BLEU line and computes sacrebleu on detokenised text against a raw reference;
- the raw results' format: one JSON record per line (:func:`append_jsonl`, :func:`read_jsonl`),
  with the paths inside the checkout relative to it (:func:`portable`, :func:`rel`).

Everything the product's runner has (``train_command``, ``parse_train_log``, ``SMALL_MODEL``, ...) is
re-exported here, so that the harness reads ``expkit.train_command`` like the rest.
"""

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from fairseq_clusterformer.tools import mt_prep  # network-free tokeniser, BPE, detokeniser, generate-output parser
from fairseq_clusterformer.tools.runs import (  # noqa: F401  (re-exported for the harness)
    CLUSTER_CRITERION,
    DEVICES,
    PLAIN_CRITERION,
    PROGRESS,
    SMALL_MODEL,
    TRAIN_SETTINGS,
    USER_DIR,
    annealed_settings,
    best_valid,
    child_env,
    device_args,
    machine_info,
    parse_train_log,
    say,
    shell_join,
    split_extra_args,
    tool,
    train_command,
)
from fairseq_clusterformer.tools.runs import run_measured as _run_measured

REPO = Path(__file__).resolve().parents[2]  # the checkout


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


def run_measured(cmd, log_path, cwd=REPO, env=None, echo=PROGRESS, poll_s=0.5):
    """The product's run_measured (output to LOG_PATH, progress lines, wall time, peak memory),
    run from the checkout unless CWD says otherwise."""
    return _run_measured(cmd, log_path, cwd=cwd, env=env, echo=echo, poll_s=poll_s)


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


def rel(text):
    """TEXT with the checkout's absolute path made relative ("docs/..." or ".")."""
    return str(text).replace(str(REPO) + "/", "").replace(str(REPO), ".")


def portable(value):
    """A record with every path inside the checkout made relative to it, so that the committed
    raw results (and the tables built from them) do not depend on where the checkout lives."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v) for v in value]
    return rel(value) if isinstance(value, str) else value


def run_dir(record):
    """A record's run folder (recorded relative to the checkout)."""
    path = Path(record.get("run_dir") or "/nonexistent")
    return path if path.is_absolute() else REPO / path
