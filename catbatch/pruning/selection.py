"""Token selection for CAT pruning: which image tokens each sample computes at the next step.

One :class:`Selector` per generation call (reset between calls); :func:`make_selector` picks the
strategy from ``CATConfig.strategy``. The diffusers integration drives it on the timeline of the
notes (0-based step ``i``, ``s = config.last_full_step``):

* ``i = s + 1`` (full): ``set_reference(out)``; ``out`` is the conditional output ``(B, N, C)``.
* ``i = s + 2`` (full): ``idx = start(out)`` -> ``(B, K)`` tokens for step ``s + 3``.
* ``i >= s + 3`` (pruned): ``idx = step(out, computed)`` -> tokens for the next step.

Conventions shared by all strategies:

* Token score = per-token L2 norm of ``delta = out - ref`` (float32). At a pruned step ``out`` is
  the merged output: rows in ``computed`` are fresh, the others hold the output reused from the
  step they were last computed, so their delta (and score) is the one from that step.
* Returned indices are ``(B, K)`` int64, ``K = config.num_selected(N)``, distinct, in ``[0, N)``
  and sorted ascending per sample. Samples never influence each other.
* Ties are broken deterministically by token index (lower index first) after the documented
  criteria; no randomness except the ``random`` strategy, which is seeded and reproducible.
* ``step()`` has static shapes and no host synchronisation; all state lives in tensors
  allocated once and updated in place, so it compiles with ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from catbatch.pruning import clustering
from catbatch.pruning.config import CATConfig

# -- ranking helpers (all static-shape, deterministic) ------------------------------------------


def _ranks_from_order(order: Tensor) -> Tensor:
    """Inverse permutation: ``rank[b, order[b, j]] = j``."""
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def descending_rank(values: Tensor) -> Tensor:
    """Rank along dim 1 by value, largest first; ties: lower index first. int64, a permutation."""
    return _ranks_from_order(torch.sort(values, dim=1, descending=True, stable=True).indices)


def ascending_rank(values: Tensor, tiebreak_rank: Tensor) -> Tensor:
    """Rank by value, smallest first; ties broken by ``tiebreak_rank`` (a permutation)."""
    pre = torch.sort(tiebreak_rank, dim=1).indices  # tokens in tie-break order
    inner = torch.sort(values.gather(1, pre), dim=1, stable=True).indices
    return _ranks_from_order(pre.gather(1, inner))


def ranks_within_groups(groups: Tensor, key: Tensor, n_groups: int, span: int) -> Tensor:
    """Rank of each token inside its group by ascending ``key``.

    ``groups (B, N)`` in ``[0, n_groups)``; ``key (B, N)`` int64 in ``[0, span)``, distinct
    within a row. Returns ``(B, N)`` int64, 0 for the smallest key of each group.
    """
    order = torch.sort(groups * span + key, dim=1).indices
    sizes = clustering.cluster_sizes(groups, n_groups)
    starts = sizes.cumsum(1) - sizes
    positions = torch.arange(groups.shape[1], device=groups.device).expand_as(groups)
    within_sorted = positions - starts.gather(1, groups.gather(1, order))
    return torch.empty_like(order).scatter_(1, order, within_sorted)


def smallest_keys(key: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` smallest (distinct) keys per row, sorted ascending: ``(B, k)``."""
    return torch.topk(key, k, dim=1, largest=False, sorted=False).indices.sort(dim=1).values


def _state(tensor: Tensor) -> Tensor:
    """Mark a state buffer as having a fixed address (CUDA graphs may then mutate it)."""
    torch._dynamo.mark_static_address(tensor)
    return tensor


# -- base ---------------------------------------------------------------------------------------


