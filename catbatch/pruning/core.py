"""The shared core of the CAT step: persistent buffers, the step context, joint K/V caches.

A model family (:mod:`.sd3`, :mod:`.pixart`) writes its blocks with the helpers here; the
timeline, selection and pipeline hooks know nothing about families.

At a pruned step the ``K`` computed rows of every batch row flow through the blocks (the
"K-row stream"). With the full-length stream (``CATConfig.stream = "full"``) a second stream of
all ``N`` image tokens runs beside it: every block writes the computed rows' attention and
feed-forward outputs into per-block caches of all tokens (:meth:`StepContext.residual`), and the
full-length stream adds the gated caches, so tokens not computed advance with the outputs cached
from the step they were last computed (cheap elementwise work). The final norm and projection
then run for all tokens as well (:meth:`StepContext.finish`): every token has a raw output to
score. The output merges the computed rows of the K-row stream in both modes, so both give the
same images for the same index sets.

Everything a step reads or writes between calls lives in :class:`Buffers`, allocated once per
``(rows, tokens, text tokens, dtype, device)`` and updated in place (``copy_``,
``index_copy_``): no ``torch.cat`` in a block, no host synchronisation, so a step can be
captured as a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import Tensor


@dataclass(frozen=True)
class BufferKey:
    """What the persistent buffers of a step depend on."""

    rows: int  # R: batch rows (2B with CFG)
    batch: int  # B: samples (index sets)
    n_tokens: int  # N: image tokens per row
    n_joint: int  # text tokens beside the image tokens in joint attention (0 for PixArt)
    n_text: int  # text tokens of the prompt embeddings
    out_dim: int  # p * p * C_out: values per output token
    dtype: torch.dtype
    device: torch.device


class KVCache:
    """Keys and values of one attention module: ``n_image`` image tokens, then ``n_text`` text
    tokens, per row.

    ``key``/``value`` are ``(R, n_image + n_text, D)``; ``*_heads`` are the ``(R, H, L, D / H)``
    views scaled dot-product attention reads; ``*_flat`` the ``(R * L, D)`` views that
    ``index_copy_`` writes the computed rows into; ``image_*`` / ``text_*`` the two parts.
    """

    def __init__(self, key: BufferKey, n_image: int, n_text: int, heads: int, dim: int):
        r, length = key.rows, n_image + n_text
        self.n_image, self.n_text, self.heads = n_image, n_text, heads
        self.key = torch.zeros(r, length, dim, dtype=key.dtype, device=key.device)
        self.value = torch.zeros_like(self.key)
        self.key_heads = self.key.view(r, length, heads, dim // heads).transpose(1, 2)
        self.value_heads = self.value.view(r, length, heads, dim // heads).transpose(1, 2)
        self.key_flat, self.value_flat = self.key.view(-1, dim), self.value.view(-1, dim)
        self.image_key, self.image_value = self.key[:, :n_image], self.value[:, :n_image]
        self.text_key, self.text_value = self.key[:, n_image:], self.value[:, n_image:]


class BranchCache:
    """A block branch's output (attention or feed-forward) for all image tokens: ``(R, N, D)``,
    with a ``(R * N, D)`` view for writing the computed rows (full-length stream only)."""

    def __init__(self, key: BufferKey, dim: int):
        self.full = torch.zeros(key.rows, key.n_tokens, dim, dtype=key.dtype, device=key.device)
        self.flat = self.full.view(-1, dim)


class IndexSet:
    """The tokens a pruned step computes, as persistent buffers for ``K`` tokens per sample.

    ``index``: ``(B, K)`` int64, what the selector (or a forced set) wrote for the next pruned
    step. ``rows_index``: ``(R * K,)`` rows of the flattened ``(R * N)`` image tokens (CFG rows
    ``b`` and ``B + b`` share sample ``b``'s set); ``kv_index``: the same rows in the flattened
    ``(R * (N + T))`` joint K/V caches. :meth:`update` derives both from ``index`` in place and
    keeps the set it used in ``current`` (what later calls of the same step compute).
    """

    def __init__(self, key: BufferKey, k: int):
        dev, r, b = key.device, key.rows, key.batch
        groups = r // b
        self.k = k
        self.index = torch.arange(k, device=dev).repeat(b, 1)
        self.current = self.index.clone()
        self.rows_index = torch.zeros(r * k, dtype=torch.long, device=dev)
        self.kv_index = torch.zeros(r * k, dtype=torch.long, device=dev)
        rows = torch.arange(r, device=dev).view(groups, b, 1)
        self._offsets = rows * key.n_tokens
        self._kv_offsets = rows * (key.n_tokens + key.n_joint)
        self._rows_out = self.rows_index.view(groups, b, k)
        self._kv_out = self.kv_index.view(groups, b, k)

    def update(self) -> None:
        self.current.copy_(self.index)
        index = self.index.unsqueeze(0)
        torch.add(index, self._offsets, out=self._rows_out)
        torch.add(index, self._kv_offsets, out=self._kv_out)


class Buffers:
    """Everything a step keeps between calls, for one :class:`BufferKey`; reused across
    generations (every full step rewrites what a later pruned step reads).

    Attributes:
        merged: ``(R, N, p*p*C_out)`` output tokens of the last step, unselected tokens reused.
        kv: joint K/V caches by attention module name (:class:`KVCache`).
        branches: full-length stream branch caches by name (:class:`BranchCache`).
        text: per-generation tensors of a family (context embedding, masks), written when the
            prompt embeddings change.
        index_sets: :class:`IndexSet` by ``K``.
    """

    def __init__(self, key: BufferKey):
        self.key = key
        self.merged = torch.zeros(
            key.rows, key.n_tokens, key.out_dim, dtype=key.dtype, device=key.device
        )
        self.merged_flat = self.merged.view(-1, key.out_dim)
        self.kv: dict[str, KVCache] = {}
        self.branches: dict[str, BranchCache] = {}
        self.text: dict[str, Tensor] = {}
        self.index_sets: dict[int, IndexSet] = {}
        self.query_buffers: dict[tuple[int, int], Tensor] = {}

    def index_set(self, k: int) -> IndexSet:
        found = self.index_sets.get(k)
        if found is None:
            found = self.index_sets[k] = IndexSet(self.key, k)
        return found

    def kv_cache(self, name: str, attn: Attention, n_image: int, n_text: int) -> KVCache:
        cache = self.kv.get(name)
        if cache is None:
            cache = self.kv[name] = KVCache(self.key, n_image, n_text, attn.heads, attn.inner_dim)
        return cache

    def queries(self, length: int, dim: int) -> Tensor:
        """A ``(R, length, dim)`` buffer for joint queries, shared by the blocks of a step
        (each uses it only within its attention call)."""
        found = self.query_buffers.get((length, dim))
        if found is None:
            key = self.key
            found = torch.empty(key.rows, length, dim, dtype=key.dtype, device=key.device)
            self.query_buffers[(length, dim)] = found
        return found

    def branch(self, name: str, dim: int) -> BranchCache:
        cache = self.branches.get(name)
        if cache is None:
            cache = self.branches[name] = BranchCache(self.key, dim)
        return cache

    def keep_text(self, name: str, value: Tensor) -> Tensor:
        """Store a per-generation tensor in place (same address across generations)."""
        kept = self.text.get(name)
        if kept is None or kept.shape != value.shape or kept.dtype != value.dtype:
            kept = self.text[name] = torch.empty_like(value)
        return kept.copy_(value)

    def mirror(self, other: Buffers, rows: slice) -> None:
        """Copy ``other``'s image state for its batch rows ``rows`` (image keys/values, branch
        caches, merged output) into these buffers: what a call that must not change ``other``
        reads (see :class:`~catbatch.pruning.hooks.CATState`, extra calls)."""
        for name, cache in other.kv.items():
            if not cache.n_image:  # text-only caches are the call's own prompt work
                continue
            mine = self.kv.get(name)
            if mine is None:
                n_text = self.key.n_joint if cache.n_text else 0
                dim = cache.key.shape[-1]
                mine = self.kv[name] = KVCache(self.key, cache.n_image, n_text, cache.heads, dim)
            mine.image_key.copy_(cache.image_key[rows])
            mine.image_value.copy_(cache.image_value[rows])
        for name, branch in other.branches.items():
            self.branch(name, branch.full.shape[-1]).full.copy_(branch.full[rows])
        self.merged.copy_(other.merged[rows])

    def nbytes(self) -> int:
        """Bytes held (caches, outputs, text tensors and index sets)."""
        tensors = [self.merged, *self.text.values()]
        tensors += [t for c in self.kv.values() for t in (c.key, c.value)]
        tensors += [c.full for c in self.branches.values()]
        tensors += list(self.query_buffers.values())
        for s in self.index_sets.values():
            tensors += [s.index, s.current, s.rows_index, s.kv_index]
        return sum(t.numel() * t.element_size() for t in tensors)


class StepContext:
    """What the blocks of one step share: its buffers, whether it is pruned, which stream.

    Attributes:
        buffers: the :class:`Buffers` of this call's shape.
        indices: the :class:`IndexSet` of a pruned step (its ``rows_index`` / ``kv_index``
            are current), or None at a full step (all tokens, in order).
        full_length: at a pruned step, also run the full-length stream (``stream = "full"``).
        fill: a full step whose branch outputs a following pruned step reuses (full-length
            stream): they are copied into the branch caches.
        record: name of the attention module whose image-query probabilities to keep.
        attention: the kept probabilities ``(R, Sq, N)``, averaged over heads.
        shadow: the full-length stream ``(R, N, D)`` during a pruned step, else None.
        raw: the full-length stream's output tokens ``(R, N, p*p*C_out)`` (scored), or None.
    """

    def __init__(
        self,
        buffers: Buffers,
        indices: IndexSet | None = None,
        *,
        full_length: bool = False,
        fill: bool = False,
        record: str | None = None,
    ):
        self.buffers = buffers
        self.indices = indices
        self.pruned = indices is not None
        self.full_length = full_length and self.pruned
        self.fill = fill and full_length and not self.pruned
        self.record = record
        self.attention: Tensor | None = None
        self.shadow: Tensor | None = None
        self.raw: Tensor | None = None

    @property
    def rows(self) -> int:
        return self.buffers.key.rows

    @property
    def n_tokens(self) -> int:
        return self.buffers.key.n_tokens

    # -- the two streams -----------------------------------------------------------------------
    def enter(self, tokens: Tensor) -> Tensor:
        """Patch tokens ``(R, N, D)`` -> the rows the blocks compute (all at a full step). The
        full-length stream starts from (and updates in place) ``tokens``."""
        if not self.pruned:
            return tokens
        if self.full_length:
            self.shadow = tokens
        d = tokens.shape[-1]
        rows = tokens.view(-1, d).index_select(0, self.indices.rows_index)
        return rows.view(self.rows, -1, d)

    def finish(self, head: Callable[[Tensor], Tensor], tokens: Tensor) -> Tensor:
        """The final norm and projection ``head`` of the computed rows (what the output merges);
        in the full-length stream also of every token, kept in ``raw`` for the selector."""
        if self.shadow is not None:
            self.raw = head(self.shadow)
        return head(tokens)

    def residual(
        self, name: str, stream: Tensor, out: Tensor, gate: Tensor | None = None
    ) -> Tensor:
        """``stream + gate * out`` for a branch output ``out`` ``(R * S, D)`` of the computed
        rows (diffusers' order: bit-exact); in the full-length stream the branch cache ``name``
        takes the computed rows and the full-length stream adds the gated cache in place (it
        only feeds the scores, so one fused pass is enough)."""
        rows = out.view(stream.shape)
        stream = stream + rows if gate is None else stream + gate * rows
        if self.shadow is not None:
            cache = self.buffers.branch(name, out.shape[-1])
            cache.flat.index_copy_(0, self.indices.rows_index, out)
            if gate is None:
                self.shadow.add_(cache.full)
            else:
                self.shadow.addcmul_(gate, cache.full)
        elif self.fill:
            self.buffers.branch(name, out.shape[-1]).full.copy_(rows)
        return stream

    # -- attention -----------------------------------------------------------------------------
    def write_image_kv(self, cache: KVCache, key: Tensor, value: Tensor) -> None:
        """Keys and values ``(R * S, D)`` of the computed image rows into ``cache``."""
        if self.pruned:
            index = self.indices.kv_index if cache.n_text else self.indices.rows_index
            cache.key_flat.index_copy_(0, index, key)
            cache.value_flat.index_copy_(0, index, value)
        else:
            cache.image_key.copy_(key.view(cache.image_key.shape))
            cache.image_value.copy_(value.view(cache.image_value.shape))

    def attend(
        self,
        name: str,
        attn: Attention,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        mask: Tensor | None = None,
        image_queries: bool = True,
    ) -> Tensor:
        """Attention of ``query`` ``(R * S, D)`` (rows of ``R``) over head-layout ``key`` and
        ``value`` ``(R, H, L, D / H)``; returns ``(R * S, D)``.

        In the module named ``record`` the probabilities of image queries are formed
        explicitly and their image-key part, averaged over heads, is kept in ``attention``.
        """
        d = query.shape[-1]
        q = query.view(self.rows, -1, attn.heads, d // attn.heads).transpose(1, 2)
        n_image = q.shape[2] if image_queries else 0
        return self._attention(name, q, key, value, mask, n_image).reshape(-1, d)

    def attend_joint(
        self, name: str, attn: Attention, query: Tensor, text_query: Tensor, cache: KVCache
    ) -> tuple[Tensor, Tensor]:
        """Joint attention of image queries ``(R * S, D)`` and text queries ``(R * T, D)`` over
        ``cache`` in one call, as diffusers does (one kernel over ``S + T`` queries is faster
        than two, and the same computation): the queries are written into a persistent
        ``(R, S + T, D)`` buffer (no ``torch.cat``). Returns the image and text outputs,
        ``(R * S, D)`` and ``(R * T, D)``."""
        r, h = self.rows, attn.heads
        d = query.shape[-1]
        s, t = query.shape[0] // r, text_query.shape[0] // r
        joint = self.buffers.queries(s + t, d)
        joint[:, :s].copy_(query.view(r, s, d))
        joint[:, s:].copy_(text_query.view(r, t, d))
        q = joint.view(r, s + t, h, d // h).transpose(1, 2)
        out = self._attention(name, q, cache.key_heads, cache.value_heads, None, s)
        return out[:, :s].reshape(-1, d), out[:, s:].reshape(-1, d)

    def _attention(
        self, name: str, q: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, n_image: int
    ) -> Tensor:
        """``(R, H, Sq, Dh)`` queries -> ``(R, Sq, H, Dh)`` outputs; the first ``n_image``
        queries are image queries (their probabilities are kept in the ``record`` module)."""
        if n_image and self.record == name:
            scores = (q @ key.transpose(-1, -2)) * q.shape[-1] ** -0.5
            if mask is not None:
                scores = scores + mask
            probs = scores.float().softmax(dim=-1)
            self.attention = probs[:, :, :n_image, : self.n_tokens].mean(dim=1)
            out = probs.to(value.dtype) @ value
        else:
            out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask)
        return out.transpose(1, 2)


@contextmanager
def weights_of(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` with its own parameters on the compute device for the duration.

    The step reads some parameters directly (PixArt's ``scale_shift_table``) instead of calling
    the module that owns them; accelerate's sequential CPU offload keeps those on the ``meta``
    device between the owner's forward calls, so its hook is run around the read.
    """
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        yield module
        return
    hook.pre_forward(module)
    try:
        yield module
    finally:
        hook.post_forward(module, None)


def modulation(norm: torch.nn.Module, silu_temb: Tensor, chunks: int) -> tuple[Tensor, ...]:
    """AdaLN-Zero's shift/scale/gate vectors of ``norm`` (its ``linear`` on ``silu(temb)``),
    each ``(R, 1, D)``."""
    emb = norm.linear(silu_temb)
    return emb.view(emb.shape[0], chunks, -1).split(1, dim=1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """AdaLN modulation ``x * (1 + scale) + shift``, in diffusers' order (bit-exact)."""
    return x * (1 + scale) + shift


def heads_view(x: Tensor, rows: int, heads: int) -> Tensor:
    """``(R * S, D)`` -> ``(R, S, H, D / H)`` (a view; QK norms apply over the last dim)."""
    return x.view(rows, -1, heads, x.shape[-1] // heads)


def project_qkv(attn: Attention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Image queries, keys and values of ``x`` ``(R * S, D)``: diffusers' fused ``to_qkv``
    after ``fuse_qkv_projections()``, else ``to_q`` / ``to_k`` / ``to_v``."""
    if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
        q, k, v = attn.to_qkv(x).chunk(3, dim=-1)
        return q, k, v
    return attn.to_q(x), attn.to_k(x), attn.to_v(x)


def project_added_qkv(attn: Attention, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Text queries, keys and values (SD3's added projections), fused or not."""
    if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
        q, k, v = attn.to_added_qkv(c).chunk(3, dim=-1)
        return q, k, v
    return attn.add_q_proj(c), attn.add_k_proj(c), attn.add_v_proj(c)


def project_kv(attn: Attention, c: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-attention keys and values of the context ``c``, fused (``to_kv``) or not."""
    if getattr(attn, "fused_projections", False) and hasattr(attn, "to_kv"):
        k, v = attn.to_kv(c).chunk(2, dim=-1)
        return k, v
    return attn.to_k(c), attn.to_v(c)


def normed(norm: torch.nn.Module | None, x: Tensor, rows: int, heads: int) -> Tensor:
    """``x`` ``(R * S, D)`` through a per-head QK norm (if any), back to ``(R * S, D)``."""
    if norm is None:
        return x
    return norm(heads_view(x, rows, heads)).view(x.shape)


def unpatchify(tokens: Tensor, grid: tuple[int, int], patch: int, channels: int) -> Tensor:
    """``(R, h*w, p*p*C)`` -> ``(R, C, h*p, w*p)``, as diffusers does."""
    h, w = grid
    x = tokens.reshape(tokens.shape[0], h, w, patch, patch, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], channels, h * patch, w * patch)


class CATProcessor:
    """Marks an attention module as run by the CAT step (which calls the module's projections
    itself); calling the module outside the step is an error, never a silent fallback."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, attn: Attention, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"attention {self.name} belongs to a CAT-pruned transformer: call the transformer "
            "(or remove_cat() first), not its blocks"
        )


def check_attention_module(attn: Attention) -> None:
    """Raise if ``attn`` uses a feature the CAT step does not reproduce."""
    # diffusers' newer attention classes (FluxAttention) have none of these attributes
    unsupported = {
        "spatial_norm": getattr(attn, "spatial_norm", None) is not None,
        "group_norm": getattr(attn, "group_norm", None) is not None,
        "residual_connection": bool(getattr(attn, "residual_connection", False)),
        "rescale_output_factor": getattr(attn, "rescale_output_factor", 1.0) != 1.0,
        "norm_cross": getattr(attn, "norm_cross", None) is not None,
    }
    bad = [name for name, present in unsupported.items() if present]
    if bad:
        raise NotImplementedError(f"CAT pruning does not support attention with {', '.join(bad)}")


class Family:
    """One model family's CAT step. Subclasses set the class attributes and implement the
    methods; the engine finds the family with :meth:`matches`."""

    name: ClassVar[str]
    model_class: ClassVar[type]
    # Inputs of the diffusers forward that the step does not reproduce (error when given).
    unsupported: ClassVar[tuple[str, ...]] = ()
    # The forward's attention-kwargs input whose ``scale`` is the LoRA scale (diffusers'
    # ``apply_lora_scale``), or None; its other keys are errors.
    attention_kwargs: ClassVar[str | None] = None
    # Inputs whose tensors :meth:`step` reads (a captured step copies them in); the others
    # are read by :meth:`prepare_text` only.
    step_inputs: ClassVar[tuple[str, ...]] = ("hidden_states", "timestep")
    # Whether a pipeline's ``guidance_scale > 1`` batches ``[uncond, cond]`` rows (classifier-free
    # guidance); False for guidance-distilled models (one row, one index set per image).
    cfg: ClassVar[bool] = True

    @classmethod
    def matches(cls, model: torch.nn.Module) -> bool:
        return isinstance(model, cls.model_class)

    @staticmethod
    def attention_modules(model: torch.nn.Module) -> dict[str, Attention]:
        """Every attention module the step runs, by name (``"{block}.{attr}"``)."""
        raise NotImplementedError

    @staticmethod
    def attention_name(model: torch.nn.Module, block: int) -> str:
        """Name of block ``block``'s image self-attention (for ``at-edm``)."""
        raise NotImplementedError

    @staticmethod
    def grid(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[int, int]:
        """``(h, w)`` token grid of the latents ``(R, C, H, W)`` (the selector's positions; the
        engine asks once per generation and input, see :meth:`grid_key`)."""
        p = model.config.patch_size
        hidden = inputs["hidden_states"]
        return hidden.shape[-2] // p, hidden.shape[-1] // p

    @staticmethod
    def grid_key(inputs: dict[str, Any]) -> Any:
        """What :meth:`grid` depends on, without reading tensor contents."""
        return tuple(inputs["hidden_states"].shape)

    @classmethod
    def n_tokens(cls, model: torch.nn.Module, inputs: dict[str, Any]) -> int:
        """Image tokens per row ``N`` (from shapes only: no host synchronisation)."""
        h, w = cls.grid(model, inputs)
        return h * w

    @staticmethod
    def output_dim(model: torch.nn.Module) -> int:
        """Values per output token: ``p * p * C_out``."""
        return model.config.patch_size**2 * model.out_channels

    @classmethod
    def output(cls, model: torch.nn.Module, tokens: Tensor, inputs: dict[str, Any]) -> Tensor:
        """Output tokens ``(R, N, p*p*C_out)`` -> the transformer's output latents (a new
        tensor: ``tokens`` is a persistent buffer)."""
        grid = cls.grid(model, inputs)
        return unpatchify(tokens, grid, model.config.patch_size, model.out_channels)

    @staticmethod
    def text_lengths(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[int, int]:
        """``(text tokens in joint attention beside the image tokens, prompt tokens)``."""
        raise NotImplementedError

    @staticmethod
    def text_key(inputs: dict[str, Any]) -> tuple[Any, ...]:
        """Identifies the per-generation text inputs (no host sync: addresses, versions)."""
        raise NotImplementedError

    @staticmethod
    def prepare_text(model: torch.nn.Module, buffers: Buffers, inputs: dict[str, Any]) -> None:
        """Compute what depends only on the prompt into ``buffers.text`` (once per
        generation)."""
        raise NotImplementedError

    @staticmethod
    def text_tokens(config: Any, max_sequence_length: int | None) -> int:
        """Prompt tokens its diffusers pipeline feeds the transformer (``max_sequence_length``:
        the call's, None for the pipeline's default)."""
        raise NotImplementedError

    @staticmethod
    def example_inputs(
        model: torch.nn.Module, rows: int, latent: tuple[int, int], text_tokens: int
    ) -> dict[str, Any]:
        """Forward inputs of the shapes a pipeline call passes (zeros; any device, ``meta``
        for sizes only): ``rows`` batch rows, ``latent`` = ``(H, W)`` of the latents."""
        raise NotImplementedError

    @staticmethod
    def step(model: torch.nn.Module, ctx: StepContext, inputs: dict[str, Any]) -> Tensor:
        """One step: output tokens ``(R, S, p*p*C_out)`` of the rows in the stream (all
        ``N`` at a full step, the ``K`` computed ones at a pruned step), via
        :meth:`StepContext.finish`."""
        raise NotImplementedError


def tensor_key(t: Tensor | None) -> tuple[Any, ...] | None:
    """Identity of a tensor's contents without reading them: address, shape, version."""
    if t is None:
        return None
    return (t.data_ptr(), tuple(t.shape), t.dtype, t._version)


def noise_channels(model: torch.nn.Module, tokens: Tensor) -> Tensor:
    """The noise-prediction part of output tokens ``(R, N, p*p*C_out)``.

    With PixArt's learned sigma (``C_out == 2 * C_in``) the last ``C_in`` channels of every
    patch position are variances, not noise: they are dropped from the score.
    """
    c_out, c_in = model.out_channels, model.config.in_channels
    if c_out != 2 * c_in:
        return tokens
    r, n, _ = tokens.shape
    return tokens.view(r, n, -1, c_out)[..., :c_in].reshape(r, n, -1)
