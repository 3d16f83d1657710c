"""fairseq-clusterformer: ClusterFormer neural clustering attention as a fairseq plugin.

Use it with ``--user-dir fairseq_clusterformer`` (from the repository root) or ``import
fairseq_clusterformer``. Importing it checks the installed fairseq, allow-lists the globals that
fairseq checkpoints need under torch's safe loader, and registers the models and criterions.

The attention module itself, ``fairseq_clusterformer/modules/cluster_attention.py``, imports only
torch: copy that one file to use neural clustering attention outside fairseq.
"""
from ._fairseq_check import FairseqUnusableError, check_fairseq

__version__ = "0.1.0"

check_fairseq()

from .checkpoint_safety import (  # noqa: E402
    allow_fairseq_checkpoint_globals,
    guard_fairseq_checkpoint_loading,
)

allow_fairseq_checkpoint_globals()
guard_fairseq_checkpoint_loading()

# fairseq's import_user_module auto-imports models/ (and tasks/) only; criterions are ours to load.
from . import criterions, models  # noqa: E402,F401
