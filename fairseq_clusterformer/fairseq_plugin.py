"""Everything the plugin does to fairseq, in one place, run once at package import.

1. Check that the installed fairseq can run the plugin (FairseqUnusableError with the fix).
2. Safe checkpoint loading: allow-list the globals fairseq checkpoints hold under torch's
   weights-only loader, and turn loader failures into a clear CheckpointLoadError. This is the
   only place the plugin patches fairseq (checkpoint_safety.py says why each patch is needed).
3. Register the models and the criterion, by explicit imports.
"""

from ._fairseq_check import check_fairseq

check_fairseq()

from .checkpoint_safety import (  # noqa: E402
    allow_fairseq_checkpoint_globals,
    guard_fairseq_checkpoint_loading,
)

allow_fairseq_checkpoint_globals()
guard_fairseq_checkpoint_loading()

from . import criterions, models  # noqa: E402,F401
