"""Byte-level BPE tokenizer for Python source, trained with `tokenizers` and saved as a HF fast tokenizer."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: Path, max_length: int
) -> PreTrainedTokenizerFast:
    """Byte-level so that every string round-trips (no unknown tokens), which the engine's streaming relies on."""
    tok = Tokenizer(models.BPE())
    # A newline is always a token of its own: prompts very often end right after one ("...):\n"), and if
    # training text merged "\n" with the next line's indentation, such a prompt would end on a token boundary
    # the model never saw (it would predict end-of-file).
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None, model_max_length=max_length
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast
