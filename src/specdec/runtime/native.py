"""specdec's own forward for Llama-family decoders (Llama, Mistral, Qwen2, Qwen3): the fast runtime.

On a CPU a small model's transformers forward is mostly framework work around the arithmetic: mask and
position objects, cache classes, module hooks and dispatch through ~20 modules per layer. This forward runs
the same weights, in the same dtype, with a handful of tensor ops per layer:

- weights packed once: q/k/v in one matrix and gate/up in another, so a layer is 4 matrix products, each
  stored transposed ([in, out]) for `x @ W`: MKL's few-row products with a row-major [out, in] weight (what
  `F.linear` hands it) ran markedly slower on the AMD EPYC of docs/runtime.md (Why these designs);
- the residual adds fused into those products (`addmm`), RMSNorm as one op (`F.rms_norm`);
- float32 weights, and bfloat16 ones on CPUs with bf16 units, go through oneDNN's product on a copy prepacked
  once in its blocked layout: MKL repacks the weight at every call, which dominates few-row products
  (docs/runtime.md, Batches), and bfloat16 would otherwise take a slower path (no float32 upcast either way).
  Trees and batches always use it; for one token `choose_one_token_kernel` times both kernels at load and
  keeps the faster (which one wins depends on the CPU and the model's size: docs/runtime.md);
- rotary embeddings as one complex multiply on q and k together: the q and k rows of each head are stored
  with their rotary pairs (i, i + d/2) side by side, a fixed permutation of the head dimension that changes
  no dot product q.k (both sides are permuted alike) and lets `view_as_complex` rotate each pair;
- attention through `F.scaled_dot_product_attention` on 4D inputs over its own preallocated cache
  [layers, kv_heads, capacity, head_dim], each layer's keys contiguous: the layout for which PyTorch's CPU
  flash-attention kernel applies (a token-major cache sends it to the unfused math path, several times slower:
  docs/runtime.md); keeping an accepted tree path is one gather for all layers. A single query (plain
  decoding) takes two float32 batched products instead: the kernel is slow for one query (docs/runtime.md).

It computes the function transformers computes, differing only in float rounding; `specdec.runtime.check`
compares both on the real model before this forward is trusted as a target (`NativeModel.supports` only
admits configurations it reproduces). Draft models use it without that check: a draft's numbers never reach
the output unverified.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from specdec.models.support import check_layer_types
from specdec.runtime.base import Scores
from specdec.runtime.kernels import PACKED_ROWS, faster_kernel, prepack, product
from specdec.runtime.prefix import Committed, PrefixCache
from specdec.tree import DraftTree

FAMILIES = {"llama", "mistral", "qwen2", "qwen3"}
# a batch's attention runs row by row when the rows' own keys are at most this share of the padded grid's:
# reading keys and values is most of its cost, and row by row reads no padding's (docs/runtime.md, Batches,
# has the measurement); rows of even lengths stay in one call
ROWWISE = 0.75
_STATIC_ROPE = {"default", "linear", "llama3"}  # inv_freq fixed at load time (no per-length update)


def _rope_type(config) -> str | None:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default"))


def unsupported_reason(model) -> str:
    """Why this forward does not reproduce `model`, or "" when it does."""
    config = getattr(model, "config", None)
    decoder = getattr(model, "model", None)
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        return f"model type {family!r} is not one of {', '.join(sorted(FAMILIES))}"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {getattr(config, 'hidden_act', None)!r} (only silu)"
    if getattr(config, "mlp_bias", False):
        return "MLP biases"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    if _rope_type(config) not in _STATIC_ROPE:
        return f"rope type {_rope_type(config)!r}"
    if not hasattr(getattr(decoder, "rotary_emb", None), "inv_freq") or not hasattr(model, "lm_head"):
        return "an unfamiliar module layout"
    # a CPU forward (its kernels, the prepacked products, and llama.cpp's conversion of it): a model on a GPU
    # runs on the transformers runtime, which `--runtime auto` then picks
    weight = next(model.parameters(), None)
    if weight is not None and weight.device.type != "cpu":
        return f"its weights are on {weight.device}, and this forward runs on the CPU only"
    return ""


@dataclass(frozen=True)
class Layer:
    """One decoder layer's weights, packed (the q and k rows in rotary-pair order, module docstring)."""

    ln1: torch.Tensor  # [H]
    wqkv_t: torch.Tensor  # [H, (heads + 2 kv_heads) * D], transposed for mm/addmm (see `NativeModel`)
    bqkv: torch.Tensor | None  # [(heads + 2 kv_heads) * D] (Qwen2, Llama with attention_bias)
    q_norm: torch.Tensor | None  # [D] per-head RMSNorm of q and k (Qwen3), pair order
    k_norm: torch.Tensor | None
    wo_t: torch.Tensor  # [heads * D, H], transposed for addmm
    bo: torch.Tensor | None  # [H]
    ln2: torch.Tensor  # [H]
    wgu_t: torch.Tensor  # [H, 2 I]: gate columns, then up columns
    wdown_t: torch.Tensor  # [I, H]
    # the four weights above prepacked for oneDNN's product (`product`), in that order; None: unavailable
    packed: tuple[Any, ...] | None = None


