"""Thin helpers for end-to-end tests through fairseq's real command-line tools.

In the style of fairseq's own tests/utils.py (create_dummy_data, preprocess_translation_data,
train_translation_model, generate_main), but every step that runs the plugin runs the installed
console script (`fairseq-train`, `fairseq-generate`, ...) in a subprocess, exactly as a user runs
it. Binarising a corpus runs no plugin code: fairseq-preprocess's main runs in this process
(``binarise``), which spares a process start (importing fairseq, about 3 s) per corpus.
"""

import os
import random
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
USER_DIR = "fairseq_clusterformer"  # relative, as users pass it from the repo root
SHARED_DATA = REPO.parent / "shared" / "data"


def cli(name):
    """Path of a fairseq console script installed beside this interpreter."""
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        raise FileNotFoundError(f"{name} not found beside {sys.executable}; run scripts/bootstrap.sh")
    return str(path)


def run(cmd, cwd=REPO, env=None, check=True, timeout=900, input=None):
    """Run a command; on failure raise with the tail of its output (hydra is chatty on stderr)."""
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.setdefault("MKL_NUM_THREADS", "1")
    full_env["PYTHONWARNINGS"] = "ignore"
    if env:
        full_env.update(env)
    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
            f"--- stdout (tail) ---\n{proc.stdout[-4000:]}\n--- stderr (tail) ---\n{proc.stderr[-6000:]}"
        )
    return proc


# A toy "language pair": each source word maps to one target word, in the same order. Small enough
# that a 32-dim model learns it in a few hundred updates on the CPU.
SRC_VOCAB = [f"s{i}" for i in range(24)]
TGT_VOCAB = [f"t{i}" for i in range(24)]


def toy_pair(rng, min_len=2, max_len=12):
    n = rng.randint(min_len, max_len)
    ids = [rng.randrange(len(SRC_VOCAB)) for _ in range(n)]
    return " ".join(SRC_VOCAB[i] for i in ids), " ".join(TGT_VOCAB[i] for i in ids)


def write_toy_corpus(dest, n_train=600, n_valid=60, n_test=40, seed=1, min_len=2, max_len=12):
    """Write train/valid/test.{src,tgt} under dest; returns dest."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        pairs = [toy_pair(rng, min_len, max_len) for _ in range(n)]
        (dest / f"{split}.src").write_text("".join(p[0] + "\n" for p in pairs))
        (dest / f"{split}.tgt").write_text("".join(p[1] + "\n" for p in pairs))
    return dest


def binarise(args):
    """fairseq-preprocess ARGS, run in this process by fairseq's own main."""
    import logging

    from fairseq import options

    # fairseq_cli.preprocess calls logging.basicConfig(stream=sys.stdout) when imported: with a
    # handler on the root logger that is a no-op (a handler on pytest's captured stdout would
    # outlive the capture).
    guard = logging.NullHandler()
    logging.getLogger().addHandler(guard)
    try:
        from fairseq_cli import preprocess as fairseq_preprocess
    finally:
        logging.getLogger().removeHandler(guard)

    log = logging.getLogger("fairseq_cli.preprocess")
    handlers = list(log.handlers)
    try:
        fairseq_preprocess.main(options.get_preprocessing_parser().parse_args([str(a) for a in args]))
    finally:  # main adds a handler writing to <destdir>/preprocess.log at every call
        for handler in [h for h in log.handlers if h not in handlers]:
            log.removeHandler(handler)
            handler.close()


def preprocess(raw_dir, dest_dir, src="src", tgt="tgt", extra=()):
    binarise(
        [
            "--source-lang",
            src,
            "--target-lang",
            tgt,
            "--trainpref",
            Path(raw_dir) / "train",
            "--validpref",
            Path(raw_dir) / "valid",
            "--testpref",
            Path(raw_dir) / "test",
            "--destdir",
            dest_dir,
            "--workers",
            "1",
            "--joined-dictionary",
            *extra,
        ]
    )
    return Path(dest_dir)


