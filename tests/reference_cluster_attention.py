"""A slow, obviously correct float64 reference for ClusterAttention (tests only; loops allowed).

Each sequence is handled alone: its real tokens are taken out of the padding, clustered, sorted,
cut into blocks (encoder; local heads: blocks of the words in their own order) or given their
causal within-cluster window (decoder; local heads: the last `window` words of any cluster),
attended to with
explicit per-head, per-query softmax, and put back in their positions.
"""

import math

import torch


def _lin(layer, x):
    y = x @ layer.weight.double().t()
    return y + layer.bias.double() if layer.bias is not None else y


def _sim(module, a, b):
    if module.similarity == "cosine":
        return float((a @ b) / max(a.norm() * b.norm(), 1e-6) if a.norm() * b.norm() > 0 else 0.0)
    return float(a @ b) / a.numel()


def _attend(module, q_rows, k_rows, v_rows):
    """Softmax attention of each query row over the given key rows, per head (lists of tensors)."""
    H, hd = module.num_heads, module.head_dim
    out = torch.zeros(len(q_rows), H * hd, dtype=torch.float64)
    for i, (q, keys, values) in enumerate(zip(q_rows, k_rows, v_rows)):
        for h in range(H):
            sl = slice(h * hd, (h + 1) * hd)
            scores = torch.tensor([float(q[sl] @ key[sl]) / math.sqrt(hd) for key in keys], dtype=torch.float64)
            p = torch.softmax(scores, 0)
            out[i, sl] = sum(p[j] * values[j][sl] for j in range(len(values)))
    return out


@torch.no_grad()
def reference_forward(module, x, key_padding_mask=None, centroids=None):
    """Returns (out B x N x d, new centroids list, clustering loss, sorting loss, assignments)."""
    x = x.double()
    B, N, d = x.shape
    valid = torch.ones(B, N, dtype=torch.bool) if key_padding_mask is None else ~key_padding_mask
    out = torch.zeros(B, N, d, dtype=torch.float64)
    assignments = torch.full((B, N), -1, dtype=torch.long)
    new_centroids, word_losses, sort_losses = [], [], []
    for b in range(B):
        positions = [j for j in range(N) if valid[b, j]]
        X = x[b, positions]  # L x d
        L = len(positions)
        if module.causal or module.num_clusters != "auto":
            k = module.num_clusters
        else:
            k = min(max(1, math.ceil(math.sqrt(L))), module.max_clusters)
        if centroids is not None and not module.causal:
            C = centroids[min(b, centroids.size(0) - 1), :k].double()
        else:
            C = module.centroids[:k].double()
        CW = C @ module.centroid_proj.weight.double().t()
        U = CW @ X.t() / math.sqrt(d)  # k x L
        if module.causal:
            a = [int(torch.argmax((X[j][None, :] * CW).sum(-1))) for j in range(L)]
        else:
            a = [int(torch.argmax(U[:, j])) for j in range(L)]
        Cn = torch.softmax(U, dim=1) @ X  # k x d
        new_centroids.append(Cn)
        word_losses += [-_sim(module, X[j], Cn[a[j]]) for j in range(L)]
        if k > 1:
            sort_losses.append(sum(-_sim(module, Cn[i], Cn[i + 1]) for i in range(k - 1)) / (k - 1))
        for j, p in enumerate(positions):
            assignments[b, p] = a[j]

        Q, K_, V = (_lin(m, X) for m in (module.q_proj, module.k_proj, module.v_proj))
        order = sorted(range(L), key=lambda j: (a[j], j))  # stable by (cluster, position)
        if module.causal:
            rows_k, rows_v = [], []
            for j in range(L):
                mates = [i for i in range(j + 1) if a[i] == a[j]][-module.window :]
                rows_k.append([K_[i] for i in mates])
                rows_v.append([V[i] for i in mates])
            O = _attend(module, [Q[j] for j in range(L)], rows_k, rows_v)
            Hl = getattr(module, "local_heads", 0)
            if Hl:  # local heads: the last `window` real words, any cluster
                recent = [list(range(max(0, j + 1 - module.window), j + 1)) for j in range(L)]
                O_local = _attend(
                    module,
                    [Q[j] for j in range(L)],
                    [[K_[i] for i in r] for r in recent],
                    [[V[i] for i in r] for r in recent],
                )
                O[:, : Hl * module.head_dim] = O_local[:, : Hl * module.head_dim]
        else:
            w = max(1, math.ceil(L / k))
            blocks = [order[i * w : (i + 1) * w] for i in range(k)]
            O = torch.zeros(L, d, dtype=torch.float64)
            for i, block in enumerate(blocks):
                if not block:
                    continue
                keys = (blocks[i - 1] if (module.previous_block and i > 0) else []) + block
                res = _attend(
                    module,
                    [Q[j] for j in block],
                    [[K_[t] for t in keys]] * len(block),
                    [[V[t] for t in keys]] * len(block),
                )
                for r, j in enumerate(block):
                    O[j] = res[r]
            Hl = module.local_heads
            if Hl:  # local heads: the same blocks cut from the words in their own order
                O_local = torch.zeros(L, d, dtype=torch.float64)
                for i in range(k):
                    block = list(range(L))[i * w : (i + 1) * w]
                    keys = (list(range(L))[(i - 1) * w : i * w] if (module.previous_block and i > 0) else []) + block
                    res = _attend(
                        module,
                        [Q[j] for j in block],
                        [[K_[t] for t in keys]] * len(block),
                        [[V[t] for t in keys]] * len(block),
                    )
                    for r, j in enumerate(block):
                        O_local[j] = res[r]
                O[:, : Hl * module.head_dim] = O_local[:, : Hl * module.head_dim]
        O = _lin(module.out_proj, O)
        for j, p in enumerate(positions):
            out[b, p] = O[j]
    clustering = sum(word_losses) / max(len(word_losses), 1)
    sorting = sum(sort_losses) / len(sort_losses) if sort_losses else 0.0
    return out, new_centroids, clustering, sorting, assignments
