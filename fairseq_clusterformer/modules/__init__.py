"""The attention layer (torch only: importing this needs no fairseq).

- cluster_attention.py: ClusterAttention, its options, the encoder and causal paths
- reference.py: the same forward in plain autograd (``impl="reference"``)
- kernels.py: the fast path's custom autograd Functions
- incremental.py: the decoding cache, one step, beam reordering
- fairseq_cluster_attention.py: fairseq's calling conventions (imports fairseq; not imported here)
"""

from .cluster_attention import ClusterAttention, ClusterInfo, parse_num_clusters, sort_by_cluster

__all__ = ["ClusterAttention", "ClusterInfo", "parse_num_clusters", "sort_by_cluster"]
