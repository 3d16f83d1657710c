"""docs/scaling.md, the parts this machine can run: --tensorboard-logdir holds the clustering losses.

(The 2-process gloo rehearsal of a multi-GPU run is tests/test_cli.py::
test_two_process_gloo_ddp_keeps_ranks_identical; torchrun cannot launch fairseq-train on a
machine without CUDA, see docs/scaling.md.)
"""

import math
import re
import struct

from fairseq_helpers import CLUSTER_CRITERION, TINY, train


def read_events(path):
    """(tag, step, value) of every scalar in one tensorboard event file, parsed from its records
    (uint64 length, uint32 crc, an Event protobuf, uint32 crc) with tensorboardX's Event class."""
    from tensorboardX.proto.event_pb2 import Event

    data = path.read_bytes()
    out, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        pos += 12  # length + its crc
        event = Event.FromString(data[pos : pos + length])
        pos += length + 4  # payload + its crc
        for value in event.summary.value:
            out.append((value.tag, event.step, value.simple_value))
    return out


def scalars(logdir, split):
    files = sorted((logdir / split).glob("events.out.tfevents.*"))
    assert files, f"no event file under {logdir / split}"
    return [e for f in files for e in read_events(f)]


def test_tensorboard_logdir_holds_clustering_and_sorting_losses(toy_bin, tmp_path):
    logdir = tmp_path / "tb"
    out = train(
        toy_bin,
        tmp_path / "ck",
        "clusterformer_iwslt",
        extra=[*TINY, *CLUSTER_CRITERION, "--tensorboard-logdir", str(logdir), "--log-interval", "1"],
        max_update=6,
    )
    log = out.stdout + out.stderr
    assert "done training" in log
    assert sorted(p.name for p in logdir.iterdir()) == ["train", "train_inner", "valid"]

    inner = scalars(logdir, "train_inner")
    for name in ("clustering_loss", "sorting_loss", "loss", "nll_loss"):
        steps = [step for tag, step, _ in inner if tag == name]
        assert steps == list(range(1, 7)), (name, steps)  # one point per update (--log-interval 1)
    for tag, _, value in inner:
        if tag in ("clustering_loss", "sorting_loss"):
            assert math.isfinite(value) and -1.0 - 1e-6 <= value <= 1.0 + 1e-6, (tag, value)

    # The epoch summaries hold the same numbers as the text log (which rounds to 4 digits).
    for split, marker in (("train", "| train |"), ("valid", "| valid on 'valid' subset |")):
        events = scalars(logdir, split)
        lines = [line for line in log.splitlines() if marker in line]
        assert lines, split
        for name in ("clustering_loss", "sorting_loss"):
            logged = [float(v) for line in lines for v in re.findall(rf"\| {name} ([-\d.]+)", line)]
            written = [value for tag, _, value in events if tag == name]
            assert len(written) == len(logged) >= 1, (split, name, written, logged)
            for a, b in zip(written, logged):
                assert abs(a - b) <= 1e-3, (split, name, a, b)
