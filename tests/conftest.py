import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

# One torch thread per test process, and for every process a test starts: the suite runs two
# xdist workers on a 2-core machine, and more threads than cores make every small parallel
# operation wait for a descheduled thread (docs/benchmarks.md, "Over-subscription").
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
torch.set_num_threads(1)

from fairseq_helpers import CLUSTER_CRITERION, TINY, preprocess, train, write_toy_corpus  # noqa: E402


@pytest.fixture(scope="session")
def toy_bin(tmp_path_factory):
    """A binarised toy corpus (200 train, 20 valid, 20 test pairs), written by the test itself."""
    root = tmp_path_factory.mktemp("toy")
    raw = write_toy_corpus(root / "raw", n_train=200, n_valid=20, n_test=20)
    return preprocess(raw, root / "bin")


@pytest.fixture(scope="session")
def smoke_checkpoint_dir(toy_bin, tmp_path_factory):
    """A tiny clusterformer_iwslt trained for 20 updates through --user-dir."""
    save = tmp_path_factory.mktemp("smoke_ckpt")
    out = train(toy_bin, save, "clusterformer_iwslt", extra=TINY + CLUSTER_CRITERION, max_update=20)
    assert "done training" in (out.stdout + out.stderr)
    return save


# Hypothesis profiles (tests/test_properties.py). "ci", the default: derandomised (the
# same examples on every run), about 200 examples per property, no per-example deadline
# (the machine may be loaded). "thorough", for a developer's machine:
# `pytest --hypothesis-profile=thorough` (fresh randomness, 10x more examples).
from hypothesis import HealthCheck, settings  # noqa: E402

_SLOW_OK = [
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    HealthCheck.filter_too_much,
]
_COMMON = {
    "deadline": None,
    "database": None,
    "suppress_health_check": _SLOW_OK,
    "print_blob": True,
}
settings.register_profile("ci", derandomize=True, max_examples=200, **_COMMON)
settings.register_profile("thorough", max_examples=2000, **_COMMON)
settings.load_profile("ci")
