"""Criterions registered by the plugin."""

from .._fairseq_check import check_fairseq

check_fairseq()

from . import label_smoothed_cross_entropy_with_clustering  # noqa: E402,F401
