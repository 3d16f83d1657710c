"""Translation throughput: clusterformer_iwslt against transformer_iwslt_de_en, side by side.

For each setting, both models are built in this process through fairseq's own APIs
(fairseq.tasks.setup_task, task.build_model, task.build_criterion, task.get_batch_iterator) on
the same binarised data, and are timed on the same batches, alternating one model and the other
step by step (so that load from other processes hits both alike):

  train     forward + backward + Adam step (torch.optim.Adam, lr 5e-4 for both), dropout as the
            architecture sets it; clusterformer with its criterion
            label_smoothed_cross_entropy_with_clustering, the transformer with
            label_smoothed_cross_entropy (both label smoothing 0.1). Reported in target tokens/s.
  generate  fairseq.sequence_generator.SequenceGenerator, beam 5, on the same source batches,
            with a fixed number of output steps (max_len_a 0, max_len_b = min_len = L): both
            models decode exactly L tokens per hypothesis, whatever their weights. Reported in
            sentences/s.

Models are randomly initialised (seeded): throughput does not depend on the weights, and the
forced output length keeps the decoded work identical.

Settings (``--settings``):
  mt        real IWSLT14 de-en (BPE) from --data-dir: a --train-lines subset of train-sample for
            training batches and the first --gen-sentences test sentences for generation;
            binarised once with fairseq-preprocess --joined-dictionary into --work-dir.
  <L>       synthetic pairs of exactly L tokens per side (random words from a 1000-word
            vocabulary), e.g. 512,1024,2048; max positions raised to fit.

Run from the repository root as ``python -m scripts.benchmark_translation``.
--device cuda runs both models on the GPU (timed after a synchronize), in --dtype (float32 by
default; bfloat16 or float16 cast both models, as fairseq's --bf16/--fp16 do).

Example (all settings at the defaults):
  python -m scripts.benchmark_translation --settings mt,512,1024,2048 --csv /tmp/mt.csv
docs/benchmarks.md ran shorter versions of these (fewer steps, smaller generation batches,
--phases to run one phase); its Commands section has the exact lines.
A tiny smoke run:
  python -m scripts.benchmark_translation --settings 64 --layers 1 --embed-dim 32 --ffn-dim 64 \\
      --heads 4 --train-steps 2 --gen-batches 1 --csv /tmp/mt.csv
"""

import argparse
import csv
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHS = ("clusterformer_iwslt", "transformer_iwslt_de_en")
CRITERIA = {
    "clusterformer_iwslt": "label_smoothed_cross_entropy_with_clustering",
    "transformer_iwslt_de_en": "label_smoothed_cross_entropy",
}
CSV_COLUMNS = [
    "setting",
    "phase",
    "arch",
    "steps",
    "sentences",
    "tokens",
    "time_s",
    "rate",
    "unit",
    "ratio",
]


def log(msg):
    print(msg, flush=True)


def cli(name):
    path = Path(sys.executable).with_name(name)
    return str(path) if path.exists() else name


def preprocess(raw: Path, dest: Path, src: str, tgt: str, splits, workers=1):
    """fairseq-preprocess --joined-dictionary, once (kept when dest already has the dictionary)."""
    if (dest / f"dict.{src}.txt").exists() and all((dest / f"{s}.{src}-{tgt}.{src}.bin").exists() for s in splits):
        return dest
    cmd = [
        cli("fairseq-preprocess"),
        "--source-lang",
        src,
        "--target-lang",
        tgt,
        "--destdir",
        str(dest),
        "--joined-dictionary",
        "--workers",
        str(workers),
    ]
    for split in splits:
        cmd += [f"--{'train' if split == 'train' else 'test'}pref", str(raw / split)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"fairseq-preprocess failed:\n{proc.stderr[-3000:]}")
    return dest