def train(data_bin, save_dir, arch, extra=(), max_update=50, user_dir=True, env=None, check=True):
    cmd = [
        cli("fairseq-train"),
        data_bin,
        "--arch",
        arch,
        "--save-dir",
        save_dir,
        "--optimizer",
        "adam",
        "--lr",
        "0.005",
        "--lr-scheduler",
        "inverse_sqrt",
        "--warmup-updates",
        "20",
        "--max-tokens",
        "500",
        "--max-update",
        str(max_update),
        "--dropout",
        "0.0",
        "--cpu",
        "--seed",
        "1",
        "--num-workers",
        "0",
        "--log-format",
        "simple",
        "--log-interval",
        "10",
        "--no-progress-bar",
        "--required-batch-size-multiple",
        "1",
        *extra,
    ]
    if user_dir:
        cmd[1:1] = ["--user-dir", USER_DIR]
    return run(cmd, env=env, check=check)


def generate(data_bin, checkpoint, extra=(), user_dir=True, check=True, gen_subset="test"):
    cmd = [
        cli("fairseq-generate"),
        data_bin,
        "--path",
        checkpoint,
        "--gen-subset",
        gen_subset,
        "--beam",
        "2",
        "--batch-size",
        "16",
        "--cpu",
        "--required-batch-size-multiple",
        "1",
        *extra,
    ]
    if user_dir:
        cmd[1:1] = ["--user-dir", USER_DIR]
    return run(cmd, check=check)


# A small ClusterFormer: the real architecture, at test size.
TINY = [
    "--encoder-layers",
    "2",
    "--decoder-layers",
    "2",
    "--encoder-embed-dim",
    "32",
    "--decoder-embed-dim",
    "32",
    "--encoder-ffn-embed-dim",
    "64",
    "--decoder-ffn-embed-dim",
    "64",
    "--encoder-attention-heads",
    "4",
    "--decoder-attention-heads",
    "4",
    "--share-all-embeddings",
    "--causal-window",
    "8",
]
CLUSTER_CRITERION = ["--criterion", "label_smoothed_cross_entropy_with_clustering", "--label-smoothing", "0.1"]


LINE = re.compile(r"^([STHDP])-(\d+)\t(.*)$")


def parse_generate(stdout):
    """{sentence id: {'S': src, 'T': ref, 'H': (score, hyp), 'P': [floats]}} from fairseq-generate."""
    out = {}
    for line in stdout.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        kind, idx, rest = m.group(1), int(m.group(2)), m.group(3)
        entry = out.setdefault(idx, {})
        if kind == "H":
            score, hyp = rest.split("\t", 1)
            entry["H"] = (float(score), hyp)
        elif kind == "P":
            entry["P"] = [float(x) for x in rest.split()]
        elif kind == "D":
            continue
        else:
            entry[kind] = rest
    return out