class Selector:
    """Chooses ``k`` tokens per sample for the next pruned step (see module docstring)."""

    needs_attention: bool = False

    def __init__(
        self, config: CATConfig, grid: tuple[int, int], batch: int, device: torch.device | str
    ):
        self.config = config
        self.grid = (int(grid[0]), int(grid[1]))
        self.batch = int(batch)
        self.device = torch.device(device)
        self.n = self.grid[0] * self.grid[1]
        self.k = config.num_selected(self.n)
        self._ref: Tensor | None = None  # kept across reset() so its address stays fixed
        self._has_ref = False

    def reset(self) -> None:
        """Forget everything (new generation)."""
        self._has_ref = False

    def set_reference(self, out: Tensor) -> None:
        """Keep the conditional output ``(B, N, C)`` of step ``s + 1`` as ``ref`` (float32)."""
        self._check_out(out)
        if self._ref is None or self._ref.shape != out.shape:
            self._ref = _state(torch.empty(out.shape, dtype=torch.float32, device=self.device))
        self._ref.copy_(out.detach())
        self._has_ref = True

    def start(self, out: Tensor, attn: Tensor | None = None) -> Tensor:
        """Step ``s + 2`` (full): returns ``(B, K)`` indices for the first pruned step."""
        raise NotImplementedError

    def step(self, out: Tensor, computed: Tensor, attn: Tensor | None = None) -> Tensor:
        """A pruned step: ``out`` merged output, ``computed (B, K)``; returns the next indices."""
        raise NotImplementedError

    # -- helpers ------------------------------------------------------------------------------
    def _check_out(self, out: Tensor) -> None:
        if out.dim() != 3 or out.shape[0] != self.batch or out.shape[1] != self.n:
            raise ValueError(f"out must be (B={self.batch}, N={self.n}, C), got {tuple(out.shape)}")

    def _check_computed(self, computed: Tensor) -> None:
        if tuple(computed.shape) != (self.batch, self.k):
            raise ValueError(f"computed must be ({self.batch}, {self.k}), got {computed.shape}")

    def _delta(self, out: Tensor) -> Tensor:
        self._check_out(out)
        if not self._has_ref or self._ref is None:
            raise RuntimeError("set_reference() must be called before start()/step()")
        return out.float() - self._ref


# -- simple strategies ---------------------------------------------------------------------------


class NoiseSelector(Selector):
    """Top-``K`` tokens by score at every step (no clusters, no staleness); ties by index."""

    def _select(self, out: Tensor) -> Tensor:
        score = torch.linalg.vector_norm(self._delta(out), dim=-1)
        return smallest_keys(descending_rank(score), self.k)

    def start(self, out: Tensor, attn: Tensor | None = None) -> Tensor:
        return self._select(out)

    def step(self, out: Tensor, computed: Tensor, attn: Tensor | None = None) -> Tensor:
        self._check_computed(computed)
        return self._select(out)


_MASK32 = 0xFFFFFFFF


