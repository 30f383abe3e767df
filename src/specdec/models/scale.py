"""Models of real size with random weights: what `specdec bench --scale NAME` times.

No weights can be downloaded here, but what decides speed does not need them: the forward's cost, the cache,
the trees and every overhead are the same for random weights of a published shape, and the bench forces each
step's verdict along real text (`specdec.bench.forcing`), so acceptance is what a model writing that text
would give. `SCALES` holds the published config values of the shapes users run; any Hugging Face
`config.json` works too (`scale_config`).

Text goes through the shipped tokenizer (8,192 ids, all of them inside every real vocabulary): the forwards
still run over the model's full vocabulary (its embedding and lm_head are the real size), but a text is cut
into the shipped tokenizer's tokens, a little finer than these models' own tokenizers cut code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specdec.errors import InputError


@dataclass(frozen=True)
class Shape:
    """One published model's architecture, as its config.json on the hub gives it."""

    hub: str  # where the config comes from (for the report; nothing is downloaded)
    params: int  # the published parameter count (tied embeddings counted once)
    config: dict[str, Any]


_LLAMA = {"model_type": "llama", "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
# what every Qwen2.5-Coder size shares (vocabulary, context, norm, rope, tied embeddings, special ids)
_QWEN2 = {
    "model_type": "qwen2",
    "hidden_act": "silu",
    "use_sliding_window": False,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}

SCALES: dict[str, Shape] = {
    "smollm2-360m": Shape(
        "HuggingFaceTB/SmolLM2-360M",
        361_821_120,
        {
            **_LLAMA,
            "hidden_size": 960,
            "intermediate_size": 2560,
            "num_hidden_layers": 32,
            "num_attention_heads": 15,
            "num_key_value_heads": 5,
            "head_dim": 64,
            "vocab_size": 49152,
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0,
            "tie_word_embeddings": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    ),
    "qwen2.5-coder-0.5b": Shape(
        "Qwen/Qwen2.5-Coder-0.5B",
        494_032_768,
        {
            **_QWEN2,
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
        },
    ),
    "llama-3.2-1b": Shape(
        "meta-llama/Llama-3.2-1B",
        1_235_814_400,
        {
            **_LLAMA,
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "vocab_size": 128256,
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 32.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
            },
            "tie_word_embeddings": True,
            "bos_token_id": 128000,
            "eos_token_id": 128001,
        },
    ),
    "qwen2.5-coder-1.5b": Shape(
        "Qwen/Qwen2.5-Coder-1.5B",
        1_543_714_304,
        {
            **_QWEN2,
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
        },
    ),
}


def scale_config(name: str | None = None, path: Path | None = None):
    """The transformers config of a `SCALES` name, or of a Hugging Face config.json at `path`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if path is not None:
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read a model config from {str(path)!r}: {e}") from None
        if not isinstance(values, dict) or "model_type" not in values:
            raise InputError(f"{str(path)!r} is not a Hugging Face config.json (it has no model_type)")
    elif name in SCALES:
        values = dict(SCALES[name].config)
    else:
        raise InputError(f"unknown scale {name!r} (choose from {', '.join(SCALES)}, or --scale-config PATH)")
    values = dict(values)
    try:
        config = AutoConfig.for_model(values.pop("model_type"), **values)
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"cannot build a config from {path or name}: {str(e).splitlines()[0]}") from None
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise InputError(f"{path or name} describes a {type(config).__name__}, not a causal LM")
    return config


def build_scale_model(config, dtype: torch.dtype, seed: int = 0):
    """A model of `config`'s architecture and size with random weights (its own initialisation, seeded) in
    `dtype`, in memory and in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.eos_token_id
    return model.eval()


def parameter_count(model) -> int:
    """Distinct parameters (a tied lm_head counted once, as published sizes count it)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
