"""fairseq-train then fairseq-generate with --user-dir, on a tiny corpus the test writes itself."""

from fairseq_helpers import generate, parse_generate


def test_train_then_generate_with_plugin_arch(toy_bin, smoke_checkpoint_dir):
    assert (smoke_checkpoint_dir / "checkpoint_last.pt").exists()
    gen = generate(toy_bin, smoke_checkpoint_dir / "checkpoint_last.pt")
    hyps = parse_generate(gen.stdout)
    # Every one of the 20 test sentences is translated (none dropped by batch-size rounding).
    assert sorted(hyps) == list(range(20))
    assert all("H" in h for h in hyps.values())