class NativeCache:
    """Keys/values [layers, rows, kv_heads, capacity, head_dim]: one row per sequence decoded together (one for
    a single generation); `lengths[r]` positions of row r are valid. Grows on demand."""

    def __init__(
        self, layers: int, kv_heads: int, head_dim: int, capacity: int, dtype, device, rows: int = 1
    ) -> None:
        shape = (layers, rows, kv_heads, capacity, head_dim)
        # several rows: a row's attention spans the longest row's slots, masked past its own length, and a
        # masked slot must still hold a finite number (NaN * weight 0 is NaN): zeros, not leftover memory
        make = torch.zeros if rows > 1 else torch.empty
        self.k = make(shape, dtype=dtype, device=device)
        self.v = make(shape, dtype=dtype, device=device)
        self.lengths = [0] * rows

    @property
    def length(self) -> int:
        """Row 0's length: the single generation's."""
        return self.lengths[0]

    @length.setter
    def length(self, value: int) -> None:
        self.lengths[0] = value

    def crop(self, length: int, row: int = 0) -> None:
        self.lengths[row] = min(self.lengths[row], length)

    def reserve(self, needed: int) -> None:
        capacity = self.k.shape[3]
        if needed > capacity:
            grow = max(needed, 2 * capacity) - capacity
            pad = (0, 0, 0, grow)
            self.k, self.v = F.pad(self.k, pad), F.pad(self.v, pad)

    def keep(self, start: int, offsets: list[int], row: int = 0) -> None:
        """After a forward written at `start` in `row`: keep the slots start+offsets (ascending), drop the
        rest."""
        n = len(offsets)
        if offsets != list(range(n)):  # a contiguous prefix needs no copy: rolling back is moving the length
            src = torch.tensor(offsets, dtype=torch.long, device=self.k.device) + start
            # gather first (index_select copies), so overlapping source and destination slots are safe
            self.k[:, row, :, start : start + n] = self.k[:, row].index_select(2, src)
            self.v[:, row, :, start : start + n] = self.v[:, row].index_select(2, src)
        self.lengths[row] = start + n

    def move(self, source: int, target: int) -> None:
        """Row `source`'s contents into row `target` (keeping a batch's live rows first)."""
        n = self.lengths[source]
        self.k[:, target, :, :n] = self.k[:, source, :, :n]
        self.v[:, target, :, :n] = self.v[:, source, :, :n]
        self.lengths[target] = n


def pair_order(head_dim: int) -> torch.Tensor:
    """[0, d/2, 1, d/2 + 1, ...]: HF's rotate-half partners side by side."""
    half = head_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()


