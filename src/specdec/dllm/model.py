"""What makes a causal LM a block-diffusion LM here, and the conversion of an autoregressive one.

A block-diffusion LM (Fast-dLLM v2 style) is an ordinary decoder whose checkpoint carries two more facts: the
id of its mask token and the block size it was trained with (`DllmSpec`, read from config.json). It generates
a block of `block_size` tokens at a time: the block starts as mask tokens, every forward predicts every masked
position at once, and a policy (`specdec.dllm.policies`) decides which predictions to keep.

Attention, in training and decoding alike:
- committed tokens attend causally, exactly like the autoregressive model they came from, so their keys and
  values are an ordinary KV cache that never changes (the prefix cache is exact, not an approximation);
- the block being decoded attends to every committed token and bidirectionally to itself, mask tokens included.

Token shift: the token at position j is read from the output at j - 1, as in the AR model. The first token of a
block is therefore predicted by the last committed token (an AR prediction, from the cache), and a masked
position j inside the block by the block's own output at j - 1. This keeps the AR weights a good start.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from specdec.errors import InputError

MASK_TOKEN = "<|mask|>"


@dataclass(frozen=True)
class DllmSpec:
    mask_id: int  # the token a not-yet-decoded position holds; never emitted
    block_size: int  # the block length the model was trained with; decoding may use others (adablock)


def dllm_spec(model) -> DllmSpec | None:
    """The model's block-diffusion facts, or None for a plain causal LM. Reads specdec's own config keys
    (`dllm_mask_token_id`, `dllm_block_size`) and Fast-dLLM v2's (`mask_token_id`, `bd_size`)."""
    config = model.config
    mask_id = getattr(config, "dllm_mask_token_id", None)
    if mask_id is None:
        mask_id = getattr(config, "mask_token_id", None)
    block = getattr(config, "dllm_block_size", None) or getattr(config, "bd_size", None)
    if mask_id is None or block is None:
        return None
    return DllmSpec(int(mask_id), int(block))


def require_dllm(model, name: str) -> DllmSpec:
    spec = dllm_spec(model)
    if spec is None:
        raise InputError(
            f"{name!r} is not a diffusion LM (its config names no mask token and block size); "
            "use a block-diffusion model such as default-dllm, or drop --policy"
        )
    return spec


def is_dllm_dir(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    data = json.loads(config.read_text())
    has_mask = "dllm_mask_token_id" in data or "mask_token_id" in data
    return has_mask and ("dllm_block_size" in data or "bd_size" in data)


def convert_from_ar(model, tokenizer, block_size: int) -> DllmSpec:
    """Turn an AR causal LM (in place) into an untrained block-diffusion LM: add the mask token to the
    tokenizer and one embedding row for it (the mean embedding: a neutral start that predicts nothing in
    particular), and record the spec in the config."""
    tokenizer.add_special_tokens({"additional_special_tokens": [MASK_TOKEN]})
    mask_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    old = model.get_input_embeddings().weight
    mean = old.detach().mean(0)
    model.resize_token_embeddings(max(mask_id + 1, old.shape[0]), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[mask_id] = mean
        if not model.config.tie_word_embeddings:
            model.get_output_embeddings().weight[mask_id] = 0.0
    model.config.dllm_mask_token_id = mask_id
    model.config.dllm_block_size = block_size
    return DllmSpec(mask_id, block_size)


def block_mask(past: int, t: int, device=None) -> torch.Tensor:
    """[T, past + T] bool, True = visible: a block of T tokens after `past` committed ones sees all of them
    and all of itself."""
    return torch.ones(t, past + t, dtype=torch.bool, device=device)


def training_mask(seq_len: int, block_size: int, streams: int, device=None) -> torch.Tensor:
    """[S, S] bool with S = seq_len * (1 + streams), True = visible. Stream 0 is the clean sequence, causal;
    each further stream is a noisy copy whose block b sees the clean tokens before the block and its own
    block in that stream (the decoding-time view of a block, for every block of the window at once)."""
    n = seq_len * (1 + streams)
    mask = torch.zeros(n, n, dtype=torch.bool, device=device)
    mask[:seq_len, :seq_len] = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril_()
    pos = torch.arange(seq_len, device=device)
    block = pos // block_size
    same_block = block[:, None] == block[None, :]  # [L, L]
    before_block = pos[None, :] < (block * block_size)[:, None]  # clean j before query i's block
    for s in range(1, streams + 1):
        rows = slice(s * seq_len, (s + 1) * seq_len)
        mask[rows, :seq_len] = before_block
        mask[rows, rows] = same_block
    return mask
