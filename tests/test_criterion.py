"""The clustering criterion's arithmetic: LSCE plus the weighted clustering terms, and its logs."""

import pytest
import torch
from fairseq import metrics
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion
from test_model import batch, build

from fairseq_clusterformer.criterions.label_smoothed_cross_entropy_with_clustering import (
    LabelSmoothedCrossEntropyWithClusteringCriterion as Criterion,
)


def _sample(task, pad_last_target=True):
    src, lengths, prev = batch(task, n=3, src_len=7, tgt_len=6, seed=5)
    target = torch.cat([prev[:, 1:], torch.full((3, 1), task.target_dictionary.eos())], 1)
    if pad_last_target:  # a padded target: ntokens must count real tokens only
        target[2, -2:] = task.target_dictionary.pad()
    ntokens = int(target.ne(task.target_dictionary.pad()).sum())
    net_input = {"src_tokens": src, "src_lengths": lengths, "prev_output_tokens": prev}
    return {"net_input": net_input, "target": target, "ntokens": ntokens, "nsentences": 3, "id": torch.arange(3)}


@pytest.mark.parametrize("sentence_avg", [False, True], ids=["token-avg", "sentence-avg"])
def test_total_is_lsce_plus_weighted_terms_times_sample_size(toy_bin, sentence_avg):
    task, model = build(toy_bin)
    sample = _sample(task)
    stock = LabelSmoothedCrossEntropyCriterion(task, sentence_avg, 0.1)
    ours = Criterion(task, sentence_avg, 0.1, clustering_loss_weight=0.3, sorting_loss_weight=0.05)
    with torch.no_grad():
        lsce, size_stock, _ = stock(model, sample)
        total, size, log = ours(model, sample)
        _, extra = model(**sample["net_input"])
    expected_size = 3 if sentence_avg else sample["ntokens"]
    assert size == size_stock == expected_size
    clustering, sorting = extra["clustering_loss"], extra["sorting_loss"]
    assert clustering < 0 and sorting < 0  # cosine terms of a fresh model: real, nonzero values
    expected = lsce + 0.3 * clustering * expected_size + 0.05 * sorting * expected_size
    torch.testing.assert_close(total, expected, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(log["clustering_loss"], clustering * expected_size)
    torch.testing.assert_close(log["sorting_loss"], sorting * expected_size)
    assert log["loss"] == total


def test_zero_weights_give_stock_lsce_bit_for_bit(toy_bin):
    task, model = build(toy_bin)
    sample = _sample(task)
    with torch.no_grad():
        lsce, _, stock_log = LabelSmoothedCrossEntropyCriterion(task, False, 0.1)(model, sample)
        total, _, log = Criterion(task, False, 0.1, clustering_loss_weight=0.0, sorting_loss_weight=0.0)(model, sample)
    assert torch.equal(total, lsce)
    assert torch.equal(log["loss"], stock_log["loss"]) and torch.equal(log["nll_loss"], stock_log["nll_loss"])


def test_reduce_metrics_gives_the_means_per_sample():
    logs = [
        {"loss": 10.0, "nll_loss": 8.0, "ntokens": 40, "nsentences": 4, "sample_size": 40,
         "clustering_loss": -24.0, "sorting_loss": -36.0},
        {"loss": 5.0, "nll_loss": 4.0, "ntokens": 20, "nsentences": 2, "sample_size": 20,
         "clustering_loss": -6.0, "sorting_loss": -18.0},
    ]  # fmt: skip
    with metrics.aggregate() as agg:
        Criterion.reduce_metrics(logs)
        values = agg.get_smoothed_values()
    assert values["clustering_loss"] == pytest.approx(-30.0 / 60)
    assert values["sorting_loss"] == pytest.approx(-54.0 / 60)
    # The cross-entropy terms stay fairseq's (bits per token).
    assert values["nll_loss"] == pytest.approx(
        12.0 / 60 / torch.log(torch.tensor(2.0)).item(), abs=1e-3
    )  # logged rounded
