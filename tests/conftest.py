import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

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
