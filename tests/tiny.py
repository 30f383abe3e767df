"""Tiny random models and a tiny tokenizer, built in memory in a second, for exactness tests.

float64 weights make the rounding differences between scoring a tree in one forward and decoding token by
token ~1e-15, so greedy comparisons against transformers' generate() are exact, not lucky.
"""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

# The tokenizer's training text must not change when specdec's code does (it once was specdec's own sources,
# and every edit re-shuffled the vocabulary under tests that compare exact outputs): a fixed set of stdlib files.
STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS = (
    "bisect.py",
    "heapq.py",
    "textwrap.py",
    "json/encoder.py",
    "json/decoder.py",
    "functools.py",
    "abc.py",
)

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "gemma": (GemmaConfig, GemmaForCausalLM),
}


@functools.cache
def tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on a few stdlib modules (plus some non-ASCII text for multi-byte tests)."""
    texts = [(STDLIB / name).read_text() for name in CORPUS] + ["héllo wörld ñ 日本語 emoji 🙂 " * 4]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", model_max_length=512)


def model(
    arch: str = "llama",
    seed: int = 0,
    vocab_size: int | None = None,
    layers: int = 2,
    hidden: int = 32,
    dtype: torch.dtype = torch.float64,
    eos: int = 0,
):
    config_cls, model_cls = ARCHS[arch]
    config = config_cls(
        vocab_size=vocab_size or len(tokenizer()),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=512,
        eos_token_id=eos,
        bos_token_id=eos,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    m = model_cls(config).to(dtype).eval()
    # Random init has tiny logits; scale them up so greedy choices are well separated and sampling is peaked
    with torch.no_grad():
        m.lm_head.weight.mul_(8.0)
    m.generation_config.eos_token_id = eos
    m.generation_config.pad_token_id = 0
    return m


def hf_greedy(m, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """generate()'s greedy tokens, on the model's device."""
    ids = torch.tensor([prompt_ids], device=m.device)
    out = m.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=m.generation_config.pad_token_id,
    )
    return out[0, len(prompt_ids) :].tolist()


class Reference:
    """generate()'s greedy tokens for (arch, prompt, n) on `models[arch]`, each computed once (the tests
    compare many methods against the same few references)."""

    def __init__(self, models: dict) -> None:
        self.models = models
        self.done: dict[tuple[str, tuple[int, ...], int], list[int]] = {}

    def __call__(self, arch: str, prompt: tuple[int, ...], n: int) -> list[int]:
        key = (arch, prompt, n)
        if key not in self.done:
            self.done[key] = hf_greedy(self.models[arch], list(prompt), n)
        return self.done[key]


def save(path: Path, arch: str = "llama", **kwargs) -> Path:
    """A tiny float32 model plus the tiny tokenizer as a from_pretrained directory."""
    model(arch, dtype=torch.float32, **kwargs).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def random_head(target, draft_vocab: int | None = None, seed: int = 0):
    """An untrained EAGLE-3 head for `target`: its drafts are guesses, which is all losslessness needs (and
    top-k over a small vocabulary still hits)."""
    from specdec.heads import Eagle3Head, config_for_target, default_aux_layer_ids

    config = target.config
    vocab, n = config.vocab_size, config.num_hidden_layers
    size = draft_vocab or vocab
    layers = default_aux_layer_ids(n) if n >= 4 else tuple(min(i, n - 1) for i in (0, 1, 1))
    torch.manual_seed(seed)
    head = Eagle3Head(config_for_target(target, size, aux_layer_ids=layers)).to(
        next(target.parameters()).dtype
    )
    head.set_draft_vocab(torch.arange(size) * (vocab // size))
    return head


def random_medusa(target, num_heads: int = 3, seed: int = 0, kind: str = "medusa"):
    """Untrained Medusa heads for `target` (full vocabulary); `kind="hydra"`: Hydra heads (bound to the
    target's embedding by the drafter)."""
    from specdec.heads.hydra import HydraConfig, HydraHeads
    from specdec.heads.medusa import MedusaConfig, MedusaHeads

    config = target.config
    make, make_config = (HydraHeads, HydraConfig) if kind == "hydra" else (MedusaHeads, MedusaConfig)
    torch.manual_seed(seed)
    heads = make(make_config(config.hidden_size, config.vocab_size, num_heads=num_heads))
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0.0, 0.2)
    return heads.to(next(target.parameters()).dtype)


def random_hydra(target, num_heads: int = 3, seed: int = 0):
    return random_medusa(target, num_heads, seed, kind="hydra")


def untrained_head(method: str, target):
    """An untrained head of the kind `method` reads (eagle, medusa, hydra)."""
    makers = {"medusa": random_medusa, "hydra": random_hydra}
    return makers.get(method, random_head)(target)