def prepare_mt(args) -> Path:
    data = Path(args.data_dir)
    raw = Path(args.work_dir) / f"mt-raw-{args.train_lines}-{args.gen_sentences}"
    raw.mkdir(parents=True, exist_ok=True)
    for lang in ("de", "en"):
        train = (data / "train-sample" / f"train.{lang}").read_text().splitlines()[: args.train_lines]
        test = (data / f"test.{lang}").read_text().splitlines()[: args.gen_sentences]
        (raw / f"train.{lang}").write_text("\n".join(train) + "\n")
        (raw / f"test.{lang}").write_text("\n".join(test) + "\n")
    return preprocess(
        raw,
        Path(args.work_dir) / f"mt-bin-{args.train_lines}-{args.gen_sentences}",
        "de",
        "en",
        ("train", "test"),
    )


def prepare_synthetic(args, length: int) -> Path:
    n_train = max(2, args.max_tokens // length) * (args.train_steps + args.warmup + 1)
    n_test = args.gen_batch_size * (args.gen_batches + args.gen_warmup)
    raw = Path(args.work_dir) / f"syn-raw-{length}-{n_train}-{n_test}"
    raw.mkdir(parents=True, exist_ok=True)
    rng = random.Random(length)
    vocab = [f"w{i}" for i in range(1000)]
    for split, n in (("train", n_train), ("test", n_test)):
        for lang in ("src", "tgt"):
            lines = [" ".join(rng.choice(vocab) for _ in range(length)) for _ in range(n)]
            (raw / f"{split}.{lang}").write_text("\n".join(lines) + "\n")
    return preprocess(
        raw,
        Path(args.work_dir) / f"syn-bin-{length}-{n_train}-{n_test}",
        "src",
        "tgt",
        ("train", "test"),
    )


def build(arch, data_bin, src, tgt, args, max_positions):
    """task, model, criterion as fairseq-train would build them (in-process)."""
    import torch
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    argv = [
        str(data_bin),
        "--task",
        "translation",
        "--source-lang",
        src,
        "--target-lang",
        tgt,
        "--arch",
        arch,
        "--criterion",
        CRITERIA[arch],
        "--label-smoothing",
        "0.1",
        "--user-dir",
        str(REPO / "fairseq_clusterformer"),
        "--seed",
        str(args.seed),
        "--max-source-positions",
        str(max_positions),
        "--max-target-positions",
        str(max_positions),
        "--share-all-embeddings",
    ] + (["--cpu"] if args.device == "cpu" else [])
    if args.layers:
        argv += [
            "--encoder-layers",
            str(args.layers),
            "--decoder-layers",
            str(args.layers),
        ]
    if args.embed_dim:
        argv += [
            "--encoder-embed-dim",
            str(args.embed_dim),
            "--decoder-embed-dim",
            str(args.embed_dim),
        ]
    if args.ffn_dim:
        argv += [
            "--encoder-ffn-embed-dim",
            str(args.ffn_dim),
            "--decoder-ffn-embed-dim",
            str(args.ffn_dim),
        ]
    if args.heads:
        argv += [
            "--encoder-attention-heads",
            str(args.heads),
            "--decoder-attention-heads",
            str(args.heads),
        ]
    if arch.startswith("clusterformer") and args.cluster_args:
        argv += args.cluster_args.split()
    parser = options.get_training_parser()
    ns = options.parse_args_and_arch(parser, argv)
    cfg = convert_namespace_to_omegaconf(ns)
    torch.manual_seed(args.seed)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model).to(device=args.device, dtype=getattr(torch, args.dtype))
    criterion = task.build_criterion(cfg.criterion)
    return task, model, criterion


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _to_device(sample, device):
    from fairseq import utils

    return utils.move_to_cuda(sample) if device == "cuda" else sample


def batches(task, split, max_tokens, max_sentences, max_positions, count, seed=1):
    task.load_dataset(split)
    itr = task.get_batch_iterator(
        dataset=task.dataset(split),
        max_tokens=max_tokens,
        max_sentences=max_sentences,
        max_positions=(max_positions, max_positions),
        ignore_invalid_inputs=True,
        required_batch_size_multiple=1,
        seed=seed,
        num_workers=0,
    ).next_epoch_itr(shuffle=split == "train")
    out = []
    for sample in itr:
        out.append(sample)
        if len(out) == count:
            break
    return out