def _hash32(x: Tensor) -> Tensor:
    """Bijective 32-bit integer mix (xorshift-multiply) on int64 tensors holding ``[0, 2^32)``."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


class RandomSelector(Selector):
    """``K`` distinct uniformly random tokens per sample per step.

    Counter-based (a hash of ``config.seed``, the call counter, the sample and the token), not a
    ``torch.Generator``: Dynamo cannot trace generators with ``fullgraph=True``. The draws are
    identical on every device and repeat exactly after :meth:`reset`.
    """

    def __init__(self, config, grid, batch, device):
        super().__init__(config, grid, batch, device)
        self._calls = _state(torch.zeros((), dtype=torch.int64, device=self.device))
        tokens = torch.arange(self.n, dtype=torch.int64, device=self.device)
        samples = torch.arange(self.batch, dtype=torch.int64, device=self.device)
        base = _hash32(torch.tensor(config.seed & _MASK32, device=self.device))
        self._sample_base = _hash32((base + samples * 0x9E3779B1) & _MASK32)[:, None]
        self._tokens = tokens[None, :]

    def reset(self) -> None:
        super().reset()
        self._calls.zero_()

    def _draw(self) -> Tensor:
        call_base = _hash32((self._sample_base + self._calls * 0x85EBCA6B) & _MASK32)
        keys = _hash32((call_base + self._tokens) & _MASK32)  # distinct per row (bijection)
        self._calls.add_(1)
        return smallest_keys(keys, self.k)

    def start(self, out: Tensor, attn: Tensor | None = None) -> Tensor:
        self._check_out(out)
        return self._draw()

    def step(self, out: Tensor, computed: Tensor, attn: Tensor | None = None) -> Tensor:
        self._check_computed(computed)
        return self._draw()


class SequentialSelector(Selector):
    """Rows in turn (paper Fig. 6): a window of ``K`` consecutive tokens in row-major order.

    ``start()`` returns tokens ``0 .. K-1``; each call advances the window by ``K``, wrapping
    around ``N``. The same window for every sample.
    """

    def __init__(self, config, grid, batch, device):
        super().__init__(config, grid, batch, device)
        self._offset = _state(torch.zeros((), dtype=torch.int64, device=self.device))
        self._window = torch.arange(self.k, dtype=torch.int64, device=self.device)

    def reset(self) -> None:
        super().reset()
        self._offset.zero_()

    def _next(self) -> Tensor:
        idx = ((self._offset + self._window) % self.n).sort().values
        self._offset.copy_((self._offset + self.k) % self.n)
        return idx[None, :].expand(self.batch, -1).clone()

    def start(self, out: Tensor, attn: Tensor | None = None) -> Tensor:
        self._check_out(out)
        return self._next()

    def step(self, out: Tensor, computed: Tensor, attn: Tensor | None = None) -> Tensor:
        self._check_computed(computed)
        return self._next()


class ATEDMSelector(Selector):
    """AT-EDM's attention-driven ranking (G-WPR) with CAT's cache-and-reuse and budget.

    Importance ``s`` over image tokens from a weighted-PageRank iteration on the image-to-image
    attention map ``A`` (rows: queries, columns: keys; heads averaged, one block, conditional
    half): ``s0 = 1/N``, then ``pagerank_iters`` times ``s <- A^T s`` renormalised to sum 1 (a
    key is important when important queries attend to it). Top-``K`` by ``s``; ties by index.
    Rows need not sum to 1 (probabilities over text keys are simply left out).

    ``attn``: ``(B, N, N)`` at ``start()``; ``(B, K, N)`` at ``step()``, the query rows of the
    ``computed`` tokens. Rows of tokens not computed keep their last value in a ``(B, N, N)``
    float32 cache (like the K/V cache; 64 MiB per sample at N = 4096).

    Taken from AT-EDM (Wang et al., CVPR 2024): the G-WPR ranking above (attention map as a
    weighted graph, power iteration from a uniform vector, prune the lowest-ranked tokens).
    As in the CAT paper's baseline: the same budget ``K`` and start step, the ranking picks the
    tokens of the next step and the others reuse cached values. Left out or simplified: the
    similarity-based copy recovery and the DSAP schedule (the CAT paper drops them too),
    per-layer pruning inside one forward pass (here one block's map, chosen by the
    integration), damping/teleport, and a convergence test (a fixed iteration count instead).
    """

    needs_attention = True
    pagerank_iters = 3

    def __init__(self, config, grid, batch, device):
        super().__init__(config, grid, batch, device)
        self._attn = _state(torch.zeros(self.batch, self.n, self.n, device=self.device))

    def reset(self) -> None:
        super().reset()
        self._attn.zero_()

    def _select(self) -> Tensor:
        s = torch.full((self.batch, 1, self.n), 1.0 / self.n, device=self.device)
        for _ in range(self.pagerank_iters):
            s = torch.bmm(s, self._attn)
            s = s / s.sum(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
        return smallest_keys(descending_rank(s[:, 0]), self.k)

    def start(self, out: Tensor, attn: Tensor | None = None) -> Tensor:
        if attn is None or tuple(attn.shape) != (self.batch, self.n, self.n):
            raise ValueError(f"at-edm start() needs attn ({self.batch}, {self.n}, {self.n})")
        self._attn.copy_(attn)
        return self._select()

    def step(self, out: Tensor, computed: Tensor, attn: Tensor | None = None) -> Tensor:
        self._check_computed(computed)
        if attn is None or tuple(attn.shape) != (self.batch, self.k, self.n):
            raise ValueError(f"at-edm step() needs attn ({self.batch}, {self.k}, {self.n})")
        rows = computed[..., None].expand(-1, -1, self.n)
        self._attn.scatter_(1, rows, attn.to(self._attn.dtype))
        return self._select()


# -- CAT -----------------------------------------------------------------------------------------


class CATSelector(Selector):
    """Cluster-aware selection (notes, "Token selection").

    ``start()``: KMeans on ``feature_weight * out + position_weight * pos`` (``pos`` has ``C``
    dims: the first ``C // 2`` are ``row / h``, the rest ``col / w``), cluster adjacency, cluster
    score = L2 norm of the graph-pooled signed-max delta vector (pooling only if
    ``config.graph_pooling``), then the cluster walk taking the top ``K // 10`` tokens of each.

    ``step()``: ``f = a * f + 1[computed]`` (``f = 0`` at ``start()``, so the first pruned step
    gives the paper's ``f_0 = I_0``); cluster score without pooling; hot part by cluster rank
    (quotas ``3b, 2b, b, ...``, ``b = max(1, K // 20)``; for rank >= 1 also ``quota // 2``
    least-frequent tokens of the cluster among those not already taken by score), clusters
    added while fewer than or exactly ``hot_fraction * K`` tokens are taken; then the
    least-frequent other tokens up to ``K``. If the hot part exceeds ``K`` its lowest-priority
    tokens are dropped. Frequency ties: higher score first, then lower index.

    ``step()`` is written for few kernels (<= 40 dispatched ops when the hot part always fits
    in ``K``, which holds for ``hot_fraction <= 0.85``): what depends only on the clusters is
    computed once by ``start()`` into buffers updated in place; without graph pooling the
    cluster score is the L2 norm of the channel-wise maximum of ``|delta|`` (the signed maximum
    has the same magnitudes); ranks inside a cluster come from one sort of a composite key and
    the positions of the label-sorted order; the walk needs only how many tokens each cluster
    can give (``min(size, quota)``), which depends on the sizes, not on the scores.
    """

    def __init__(self, config, grid, batch, device):
        super().__init__(config, grid, batch, device)
        self.n_clusters = min(config.n_clusters, self.n)
        nc, dev, b, n = self.n_clusters, self.device, self.batch, self.n
        self.first_quota = max(1, self.k // 10)
        self.unit = max(1, self.k // 20)
        self.hot_budget = config.hot_fraction * self.k
        top = torch.full((nc,), self.unit, dtype=torch.int64, device=dev)
        top[0] = 3 * self.unit
        if nc > 1:
            top[1] = 2 * self.unit
        self._quota_top = top
        self._quota_stale = torch.where(torch.arange(nc, device=dev) == 0, 0, top // 2)
        self._quota_total = self._quota_top + self._quota_stale
        self._hot_fits = self.max_hot_tokens <= self.k
        self._labels = _state(torch.zeros(b, n, dtype=torch.int64, device=dev))
        self._sizes = _state(torch.zeros(b, nc, dtype=torch.int64, device=dev))
        self._adjacency = _state(torch.zeros(b, nc, nc, dtype=torch.bool, device=dev))
        self._freq = _state(torch.zeros(b, n, device=dev))
        # Per generation, written by start(): composite-key bases, ranks inside the
        # label-sorted order, the empty-cluster bias (-inf) for the cluster ranking.
        self._label_n = _state(torch.zeros(b, n, dtype=torch.int64, device=dev))
        self._label_2n = _state(torch.zeros(b, n, dtype=torch.int64, device=dev))
        self._within = _state(torch.zeros(b, n, dtype=torch.int64, device=dev))
        self._empty = _state(torch.zeros(b, nc, device=dev))
        # Constants.
        self._positions = torch.arange(n, device=dev).repeat(b, 1)
        self._cluster_positions = torch.arange(nc, device=dev).repeat(b, 1)
        self._ones = torch.ones(b, self.k, device=dev)
        self._first = torch.tensor(-1, device=dev)  # key of a hot token: before any stale one
        self._cluster_zeros: Tensor | None = None  # (B, nc, C), made by start()
        self._label_index: Tensor | None = None  # labels expanded over C channels (a view)

    def reset(self) -> None:
        super().reset()
        self._labels.zero_()
        self._sizes.zero_()
        self._adjacency.zero_()
        self._freq.zero_()

    @property
    def max_hot_tokens(self) -> int:
        """Upper bound on the hot part of a step: ``floor(hot_fraction * K) + 3b``.

        Clusters are added while at most ``hot_fraction * K`` tokens are taken, and one
        cluster adds at most ``3b`` (rank 0: ``3b``; rank 1: ``2b + b``; later: ``b + b // 2``).
        """
        return math.floor(self.hot_budget) + 3 * self.unit

    @property
    def labels(self) -> Tensor:
        """``(B, N)`` cluster id per token (valid after ``start()``)."""
        return self._labels

    @property
    def frequency(self) -> Tensor:
        """``(B, N)`` selection frequency ``f``."""
        return self._freq

    # -- clustering step ----------------------------------------------------------------------
    def start(self, out: Tensor, attn: Tensor | None = None) -> Tensor:
        delta = self._delta(out)
        cfg, nc, n = self.config, self.n_clusters, self.n
        pos = clustering.positional_encoding(self.grid, out.shape[-1], self.device)
        features = cfg.feature_weight * out.float() + cfg.position_weight * pos
        self._labels.copy_(clustering.kmeans(features, nc, cfg.kmeans_iters))
        self._sizes.copy_(clustering.cluster_sizes(self._labels, nc))
        self._adjacency.copy_(clustering.cluster_adjacency(self._labels, self.grid, nc))
        self._freq.zero_()
        self._prepare_step(out.shape[-1])

        vectors = clustering.signed_max(delta, self._labels, nc)
        if cfg.graph_pooling:
            vectors = clustering.graph_pool(vectors, self._adjacency)
        cluster_rank = self._cluster_rank(vectors)
        score_rank = descending_rank(torch.linalg.vector_norm(delta, dim=-1))
        rank_of_token = cluster_rank.gather(1, self._labels)
        within = ranks_within_groups(self._labels, score_rank, nc, n)
        walk = within < self.first_quota
        key = torch.where(walk, rank_of_token * n + within, nc * n + score_rank)
        return smallest_keys(key, self.k)

    def _prepare_step(self, channels: int) -> None:
        """What ``step()`` needs of the clusters, in place (fixed addresses for CUDA graphs)."""
        labels, sizes, n = self._labels, self._sizes, self.n
        self._label_n.copy_(labels * n)
        self._label_2n.copy_(labels * (2 * n))
        starts = sizes.cumsum(1) - sizes
        label_sorted = labels.sort(dim=1).values
        self._within.copy_(self._positions - starts.gather(1, label_sorted))
        self._empty.copy_(torch.where(sizes > 0, 0.0, float("-inf")))
        shape = (self.batch, self.n_clusters, channels)
        if self._cluster_zeros is None or self._cluster_zeros.shape != shape:
            self._cluster_zeros = torch.zeros(shape, device=self.device)
            self._label_index = labels.unsqueeze(-1).expand(-1, -1, channels)

    # -- pruned steps ---------------------------------------------------------------------------
    def step(self, out: Tensor, computed: Tensor, attn: Tensor | None = None) -> Tensor:
        self._check_computed(computed)
        self._check_out(out)
        if not self._has_ref or self._ref is None:
            raise RuntimeError("set_reference() must be called before start()/step()")
        n, pos, within = self.n, self._positions, self._within
        delta = torch.sub(out, self._ref)  # float32 (the reference is)
        self._freq.mul_(self.config.ewma_decay).scatter_add_(1, computed, self._ones)

        # Token order by score (ties: lower index), by frequency (ties: higher score).
        score_order = torch.sort(
            torch.linalg.vector_norm(delta, dim=-1), dim=1, descending=True, stable=True
        ).indices
        score_rank = pos.scatter(1, score_order, pos)
        inner = torch.sort(self._freq.gather(1, score_order), dim=1, stable=True).indices
        freq_rank = pos.scatter(1, score_order.gather(1, inner), pos)

        # Clusters by the L2 norm of their channel-wise max |delta| (empty ones last).
        cluster_max = self._cluster_zeros.scatter_reduce(
            1, self._label_index, delta.abs(), reduce="amax", include_self=True
        )
        cluster_score = torch.linalg.vector_norm(cluster_max, dim=-1) + self._empty
        cluster_order = torch.sort(cluster_score, dim=1, descending=True, stable=True).indices
        rank_of_token = self._cluster_positions.scatter(
            1, cluster_order, self._cluster_positions
        ).gather(1, self._labels)

        # Inside each cluster: top `quota` by score, then `quota // 2` least frequent of the rest.
        by_score = pos.scatter(1, torch.sort(self._label_n + score_rank, dim=1).indices, within)
        in_top = by_score < self._quota_top[rank_of_token]
        key = (self._label_2n + freq_rank).add_(in_top, alpha=n)
        by_freq = pos.scatter(1, torch.sort(key, dim=1).indices, within)
        taken = in_top | (by_freq < self._quota_stale[rank_of_token])
        if self.hot_budget <= 0:
            return smallest_keys(freq_rank, self.k)

        # Walk clusters by rank while at most hot_budget tokens are taken before each.
        per_rank = torch.minimum(self._sizes.gather(1, cluster_order), self._quota_total)
        reached = (per_rank.cumsum(1) <= self.hot_budget).sum(1, keepdim=True)
        hot = taken & (rank_of_token <= reached)
        if self._hot_fits:  # every hot token is taken: only the stale part is ranked
            return smallest_keys(torch.where(hot, self._first, freq_rank), self.k)
        priority = rank_of_token * (2 * n) + torch.where(in_top, score_rank, n + freq_rank)
        key = torch.where(hot, priority, self.n_clusters * 2 * n + freq_rank)
        return smallest_keys(key, self.k)

    def _cluster_rank(self, vectors: Tensor) -> Tensor:
        """``(B, k)`` rank of each cluster by the L2 norm of its vector; empty clusters last."""
        score = torch.linalg.vector_norm(vectors, dim=-1)
        score = torch.where(self._sizes > 0, score, float("-inf"))
        return descending_rank(score)


# -- factory ---------------------------------------------------------------------------------------

SELECTORS: dict[str, type[Selector]] = {
    "cat": CATSelector,
    "noise": NoiseSelector,
    "random": RandomSelector,
    "sequential": SequentialSelector,
    "at-edm": ATEDMSelector,
}


def make_selector(
    config: CATConfig, grid: tuple[int, int], batch: int, device: torch.device | str
) -> Selector:
    """The :class:`Selector` of ``config.strategy`` for a ``grid`` of tokens and ``batch``."""
    return SELECTORS[config.strategy](config, grid, batch, device)
