"""Spatial clustering of image tokens for CAT pruning: batched, on-device, deterministic.

Everything here works on a batch ``B`` of token grids of ``N = h * w`` tokens in row-major order
(token ``n`` sits at row ``n // w``, column ``n % w``) and keeps static shapes: clusters are
identified by ``0 .. n_clusters - 1`` and a cluster that ends up empty simply has no tokens.

* :func:`positional_encoding` - the paper's eq. 3: ``dims`` values per token, the first
  ``dims // 2`` equal to ``row / h``, the others to ``col / w``.
* :func:`kmeans` - Lloyd's algorithm with deterministic farthest-point initialisation and a
  fixed number of iterations (no host synchronisation, no randomness).
* :func:`cluster_adjacency` - clusters that touch as 4-neighbours on the grid.
* :func:`signed_max` - per cluster, the channel-wise value of largest magnitude (sign kept).
* :func:`graph_pool` - ``2 * mean + max`` over each cluster's closed neighbourhood.
"""

from __future__ import annotations

import torch
from torch import Tensor


def positional_encoding(
    grid: tuple[int, int], dims: int, device: torch.device | str | None = None
) -> Tensor:
    """``(N, dims)`` float32: first ``dims // 2`` columns ``row / h``, the rest ``col / w``."""
    h, w = grid
    if dims < 2:
        raise ValueError(f"positional encoding needs at least 2 dims, got {dims}")
    n = torch.arange(h * w, device=device)
    rows = (n // w).float() / h
    cols = (n % w).float() / w
    half = dims // 2
    return torch.cat(
        [rows[:, None].expand(-1, half), cols[:, None].expand(-1, dims - half)], dim=1
    ).contiguous()


def _squared_distances(x: Tensor, centers: Tensor) -> Tensor:
    """``(B, N, k)`` squared L2 distances between ``x (B, N, D)`` and ``centers (B, k, D)``."""
    d = (
        x.square().sum(-1, keepdim=True)
        - 2.0 * torch.bmm(x, centers.transpose(1, 2))
        + centers.square().sum(-1)[:, None, :]
    )
    return d.clamp_min_(0.0)


def farthest_point_init(x: Tensor, n_clusters: int) -> Tensor:
    """Deterministic maximin seeding: ``(B, n_clusters, D)`` centers taken from ``x``.

    The first center is the token nearest to the mean feature; each next one is the token
    farthest from all centers chosen so far (ties: lowest token index).
    """
    b = x.shape[0]
    batch = torch.arange(b, device=x.device)
    first = _squared_distances(x, x.mean(1, keepdim=True))[..., 0].argmin(1)
    centers = [x[batch, first]]
    nearest = _squared_distances(x, centers[0][:, None])[..., 0]
    for _ in range(n_clusters - 1):
        nxt = nearest.argmax(1)
        centers.append(x[batch, nxt])
        nearest = torch.minimum(nearest, _squared_distances(x, centers[-1][:, None])[..., 0])
    return torch.stack(centers, 1)


def kmeans(x: Tensor, n_clusters: int, iters: int) -> Tensor:
    """Batched KMeans (L2) of ``x (B, N, D)``; returns labels ``(B, N)`` int64.

    Farthest-point initialisation, then ``iters`` Lloyd steps. An empty cluster keeps its
    previous center. Ties in the assignment go to the lowest cluster id. Fully deterministic.
    """
    x = x.float()
    k = min(n_clusters, x.shape[1])
    centers = farthest_point_init(x, k)
    labels = _squared_distances(x, centers).argmin(-1)
    for _ in range(iters):
        onehot = torch.nn.functional.one_hot(labels, k).to(x.dtype)  # (B, N, k)
        counts = onehot.sum(1)[..., None]  # (B, k, 1)
        sums = torch.bmm(onehot.transpose(1, 2), x)
        centers = torch.where(counts > 0, sums / counts.clamp_min(1.0), centers)
        labels = _squared_distances(x, centers).argmin(-1)
    return labels


def cluster_adjacency(labels: Tensor, grid: tuple[int, int], n_clusters: int) -> Tensor:
    """``(B, k, k)`` bool: clusters with 4-neighbouring tokens; the diagonal is always set."""
    h, w = grid
    b = labels.shape[0]
    lab = labels.view(b, h, w)
    pairs = [
        (lab[:, :, :-1].reshape(b, -1), lab[:, :, 1:].reshape(b, -1)),  # horizontal
        (lab[:, :-1, :].reshape(b, -1), lab[:, 1:, :].reshape(b, -1)),  # vertical
    ]
    flat = torch.zeros(b, n_clusters * n_clusters, dtype=torch.bool, device=labels.device)
    for a, c in pairs:
        if a.shape[1] == 0:
            continue
        ones = torch.ones_like(a, dtype=torch.bool)
        flat.scatter_(1, a * n_clusters + c, ones)
        flat.scatter_(1, c * n_clusters + a, ones)
    adj = flat.view(b, n_clusters, n_clusters)
    return adj | torch.eye(n_clusters, dtype=torch.bool, device=labels.device)


def signed_max(values: Tensor, labels: Tensor, n_clusters: int) -> Tensor:
    """Per cluster and channel, the value of largest magnitude with its sign: ``(B, k, C)``.

    ``values (B, N, C)``, ``labels (B, N)``. Ties between ``+m`` and ``-m`` keep ``+m``; an
    empty cluster gets zeros. The scatters run channel-major (their fast layout on CPU).
    """
    b, _, c = values.shape
    channel_major = values.transpose(1, 2).contiguous()  # (B, C, N)
    index = labels[:, None, :].expand(-1, c, -1)
    hi = values.new_full((b, c, n_clusters), float("-inf"))
    lo = values.new_full((b, c, n_clusters), float("inf"))
    hi = hi.scatter_reduce_(2, index, channel_major, reduce="amax", include_self=True)
    lo = lo.scatter_reduce_(2, index, channel_major, reduce="amin", include_self=True)
    signed = torch.where(hi >= -lo, hi, lo)
    signed = torch.where(hi == float("-inf"), 0.0, signed)  # empty cluster
    return signed.transpose(1, 2)


def cluster_sizes(labels: Tensor, n_clusters: int) -> Tensor:
    """``(B, k)`` int64 token count per cluster."""
    return torch.zeros(
        labels.shape[0], n_clusters, dtype=torch.int64, device=labels.device
    ).scatter_add_(1, labels, torch.ones_like(labels))


def graph_pool(vectors: Tensor, adjacency: Tensor) -> Tensor:
    """Non-trainable graph pooling: ``2 * mean + max`` over each closed neighbourhood.

    For cluster ``c`` with neighbourhood ``M(c) = {c} + adjacent(c)``: ``2 * mean_{j in M(c)}
    v_j + max_{j in M(c)} v_j``, both channel-wise; ``max`` is the plain (not signed) maximum.
    ``vectors (B, k, C)``, ``adjacency (B, k, k)`` bool with its diagonal set.
    """
    adj = adjacency.to(vectors.dtype)
    mean = torch.bmm(adj, vectors) / adj.sum(-1, keepdim=True)
    masked = torch.where(adjacency[..., None], vectors[:, None, :, :], float("-inf"))
    return 2.0 * mean + masked.amax(2)