def time_training(models, samples, warmup, device="cpu"):
    """{arch: [seconds per step]} over the same samples, alternating the models step by step."""
    import torch

    optims = {a: torch.optim.Adam(m.parameters(), lr=5e-4) for a, (m, _) in models.items()}
    times = {a: [] for a in models}
    for i, sample in enumerate(samples):
        for arch, (model, criterion) in models.items():
            model.train()
            _sync(device)
            t0 = time.perf_counter()
            loss, _sample_size, _ = criterion(model, sample)
            loss.backward()
            optims[arch].step()
            optims[arch].zero_grad(set_to_none=True)
            _sync(device)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[arch].append(dt)
    return times


def time_generation(models, tgt_dict, samples, beam, out_len, warmup, device="cpu"):
    import torch
    from fairseq.sequence_generator import SequenceGenerator

    gens = {
        a: SequenceGenerator(
            [m],
            tgt_dict,
            beam_size=beam,
            max_len_a=0,
            max_len_b=out_len,
            min_len=out_len,
        )
        for a, (m, _) in models.items()
    }
    times = {a: [] for a in models}
    lengths = {a: [] for a in models}
    for i, sample in enumerate(samples):
        for arch, (model, _) in models.items():
            model.eval()
            _sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                hypos = gens[arch].generate([model], sample)
            _sync(device)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[arch].append(dt)
                lengths[arch] += [len(h[0]["tokens"]) for h in hypos]
    return times, lengths


def profile_models(models, run_once, title, rows):
    """Self CPU time by operator for each model running RUN_ONCE(model, criterion) once, and the
    ROWS operators where the first model (clusterformer) spends the most beyond the second."""
    from torch.profiler import profile

    per_model = {}
    for arch, (model, criterion) in models.items():
        with profile() as prof:
            run_once(model, criterion)
        per_model[arch] = {e.key: (e.self_cpu_time_total / 1000, e.count) for e in prof.key_averages()}
    ours, theirs = (per_model[a] for a in ARCHS)
    total = {a: sum(ms for ms, _ in per_model[a].values()) for a in ARCHS}
    calls = {a: sum(n for _, n in per_model[a].values()) for a in ARCHS}
    keys = sorted(set(ours) | set(theirs), key=lambda k: -(ours.get(k, (0, 0))[0] - theirs.get(k, (0, 0))[0]))
    log(f"# profile: {title}; self CPU time by operator (one run each)")
    log(f"| operator | {ARCHS[0]} ms (calls) | {ARCHS[1]} ms (calls) | difference ms |")
    log("|---|---|---|---|")
    for k in keys[:rows]:
        (a, na), (b, nb) = ours.get(k, (0.0, 0)), theirs.get(k, (0.0, 0))
        log(f"| {k} | {a:.1f} ({na}) | {b:.1f} ({nb}) | {a - b:+.1f} |")
    log(
        f"| all operators | {total[ARCHS[0]]:.1f} ({calls[ARCHS[0]]}) | {total[ARCHS[1]]:.1f} ({calls[ARCHS[1]]}) "
        f"| {total[ARCHS[0]] - total[ARCHS[1]]:+.1f} |"
    )


def _csv_setting(setting, args):
    """The CSV's setting: the setting, with --tag appended ("mt-lsh")."""
    return f"{setting}-{args.tag}" if args.tag else setting


def _csv_arch(arch, args):
    """The CSV's arch: clusterformer_iwslt+TAG for a tagged run (its --cluster-args differ)."""
    return f"{arch}+{args.tag}" if args.tag and arch == ARCHS[0] else arch


