"""Load fairseq checkpoints with torch's safe ``weights_only`` unpickler (torch >= 2.6).

fairseq's ``checkpoint_utils.load_checkpoint_to_cpu`` calls ``torch.load(f)``; since torch 2.6
that means ``weights_only=True``, which refuses every global it does not know, and fairseq
checkpoints store the legacy training arguments as an ``argparse.Namespace``. We allow-list
exactly the globals that fairseq checkpoints need, and nothing else, so ``fairseq-generate``,
``fairseq-interactive`` and resuming work while a checkpoint that carries any other pickled object
(arbitrary code on load) is still refused. We never set ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``.

Saving: fairseq copies each checkpoint onto checkpoint_last.pt (and checkpoint_best.pt) in place,
so a process killed mid-copy leaves a truncated file; ``make_checkpoint_saves_atomic`` makes every
checkpoint write go through a temporary file, fsync and rename.
"""

import argparse
import os
import re
import shutil

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
    # A checkpoint that loads must also have been saved whole, and resuming a multi-process run
    # must get it to every rank: wherever the plugin guards loading, it makes saving atomic and
    # lets ranks receive the loaded checkpoint (both idempotent; see their docstrings).
    make_checkpoint_saves_atomic()
    fix_rank_to_rank_checkpoint_broadcast()


def _raised_in_torch_serialization(err):
    tb = err.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename.replace("\\", "/")
        if filename.endswith("torch/serialization.py") or "/torch/_weights_only_unpickler" in filename:
            return True
        tb = tb.tb_next
    return False


# --- atomic checkpoint saves -------------------------------------------------------------------
# fairseq-train writes each checkpoint once (checkpoint_utils.torch_persistent_save: a ".tmp" file
# renamed over the target, but never fsynced) and then *copies* it to checkpoint_last.pt,
# checkpoint_best.pt and the other names with PathManager.copy, which is shutil.copyfile straight
# onto the target. A process killed during that copy (SIGKILL, out of memory, a pre-empted job)
# leaves a truncated checkpoint_last.pt, and the rerun that should resume from it fails. We make
# both steps write a temporary file beside the target, fsync it, rename it over the target
# (atomic on POSIX) and fsync the directory: the target is always the old or the new checkpoint,
# whole, even after a power loss.


def _fsync_dir(path):
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:  # e.g. a platform that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write):
    """Write ``path`` atomically: ``write(f)`` fills a binary file object; the result replaces
    ``path`` only once it is complete and on disk. On any error the target is left untouched and
    the temporary file removed. The temporary file, ``<path>.tmp``, matches no fairseq checkpoint
    pattern, and the next save to the same path overwrites one left behind by a killed process."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path)


def atomic_copy(src, dst):
    """Copy ``src`` onto ``dst`` atomically (see ``atomic_write``)."""
    with open(src, "rb") as source:
        atomic_write(dst, lambda f: shutil.copyfileobj(source, f, 1 << 20))


def make_checkpoint_saves_atomic():
    """Make fairseq's checkpoint writes atomic and durable (idempotent).

    Replaces ``checkpoint_utils.torch_persistent_save`` (the trainer resolves it through the
    module) and the ``PathManager`` that ``checkpoint_utils`` copies checkpoints with, for local
    paths; remote paths (ioPath handlers) and ``--write-checkpoints-asynchronously`` keep
    fairseq's own behaviour.
    """
    from fairseq import checkpoint_utils
    from fairseq.file_io import PathManager

    original_save = checkpoint_utils.torch_persistent_save
    if getattr(original_save, "_clusterformer_atomic", False):
        return

    def torch_persistent_save(obj, filename, async_write=False):
        if async_write or PathManager.path_requires_pathmanager(filename):
            return original_save(obj, filename, async_write=async_write)
        # torch.save itself: fairseq's _torch_persistent_save retries into the same, half-written file.
        atomic_write(filename, lambda f: torch.save(obj, f))

    class AtomicCopyPathManager(PathManager):
        @staticmethod
        def copy(src_path, dst_path, overwrite=False):
            remote = PathManager.path_requires_pathmanager(src_path) or PathManager.path_requires_pathmanager(dst_path)
            if remote or (not overwrite and os.path.exists(dst_path)):
                return PathManager.copy(src_path, dst_path, overwrite=overwrite)
            atomic_copy(src_path, dst_path)
            return True

    torch_persistent_save._clusterformer_atomic = True
    torch_persistent_save.__doc__ = original_save.__doc__
    checkpoint_utils.torch_persistent_save = torch_persistent_save
    checkpoint_utils.PathManager = AtomicCopyPathManager


# --- resuming multi-process training ------------------------------------------------------------
# When a distributed run resumes, rank 0 loads checkpoint_last.pt (through the safe loader above)
# and sends it to the other ranks with distributed_utils.broadcast_object, which serialises the
# non-tensor part (the training config, now an omegaconf DictConfig) with torch.save and reads it
# back with a bare torch.load: weights_only since torch 2.6, so every other rank died with
# "Unsupported global: GLOBAL omegaconf.dictconfig.DictConfig" and no DDP run could resume. These
# bytes are not a file from disk but a message from rank 0 of the same job, which fairseq already
# trusts with plain pickle (all_gather_list); so the receiving side loads them as fairseq intended.


def fix_rank_to_rank_checkpoint_broadcast():
    """Let ranks > 0 receive the checkpoint rank 0 loaded when a distributed run resumes (idempotent)."""
    import io

    from fairseq.distributed import utils as distributed_utils

    if getattr(distributed_utils._broadcast_object_slow, "_clusterformer_fixed", False):
        return

    def _broadcast_object_slow(obj, src_rank, group, dist_device):
        if distributed_utils.get_rank(group) == src_rank:
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            buffer = torch.ByteTensor(buffer.getbuffer()).to(dist_device)
            length = torch.LongTensor([len(buffer)]).to(dist_device)
            distributed_utils.broadcast(length, src=src_rank, group=group)
            distributed_utils.broadcast(buffer, src=src_rank, group=group)
            return obj
        length = torch.LongTensor([0]).to(dist_device)
        distributed_utils.broadcast(length, src=src_rank, group=group)
        buffer = torch.ByteTensor(int(length.item())).to(dist_device)
        distributed_utils.broadcast(buffer, src=src_rank, group=group)
        # A message from rank 0 of this job (the object it built after loading the checkpoint
        # safely), not a file: fairseq's own rank-to-rank channels unpickle it the same way.
        return torch.load(io.BytesIO(buffer.cpu().numpy()), map_location="cpu", weights_only=False)

    _broadcast_object_slow._clusterformer_fixed = True
    distributed_utils._broadcast_object_slow = _broadcast_object_slow
