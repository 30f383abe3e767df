"""Which models specdec can verify trees with exactly, decided before any generation.

A model is used only when its tree scoring provably equals its own causal decoding:

- attention layers only: state-space, linear-attention and other recurrent layers (Mamba, RWKV, xLSTM, gated
  delta nets, short convolutions, and the hybrids that mix them with attention) keep a running state that a
  token tree cannot branch and a rejected draft cannot roll back;
- positions that follow the tree: ALiBi models (Bloom, MPT, Falcon with `alibi=True`) derive their position
  bias from a key's index in the sequence, not from the position ids, so a node's bias would depend on where
  the tree stored it, not on its depth;
- full attention within the request's length (a sliding window or attention chunk larger than the request
  is full attention);
- a 4D attention mask that the model honours, checked on the real model, once, by scoring a small branching
  tree and comparing every node with plain causal decoding of its path.

Everything else is refused with one line naming the class and the reason (`UnsupportedModelError`).
"""

from __future__ import annotations

import re
import weakref

from specdec.errors import UnsupportedModelError

ATTENTION_LAYERS = {"full_attention", "sliding_attention", "chunked_attention"}
# transformers' names for layers without a key/value cache (cache_utils' layer-type mappings); "dummy" is an
# MLP-only layer (no state at all), harmless
RECURRENT_LAYERS = {"linear_attention", "conv", "hybrid", "hybrid_sliding", "mamba", "recurrent", "rwkv"}
STATELESS_LAYERS = {"dummy", "mlp", "moe"}
# Module class names that carry a recurrent state (a backstop for configs without `layer_types`)
RECURRENT_MODULES = re.compile(
    r"Mamba|Mixer|Rglru|RecurrentBlock|Rwkv|xLSTM|LightningAttention|DeltaNet|DeltaAttention|ShortConv"
    r"|LinearAttention|SSM|Ssm"
)
# Of those, the ones that hold the state themselves (named in the refusal, before the blocks around them)
STATE_MODULES = re.compile(
    r"Mixer|Rglru|DeltaNet|DeltaAttention|ShortConv|LightningAttention|LinearAttention"
)

_refusals: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> reason ("" when none)


def _config(model):
    return model.config.get_text_config(decoder=True)


def _recurrent_reason(model, config) -> str:
    """Why the model keeps a recurrent state, or ""."""
    types = list(getattr(config, "layer_types", None) or [])
    if not types:
        types = list(getattr(config, "layers_block_type", None) or [])
    recurrent_types = sorted({t for t in types if t in RECURRENT_LAYERS})
    outer = {type(model).__name__, type(getattr(model, "base_model", model)).__name__}  # the whole model
    modules = [type(m).__name__ for m in model.modules()]  # depth first: a layer's class before its parts
    modules = [n for n in dict.fromkeys(modules) if RECURRENT_MODULES.search(n) and n not in outer]
    if not recurrent_types and not modules:
        return ""
    hybrid = any(t in ATTENTION_LAYERS or t.startswith("hybrid") or t == "attention" for t in types)
    kind = "a hybrid attention/recurrent (state-space) model" if hybrid else "a recurrent (state-space) model"
    modules.sort(key=lambda n: not STATE_MODULES.search(n))  # stable: depth-first order otherwise
    what = f"{modules[0]} modules" if modules else f"{'/'.join(recurrent_types)} layers"
    return (
        f"is {kind}: its {what} keep a running state that a token tree cannot branch "
        "and a rejected draft cannot roll back"
    )


def _alibi_reason(model, config) -> str:
    attn = getattr(config, "attn_config", None)
    alibi = (
        getattr(config, "model_type", "") == "bloom"
        or getattr(config, "alibi", False) is True
        or getattr(config, "use_alibi", False) is True
        or getattr(config, "position_embedding_type", None) == "alibi"
        or getattr(attn, "alibi", False) is True
        or (isinstance(attn, dict) and attn.get("alibi") is True)
        or any(
            hasattr(m, "build_alibi_tensor") or hasattr(m, "build_mpt_alibi_tensor") for m in model.modules()
        )
    )
    if not alibi:
        return ""
    return (
        "uses ALiBi position biases, which it computes from each key's index in the sequence rather than "
        "from the position ids, so tree nodes would get the bias of where they are stored, not of their depth"
    )


def _unknown_layers_reason(config) -> str:
    types = set(getattr(config, "layer_types", None) or [])
    others = sorted(types - ATTENTION_LAYERS - RECURRENT_LAYERS - STATELESS_LAYERS)
    if not others:
        return ""
    return (
        f"has {', '.join(others)} layers; specdec verifies trees only for full or windowed attention layers"
    )


def _architecture_reason(model) -> str:
    """Class-level reasons to refuse (cached per model: scanning the modules is not free on a large model)."""
    reason = _refusals.get(model)
    if reason is None:
        config = _config(model)
        reason = (
            _recurrent_reason(model, config) or _alibi_reason(model, config) or _unknown_layers_reason(config)
        )
        _refusals[model] = reason
    return reason


def attention_window(config) -> tuple[str, int] | None:
    """("sliding-window", W) or ("chunked", C) when some layer sees only the last W / its own C-chunk of
    positions; None for full attention everywhere."""
    types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    windowed = "sliding_attention" in types or (not types and getattr(config, "use_sliding_window", True))
    if window and windowed:
        return "sliding-window", int(window)
    chunk = getattr(config, "attention_chunk_size", None)
    if "chunked_attention" in types and chunk:
        return "chunked", int(chunk)
    local = getattr(config, "attention_layers", None) or []  # GPT-Neo: "global" / "local" layers
    if "local" in local and getattr(config, "window_size", None):
        return "sliding-window", int(config.window_size)
    return None


def check_layer_types(model, max_length: int) -> None:
    """Raise UnsupportedModelError unless every layer of `model` is attention whose span covers `max_length`
    positions, with positions the tree can express (see the module docstring)."""
    name = type(model).__name__
    reason = _architecture_reason(model)
    if reason:
        raise UnsupportedModelError(f"{name} {reason}; specdec refuses it rather than decode it differently")
    window = attention_window(_config(model))
    if window and max_length > window[1]:
        kind, size = window
        raise UnsupportedModelError(
            f"{name} uses {kind} attention (span {size}) and this request needs {max_length} positions; "
            "specdec's tree mask covers full attention only, so it refuses rather than produce output that "
            "differs from the model's own decoding"
        )