def run_setting(setting, args, writer, f):
    import torch

    if setting == "mt":
        data_bin, src, tgt = prepare_mt(args), "de", "en"
        max_positions, out_len = 1024, args.gen_len
    else:
        length = int(setting)
        data_bin, src, tgt = prepare_synthetic(args, length), "src", "tgt"
        max_positions, out_len = max(1024, length + 16), min(length, args.gen_len_long)
    built = {}
    for arch in ARCHS:
        task, model, criterion = build(arch, data_bin, src, tgt, args, max_positions)
        built[arch] = (task, model, criterion)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"# {setting}: {arch}: {n_params / 1e6:.1f}M parameters, {sum(1 for _ in model.modules())} modules")
    task = built[ARCHS[0]][0]
    models = {a: (m, c) for a, (_, m, c) in built.items()}

    if "train" in args.phases:
        run_training(task, models, args, max_positions, setting, writer, f)
    if "generate" in args.phases:
        run_generation(task, models, args, max_positions, out_len, setting, writer, f)
    del built, models
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def run_training(task, models, args, max_positions, setting, writer, f):
    train_samples = batches(
        task,
        "train",
        args.max_tokens,
        None,
        max_positions,
        args.train_steps + args.warmup,
    )
    samples = [_to_device(s, args.device) for s in train_samples]
    times = time_training(models, samples, args.warmup, args.device)
    if args.profile:
        profile_models(
            models,
            lambda model, criterion: time_training({"m": (model, criterion)}, samples[-1:], 0, args.device),
            f"{setting}, one training step ({int(samples[-1]['ntokens'])} target tokens)",
            args.profile,
        )
    timed = train_samples[args.warmup :]
    tokens = sum(int(s["ntokens"]) for s in timed)
    sents = sum(int(s["nsentences"]) for s in timed)
    rates = {a: tokens / sum(t) for a, t in times.items()}
    for arch in ARCHS:
        ratio = rates[arch] / rates[ARCHS[1]]
        writer.writerow(
            [
                _csv_setting(setting, args),
                "train",
                _csv_arch(arch, args),
                len(timed),
                sents,
                tokens,
                f"{sum(times[arch]):.3f}",
                f"{rates[arch]:.1f}",
                "target_tokens/s",
                f"{ratio:.3f}",
            ]
        )
        log(
            f"{setting:6s} train    {arch:26s} {rates[arch]:9.1f} target tokens/s  ({len(timed)} steps, "
            f"{tokens} target tokens, {sents} sentences; per-step median {statistics.median(times[arch]):.3f} s)  "
            f"ratio {ratio:.3f}"
        )
    f.flush()


