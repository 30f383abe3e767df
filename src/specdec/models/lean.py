"""A lean forward pass for Llama-architecture DRAFT models, without transformers' per-call machinery.

On a CPU a small model's forward is mostly framework overhead: the shipped 1.5M-parameter draft costs about
as much per token through `model(...)` as a far larger model's arithmetic (mask building, cache objects,
module hooks, dispatch across ~20 modules per layer). A draft model runs several times per step, so that
overhead decides whether draft-model speculation can win at all. This module runs the same weights with a
handful of fused tensor ops per layer and its own preallocated cache.

Only drafting uses it: a draft's numbers never reach the output unverified, so a lean forward that differs
from transformers' in float rounding changes speed, never text (sampled drafts report the q they were drawn
from, computed here). `LeanRunner.supports` accepts only configurations whose arithmetic it reproduces
(checked against transformers in the tests); anything else keeps the ordinary `ModelRunner`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

_STATIC_ROPE = {"default", "linear", "llama3"}  # inv_freq fixed at load time (no per-length update)


def _rope_type(config) -> str | None:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default"))


class LeanCache:
    """Keys/values [layers, kv_heads, capacity, head_dim]; `length` positions are valid. Grows on demand."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int, dtype, device) -> None:
        shape = (layers, kv_heads, capacity, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    def crop(self, length: int) -> None:
        self.length = min(self.length, length)

    def reserve(self, needed: int) -> None:
        capacity = self.k.shape[2]
        if needed > capacity:
            grow = max(needed, 2 * capacity) - capacity
            pad = (0, 0, 0, grow)
            self.k, self.v = F.pad(self.k, pad), F.pad(self.v, pad)


class LeanRunner:
    """The `ModelRunner` surface a drafter needs (start, extend, cache.crop, forwards) for a Llama model.

    `layers` selects decoder layers by index (layer-skipping drafts run a subset of the target's layers).
    """

    def __init__(self, model, layers: Sequence[int] | None = None) -> None:
        config = model.config
        decoder = model.model
        self.layer_ids = list(range(config.num_hidden_layers)) if layers is None else list(layers)
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.scale = self.head_dim**-0.5
        self.embed = decoder.embed_tokens.weight
        self.norm = decoder.norm.weight
        self.lm_head = model.lm_head.weight
        rotary = decoder.rotary_emb
        self.inv_freq = rotary.inv_freq.detach().to(torch.float32)
        self.rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        self.dtype, self.device = self.embed.dtype, self.embed.device
        self.weights = []
        with torch.no_grad():
            for i in self.layer_ids:
                layer = decoder.layers[i]
                attn, mlp = layer.self_attn, layer.mlp
                self.weights.append(
                    (
                        layer.input_layernorm.weight,
                        torch.cat(
                            [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
                        ).T.contiguous(),
                        attn.o_proj.weight.T.contiguous(),
                        layer.post_attention_layernorm.weight,
                        torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).T.contiguous(),
                        mlp.down_proj.weight.T.contiguous(),
                    )
                )
        self.cache: LeanCache | None = None
        self.forwards = 0
        self._cos = self._sin = torch.empty(0)

    @staticmethod
    def supports(model) -> bool:
        """True for plain Llama models (the shipped ones included) whose arithmetic this forward reproduces."""
        config = getattr(model, "config", None)
        decoder = getattr(model, "model", None)
        return (
            getattr(config, "model_type", None) == "llama"
            and getattr(config, "hidden_act", None) == "silu"
            and not getattr(config, "attention_bias", False)
            and not getattr(config, "mlp_bias", False)
            and getattr(config, "pretraining_tp", 1) == 1
            and _rope_type(config) in _STATIC_ROPE
            and hasattr(getattr(decoder, "rotary_emb", None), "inv_freq")
            and hasattr(model, "lm_head")
        )

    def start(self, prompt_ids: list[int], positions: int, slack: int = 0) -> torch.Tensor:
        """Prefill into a fresh cache with room for `positions + slack` entries; returns the logits [V] for
        the token after the prompt."""
        capacity = positions + slack
        self.cache = LeanCache(
            len(self.layer_ids), self.kv_heads, self.head_dim, capacity, self.dtype, self.device
        )
        self.forwards = 0
        return self._forward(prompt_ids, last_only=True)[-1]

    def extend(self, token_ids: list[int]) -> torch.Tensor:
        """Append tokens causally after the cache; returns their logits [T, V]."""
        return self._forward(token_ids, last_only=False)

    def _rope(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos.shape[0] < end:
            n = max(end, 2 * self._cos.shape[0], 256)
            freqs = torch.outer(torch.arange(n, dtype=torch.float32, device=self.device), self.inv_freq)
            emb = torch.cat([freqs, freqs], dim=-1)
            self._cos = (emb.cos() * self.rope_scaling).to(self.dtype)
            self._sin = (emb.sin() * self.rope_scaling).to(self.dtype)
        return self._cos, self._sin

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    @torch.inference_mode()
    def _forward(self, ids: list[int], last_only: bool) -> torch.Tensor:
        cache = self.cache
        assert cache is not None, "start() comes before extend()"
        past, t = cache.length, len(ids)
        cache.reserve(past + t)
        cos_all, sin_all = self._rope(past + t)
        cos, sin = cos_all[past : past + t][None], sin_all[past : past + t][None]  # [1, T, D]
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        half = d // 2
        mask = None
        if t > 1:  # causal within the chunk; the past is fully visible
            mask = torch.ones(t, past + t, dtype=torch.bool, device=self.device).tril_(diagonal=past)
        x = self.embed[torch.tensor(ids, device=self.device)]
        for slot, (ln1, wqkv, wo, ln2, wgu, wdown) in enumerate(self.weights):
            qkv = self._rms(x, ln1) @ wqkv
            q = qkv[:, : h * d].view(t, h, d).transpose(0, 1)
            k = qkv[:, h * d : (h + kv) * d].view(t, kv, d).transpose(0, 1)
            v = qkv[:, (h + kv) * d :].view(t, kv, d).transpose(0, 1)
            q = q * cos + torch.cat([-q[..., half:], q[..., :half]], dim=-1) * sin
            k = k * cos + torch.cat([-k[..., half:], k[..., :half]], dim=-1) * sin
            cache.k[slot, :, past : past + t] = k
            cache.v[slot, :, past : past + t] = v
            keys, values = cache.k[slot, :, : past + t], cache.v[slot, :, : past + t]
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=kv != h
            )
            x = x + out.transpose(0, 1).reshape(t, h * d) @ wo
            gate, up = (self._rms(x, ln2) @ wgu).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ wdown
        cache.length = past + t
        self.forwards += 1
        if last_only:
            x = x[-1:]
        return self._rms(x, self.norm) @ self.lm_head.T
