"""A checkpoint trained by an earlier version of the plugin translates identically today."""

from pathlib import Path

import pytest

from fairseq_helpers import generate, parse_generate

LEGACY = Path(__file__).resolve().parent / "data" / "legacy_checkpoint"


def _expected(name):
    return parse_generate((LEGACY / name).read_text())


@pytest.mark.parametrize(
    "expected, extra",
    [("expected_beam3.txt", ["--beam", "3"]), ("expected_score_reference.txt", ["--beam", "1", "--score-reference"])],
)
def test_legacy_checkpoint_gives_the_same_translations_and_scores(expected, extra):
    want = _expected(expected)
    got = parse_generate(generate(LEGACY, LEGACY / "model.pt", extra=["--batch-size", "5", *extra]).stdout)
    assert sorted(got) == sorted(want) == list(range(12))
    for i in want:
        assert got[i]["H"][1] == want[i]["H"][1], f"sentence {i}: translation changed"
        assert got[i]["H"][0] == pytest.approx(want[i]["H"][0], abs=1e-5)
        assert got[i]["P"] == pytest.approx(want[i]["P"], abs=1e-4)