def run_generation(task, models, args, max_positions, out_len, setting, writer, f):
    gen_samples = batches(
        task,
        "test",
        None,
        args.gen_batch_size,
        max_positions,
        args.gen_batches + args.gen_warmup,
    )
    samples = [_to_device(s, args.device) for s in gen_samples]
    times, lengths = time_generation(
        models, task.target_dictionary, samples, args.beam, out_len, args.gen_warmup, args.device
    )
    if args.profile:
        profile_models(
            models,
            lambda model, criterion: time_generation(
                {"m": (model, criterion)}, task.target_dictionary, samples[-1:], args.beam, out_len, 0, args.device
            ),
            f"{setting}, one generation batch ({int(samples[-1]['nsentences'])} sentences, beam {args.beam}, "
            f"{out_len} steps)",
            args.profile,
        )
    timed = gen_samples[args.gen_warmup :]
    sents = sum(int(s["nsentences"]) for s in timed)
    rates = {a: sents / sum(t) for a, t in times.items()}
    for arch in ARCHS:
        ratio = rates[arch] / rates[ARCHS[1]]
        out_tokens = sum(lengths[arch])
        writer.writerow(
            [
                _csv_setting(setting, args),
                "generate",
                _csv_arch(arch, args),
                len(timed),
                sents,
                out_tokens,
                f"{sum(times[arch]):.3f}",
                f"{rates[arch]:.3f}",
                "sentences/s",
                f"{ratio:.3f}",
            ]
        )
        log(
            f"{setting:6s} generate {arch:26s} {rates[arch]:9.3f} sentences/s  ({len(timed)} batches, {sents} "
            f"sentences, beam {args.beam}, {out_len} output steps; {out_tokens} tokens incl. eos)  ratio {ratio:.3f}"
        )
    f.flush()


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "--settings",
        default="mt,512,1024,2048",
        help="mt and/or synthetic lengths, comma-separated",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="for the 'mt' setting: the offline IWSLT14 de-en material (train-sample/, test.de, test.en), "
        "e.g. ../shared/data/iwslt14",
    )
    p.add_argument(
        "--work-dir",
        default="/tmp/clusterformer-bench-translation",
        help="binarised data (reused)",
    )
    p.add_argument("--csv", default="translation_benchmark.csv")
    p.add_argument("--train-lines", type=int, default=4600, help="mt: training sentences binarised")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=4096,
        help="training batch size in tokens (both models)",
    )
    p.add_argument("--train-steps", type=int, default=10, help="timed training steps per model")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps per model first")
    p.add_argument("--gen-sentences", type=int, default=400, help="mt: test sentences binarised")
    p.add_argument("--gen-batch-size", type=int, default=32, help="sentences per generation batch")
    p.add_argument("--gen-batches", type=int, default=3, help="timed generation batches per model")
    p.add_argument("--gen-warmup", type=int, default=1)
    p.add_argument(
        "--gen-len",
        type=int,
        default=30,
        help="mt: output tokens per hypothesis (forced)",
    )
    p.add_argument(
        "--gen-len-long",
        type=int,
        default=256,
        help="synthetic: output tokens per hypothesis (forced), at most the length",
    )
    p.add_argument(
        "--phases",
        default="train,generate",
        help="train and/or generate (comma-separated)",
    )
    p.add_argument("--beam", type=int, default=5)
    p.add_argument(
        "--layers",
        type=int,
        default=0,
        help="override encoder/decoder layers (both models)",
    )
    p.add_argument("--embed-dim", type=int, default=0)
    p.add_argument("--ffn-dim", type=int, default=0)
    p.add_argument("--heads", type=int, default=0, help="override attention heads (both models)")
    p.add_argument(
        "--cluster-args",
        default="",
        help="extra clusterformer options, e.g. '--num-clusters auto'",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="ROWS",
        help="after timing, profile one training step and one generation batch of each model "
        "(torch.profiler, self CPU time by operator) and print the ROWS operators where "
        "clusterformer spends the most time beyond the transformer",
    )
    p.add_argument(
        "--tag",
        default="",
        help="name of this run's variant in the CSV: setting becomes SETTING-TAG and the clusterformer "
        "arch clusterformer_iwslt+TAG (e.g. --tag lsh with --cluster-args '--self-attention-encoder lsh ...')",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="both models' parameters and activations",
    )
    args = p.parse_args(argv)
    if "mt" in args.settings.split(",") and not args.data_dir:
        p.error("the 'mt' setting needs --data-dir DIR: the IWSLT14 de-en material (e.g. ../shared/data/iwslt14)")
    if args.gen_batch_size < 1 or args.gen_batches < 1 or args.train_steps < 1:
        p.error("--gen-batch-size, --gen-batches and --train-steps must be >= 1")
    args.phases = [v.strip() for v in args.phases.split(",") if v.strip()]
    if not args.phases or any(v not in ("train", "generate") for v in args.phases):
        p.error("--phases must be train, generate or train,generate")
    if "mt" in args.settings.split(",") and args.gen_sentences < args.gen_batch_size * (
        args.gen_batches + args.gen_warmup
    ):
        p.error("--gen-sentences must cover --gen-batch-size x (--gen-batches + --gen-warmup)")

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.INFO)  # fairseq/hydra chatter (warnings still show)
    import torch

    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    import fairseq_clusterformer  # noqa: F401  registers the model, archs and criterion

    gpu = f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""
    log(
        f"# torch {torch.__version__}, device {args.device}{gpu}, dtype {args.dtype}, "
        f"threads {torch.get_num_threads()}, load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(args.csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for setting in [s.strip() for s in args.settings.split(",") if s.strip()]:
            run_setting(setting, args, writer, f)
    log(
        f"# wrote {args.csv} in {time.perf_counter() - t0:.0f} s; load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )


if __name__ == "__main__":
    sys.exit(main())
