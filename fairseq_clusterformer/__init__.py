"""fairseq-clusterformer: ClusterFormer neural clustering attention as a fairseq plugin.

``from fairseq_clusterformer.modules import ClusterAttention`` needs only torch. Where fairseq
is installed, importing this package also registers the ``clusterformer`` model, its
architectures and the ``label_smoothed_cross_entropy_with_clustering`` criterion (as
``--user-dir fairseq_clusterformer`` does), after checking that the fairseq found can run them;
a fairseq that is installed but unusable is a FairseqUnusableError naming the fix.
"""

from importlib.util import find_spec

from ._fairseq_check import FairseqUnusableError, check_fairseq

__version__ = "0.1.0"
__all__ = ["FairseqUnusableError", "check_fairseq", "fairseq_available"]


def fairseq_available() -> bool:
    """Whether a fairseq distribution is installed (importable or not)."""
    try:
        return find_spec("fairseq") is not None
    except ValueError:  # sys.modules["fairseq"] without a spec
        return False


if fairseq_available():
    from . import fairseq_plugin  # noqa: E402,F401  (checks fairseq, safe loading, registration)