def assert_incremental_scores_equal_score_reference(data_bin, checkpoint, tmp, n=20):
    """Per-token scores of beam-1 incremental decoding equal --score-reference's full-forward
    scores of the same tokens (the decoder's incremental state is exact). Returns the beam-1
    output ({id: entry}, as parse_generate)."""
    import torch

    gen = parse_generate(generate(data_bin, checkpoint, extra=["--beam", "1"]).stdout)
    assert sorted(gen) == list(range(n))
    # The hypotheses become the references of a new test set, scored with --score-reference.
    tmp = Path(tmp)
    (tmp / "test.src").write_text("".join(gen[i]["S"] + "\n" for i in sorted(gen)))
    (tmp / "test.tgt").write_text("".join(gen[i]["H"][1] + "\n" for i in sorted(gen)))
    binarise([
        "--source-lang", "src", "--target-lang", "tgt", "--testpref", tmp / "test",
        "--destdir", tmp / "bin", "--srcdict", Path(data_bin) / "dict.src.txt",
        "--tgtdict", Path(data_bin) / "dict.tgt.txt", "--workers", "1",
    ])  # fmt: skip
    scored = parse_generate(generate(tmp / "bin", checkpoint, extra=["--score-reference"]).stdout)
    assert sorted(scored) == sorted(gen)
    for i in sorted(gen):
        a, b = torch.tensor(gen[i]["P"]), torch.tensor(scored[i]["P"])
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=2e-4, rtol=0)  # fairseq prints 4 decimals
    return gen


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_two_process_ddp(data_bin, save_dir, extra=(), max_update=8):
    """fairseq-train of a tiny clusterformer_iwslt (TINY, the clustering criterion, EXTRA) on 2 CPU
    processes over gloo (tests/ddp_driver.py, the only way fairseq runs DDP on the CPU: FAIRSEQ-NOTES
    item 3). Returns (rank 0's log, rank 0's and rank 1's saved {"model", "num_updates"})."""
    import os
    import subprocess
    import sys

    import torch

    common = [
        str(data_bin), "--user-dir", USER_DIR, "--arch", "clusterformer_iwslt", *TINY, *CLUSTER_CRITERION,
        "--optimizer", "adam", "--lr", "0.005", "--max-tokens", "300", "--max-update", str(max_update),
        "--cpu", "--seed", "3", "--num-workers", "0", "--log-format", "simple", "--log-interval", "1",
        "--no-progress-bar", "--save-dir", str(save_dir), "--required-batch-size-multiple", "1",
        "--distributed-world-size", "2", "--distributed-init-method", f"tcp://127.0.0.1:{_free_port()}",
        "--distributed-no-spawn", "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests"), "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "ddp_driver.py"), *common, "--distributed-rank", str(r)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for r in (0, 1)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    assert "training on 2 devices" in logs[0]  # only rank 0 logs
    ranks = [torch.load(Path(save_dir) / f"params_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["num_updates"] == ranks[1]["num_updates"] == max_update
    for name in ranks[0]["model"]:
        assert torch.equal(ranks[0]["model"][name], ranks[1]["model"][name]), name
    return logs[0], ranks[0], ranks[1]


def build_toy_model(data_bin, extra=()):
    """(task, model in eval mode, args): a tiny clusterformer_iwslt (TINY) built in-process on
    DATA_BIN's dictionaries, with EXTRA model flags; torch seeded, so equal calls build equal models."""
    import torch
    from fairseq import options, tasks

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, [str(data_bin), "--task", "translation", "--arch", "clusterformer_iwslt", *TINY, *extra]
    )
    task = tasks.setup_task(args)
    torch.manual_seed(0)
    return task, task.build_model(args).eval(), args


def toy_batch(task, n=4, src_len=9, tgt_len=11, seed=0):
    """(source tokens, source lengths, previous output tokens) of N random sentences of TASK's
    dictionaries, the source ending in </s> and the target starting with it."""
    import torch

    g = torch.Generator().manual_seed(seed)
    d = task.source_dictionary
    src = torch.randint(d.nspecial, len(d), (n, src_len), generator=g)
    src[:, -1] = d.eos()
    prev = torch.randint(d.nspecial, len(d), (n, tgt_len), generator=g)
    prev[:, 0] = d.eos()
    return src, torch.full((n,), src_len), prev


def assert_decoding_with_reordering_equals_full_forward(task, model, tgt_len=12, reorder_at=6):
    """The decoder step by step, its incremental state reordered at REORDER_AT as beam search does
    (beams of one sentence share its source, as fairseq's cross-attention cache assumes), equals
    the full forward of the reordered prefixes."""
    import torch

    src, lengths, prev = toy_batch(task, n=3, tgt_len=tgt_len)
    src = src[:1].expand_as(src).contiguous()
    enc = model.encoder(src, lengths)
    full, _ = model.decoder(prev, encoder_out=enc)
    order = torch.tensor([2, 0, 0])
    state, steps, history = {}, [], prev[:, :0]
    for t in range(prev.size(1)):
        if t == reorder_at:
            model.decoder.reorder_incremental_state_scripting(state, order)
            enc = model.encoder.reorder_encoder_out(enc, order)
            history = history[order]
            steps = [s[order] for s in steps]
        history = torch.cat([history, (prev if t < reorder_at else prev[order])[:, t : t + 1]], 1)
        y, _ = model.decoder(history, encoder_out=enc, incremental_state=state)
        steps.append(y)
    expected, _ = model.decoder(history, encoder_out=enc)
    torch.testing.assert_close(torch.cat(steps, 1), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(expected[:, :reorder_at], full[order][:, :reorder_at], atol=1e-5, rtol=1e-5)


def assert_interactive_translates_every_line(data_bin, checkpoint, beam=3):
    """fairseq-interactive with beam search translates three toy lines, one hypothesis each."""
    lines = ["s1 s2 s3", "s5", "s7 s7 s8 s9 s10 s11 s12 s13 s14"]
    cmd = [
        cli("fairseq-interactive"), str(data_bin), "--user-dir", USER_DIR, "--path", str(checkpoint),
        "--source-lang", "src", "--target-lang", "tgt", "--beam", str(beam), "--cpu",
    ]  # fmt: skip
    out = run(cmd, input="\n".join(lines) + "\n")
    hyps = re.findall(r"^H-(\d+)\t", out.stdout, flags=re.M)
    assert sorted(map(int, hyps)) == [0, 1, 2], out.stdout[-2000:]
