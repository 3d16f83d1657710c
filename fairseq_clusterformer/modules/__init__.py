"""The attention layer (torch only: importing this needs no fairseq).

- clustering.py: the method, step by step, in plain torch (U, assignment, C', the two losses,
  the sort and its inverse, which words each word sees)
- cluster_attention.py: ClusterAttention, its options, the reference and fast paths side by side
- kernels.py: the fast path's custom autograd Functions and block attention
- flex.py: impl="flex", the fast path's block attention as one FlexAttention call (CUDA)
- incremental.py: the decoder's assignment rule, the decoding cache, one step, beam reordering
- fairseq_cluster_attention.py: fairseq's calling conventions (imports fairseq; not imported here)
"""

from .cluster_attention import ClusterAttention, ClusterInfo, parse_num_clusters
from .clustering import sort_by_cluster, sorted_word_idx, undo_sorted_word_idx

__all__ = [
    "ClusterAttention",
    "ClusterInfo",
    "parse_num_clusters",
    "sort_by_cluster",
    "sorted_word_idx",
    "undo_sorted_word_idx",
]
