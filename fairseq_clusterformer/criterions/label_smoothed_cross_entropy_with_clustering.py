"""Label-smoothed cross-entropy plus the two ClusterFormer losses, each logged on its own.

    loss = LSCE + clustering_loss_weight * clustering_loss * sample_size
                + sorting_loss_weight * sorting_loss * sample_size
                + commitment_loss_weight * commitment_loss * sample_size

(The commitment term comes from Routing Transformer layers, ``--self-attention-* routing``: the
mean squared distance of a word's unit vector to its k-means mean; docs/baselines.md. A model
with no clustering or routing layer, e.g. LSH or full attention on both sides, gets plain LSCE.)

The clustering losses are means (over words, and over centroid pairs, each averaged over the
clustering layers), while fairseq's LSCE is a sum over target tokens that the trainer divides by
the summed sample size. Multiplying the means by this batch's sample size puts them on the same
scale, so the weights mean the same thing whatever the batch size, --update-freq or number of
GPUs. With cosine similarity (the default) each clustering term lies in [-1, 1]; -1 is a
perfect fit. Each term is logged (``clustering_loss``, ``sorting_loss``, ``commitment_loss``)
when the model has it.
"""

import math
from dataclasses import dataclass, field

from fairseq import metrics, utils
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)


@dataclass
class LabelSmoothedCrossEntropyWithClusteringConfig(LabelSmoothedCrossEntropyCriterionConfig):
    clustering_loss_weight: float = field(
        default=0.01,
        metadata={
            "help": "weight lambda1 of the clustering loss (mean over words of -sim(word, its "
            "updated centroid)); 0 disables it. 0.01 (default): at 0.1 it cost 0.3 bits of "
            "validation nll in our runs (docs/results.md)"
        },
    )
    sorting_loss_weight: float = field(
        default=0.01,
        metadata={
            "help": "weight lambda2 of the centroid-sorting loss (mean over adjacent centroid "
            "pairs of -sim(c_i, c_i+1)); 0 disables it (default 0.01)"
        },
    )
    commitment_loss_weight: float = field(
        default=1e-4,
        metadata={
            "help": "weight of the routing baseline's k-means commitment loss (mean over real words "
            "of |x/|x| - mu|^2 / d, over the routing layers); default 1e-4, the routing-transformer "
            "package's commitment factor"
        },
    )


def _check_weight(name, value):
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    return value


@register_criterion(
    "label_smoothed_cross_entropy_with_clustering", dataclass=LabelSmoothedCrossEntropyWithClusteringConfig
)
class LabelSmoothedCrossEntropyWithClusteringCriterion(LabelSmoothedCrossEntropyCriterion):
    # fairseq passes config fields by name: no **kwargs allowed here.
    def __init__(
        self,
        task,
        sentence_avg,
        label_smoothing,
        clustering_loss_weight=0.01,
        sorting_loss_weight=0.01,
        commitment_loss_weight=1e-4,
        ignore_prefix_size=0,
        report_accuracy=False,
    ):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        self.clustering_loss_weight = _check_weight("clustering_loss_weight", clustering_loss_weight)
        self.sorting_loss_weight = _check_weight("sorting_loss_weight", sorting_loss_weight)
        self.commitment_loss_weight = _check_weight("commitment_loss_weight", commitment_loss_weight)

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        loss, nll_loss = self.compute_loss(model, net_output, sample, reduce=reduce)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        extra = net_output[1] if isinstance(net_output[1], dict) else {}
        if "clustering_loss" not in extra:
            raise RuntimeError(
                "label_smoothed_cross_entropy_with_clustering needs a model that returns the "
                "clustering losses (--arch clusterformer_*); for other models use --criterion "
                "label_smoothed_cross_entropy"
            )
        # Summed-loss scale (see the module docstring); logged as sums, reduced per sample.
        for name, weight in (
            ("clustering_loss", self.clustering_loss_weight),
            ("sorting_loss", self.sorting_loss_weight),
            ("commitment_loss", self.commitment_loss_weight),
        ):
            term = extra.get(name)
            if term is None:  # the model has no layer with this loss
                continue
            term_sum = term.float() * sample_size
            loss = loss + weight * term_sum
            logging_output[name] = term_sum.data
        logging_output["loss"] = loss.data
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"] = utils.item(n_correct.data)
            logging_output["total"] = utils.item(total.data)
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        for name in ("clustering_loss", "sorting_loss", "commitment_loss"):
            if not any(name in log for log in logging_outputs):
                continue
            total = sum(log.get(name, 0) for log in logging_outputs)
            # Plain means (not divided by log 2 like the CE terms): -1 is a perfect fit.
            metrics.log_scalar(name, total / max(sample_size, 1), sample_size, round=4)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
