"""How many CUDA graphs `--cluster-compile-mode reduce-overhead` records over a training epoch.

torch.compile's CUDA graphs (inductor's CUDA-graph trees) are recorded once per distinct input
shape of each compiled function: ClusterFormer's encoder layers see batches of B sentences of
N_src tokens, its decoder layers B x N_tgt, and each compiles one graph for batches with padding
and one for batches without. This script builds fairseq's own batches of one epoch (the
translation task's batch iterator and collater, with the batching options given) and counts the
distinct (B, N, padded) shapes on each side: the CUDA graphs a training run records, each once,
in its first epoch (fairseq's batches keep their composition from epoch to epoch; only their
order is shuffled). Bucketing the lengths with --required-seq-len-multiple makes far fewer.

    python -m scripts.experiments.prepare_data multi30k
    python -m scripts.count_shapes work/experiments/data/multi30k/data-bin --max-tokens 4096 \\
        --seq-len-multiples 1,8,32 --csv docs/data/cpu/shapes_multi30k.csv

Each shape is counted once per side; training also records each one's backward, and validation
(no gradients) its own graphs of the valid subset's shapes (``--subset valid``).
"""

import argparse
import csv
import sys
from pathlib import Path

CSV_COLUMNS = [
    "data",
    "subset",
    "max_tokens",
    "required_batch_size_multiple",
    "required_seq_len_multiple",
    "batches",
    "encoder_shapes",
    "decoder_shapes",
    "padded_batches",
    "median_batch_size",
]


def count_shapes(data, subset="train", max_tokens=4096, batch_size_multiple=8, seq_len_multiple=1, max_positions=1024):
    """The distinct (B, N, padded) shapes of one epoch of fairseq's batches of SUBSET: a dict of
    CSV_COLUMNS' values (the data and options left out), and the shapes themselves (``encoder``,
    ``decoder``: sets of (B, N, padded))."""
    from fairseq import options, tasks

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser,
        [
            str(data),
            "--task",
            "translation",
            "--arch",
            "transformer_iwslt_de_en",
            "--max-tokens",
            str(max_tokens),
            "--required-batch-size-multiple",
            str(batch_size_multiple),
            "--required-seq-len-multiple",
            str(seq_len_multiple),
            "--max-source-positions",
            str(max_positions),
            "--max-target-positions",
            str(max_positions),
            "--cpu",
        ],
    )
    task = tasks.setup_task(args)
    task.load_dataset(subset)
    dataset = task.dataset(subset)
    batches = task.get_batch_iterator(
        dataset,
        max_tokens=max_tokens,
        max_positions=(max_positions, max_positions),
        ignore_invalid_inputs=True,
        required_batch_size_multiple=batch_size_multiple,
        seed=1,
    ).next_epoch_itr(shuffle=False)
    pad = task.source_dictionary.pad()
    encoder, decoder, sizes = set(), set(), []
    n_batches = padded_batches = 0
    for sample in batches:
        src = sample["net_input"]["src_tokens"]
        tgt = sample["net_input"]["prev_output_tokens"]
        src_padded, tgt_padded = bool(src.eq(pad).any()), bool(tgt.eq(pad).any())
        encoder.add((*src.shape, src_padded))
        decoder.add((*tgt.shape, tgt_padded))
        sizes.append(src.size(0))
        n_batches += 1
        padded_batches += src_padded or tgt_padded
    if not n_batches:
        raise ValueError(f"{data}: the {subset} subset gave no batch")
    sizes.sort()
    return {
        "subset": subset,
        "batches": n_batches,
        "encoder_shapes": len(encoder),
        "decoder_shapes": len(decoder),
        "padded_batches": padded_batches,
        "median_batch_size": sizes[len(sizes) // 2],
        "encoder": encoder,
        "decoder": decoder,
    }


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", help="a fairseq-preprocess data-bin of a translation pair")
    p.add_argument("--subset", default="train")
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--required-batch-size-multiple", type=int, default=8, help="fairseq's option (default 8)")
    p.add_argument(
        "--seq-len-multiples",
        default="1",
        help="comma-separated values of fairseq's --required-seq-len-multiple, one row each (1: no bucketing)",
    )
    p.add_argument("--max-positions", type=int, default=1024, help="longer pairs are left out, as fairseq does")
    p.add_argument("--csv", help="write the rows here")
    args = p.parse_args(argv)
    try:
        multiples = [int(v) for v in args.seq_len_multiples.split(",") if v]
    except ValueError:
        p.error(f"--seq-len-multiples: comma-separated integers, got {args.seq_len_multiples!r}")
    if not multiples or min(multiples) < 1:
        p.error("--seq-len-multiples: at least one value, each at least 1")
    if not Path(args.data).is_dir() or not list(Path(args.data).glob("dict.*.txt")):
        p.error(f"{args.data} is not a fairseq-preprocess data-bin (a folder with dict.<lang>.txt files)")
    rows = []
    print(
        "| --required-seq-len-multiple | batches | encoder shapes (B, N_src, padded) "
        "| decoder shapes (B, N_tgt, padded) | batches with padding | median B |\n|---|---|---|---|---|---|"
    )
    for multiple in multiples:
        try:
            c = count_shapes(
                args.data, args.subset, args.max_tokens, args.required_batch_size_multiple, multiple, args.max_positions
            )
        except (FileNotFoundError, ValueError) as err:  # e.g. no such subset in the data-bin
            p.error(str(err))
        row = {
            "data": args.data,
            "max_tokens": args.max_tokens,
            "required_batch_size_multiple": args.required_batch_size_multiple,
            "required_seq_len_multiple": multiple,
            **{k: c[k] for k in CSV_COLUMNS[5:]},
            "subset": c["subset"],
        }
        rows.append(row)
        print(
            f"| {multiple} | {c['batches']} | {c['encoder_shapes']} | {c['decoder_shapes']} "
            f"| {c['padded_batches']} | {c['median_batch_size']} |",
            flush=True,
        )
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
