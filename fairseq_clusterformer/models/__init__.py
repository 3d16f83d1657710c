"""Models registered by the plugin (fairseq's --user-dir also imports every file here)."""

from .._fairseq_check import check_fairseq

check_fairseq()  # a clear error where fairseq is missing or unusable

from . import clusterformer  # noqa: E402,F401
