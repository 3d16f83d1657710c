"""Load fairseq checkpoints with torch's safe ``weights_only`` unpickler (torch >= 2.6).

fairseq's ``checkpoint_utils.load_checkpoint_to_cpu`` calls ``torch.load(f)``; since torch 2.6
that means ``weights_only=True``, which refuses every global it does not know, and fairseq
checkpoints store the legacy training arguments as an ``argparse.Namespace``. We allow-list
exactly the globals that fairseq checkpoints need, and nothing else, so ``fairseq-generate``,
``fairseq-interactive`` and resuming work while a checkpoint that carries any other pickled object
(arbitrary code on load) is still refused. We never set ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``.
"""
import argparse
import re

import torch

# Found by loading checkpoints written by fairseq-train (stock transformer and this plugin's
# models, fp32 and bf16, after resuming and after checkpoint averaging) with an empty allow-list
# and adding what the loader refused: only the legacy args Namespace. Tensors, dicts, lists,
# OrderedDict and primitives are already allowed by torch. tests/test_checkpoint_safety.py
# checks that both directions hold.
SAFE_CHECKPOINT_GLOBALS = (argparse.Namespace,)


def allow_fairseq_checkpoint_globals():
    """Register the allow-list with torch's weights_only unpickler (idempotent)."""
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is None:  # torch < 2.4 loads with full pickle by default; nothing to allow.
        return ()
    add(list(SAFE_CHECKPOINT_GLOBALS))
    return SAFE_CHECKPOINT_GLOBALS


class CheckpointLoadError(RuntimeError):
    """A checkpoint file that cannot be loaded safely: corrupt, truncated, or carrying code."""


def explain_load_failure(path, err):
    """One clear message for the ways torch.load fails on a bad checkpoint file."""
    text = str(err)
    if "Unsupported global" in text or "weights_only" in text.lower():
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
        bad = found.group(1) if found else "an object the safe loader does not know"
        return (
            f"refusing to load checkpoint {path}: it carries a pickled object that is not plain "
            f"checkpoint data ({bad}). Loading it could run arbitrary code, so the safe "
            f"weights_only loader rejects it. Only load checkpoints you made or trust; this plugin "
            f"deliberately allows only {[g.__module__ + '.' + g.__qualname__ for g in SAFE_CHECKPOINT_GLOBALS]}."
        )
    return (
        f"cannot read checkpoint {path}: the file is truncated or corrupted "
        f"({type(err).__name__}: {text.splitlines()[0] if text else ''}). "
        f"Use another checkpoint (e.g. checkpoint_best.pt or an earlier checkpointN.pt)."
    )


def guard_fairseq_checkpoint_loading():
    """Wrap fairseq's load_checkpoint_to_cpu so unsafe or broken files fail with a clear error.

    fairseq resolves the function through its module (checkpoint_utils and trainer both call
    ``checkpoint_utils.load_checkpoint_to_cpu``), so replacing the module attribute covers
    fairseq-generate, fairseq-interactive, resuming and checkpoint averaging alike.
    """
    from fairseq import checkpoint_utils

    original = checkpoint_utils.load_checkpoint_to_cpu
    if getattr(original, "_clusterformer_guarded", False):
        return

    def load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):
        try:
            return original(path, arg_overrides, load_on_all_ranks)
        except Exception as err:
            # Only failures of torch.load itself mean a bad file (damaged zip container, pickle
            # stream, refused global, or UnicodeDecodeError from garbled record names); anything
            # raised later (config upgrades, a missing file) passes through unchanged.
            if isinstance(err, FileNotFoundError) or not _raised_in_torch_serialization(err):
                raise
            raise CheckpointLoadError(explain_load_failure(path, err)) from err

    load_checkpoint_to_cpu._clusterformer_guarded = True
    load_checkpoint_to_cpu.__doc__ = original.__doc__
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu


def _raised_in_torch_serialization(err):
    tb = err.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename.replace("\\", "/")
        if filename.endswith("torch/serialization.py") or "/torch/_weights_only_unpickler" in filename:
            return True
        tb = tb.tb_next
    return False
