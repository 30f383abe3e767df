"""EAGLE-3 draft head: one Llama decoder layer over the target's own hidden states, with a reduced draft vocabulary.

Per position t the head reads f_t = concat of the target's hidden states at three layers (low, middle, high;
[3H_t]) projected by `fc` to [H], and the target's embedding of the NEXT token x_{t+1}. Its one decoder layer
attends over concat(RMSNorm(embedding), RMSNorm(feature)) ([2H]: q/k/v take 2H inputs), with the feature as the
residual; the pre-norm output is the head's own prediction of the next feature, fed back as f for the next
draft step, and norm + lm_head give logits over the draft vocabulary (target id = i + d2t[i]).

specdec's on-disk format IS the layout vLLM and SGLang load, so exporting a head is a copy (plus its layer ids
in the engine's own numbering: layer_ids.py) and published heads load here. Matched against (read with the
search tool; not copied):
  - vllm-project/vllm `vllm/model_executor/models/llama_eagle3.py`: `Eagle3LlamaForCausalLM`; `midlayer.` ->
    `layers.0.`; fc input = 3 * `target_hidden_size` (else 3 * hidden_size); `draft_vocab_size`; `d2t` ->
    `draft_id_to_target_id` (target id = i + d2t[i]); `t2d` skipped; `embed_tokens` optional; the decoder layer
    computes residual = feature, cat(input_layernorm(embeds), hidden_norm(feature)), attention,
    post_attention_layernorm(h, residual), mlp, then norm(h, residual) returning (normed, pre-norm) — the
    pre-norm output is the feature fed back; `norm_before_residual` makes the residual hidden_norm(feature).
  - vllm-project/vllm `vllm/model_executor/models/llama.py`: aux hidden state id i is `hidden_states +
    residual` as it enters decoder layer i, i.e. the INPUT of layer i, which is Hugging Face's
    `output_hidden_states[i]` (entry 0 = embeddings output); default ids (2, L // 2, L - 3).
  - sgl-project/sglang `python/sglang/srt/models/llama_eagle3.py`: `LlamaForCausalLMEagle3`, the same
    `midlayer`/`fc`/`norm`/`lm_head` names, `hot_token_id = d2t + arange`; with `tie_word_embeddings` true it
    would use embed_tokens as lm_head, so configs written here say false. SGLang numbers the layer ids
    differently (id a = the OUTPUT of layer a = HF's a + 1): `aux_layer_ids` are always HF's here, and
    layer_ids.py translates them where a file is read or exported (docs/export.md cites both engines).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import specdec.heads.layer_ids as layer_ids
from specdec.errors import InputError
from specdec.heads.checkpoint import WEIGHTS_FILE, read_config, write_checkpoint

ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")  # SGLang's name first; vLLM takes both


def default_aux_layer_ids(num_layers: int) -> tuple[int, int, int]:
    """Low/middle/high aux layers (vLLM convention: id i = the input of decoder layer i).

    vLLM's default (2, L // 2, L - 3) is meant for deep targets and collapses for shallow ones (L = 6 gives
    (2, 3, 3)). Then: (1, L // 2, L - 1) — id 0 is only the token embedding (the head already reads the next
    token's embedding, and id 1 carries the current token after one layer), and L - 1, the input of the last
    layer, is the deepest state an id can name; for L = 6 that is (1, 3, 5), one every two layers.
    """
    ids = (2, num_layers // 2, num_layers - 3)
    if ids[0] < ids[1] < ids[2]:
        return ids
    return (min(1, num_layers - 1), num_layers // 2, num_layers - 1)


@dataclass
class Eagle3Config:
    hidden_size: (
        int  # the head's width; equals the target's embedding width (it reads the target's embeddings)
    )
    target_hidden_size: int  # width of each of the target's aux hidden states; fc reads 3 of them
    vocab_size: int  # the target's vocabulary (rows of the shared embedding, length of t2d)
    draft_vocab_size: int  # rows of lm_head: the most frequent target tokens (VOCABTRIM); full vocab allowed
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    aux_layer_ids: tuple[int, ...] = (1, 3, 5)  # HF output_hidden_states indices == vLLM's layer ids
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    norm_before_residual: bool = False  # a vLLM variant some published heads use (residual = hidden_norm(f))
    extra: dict = field(default_factory=dict)  # other config.json fields, written back unchanged
    layer_ids_reading: str = ""  # how a loaded config.json's ids were read (layer_ids.Reading); not written

    def to_json(self) -> dict:
        """config.json in the layout vLLM/SGLang read (standard Llama fields + EAGLE-3 ones). The ids are HF's
        (vLLM's), written where vLLM reads them (top level) and where SGLang does (eagle_config), with specdec's
        marker saying so; `specdec export-drafter --format sglang` restates them in SGLang's numbering."""
        return {
            **self.extra,
            "architectures": [ARCHITECTURES[0]],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "target_hidden_size": self.target_hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_hidden_layers": 1,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size,
            "tie_word_embeddings": False,  # SGLang would otherwise use embed_tokens as the lm_head
            "attention_bias": False,
            "mlp_bias": False,
            "norm_before_residual": self.norm_before_residual,
            "torch_dtype": "bfloat16",
            "eagle_config": {
                "eagle_aux_hidden_state_layer_ids": list(self.aux_layer_ids),
                "use_aux_hidden_state": True,
            },
            layer_ids.FIELD: list(self.aux_layer_ids),
            layer_ids.MARKER: "vllm",
        }

    @classmethod
    def from_json(
        cls,
        d: dict,
        where: str = "config.json",
        layer_ids_from: str | None = None,
        record: list[int] | None = None,
    ) -> Eagle3Config:
        """`layer_ids_from` ("vllm" | "sglang"): whose numbering the file's layer ids are in, where the file
        itself does not say; `record`: the HF ids its training record holds (see layer_ids.read)."""
        arch = d.get("architectures") or []
        if not any(a in ARCHITECTURES for a in arch):
            raise InputError(
                f"{where}: not an EAGLE-3 head (architectures {arch}, expected {ARCHITECTURES[0]})"
            )
        if d.get("num_hidden_layers", 1) != 1:
            raise InputError(f"{where}: EAGLE-3 heads with {d['num_hidden_layers']} layers are not supported")
        scaling = d.get("rope_scaling") or (d.get("rope_parameters") or {})
        if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
            raise InputError(
                f"{where}: rope scaling {scaling.get('rope_type') or scaling.get('type')!r} not supported"
            )
        reading = layer_ids.read(d, where, layer_ids_from, record)
        if not reading.ids:
            raise InputError(
                f"{where} names no target layers (eagle_config.{layer_ids.FIELD}); add the ids it was trained on"
            )
        try:
            heads = int(d["num_attention_heads"])
            known = set(cls.__dataclass_fields__) | {"rope_parameters", "rope_scaling", "eagle_config"}
            known |= {layer_ids.FIELD, layer_ids.MARKER}
            return cls(
                hidden_size=int(d["hidden_size"]),
                target_hidden_size=int(d.get("target_hidden_size") or d["hidden_size"]),
                vocab_size=int(d["vocab_size"]),
                draft_vocab_size=int(d.get("draft_vocab_size") or d["vocab_size"]),
                intermediate_size=int(d["intermediate_size"]),
                num_attention_heads=heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or d["hidden_size"] // heads),
                aux_layer_ids=reading.ids,
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(d.get("rope_theta") or scaling.get("rope_theta") or 10000.0),
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                norm_before_residual=bool(d.get("norm_before_residual", False)),
                extra={k: v for k, v in d.items() if k not in known and k not in cls._written()},
                layer_ids_reading=reading.describe(),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{where}: missing or bad field {e}") from None

    @staticmethod
    def _written() -> set[str]:
        return {
            "architectures",
            "model_type",
            "num_hidden_layers",
            "hidden_act",
            "tie_word_embeddings",
            "attention_bias",
            "mlp_bias",
            "torch_dtype",
            "dtype",
            "draft_vocab_size",
            "target_hidden_size",
        }


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.q_proj = nn.Linear(2 * c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)


class MLP(nn.Module):
    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MidLayer(nn.Module):
    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)  # on the token embedding
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)  # on the projected feature
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


@dataclass
class HeadCache:
    """The head's own preallocated KV cache for one sequence; crop = moving `length`."""

    k: torch.Tensor  # [kv_heads, max_len, D]
    v: torch.Tensor  # [kv_heads, max_len, D]
    length: int = 0

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a head cache of length {self.length} to {length}")
        self.length = length

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def reserve(self, m: int) -> int:
        """Where `m` new entries go (the current length); refused when they do not fit."""
        if self.length + m > self.capacity:
            raise ValueError(f"head cache full: {self.length} + {m} entries > capacity {self.capacity}")
        return self.length


def head_input(features: torch.Tensor, fc, fc_width: int, hidden_size: int) -> torch.Tensor:
    """A step's features as its layer reads them, [m, H]: the target's aux states [m, 3H_t] through `fc`, the
    head's own output features as they are."""
    width = features.shape[-1]
    if width == fc_width and width != hidden_size:
        return fc(features)
    if width != hidden_size:
        raise ValueError(f"features of width {width}: expected {fc_width} or {hidden_size}")
    return features


def chain_visible(start: int, m: int, device: torch.device | None = None) -> torch.Tensor | None:
    """[m, start + m] bool: m new cache entries after `start` old ones see all old ones and, among themselves,
    those before them (a chain); None for one entry, which sees everything."""
    if m == 1:
        return None
    col = torch.arange(start + m, device=device)
    return col[None, :] <= (start + torch.arange(m, device=device))[:, None]


class Eagle3Head(nn.Module):
    """The head. State dict names == the vLLM/SGLang checkpoint names; the embedding is the target's (bound,
    frozen, never saved)."""

    # Buffers (registered in __init__; declared here so that they type as tensors, not Module attributes).
    d2t: torch.Tensor
    t2d: torch.Tensor
    embed_tokens: torch.Tensor
    inv_freq: torch.Tensor

    def __init__(self, config: Eagle3Config):
        super().__init__()
        c = self.config = config
        self.fc = nn.Linear(len(c.aux_layer_ids) * c.target_hidden_size, c.hidden_size, bias=False)
        self.midlayer = MidLayer(c)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long))  # target = i + d2t[i]
        self.register_buffer(
            "t2d", torch.ones(c.vocab_size, dtype=torch.bool)
        )  # target id in the draft vocab?
        self.register_buffer("embed_tokens", torch.zeros(0, c.hidden_size), persistent=False)
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    # --- vocabulary and embedding ------------------------------------------------------------------------

    def set_draft_vocab(self, target_ids: torch.Tensor) -> None:
        """Draft id i <-> target id target_ids[i] (sorted ascending, as in the published heads)."""
        target_ids = torch.as_tensor(target_ids, dtype=torch.long)
        assert target_ids.numel() == self.config.draft_vocab_size
        self.d2t.copy_(target_ids - torch.arange(target_ids.numel()))
        self.t2d.zero_()
        self.t2d[target_ids] = True

    @property
    def draft_to_target(self) -> torch.Tensor:  # [draft_vocab] target ids
        return torch.arange(self.d2t.numel(), device=self.d2t.device) + self.d2t

    def bind_embedding(self, weight: torch.Tensor) -> None:
        """Share the target's token embedding [vocab, H] (no copy; never trained or saved)."""
        if tuple(weight.shape) != (self.config.vocab_size, self.config.hidden_size):
            raise InputError(
                f"the head expects a target embedding of {self.config.vocab_size} x {self.config.hidden_size}, "
                f"got {tuple(weight.shape)[0]} x {tuple(weight.shape)[-1]}"
            )
        self.embed_tokens = weight.detach()

    # --- the layer, in pieces shared by training and drafting ----------------------------------------------

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(self.inv_freq.dtype)[..., None] * self.inv_freq  # [..., T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def _qkv(self, feat: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor):
        """feat [B, T, H], tokens [B, T], positions [T] or [B, T] -> q [B, nh, T, D], k/v [B, nkv, T, D],
        residual [B, T, H]."""
        c, layer = self.config, self.midlayer
        emb = F.embedding(tokens, self.embed_tokens).to(feat.dtype)
        normed = layer.hidden_norm(feat)
        residual = normed if c.norm_before_residual else feat
        x = torch.cat([layer.input_layernorm(emb), normed], dim=-1)  # [B, T, 2H]
        b, t = tokens.shape
        q = layer.self_attn.q_proj(x).view(b, t, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = layer.self_attn.k_proj(x).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = layer.self_attn.v_proj(x).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        cos, sin = self._rope(positions)
        if cos.dim() == 3:  # per-batch positions [B, T, D] -> [B, 1, T, D]
            cos, sin = cos[:, None], sin[:, None]
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v, residual

    def _finish(self, residual: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """attn [B, nh, T, D] -> the head's next feature [B, T, H] (pre-norm: the one fed back)."""
        b, _, t, _ = attn.shape
        layer = self.midlayer
        h = residual + layer.self_attn.o_proj(attn.transpose(1, 2).reshape(b, t, -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def logits(self, feature: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., draft_vocab]."""
        return self.lm_head(self.norm(feature))

    def _expand_kv(self, x: torch.Tensor) -> torch.Tensor:
        groups = self.config.num_attention_heads // self.config.num_key_value_heads
        return x if groups == 1 else x.repeat_interleave(groups, dim=-3)

    # --- training ------------------------------------------------------------------------------------------

    def forward_train(self, aux: torch.Tensor, tokens: torch.Tensor, steps: int = 1) -> list[torch.Tensor]:
        """Whole sequences with causal attention, unrolled `steps` times on the head's own features
        (EAGLE-3's training-time test).

        aux [B, T, 3H_t]: the target's aux hidden states at positions 0..T-1; tokens [B, T]: the tokens there.
        Returns per step k a tensor [B, T, draft_vocab]: row t is the draft for the token at position t + k + 2,
        made from the target's features up to t and the head's own features for t + 1 .. t + k (the target's
        distribution at position t + k + 1 is its label). Rows with t + k + 1 >= T have no label (their input
        token is padding).

        Step k's query at row t sits at position t + k and sees what the same query sees when drafting: the
        real-feature entries of rows <= t (step 0) and its own chain, the entries of steps 1..k at row t.
        """
        b, t = tokens.shape
        feat = self.fc(aux)  # [B, T, H]
        base = torch.arange(t, device=aux.device)
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        out = []
        for k in range(steps):
            step_tokens = F.pad(tokens[:, 1 + k :], (0, 1 + k))  # [B, T]: x_{t+1+k}, zero past the end
            q, key, value, residual = self._qkv(feat, step_tokens, base + k)
            keys.append(self._expand_kv(key))
            values.append(self._expand_kv(value))
            feat = self._finish(residual, self._ttt_attention(q, keys, values))
            out.append(self.logits(feat))
        return out

    @staticmethod
    def _ttt_attention(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        """q [B, nh, T, D]; keys/values per step [B, nh, T, D] -> [B, nh, T, D].

        Causal over step 0's entries, plus the diagonal (same row) of every later step's entries.
        """
        scale = 1.0 / math.sqrt(q.shape[-1])
        t = q.shape[-2]
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        s0 = (q @ keys[0].transpose(-1, -2)) * scale  # [B, nh, T, T]
        s0 = s0.masked_fill(~causal, float("-inf"))
        diag = [(q * k).sum(-1, keepdim=True) * scale for k in keys[1:]]  # each [B, nh, T, 1]
        p = torch.softmax(torch.cat([s0, *diag], dim=-1), dim=-1)
        out = p[..., :t] @ values[0]
        for j, v in enumerate(values[1:]):
            out = out + p[..., t + j : t + j + 1] * v
        return out

    # --- drafting: the head's own KV cache ------------------------------------------------------------------

    def new_cache(self, max_len: int, dtype: torch.dtype | None = None) -> HeadCache:
        c = self.config
        dtype = dtype or self.lm_head.weight.dtype
        shape = (c.num_key_value_heads, max_len, c.head_dim)
        device = self.lm_head.weight.device
        return HeadCache(
            torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
        )

    def step(
        self,
        cache: HeadCache,
        features: torch.Tensor,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        visible: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append m entries to the cache and return their (logits [m, draft_vocab], next features [m, H]).

        features [m, 3H_t] (the target's aux states: prefill, or the newly verified positions) or [m, H] (the
        head's own output features while drafting); tokens [m]: the token following each feature's position;
        positions [m]. visible [m, length + m] bool: which cache entries (old and new) each new entry attends
        to; default: all old entries and causal among the new ones (a chain). A tree passes ancestor masks.
        """
        m = tokens.shape[0]
        features = head_input(features, self.fc, self.fc.in_features, self.config.hidden_size)
        start = cache.reserve(m)
        q, k, v, residual = self._qkv(features[None], tokens[None], positions)
        cache.k[:, start : start + m] = k[0]
        cache.v[:, start : start + m] = v[0]
        cache.length = start + m
        keys = self._expand_kv(cache.k[None, :, : start + m])  # [1, nh, L, D]
        vals = self._expand_kv(cache.v[None, :, : start + m])
        if visible is None:
            visible = chain_visible(start, m, tokens.device)
        mask = None if visible is None else visible[None, None]
        attn = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask)
        out = self._finish(residual, attn)[0]  # [m, H]
        return self.logits(out), out


# ----------------------------------------------------------------------------------------------------------
# Checkpoints (safetensors, the vLLM/SGLang layout)
# ----------------------------------------------------------------------------------------------------------


def save_head(head: Eagle3Head, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """config.json + model.safetensors (float weights in `dtype`, d2t int64, t2d bool); no embedding."""
    write_checkpoint(head, head.config.to_json(), out_dir, dtype)


def load_config(path: Path, layer_ids_from: str | None = None) -> Eagle3Config:
    """The head directory's config, its layer ids read in the numbering the file (or its training record, or
    `layer_ids_from` where neither says) puts them in."""
    where = str(Path(path) / "config.json")
    return Eagle3Config.from_json(read_config(path), where, layer_ids_from, layer_ids.record_ids(Path(path)))


def load_head(
    path: str | Path, target=None, dtype: torch.dtype = torch.float32, layer_ids_from: str | None = None
) -> Eagle3Head:
    """Load a head directory (specdec's own or a published EAGLE-3 checkpoint) as `dtype` (float32 default);
    with `target` (a HF causal LM) it is checked against it and bound to its embedding. `layer_ids_from`
    ("vllm" | "sglang"): whose numbering its layer ids are in, where the files do not say (layer_ids.read).
    InputError, one line, for anything wrong with the files or a head made for another model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    config = load_config(path, layer_ids_from)
    weights = path / WEIGHTS_FILE
    if not weights.exists():
        raise InputError(f"{str(path)!r} has no {WEIGHTS_FILE}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise InputError(
            f"{weights} is corrupt or not a safetensors file ({str(e).splitlines()[0]})"
        ) from None
    state.pop("embed_tokens.weight", None)  # some published heads carry a copy of the target's; it is shared
    if "d2t" not in state and config.draft_vocab_size == config.vocab_size:
        state["d2t"] = torch.zeros(config.vocab_size, dtype=torch.long)
    if "t2d" not in state and "d2t" in state:
        state["t2d"] = torch.zeros(config.vocab_size, dtype=torch.bool)
        state["t2d"][torch.arange(state["d2t"].numel()) + state["d2t"].long()] = True
    head = Eagle3Head(config)
    expected = head.state_dict()
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    if missing or unknown:
        what = f"lacks {missing[0]}" if missing else f"has an unknown tensor {unknown[0]}"
        raise InputError(f"{weights} {what}: not an EAGLE-3 head in the expected layout")
    for name, ref in expected.items():
        if tuple(state[name].shape) != tuple(ref.shape):
            raise InputError(
                f"{weights}: {name} has shape {tuple(state[name].shape)}, config.json implies {tuple(ref.shape)}"
            )
    head.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    head.to(dtype)
    if target is not None:
        check_target(config, target, str(path))
        head.bind_embedding(target.get_input_embeddings().weight)
    return head.eval()


def check_target(config: Eagle3Config, target, where: str = "the head") -> None:
    """A head made for another model is refused: aux width, vocabulary, embedding width, layer ids."""
    tc = target.config.get_text_config(decoder=True)
    if config.target_hidden_size != tc.hidden_size:
        raise InputError(
            f"{where} was trained for a target with hidden size {config.target_hidden_size}; "
            f"this target has {tc.hidden_size}"
        )
    if config.vocab_size != tc.vocab_size:
        raise InputError(
            f"{where} was trained for a vocabulary of {config.vocab_size} tokens; this target has {tc.vocab_size}"
        )
    emb = target.get_input_embeddings().weight
    if emb.shape[-1] != config.hidden_size:
        raise InputError(
            f"{where} has width {config.hidden_size} but the target's embeddings are {emb.shape[-1]} wide"
        )
    bad = [i for i in config.aux_layer_ids if not 0 <= i < tc.num_hidden_layers]
    if bad or not config.aux_layer_ids:
        raise InputError(
            f"{where} reads the target's layers {list(config.aux_layer_ids)}; this target has {tc.num_hidden_layers}"
        )


def config_for_target(
    target,
    draft_vocab_size: int,
    aux_layer_ids: tuple[int, ...] | None = None,
    intermediate_size: int | None = None,
) -> Eagle3Config:
    """A head shaped like one layer of the target (width, heads, rope), reading `aux_layer_ids`."""
    tc = target.config.get_text_config(decoder=True)
    heads = tc.num_attention_heads
    rope = getattr(tc, "rope_parameters", None) or {}
    return Eagle3Config(
        hidden_size=tc.hidden_size,
        target_hidden_size=tc.hidden_size,
        vocab_size=tc.vocab_size,
        draft_vocab_size=draft_vocab_size,
        intermediate_size=intermediate_size or tc.intermediate_size,
        num_attention_heads=heads,
        num_key_value_heads=getattr(tc, "num_key_value_heads", None) or heads,
        head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads,
        aux_layer_ids=tuple(aux_layer_ids or default_aux_layer_ids(tc.num_hidden_layers)),
        rms_norm_eps=float(getattr(tc, "rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta") or getattr(tc, "rope_theta", None) or 10000.0),
        max_position_embeddings=int(getattr(tc, "max_position_embeddings", 2048)),
    )
