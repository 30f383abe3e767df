"""The head trainer's text: token streams of the training and held-out text, and the windows cut from them.

For the shipped target, the streams are `specdec train-lm --stage prepare` with the shipped tokenizer (its
training corpus, with the held-out split by file name); for a user's model, `--data` text files tokenized with
the model's tokenizer (a hashed file-name split holds some out).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from specdec.errors import InputError
from specdec.train.corpus import CorpusConfig, is_held_out
from specdec.train.lm import prepare


@dataclass(frozen=True)
class DataConfig:
    seq_len: int = 1024  # the shipped target's training window; inference contexts are mostly shorter
    feature_tokens: int = 2_000_000  # distinct training tokens whose features are cached (epochs reuse them)
    heldout_windows: int = 24  # real held-out text for teacher-forced acceptance
    greedy_prompts: int = (
        24  # held-out prompts whose greedy continuations the target writes (exact acceptance)
    )
    greedy_prompt_len: int = 128
    greedy_new_tokens: int = 256
    seed: int = 0


def prepare_corpus(workdir: Path, model_name: str, tokenizer, data: list[Path] | None) -> Path:
    """Token streams train.bin / heldout.bin (uint16 or uint32) under workdir/corpus; returns that directory."""
    corpus_dir = workdir / "corpus"
    if (corpus_dir / "train.bin").exists() and (corpus_dir / "heldout.bin").exists():
        return corpus_dir
    if data:
        _tokenize_files(data, tokenizer, corpus_dir)
        return corpus_dir
    if model_name != "default":
        raise InputError(
            "give --data FILES (text the model should be good at) for a model other than default"
        )
    from specdec.models.loading import resolve

    # The shipped target's corpus, tokenized with the shipped tokenizer (copied in so prepare() does not train
    # a new one): `specdec train-lm --stage prepare` with the same held-out split by file name.
    tok_dir = corpus_dir / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    shipped = Path(resolve("default"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (tok_dir / name).exists():
            shutil.copyfile(shipped / name, tok_dir / name)
    prepare(corpus_dir, CorpusConfig())
    return corpus_dir


def _tokenize_files(paths: list[Path], tokenizer, corpus_dir: Path) -> None:
    eos = tokenizer.eos_token_id
    splits: dict[str, list[np.ndarray]] = {"train": [], "heldout": []}
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read --data file {str(path)!r}: {e}") from None
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        splits["heldout" if is_held_out(path.name) else "train"].append(np.asarray(ids, dtype=np.int64))
    if not splits["train"]:
        raise InputError("every --data file fell in the held-out split; give more files")
    if not splits["heldout"]:  # too few files for the hashed split: hold out the tail of the last one
        last = splits["train"].pop()
        cut = int(len(last) * 0.9)
        splits["train"].append(last[:cut])
        splits["heldout"].append(last[cut:])
    corpus_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if len(tokenizer) <= 65535 else np.uint32
    for split, arrays in splits.items():
        np.concatenate(arrays).astype(dtype).tofile(corpus_dir / f"{split}.bin")
    (corpus_dir / "dtype.txt").write_text(np.dtype(dtype).name)


def load_stream(corpus_dir: Path, split: str) -> np.memmap:
    dtype_file = corpus_dir / "dtype.txt"
    dtype = np.dtype(dtype_file.read_text().strip()) if dtype_file.exists() else np.uint16
    return np.memmap(corpus_dir / f"{split}.bin", dtype=dtype, mode="r")


def train_windows(stream: np.ndarray, seq_len: int, n: int, seed: int) -> np.ndarray:
    """n distinct aligned windows [n, S] drawn at random (seeded) from the token stream."""
    available = stream.size // seq_len
    if available == 0:
        raise InputError(f"the training text has {stream.size} tokens, fewer than one {seq_len}-token window")
    n = min(n, available)
    # Random order (not sorted): any prefix of the windows is itself a uniform sample of the corpus.
    picks = np.random.default_rng(seed).choice(available, size=n, replace=False)
    return np.stack([np.asarray(stream[i * seq_len : (i + 1) * seq_len]) for i in picks])


def heldout_windows(stream: np.ndarray, seq_len: int, n: int) -> np.ndarray:
    """Evenly spaced aligned windows [n, S] of the held-out stream (spread over many held-out files)."""
    available = stream.size // seq_len
    if available == 0:
        seq_len, available = int(stream.size), 1
    picks = np.linspace(0, available - 1, num=min(n, available)).astype(int)
    return np.stack([np.asarray(stream[i * seq_len : (i + 1) * seq_len]) for i in picks])


@torch.inference_mode()
def greedy_windows(model, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    """prompt + the target's greedy continuation, [n, P + new_tokens]: text on which the target's greedy token
    at every generated position IS the next token, so teacher-forced chain drafting there is exact."""
    rows = []
    for p in tqdm(prompts, desc="greedy continuations", unit="prompt"):
        ids = torch.from_numpy(p.astype(np.int64))[None]
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # fixed-length rows (an EOS would end a row early)
            do_sample=False,
            pad_token_id=0,
        )
        rows.append(out[0].numpy())
    return np.stack(rows)


def describe_data(corpus_dir: Path, data: list[Path] | None) -> str:
    """The card's account of the training text."""
    train_info = corpus_dir / "train.json"
    info = json.loads(train_info.read_text()) if train_info.exists() else {}
    if data:
        return f"{len(data)} --data file(s); held-out split by file name (or the tail of the last file)."
    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    return (
        f"The shipped target's training corpus, rebuilt by `specdec train-lm --stage prepare` with the shipped "
        f"tokenizer: {manifest['files']:,} Python files ({manifest['bytes'] / 1e6:.0f} MB) visible to the "
        f"training interpreter, {info.get('tokens', 0) / 1e6:.1f}M training tokens; held out by file name "
        f"({manifest['held_out_rule']}), never trained on."
    )
