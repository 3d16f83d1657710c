"""Training recipes of the side-by-side runner (``run_side_by_side run --recipe NAME``).

Every recipe is shared by all systems: only the self-attention differs between them (the
architecture, and the criterion that adds the clustering terms for ClusterFormer).

- ``quick``: the short setting the demo uses (a fixed number of updates, ``--max-update``,
  default 500; docs/results.md's "quick setting" tables).
- ``converged``: the same small model, BPE, optimiser, dropout and label smoothing, trained until
  the validation nll has not improved for ``PATIENCE`` validations (one per epoch), with
  ``MAX_EPOCH`` as a safety cap. A killed run resumes from its ``checkpoint_last.pt``.
  With inverse-square-root decay the Transformer was still improving at the cap (valid nll
  2.687 at epoch 18, 2.618 at epoch 30): about 95 minutes per run on one core.
- ``annealed``: the recipe of the converged study. The same model, BPE, optimiser, peak learning
  rate, warm-up, dropout and label smoothing, for a fixed budget of ``ANNEAL_UPDATES`` updates
  (16 epochs of Multi30k at --max-tokens 2048) with the learning rate decayed linearly to zero
  after warm-up, so that the last updates are spent at a small step size and the budget ends at
  the bottom of the curve. Resumable like ``converged``; the best checkpoint on valid nll is kept.
- ``annealed-d256``: the ``annealed`` recipe with the model twice as wide (d 256, FFN 1,024, still
  3+3 layers and 4 heads): every training setting is the same. Too slow for the 2-core machine's
  study, it is the study's setting for a GPU (``--device cuda``; scripts/gpu/converged.sh).
- ``demo-annealed``: the candidate setting for the demo. The quick setting with the learning rate
  decayed linearly to zero over ``--max-update`` updates (the ``annealed`` schedule on the demo's
  short budget), recorded like a study recipe (chrF, kept translations, seeds' spread).
"""

from scripts.experiments import expkit  # SMALL_MODEL, TRAIN_SETTINGS: fairseq_clusterformer/tools/runs.py

PATIENCE = 3
MAX_EPOCH = 30
ANNEAL_UPDATES = 3920


def _widened(model_args, dim, ffn):
    """MODEL_ARGS with every embedding width set to DIM and every FFN width to FFN."""
    s = list(model_args)
    for flag, value in (
        ("--encoder-embed-dim", dim),
        ("--decoder-embed-dim", dim),
        ("--encoder-ffn-embed-dim", ffn),
        ("--decoder-ffn-embed-dim", ffn),
    ):
        s[s.index(flag) + 1] = str(value)
    return s


def _annealed_settings():
    """TRAIN_SETTINGS with inverse_sqrt replaced by a linear decay to zero over ANNEAL_UPDATES."""
    return expkit.annealed_settings(ANNEAL_UPDATES)


RECIPES = {
    "quick": {
        "model_args": list(expkit.SMALL_MODEL),
        "train_settings": list(expkit.TRAIN_SETTINGS),
        "stopping": [],
        "resumable": False,
        "max_update": None,  # --max-update
        "study": False,
    },
    "converged": {
        "model_args": list(expkit.SMALL_MODEL),
        "train_settings": list(expkit.TRAIN_SETTINGS),
        # fairseq's --patience counts validations whose --best-checkpoint-metric (nll_loss) did
        # not improve on the best; --max-update 0 (no update limit) is set by the runner.
        "stopping": ["--patience", str(PATIENCE), "--max-epoch", str(MAX_EPOCH)],
        "resumable": True,
        "max_update": 0,  # no update limit: the patience and the epoch cap stop it
        "study": True,
    },
    "annealed": {
        "model_args": list(expkit.SMALL_MODEL),
        "train_settings": _annealed_settings(),
        "stopping": [],
        "resumable": True,
        "max_update": ANNEAL_UPDATES,
        "study": True,
    },
    "annealed-d256": {
        "model_args": _widened(expkit.SMALL_MODEL, 256, 1024),
        "train_settings": _annealed_settings(),
        "stopping": [],
        "resumable": True,
        "max_update": ANNEAL_UPDATES,
        "study": True,
    },
    "demo-annealed": {
        "model_args": list(expkit.SMALL_MODEL),
        # --total-num-update is set to the run's --max-update by ``train_settings``
        "train_settings": _annealed_settings(),
        "stopping": [],
        "resumable": False,
        "max_update": None,
        "study": True,
    },
}


def budget_tag(recipe, max_update):
    """The last part of a run id: u<updates> for the quick recipe, conv for the converged recipe,
    ann<updates> for the annealed recipe (ann<updates>d256 for annealed-d256), dann<updates> for
    demo-annealed, doc<updates> for documents."""
    if recipe == "converged":
        return "conv"
    if recipe == "annealed":
        return f"ann{ANNEAL_UPDATES}"
    if recipe == "annealed-d256":
        return f"ann{ANNEAL_UPDATES}d256"
    if recipe == "demo-annealed":
        return f"dann{max_update}"
    if recipe == "documents":
        return f"doc{DOC_UPDATES}"
    return f"u{max_update}"


def train_settings(recipe, max_update):
    """RECIPE's training settings for a run of MAX_UPDATE updates: a decay whose length follows the
    run's budget (demo-annealed) is set to it."""
    settings = list(RECIPES[recipe]["train_settings"])
    if RECIPES[recipe]["max_update"] is None and "--total-num-update" in settings:
        settings[settings.index("--total-num-update") + 1] = str(max_update)
    return settings


def max_update(recipe, requested):
    """The --max-update a run of RECIPE trains with (REQUESTED: the runner's --max-update)."""
    fixed = RECIPES[recipe]["max_update"]
    return requested if fixed is None else fixed


# ``documents`` (issue 28): the ``annealed`` recipe on document-level IWSLT14 de-en
# (scripts/experiments/long_documents.py: 8-16 consecutive sentences, 200-500 BPE tokens on the
# source side, up to 532 on the target side). Every setting is annealed's but three, all for the
# length: positions for 1,024 tokens (the longest pair plus </s>, with room: fairseq-train drops a
# training pair longer than its positions with only a warning), and --max-tokens 4096. fairseq counts
# a pair as its longer side, so a batch holds about ten whole documents (one longer than --max-tokens
# stops fairseq-train with an error; none is). DOC_UPDATES: 20 epochs of the 1,007 training documents
# (103 updates each), sized so that a run, test translation included, fits about 2 hours on one core.
DOC_UPDATES = 2060
DOC_MAX_TOKENS = 4096
DOC_POSITIONS = 1024


def _documents_settings():
    s = expkit.annealed_settings(DOC_UPDATES)
    s[s.index("--max-tokens") + 1] = str(DOC_MAX_TOKENS)
    return s


RECIPES["documents"] = {
    "model_args": [
        *expkit.SMALL_MODEL,
        "--max-source-positions",
        str(DOC_POSITIONS),
        "--max-target-positions",
        str(DOC_POSITIONS),
    ],
    "train_settings": _documents_settings(),
    "stopping": [],
    "resumable": True,
    "max_update": DOC_UPDATES,
    "study": True,
}