def qkv_row_order(heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """Row order of a packed [q; k; v] weight for the fast forward: the q and k rows of each head in rotary-pair
    order (`pair_order`), the v rows unchanged. Index a `cat([q, k, v])` weight (or bias) with it."""
    pair = pair_order(head_dim)
    return torch.cat(
        [h * head_dim + pair for h in range(heads + kv_heads)]
        + [torch.arange((heads + kv_heads) * head_dim, (heads + 2 * kv_heads) * head_dim)]
    )


class RotaryTable:
    """Complex rotations per position for pair-ordered q/k rows, grown on demand: cos/sin computed in
    `inv_freq`'s dtype (float32 for HF targets, as HF does), scaled, rounded to the model's dtype as HF's
    cos/sin are, held in float32 (float64 for float64 models)."""

    def __init__(self, inv_freq: torch.Tensor, dtype: torch.dtype, scaling: float = 1.0) -> None:
        self.inv_freq, self.dtype, self.scaling = inv_freq, dtype, scaling
        self.table = torch.empty(0, device=inv_freq.device)  # where it is grown (the eagle head's: its GPU)

    def __call__(self, positions: torch.Tensor, end: int) -> torch.Tensor:
        """[T, 1, D/2] for positions [T], all below `end`."""
        if self.table.shape[0] < end:
            n = max(end, 2 * self.table.shape[0], 256)
            inv = self.inv_freq
            freqs = torch.outer(torch.arange(n, dtype=inv.dtype, device=inv.device), inv)  # [n, D/2]
            cos = (freqs.cos() * self.scaling).to(self.dtype)
            sin = (freqs.sin() * self.scaling).to(self.dtype)
            real = torch.float64 if self.dtype == torch.float64 else torch.float32
            self.table = torch.complex(cos.to(real), sin.to(real))
        return self.table[positions][:, None]


class NativeModel:
    """A Llama-family model's weights packed for the fast forward (shared by every generation using it).

    `layers` selects decoder layers by index (layer-skipping drafts run a subset of the target's layers).
    """

    def __init__(self, model, layers: Sequence[int] | None = None) -> None:
        config = model.config
        decoder = model.model
        self.model = model
        self.layer_ids = list(range(config.num_hidden_layers)) if layers is None else list(layers)
        attn0 = decoder.layers[0].self_attn
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(attn0, "head_dim", None) or config.hidden_size // self.heads
        self.hidden_size = config.hidden_size
        self.num_layers = config.num_hidden_layers
        self.eps = config.rms_norm_eps
        self.scale = float(getattr(attn0, "scaling", self.head_dim**-0.5))
        self.embed = decoder.embed_tokens.weight
        self.norm = decoder.norm.weight
        self.lm_head = model.lm_head.weight  # [V, H] (tied to `embed` or not: the GGUF export asks)
        self.lm_head_t = self.lm_head.detach().T.contiguous()  # [H, V]
        self.lm_head_packed = prepack(self.lm_head_t)
        # committed prefixes shared by the generations on these weights (`specdec.runtime.prefix`; None: off)
        self.prefix_cache: PrefixCache | None = None
        rotary = decoder.rotary_emb
        self.inv_freq = rotary.inv_freq.detach().to(torch.float32)
        self.rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        self.dtype, self.device = self.embed.dtype, self.embed.device
        self.packed_from = PACKED_ROWS  # tokens from which products take the prepacked weights (module doc)
        self._rotary = RotaryTable(self.inv_freq, self.dtype, self.rope_scaling)
        with torch.no_grad():
            self.layers = [self._pack(decoder.layers[i]) for i in self.layer_ids]

    @staticmethod
    def supports(model) -> bool:
        return not unsupported_reason(model)

    def _pack(self, layer) -> Layer:
        attn, mlp = layer.self_attn, layer.mlp
        d = self.head_dim
        pair = pair_order(d).to(self.device)
        order = qkv_row_order(self.heads, self.kv_heads, d).to(self.device)
        wqkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])[order]
        biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
        bqkv = torch.cat(biases)[order].contiguous() if all(b is not None for b in biases) else None
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        weights = (
            wqkv.T.contiguous(),
            attn.o_proj.weight.T.contiguous(),
            torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).T.contiguous(),
            mlp.down_proj.weight.T.contiguous(),
        )
        packed = tuple(prepack(w) for w in weights)
        return Layer(
            ln1=layer.input_layernorm.weight,
            wqkv_t=weights[0],
            bqkv=bqkv,
            q_norm=None if q_norm is None else q_norm.weight[pair].contiguous(),
            k_norm=None if k_norm is None else k_norm.weight[pair].contiguous(),
            wo_t=weights[1],
            bo=attn.o_proj.bias,
            ln2=layer.post_attention_layernorm.weight,
            wgu_t=weights[2],
            wdown_t=weights[3],
            packed=None if any(p is None for p in packed) else packed,
        )

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """HF's RMSNorm: normalise over the last dim in float32 (so float64 models round there too), scale."""
        if x.dtype == torch.float64:
            return weight * F.rms_norm(x.float(), x.shape[-1:], None, self.eps).to(x.dtype)
        return F.rms_norm(x, x.shape[-1:], weight, self.eps)

    def new_cache(self, capacity: int, rows: int = 1) -> NativeCache:
        return NativeCache(
            len(self.layers), self.kv_heads, self.head_dim, capacity, self.dtype, self.device, rows
        )

    @torch.inference_mode()
    def forward(
        self,
        cache: NativeCache,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        layers: Sequence[int] = (),
        logits: str = "all",
    ) -> Scores:
        """Run tokens ids [T] at `positions` [T] after row 0 of the cache, attending by `mask` [T, past + T]
        (True = visible; None = causal: for T = 1, or T tokens into an empty cache). Writes their keys/values
        at slots past..past+T-1 and advances the row's length by T. `logits`: "all" rows, "last" row, or
        "none"; `layers`: HF hidden_states ids."""
        past, t = cache.length, ids.shape[0]
        causal = mask is None and t > 1  # a chunk into an empty cache: the kernel's own causal masking
        assert not causal or past == 0, "a chunk after the cache needs an explicit mask"
        scores = self._run(cache, ids[None], positions[None], mask, [past], causal, layers, logits)
        cache.length = past + t
        return scores

    @torch.inference_mode()
    def forward_block(
        self,
        cache: NativeCache,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        keys_end: int = 0,
        logits_from: int = 0,
    ) -> torch.Tensor:
        """A diffusion block's forward (`specdec.dllm`), as `forward` with every row's logits, plus: `keys_end`,
        attend to cache slots up to this one even past the new tokens (the mask is then [T, keys_end]: the
        block's cached suffix); `logits_from`, only rows from this one on (the LM head is the costliest
        product). Returns logits [T - logits_from, V]."""
        past, t = cache.length, ids.shape[0]
        scores = self._run(
            cache,
            ids[None],
            positions[None],
            mask,
            [past],
            False,
            (),
            "all",
            keys_end=keys_end,
            logits_from=logits_from,
        )
        cache.length = past + t
        return scores.logits

    @torch.inference_mode()
    def forward_rows(
        self,
        cache: NativeCache,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        real: torch.Tensor | None = None,
        layers: Sequence[int] = (),
    ) -> Scores:
        """One forward over rows 0..B-1 of the cache, N tokens each (a row's tree padded to N): ids and
        positions [B, N], `mask` [B, N, S] with S = max(lengths) + N (True = visible), `real` [R] the flat
        indices (row * N + i) of the real tokens: only they go through the matrix products (padding costs
        only attention; None: every token is real). Each row's tokens are written after its own length, which is
        left as it is (the caller commits). Returns logits [R, V] and the hidden states of `layers` [R, H], in
        `real`'s order."""
        b = ids.shape[0]
        return self._run(cache, ids, positions, mask[:, None], cache.lengths[:b], False, layers, "all", real)

    def _run(
        self, cache, ids, positions, mask, pasts, causal, layers, logits, real=None, keys_end=0, logits_from=0
    ) -> Scores:
        """The layers over ids [B, N] (one generation: B = 1), flattened to T tokens for all but attention
        (T = B * N, or the `real` ones: attention alone sees the [B, N] grid, padding as zero keys); row r's
        keys/values go to cache row r after its length pasts[r]."""
        b, n = ids.shape
        grid = b * n
        end = max(max(pasts) + n, keys_end)
        cache.reserve(end)
        # rows of uneven lengths: attention row by row over each row's own keys, not all over the longest's
        # (reading keys and values is most of a batch step's attention; see ROWWISE)
        ends = [past + n for past in pasts]
        rowwise = b > 1 and not keys_end and sum(ends) <= ROWWISE * b * end
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        ids, positions = ids.reshape(grid), positions.reshape(grid)
        if real is not None:
            ids, positions = ids[real], positions[real]
        t = ids.shape[0]
        rot = self._rotary(positions, end)  # [T, 1, D/2]; every position is below `end`
        wanted = set(layers)
        hidden: dict[int, torch.Tensor] = {}
        x = self.embed[ids]  # [T, H]
        for slot, w in enumerate(self.layers):
            if slot in wanted:
                hidden[slot] = x
            normed = self._norm(x, w.ln1)
            packed = w.packed if t >= self.packed_from else None
            qkv = product(normed, w.wqkv_t, packed and packed[0], w.bqkv)
            qk = self._rotated_qk(qkv[:, : (h + kv) * d].view(t, h + kv, d), w, rot)
            v_flat = qkv[:, (h + kv) * d :]
            if real is not None:  # onto the [B, N] grid attention works on
                qk = qk.new_zeros(grid, h + kv, d).index_copy_(0, real, qk)
                v_flat = v_flat.new_zeros(grid, kv * d).index_copy_(0, real, v_flat)
            new_k = qk[:, h:].view(b, n, kv, d).transpose(1, 2)  # [B, kv_heads, N, D]
            new_v = v_flat.view(b, n, kv, d).transpose(1, 2)
            for row, past in enumerate(pasts):
                cache.k[slot, row, :, past : past + n] = new_k[row]
                cache.v[slot, row, :, past : past + n] = new_v[row]
            keys = cache.k[slot, :b, :, :end]  # [B, kv_heads, S, D]
            values = cache.v[slot, :b, :, :end]
            q = qk[:, :h].view(b, n, h, d).transpose(1, 2)  # [B, heads, N, D]
            out = self._attend(q, keys, values, mask, ends if rowwise else None, causal)  # [B, heads, N, D]
            attended = out.transpose(1, 2).reshape(grid, h * d)
            if real is not None:
                attended = attended.index_select(0, real)
            x = product(attended, w.wo_t, packed and packed[1], residual=x)
            if w.bo is not None:
                x = x + w.bo
            gate, up = product(self._norm(x, w.ln2), w.wgu_t, packed and packed[2]).chunk(2, dim=-1)
            x = product(F.silu(gate) * up, w.wdown_t, packed and packed[3], residual=x)
        return self._outputs(x, hidden, wanted, logits, logits_from)

    def _rotated_qk(self, qk: torch.Tensor, w: Any, rot: torch.Tensor) -> torch.Tensor:
        """Queries and keys [T, heads + kv_heads, D], normed per head where the model does (Qwen3) and rotated
        by `rot` [T, 1, D/2] (complex), in the model's dtype."""
        t, heads, d = qk.shape
        h = self.heads
        if w.q_norm is not None and w.k_norm is not None:
            qk = torch.cat([self._norm(qk[:, :h], w.q_norm), self._norm(qk[:, h:], w.k_norm)], dim=1)
        pairs = qk.to(rot.real.dtype).reshape(t, heads, d // 2, 2)
        return torch.view_as_real(torch.view_as_complex(pairs) * rot).view(t, heads, d).to(self.dtype)

    def _attend(self, q, keys, values, mask, ends: list[int] | None, causal: bool) -> torch.Tensor:
        """Attention of q [B, heads, N, D] over keys/values [B, kv_heads, S, D]; `ends`: row by row, each over
        its own first ends[r] keys (rows of uneven lengths; see ROWWISE), else over all S under `mask`."""
        gqa = self.kv_heads != self.heads
        one_query = q.shape[2] == 1  # one query per row sees all its keys: no mask needed
        if ends is None:
            if one_query and q.shape[0] == 1:
                return self._one_query(q, keys, values)
            return F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=gqa, is_causal=causal
            )
        if one_query:
            return torch.cat(
                [
                    self._one_query(q[r : r + 1], keys[r : r + 1, :, :e], values[r : r + 1, :, :e])
                    for r, e in enumerate(ends)
                ]
            )
        return torch.cat(
            [
                F.scaled_dot_product_attention(
                    q[r : r + 1],
                    keys[r : r + 1, :, :e],
                    values[r : r + 1, :, :e],
                    attn_mask=mask[r : r + 1, :, :, :e],
                    scale=self.scale,
                    enable_gqa=gqa,
                )
                for r, e in enumerate(ends)
            ]
        )

    def _one_query(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """One query's attention, q [1, heads, 1, D] over all of keys/values [1, kv_heads, S, D], as two batched
        matrix products in float32 (float64 for a float64 model): the arithmetic SDPA's CPU kernel does, which
        for a single query is several times slower, most of all in bfloat16 (docs/runtime.md, Attention)."""
        h, d = q.shape[1], q.shape[3]
        kv, exact = keys.shape[1], torch.promote_types(q.dtype, torch.float32)
        grouped = q.reshape(kv, h // kv, d).to(
            exact
        )  # query heads by their kv head, as enable_gqa pairs them
        scores = torch.bmm(grouped, keys[0].to(exact).transpose(1, 2)).mul_(self.scale)  # [kv, h / kv, S]
        out = torch.bmm(scores.softmax(-1), values[0].to(exact))  # [kv, h / kv, D]
        return out.view(1, h, 1, d).to(q.dtype)

    def _outputs(
        self, x, hidden: dict[int, torch.Tensor], wanted: set[int], logits: str, logits_from: int
    ) -> Scores:
        """The final norm and the LM head over the last layer's output x [T, H]: logits for "all" tokens (from
        `logits_from` on), the "last" one or "none", and the final hidden state when it was asked for."""
        out_layer = len(self.layers) if len(self.layers) == self.num_layers else None
        if logits == "none" and out_layer not in wanted:
            return Scores(torch.empty(0), hidden)
        if logits == "last" and out_layer not in wanted:
            x = x[-1:]
        normed = self._norm(x, self.norm)
        if out_layer in wanted:
            hidden[self.num_layers] = normed
        if logits == "none":
            return Scores(torch.empty(0), hidden)
        rows = normed[-1:] if logits == "last" else normed[logits_from:]
        head = self.lm_head_packed if rows.shape[0] >= self.packed_from else None
        return Scores(product(rows, self.lm_head_t, head), hidden)


def choose_one_token_kernel(native: NativeModel, clock=None, repeats: int = 5) -> int:
    """Time a one-token forward after a 64-token past with MKL's product and with oneDNN's prepacked one
    (`faster_kernel`) and keep the faster in `native.packed_from` (1: prepacked); returns it. Nothing to choose
    where the weights are not prepacked."""
    import time

    if native.lm_head_packed is None or any(w.packed is None for w in native.layers):
        return native.packed_from
    past, device = 64, native.device
    cache = native.new_cache(past + 1)
    native.forward(cache, torch.arange(past, device=device), torch.arange(past, device=device), None)
    token, position = torch.tensor([5], device=device), torch.tensor([past], device=device)

    def forward(rows: int) -> None:
        native.packed_from = rows
        native.forward(cache, token, position, None)
        cache.length = past  # the same forward again next time

    native.packed_from = faster_kernel(forward, repeats, clock or time.perf_counter)
    return native.packed_from


def _causal_mask(past: int, t: int, device) -> torch.Tensor | None:
    """[T, past + T] bool, True = visible: the past fully, the chunk causally (None for one token, or for a
    chunk into an empty cache, which SDPA masks causally itself, faster)."""
    if t == 1 or past == 0:
        return None
    return torch.ones(t, past + t, dtype=torch.bool, device=device).tril_(diagonal=past)


class NativeRunner:
    """One generation's cache over a shared `NativeModel` (`specdec.runtime.base.Runtime`)."""

    name = "native"

    def __init__(self, native: NativeModel) -> None:
        self.native = native
        self.cache: NativeCache | None = None
        self.forwards = 0
        self.committed = Committed()  # what the cache holds, for the prefix cache (`reset` turns it on)
        self.cached_tokens = 0  # of the prompt, restored from the prefix cache

    @property
    def max_positions(self) -> int | None:
        return getattr(self.native.model.config, "max_position_embeddings", None)

    @property
    def length(self) -> int:
        return 0 if self.cache is None else self.cache.length

    def reset(self, positions: int, slack: int = 0) -> None:
        # a sliding window wider than the request is full attention; a narrower one is refused, as by
        # transformers' runtime
        check_layer_types(self.native.model, positions)
        self.cache = self.native.new_cache(positions + slack)
        self.forwards = 0
        self.committed, self.cached_tokens = Committed(self.native.prefix_cache is not None), 0

    def _run(self, token_ids: list[int], positions=None, mask=None, layers=(), logits="all") -> Scores:
        cache = self.cache
        assert cache is not None, "reset() or start() comes first"
        device = self.native.device
        past, t = cache.length, len(token_ids)
        ids = torch.tensor(token_ids, dtype=torch.long, device=device)
        if positions is None:
            positions = torch.arange(past, past + t, device=device)
            mask = _causal_mask(past, t, device)
        self.forwards += 1
        return self.native.forward(cache, ids, positions, mask, layers, logits)

    def prefill(self, token_ids: list[int], layers: Sequence[int] = ()) -> Scores:
        """Run the tokens causally into the cache; only the requested hidden states are computed fully."""
        if not token_ids:
            return Scores(torch.empty(0), {})
        prefix, cache = self.native.prefix_cache, self.cache
        restored: dict[int, torch.Tensor] = {}
        if prefix is not None and cache is not None and cache.length == 0:
            # the longest cached prefix, short of the last token (whose logits the caller reads)
            n, restored = prefix.restore(token_ids, cache.k[:, 0], cache.v[:, 0], len(token_ids) - 1, layers)
            cache.length = self.cached_tokens = n
        scores = self._run(token_ids[self.cached_tokens :], layers=layers, logits="last")
        if restored:  # the cached positions' states first, then the ones just computed
            scores = Scores(scores.logits, {i: torch.cat([restored[i], h]) for i, h in scores.hidden.items()})
        self.committed.begin(token_ids, scores.hidden)
        return scores

    def score(self, tree: DraftTree, layers: Sequence[int] = ()) -> Scores:
        """One forward over the tree nodes after the committed cache; logits [N, V], row i for node i."""
        past = self.length
        device = self.native.device
        positions = torch.tensor([past + depth for depth in tree.depths], dtype=torch.long, device=device)
        mask = None
        if len(tree) > 1:
            mask = torch.ones(len(tree), past + len(tree), dtype=torch.bool, device=device)
            mask[:, past:] = tree.ancestor_mask().to(device)
        scores = self._run(tree.tokens, positions, mask, layers)
        return Scores(scores.logits, scores.hidden, past, tree)

    def commit(self, scores: Scores, accepted_nodes: list[int]) -> None:
        assert self.cache is not None, "commit() follows score()"
        self.cache.keep(scores.start, accepted_nodes)
        if scores.tree is not None and self.committed.on:
            self.committed.add([scores.tree.tokens[i] for i in accepted_nodes], scores.hidden, accepted_nodes)

    def crop(self, length: int) -> None:
        assert self.cache is not None, "reset() or start() comes first"
        self.cache.crop(length)
        self.committed.crop(length)

    def keep_prefix(self) -> None:
        """Offer the committed sequence to the prefix cache (a generation ended)."""
        prefix, cache = self.native.prefix_cache, self.cache
        if prefix is not None and cache is not None:
            self.committed.keep(prefix, cache.k[:, 0], cache.v[:, 0], cache.length)

    def free(self) -> None:
        self.cache = None

    def start(self, prompt_ids: list[int], positions: int, slack: int = 0) -> torch.Tensor:
        """Prefill into a fresh cache; returns the logits [V] for the token after the prompt (drafts)."""
        self.reset(positions, slack)
        self.committed.begin(prompt_ids, {})
        return self._run(prompt_ids, logits="last").logits[-1]

    def extend(self, token_ids: list[int]) -> torch.Tensor:
        """Append tokens causally after the cache; returns their logits [T, V]."""
        self.committed.add(token_ids, {})
        return self._run(token_ids).logits
