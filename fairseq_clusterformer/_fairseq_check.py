"""Check, at plugin import, that the fairseq we find can run this plugin.

`pip install fairseq` gives 0.12.2, which does not import on Python 3.11+; the error it raises
(a dataclass ValueError deep inside fairseq) says nothing about the fix. We turn every failure
into one message that says what is wrong and the command that fixes it.
"""

import importlib
import sys

FIX = (
    "Fix: run `bash scripts/bootstrap.sh` from the fairseq-clusterformer checkout, or by hand:\n"
    "    pip uninstall -y fairseq\n"
    "    pip install cython numpy wheel setuptools\n"
    "    pip install --no-build-isolation fairseq-fixed==0.12.3.1\n"
    "(or `pip install ve-fairseq==0.12.3` for prebuilt Linux x86_64 wheels; see docs/install.md)."
)

# What the plugin uses; a fairseq without these cannot run it.
REQUIRED = (
    ("fairseq.models.transformer", "TransformerModel"),
    ("fairseq.models.transformer", "TransformerEncoderBase"),
    ("fairseq.models.transformer", "TransformerDecoderBase"),
    ("fairseq.modules.transformer_layer", "TransformerEncoderLayerBase"),
    ("fairseq.modules.transformer_layer", "TransformerDecoderLayerBase"),
    ("fairseq.criterions.label_smoothed_cross_entropy", "LabelSmoothedCrossEntropyCriterion"),
    ("fairseq.incremental_decoding_utils", "with_incremental_state"),
)


class FairseqUnusableError(ImportError):
    pass


def check_fairseq():
    """Import fairseq and the pieces we extend; raise FairseqUnusableError with the fix if not."""
    try:
        fairseq = importlib.import_module("fairseq")
    except ModuleNotFoundError as err:
        if err.name != "fairseq":
            raise FairseqUnusableError(
                f"fairseq is installed but a module it needs is missing ({err}).\n{FIX}"
            ) from err
        raise FairseqUnusableError(
            f"fairseq-clusterformer needs fairseq, which is not installed in {sys.executable}.\n{FIX}"
        ) from err
    except Exception as err:  # e.g. fairseq 0.12.2 on Python 3.11: dataclass ValueError
        raise FairseqUnusableError(
            f"fairseq is installed but does not import on Python "
            f"{sys.version_info.major}.{sys.version_info.minor}: {type(err).__name__}: {err}\n{FIX}"
        ) from err
    for module_name, attr in REQUIRED:
        try:
            module = importlib.import_module(module_name)
        except Exception as err:
            raise FairseqUnusableError(
                f"fairseq {getattr(fairseq, '__version__', '?')} is unusable: importing "
                f"{module_name} failed: {type(err).__name__}: {err}\n{FIX}"
            ) from err
        if not hasattr(module, attr):
            raise FairseqUnusableError(
                f"fairseq {getattr(fairseq, '__version__', '?')} at {fairseq.__file__} is too old "
                f"for this plugin: {module_name}.{attr} is missing.\n{FIX}"
            )
    return fairseq
