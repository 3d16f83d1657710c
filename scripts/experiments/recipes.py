"""Training recipes of the side-by-side runner (``run_side_by_side run --recipe NAME``).

Every recipe is shared by all systems: only the self-attention differs between them (the
architecture, and the criterion that adds the clustering terms for ClusterFormer).

- ``quick``: the short setting the demo uses (a fixed number of updates, ``--max-update``,
  default 500; docs/results.md's "quick setting" tables).
- ``converged``: the same small model, BPE, optimiser, dropout and label smoothing, trained until
  the validation nll has not improved for ``PATIENCE`` validations (one per epoch), with
  ``MAX_EPOCH`` as a safety cap. A killed run resumes from its ``checkpoint_last.pt``.
"""

from fairseq_clusterformer.tools import expkit

PATIENCE = 3
MAX_EPOCH = 30

RECIPES = {
    "quick": {
        "model_args": list(expkit.SMALL_MODEL),
        "train_settings": list(expkit.TRAIN_SETTINGS),
        "stopping": [],
        "resumable": False,
    },
    "converged": {
        "model_args": list(expkit.SMALL_MODEL),
        "train_settings": list(expkit.TRAIN_SETTINGS),
        # fairseq's --patience counts validations whose --best-checkpoint-metric (nll_loss) did
        # not improve on the best; --max-update 0 (no update limit) is set by the runner.
        "stopping": ["--patience", str(PATIENCE), "--max-epoch", str(MAX_EPOCH)],
        "resumable": True,
    },
}


def budget_tag(recipe, max_update):
    """The last part of a run id: u<updates> for a fixed budget, conv for the converged recipe."""
    return "conv" if recipe == "converged" else f"u{max_update}"
