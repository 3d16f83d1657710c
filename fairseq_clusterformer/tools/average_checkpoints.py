#!/usr/bin/env python
"""Average the parameters of the last N fairseq checkpoints (as fairseq's own
scripts/average_checkpoints.py, which the pip-installed forks do not ship).

    clusterformer-average-checkpoints --inputs checkpoints/clusterformer_iwslt \
        --num-epoch-checkpoints 5 --output checkpoints/clusterformer_iwslt/averaged.pt

The output keeps everything but the model (config, optimizer history) from the newest input, so
fairseq-generate and fairseq-interactive load it like any checkpoint. Checkpoints are read with
torch's safe weights_only loader (see docs/install.md).
"""

import argparse
import collections
import os
import re
import sys

import torch


def last_checkpoints(folder, num, kind):
    """The num newest checkpoint{E}.pt (kind='epoch') or checkpoint_{E}_{U}.pt (kind='update')."""
    pattern = re.compile(r"checkpoint(\d+)\.pt$" if kind == "epoch" else r"checkpoint_\d+_(\d+)\.pt$")
    found = sorted(
        ((int(m.group(1)), name) for name in os.listdir(folder) if (m := pattern.fullmatch(name))),
        reverse=True,
    )
    if len(found) < num:
        raise SystemExit(
            f"error: --num-{kind}-checkpoints {num}, but {folder} holds only {len(found)} {kind} checkpoints"
        )
    return [os.path.join(folder, name) for _, name in found[:num]]


def average(paths):
    averaged, newest = collections.OrderedDict(), None
    for path in paths:
        state = torch.load(path, map_location="cpu", weights_only=True)
        params = state["model"]
        if averaged and params.keys() != averaged.keys():
            raise SystemExit(f"error: {path} has different parameters from {paths[0]}; cannot average")
        for name, value in params.items():
            acc = value.double() if value.is_floating_point() else value
            if name in averaged and value.is_floating_point():
                averaged[name] += acc
            elif name not in averaged:
                averaged[name] = acc.clone()
        newest = newest or state
    first = torch.load(paths[0], map_location="cpu", weights_only=True)["model"]
    for name, value in averaged.items():
        if value.is_floating_point():
            averaged[name] = (value / len(paths)).to(first[name].dtype)
    newest["model"] = averaged
    return newest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--inputs", nargs="+", required=True, help="checkpoint files, or one folder with --num-*-checkpoints"
    )
    parser.add_argument("--output", required=True, help="where to write the averaged checkpoint")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--num-epoch-checkpoints", type=int, help="average the last N checkpoint{epoch}.pt in the folder"
    )
    group.add_argument("--num-update-checkpoints", type=int, help="average the last N checkpoint_{epoch}_{update}.pt")
    args = parser.parse_args(argv)

    import fairseq_clusterformer.checkpoint_safety as safety  # allow-lists the checkpoint globals

    safety.allow_fairseq_checkpoint_globals()
    num = args.num_epoch_checkpoints or args.num_update_checkpoints
    if num is not None:
        if len(args.inputs) != 1 or not os.path.isdir(args.inputs[0]):
            raise SystemExit("error: --num-*-checkpoints needs exactly one folder in --inputs")
        if num < 1:
            raise SystemExit("error: the number of checkpoints to average must be >= 1")
        paths = last_checkpoints(args.inputs[0], num, "epoch" if args.num_epoch_checkpoints else "update")
    else:
        paths = args.inputs
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"error: not a checkpoint file: {missing[0]}")
    print(f"averaging {len(paths)} checkpoints: {', '.join(paths)}")
    state = average(paths)
    from fairseq.checkpoint_utils import torch_persistent_save

    torch_persistent_save(state, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    sys.exit(main())
