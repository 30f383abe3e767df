"""The EAGLE-3 head's drafting path, `PackedHead`: the function of `Eagle3Head.step` (eagle3.py: the reference,
which training and the tests use) on weights packed the way `specdec.runtime.native` packs a target layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from specdec.heads.eagle3 import Eagle3Head, HeadCache, chain_visible, head_input


class PackedHead:
    """The head's weights packed for drafting, the way `specdec.runtime.native` packs a target layer: q/k/v in
    one matrix with the q and k rows of each head in rotary-pair order (rotary as one complex multiply; a fixed
    permutation of the head dimension on both sides changes no q.k), gate/up in one, residual adds fused,
    products by the target forward's kernels (`Matrix`: oneDNN on prepacked weights from two rows on, and for one row where timed faster),
    RMSNorm as one op, rotations from a table. `Eagle3Head.step` computes the same function (the
    reference: training and tests use it); this one is what drafting calls every level, so its ~30 small ops
    per call are what it saves. A cache written by one must not be read by the other (key layouts differ).
    """

    def __init__(self, head: Eagle3Head) -> None:
        from specdec.runtime.kernels import Matrix
        from specdec.runtime.native import RotaryTable, qkv_row_order

        c, layer = head.config, head.midlayer
        attn, mlp = layer.self_attn, layer.mlp
        self.head, self.config = head, c
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        order = qkv_row_order(self.heads, self.kv_heads, c.head_dim)
        with torch.no_grad():
            self.fc_width = head.fc.weight.shape[1]
            self.fc = Matrix(head.fc.weight)
            self.wqkv = Matrix(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])[order])
            self.wo = Matrix(attn.o_proj.weight)
            self.wgu = Matrix(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
            self.wdown = Matrix(mlp.down_proj.weight)
            self.lm_head = Matrix(head.lm_head.weight)
        self.ln_in, self.ln_hidden = layer.input_layernorm.weight, layer.hidden_norm.weight
        self.ln_post, self.ln_final = layer.post_attention_layernorm.weight, head.norm.weight
        self.dtype = head.lm_head.weight.dtype
        self._rotary = RotaryTable(head.inv_freq, self.dtype)  # the reference's cos/sin, in inv_freq's dtype

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, x.shape[-1:], weight, self.config.rms_norm_eps)

    @torch.inference_mode()
    def step(
        self,
        cache: HeadCache,
        features: torch.Tensor,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        visible: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`Eagle3Head.step`, the same arguments and results. `positions` may be on the host while the rest is on
        a GPU (the eagle drafter keeps them there): their largest, which sizes the rotary table, is then read
        without a host sync."""
        c = self.config
        m = tokens.shape[0]
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        features = head_input(features, self.fc, self.fc_width, c.hidden_size)
        start = cache.reserve(m)
        normed = self._norm(features, self.ln_hidden)
        residual = normed if c.norm_before_residual else features
        emb = self.head.embed_tokens[tokens].to(features.dtype)
        qkv = self.wqkv(torch.cat([self._norm(emb, self.ln_in), normed], dim=-1))  # [m, (h+2kv)*D]
        rot = self._rotary(positions, int(positions.max()) + 1)
        pairs = qkv[:, : (h + kv) * d].to(rot.real.dtype).reshape(m, h + kv, d // 2, 2)
        qk = torch.view_as_real(torch.view_as_complex(pairs) * rot).view(m, h + kv, d).to(self.dtype)
        cache.k[:, start : start + m] = qk[:, h:].transpose(0, 1)
        cache.v[:, start : start + m] = qkv[:, (h + kv) * d :].view(m, kv, d).transpose(0, 1)
        cache.length = end = start + m
        if visible is None:
            visible = chain_visible(start, m, qk.device)
        attn = F.scaled_dot_product_attention(
            qk[:, :h].transpose(0, 1)[None],  # [1, heads, m, D]
            cache.k[None, :, :end],
            cache.v[None, :, :end],
            attn_mask=None if visible is None else visible[None, None],
            enable_gqa=kv != h,
        )  # [1, heads, m, D]
        x = self.wo(attn[0].transpose(0, 1).reshape(m, h * d), residual=residual)
        gate, up = self.wgu(self._norm(x, self.ln_post)).chunk(2, dim=-1)
        out = self.wdown(F.silu(gate) * up, residual=x)  # [m, H]: the next features (pre-norm)
        return self.lm_head(self._norm(out, self.ln_final)), out
