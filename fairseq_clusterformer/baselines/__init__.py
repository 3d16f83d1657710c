"""The baselines beside ClusterFormer: Reformer (LSH), Routing Transformer, Sparse Transformer and
Linformer attention.

Encoder side: the published implementations (``reformer-pytorch``, ``routing-transformer``,
the ``baselines`` extra of setup.py), in small subclasses that fix their padding dependence,
batch dependence and evaluation randomness (lsh.py, routing.py), behind fairseq's attention
interface (fairseq_adapters.py). The packages are imported only when a model asks for them.

Decoder side: the project's exact causal clustering attention (ClusterAttention, causal=True)
with the assignment rule swapped for a router (routers.py): LSH hashing with fixed rotations,
or the nearest k-means centroid. docs/baselines.md has what comes from where, and why.

The Sparse Transformer's fixed pattern (sparse.py, both sides, with its own exact decoding
cache) and the Linformer (linformer.py, encoder only) are written here in torch; sparse.py's
FairseqSelfAttention adapter (which imports fairseq) gives both fairseq's attention interface.

This file and routers.py / kmeans.py / linformer.py import only torch.
"""

from .routers import LSHRouter, RoutingRouter  # noqa: F401
