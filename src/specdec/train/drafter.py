"""`specdec train-drafter`: self-distil a drafter head from the target's own hidden states and distributions.

Pipeline, every stage resumable from what the working directory already holds (re-run the same command):

1. corpus: token ids of the training text. For the shipped target, `specdec train-lm --stage prepare` with the
   shipped tokenizer (its training corpus, with the held-out split by file name); for a user's model, `--data`
   text files tokenized with the model's tokenizer (a hashed file-name split holds some out).
2. features: the target is run ONCE over fixed-length windows of the corpus; per position the token id, the
   three auxiliary hidden states (concatenated, [3H]), the final normed hidden state (the input of the target's
   lm_head, [H]) and the target's top token are written to numpy memmaps (16-bit floats). Soft labels are
   recomputed on the fly as lm_head(final) restricted to the draft vocabulary, so the full-vocabulary logits
   are never stored and epochs never re-run the target.
3. training: AdamW, cosine schedule, EAGLE-3 training-time test (the head unrolled on its own output features),
   gradient clipping, atomic checkpoints.
4. export: the head in the EAGLE-3 layout vLLM/SGLang load (see specdec.heads.eagle3), a loss curve and a card
   with held-out acceptance by depth and tau.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from specdec.errors import InputError

# ----------------------------------------------------------------------------------------------------------
# Features on disk
# ----------------------------------------------------------------------------------------------------------


@dataclass
class FeatureSpec:
    seq_len: int  # window length the target reads (the head trains on segments of it: segment_len)
    n_seqs: int
    hidden_size: int
    aux_layer_ids: list[int]  # HF output_hidden_states indices == vLLM eagle_aux_hidden_state_layer_ids
    store_dtype: str = "float16"  # hidden states here stay far inside fp16's range (|h| < 100 measured)


class FeatureStore:
    """Memory-mapped per-window arrays: ids [N, S] int32, aux [N, S, 3H], final [N, S, H], top [N, S] int32.

    `done` (in meta.json, written after each flush) counts the windows already written, so an interrupted
    extraction resumes at the next window; `limit` <= done is how many of them training uses.
    """

    def __init__(self, root: Path, spec: FeatureSpec | None = None):
        self.root = root
        meta_path = root / "meta.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            self.spec = FeatureSpec(**meta["spec"])
            self.done = meta["done"]
            self.seconds = meta.get("seconds", 0.0)
            same = spec is None or {**asdict(spec), "n_seqs": 0} == {**asdict(self.spec), "n_seqs": 0}
            if not same:
                raise InputError(
                    f"{root} holds features of another shape ({self.spec}); remove it or use another --workdir"
                )
            mode = "r+"
        else:
            if spec is None:
                raise InputError(f"no features in {root}")
            root.mkdir(parents=True, exist_ok=True)
            self.spec, self.done, self.seconds, mode = spec, 0, 0.0, "w+"
        s = self.spec
        shapes = {
            "ids": ((s.n_seqs, s.seq_len), np.int32),
            "aux": ((s.n_seqs, s.seq_len, len(s.aux_layer_ids) * s.hidden_size), np.float16),
            "final": ((s.n_seqs, s.seq_len, s.hidden_size), np.float16),
            "top": ((s.n_seqs, s.seq_len), np.int32),
        }
        self.arrays = {
            name: np.lib.format.open_memmap(root / f"{name}.npy", mode=mode, dtype=dt, shape=shape)
            for name, (shape, dt) in shapes.items()
        }
        if mode == "w+":
            self._write_meta()
        self.limit = self.done  # windows training uses (prepare_features may lower it: --feature-tokens)

    def _write_meta(self) -> None:
        tmp = self.root / "meta.tmp"
        tmp.write_text(json.dumps({"spec": asdict(self.spec), "done": self.done, "seconds": self.seconds}))
        os.replace(tmp, self.root / "meta.json")

    def flush(self, done: int) -> None:
        for a in self.arrays.values():
            a.flush()
        self.done = self.limit = done
        self._write_meta()

    @property
    def complete(self) -> bool:
        return self.done >= self.spec.n_seqs

    def window(self, i: int) -> dict[str, torch.Tensor]:
        """One window as float32/int64 tensors: ids [S], aux [S, 3H], final [S, H], top [S]."""
        a = self.arrays
        return {
            "ids": torch.from_numpy(np.asarray(a["ids"][i], dtype=np.int64)),
            "aux": torch.from_numpy(np.asarray(a["aux"][i], dtype=np.float32)),
            "final": torch.from_numpy(np.asarray(a["final"][i], dtype=np.float32)),
            "top": torch.from_numpy(np.asarray(a["top"][i], dtype=np.int64)),
        }

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = [self.window(i) for i in indices]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


@torch.inference_mode()
def target_features(model, ids: torch.Tensor, aux_layer_ids: list[int]) -> dict[str, torch.Tensor]:
    """One target forward over ids [B, S]: aux [B, S, 3H], final [B, S, H] (lm_head's input), top [B, S].

    `final` is captured by a hook on the output embeddings, so it is exactly what the lm_head reads whatever
    the architecture's final norm is called.
    """
    captured: list[torch.Tensor] = []
    lm_head = model.get_output_embeddings()
    handle = lm_head.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    finally:
        handle.remove()
    hs = out.hidden_states  # entry i = input of decoder layer i (0 = embeddings output)
    aux = torch.cat([hs[i] for i in aux_layer_ids], dim=-1)
    return {"aux": aux, "final": captured[-1], "top": out.logits.argmax(-1)}


def extract(
    model,
    windows: np.ndarray,
    store: FeatureStore,
    batch: int = 1,
    desc: str = "features",
    limit: int | None = None,
) -> FeatureStore:
    """Run the target over windows [N, S] (token ids) into `store`, resuming at store.done, up to `limit`."""
    n = min(store.spec.n_seqs, limit or store.spec.n_seqs)
    bar = tqdm(total=n, initial=store.done, desc=desc, unit="win")
    t_last = time.monotonic()
    for start in range(store.done, n, batch):
        stop = min(start + batch, n)
        ids = torch.from_numpy(windows[start:stop].astype(np.int64))
        f = target_features(model, ids, store.spec.aux_layer_ids)
        a = store.arrays
        a["ids"][start:stop] = ids.numpy().astype(np.int32)
        a["aux"][start:stop] = f["aux"].float().numpy().astype(np.float16)
        a["final"][start:stop] = f["final"].float().numpy().astype(np.float16)
        if not (np.isfinite(a["aux"][start:stop]).all() and np.isfinite(a["final"][start:stop]).all()):
            raise InputError(
                "the target's hidden states exceed float16's range; this model cannot be cached here"
            )
        a["top"][start:stop] = f["top"].numpy().astype(np.int32)
        bar.update(stop - start)
        now = time.monotonic()
        bar.set_postfix(tok_s=f"{ids.numel() / max(1e-9, now - t_last):.0f}")
        store.seconds += now - t_last
        t_last = now
        if stop % 16 == 0 or stop == n:
            store.flush(stop)
    bar.close()
    store.flush(max(n, store.done))
    return store


# ----------------------------------------------------------------------------------------------------------
# Corpus and windows
# ----------------------------------------------------------------------------------------------------------


@dataclass
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
    from specdec.train.corpus import CorpusConfig
    from specdec.train.lm import prepare

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
    from specdec.train.corpus import is_held_out

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


def prepare_features(
    workdir: Path, model, corpus_dir: Path, aux_layer_ids: list[int], cfg: DataConfig
) -> dict[str, FeatureStore]:
    """Feature stores 'train', 'heldout' (real text) and 'greedy' (target's own continuations); resumable."""
    hidden = model.config.get_text_config(decoder=True).hidden_size
    stores = {}
    held = load_stream(corpus_dir, "heldout")
    real = heldout_windows(held, cfg.seq_len, cfg.heldout_windows)
    prompt_rows = heldout_windows(held, cfg.greedy_prompt_len, cfg.greedy_prompts)
    plans = [("heldout", lambda: real, real.shape)]
    greedy_len = prompt_rows.shape[1] + cfg.greedy_new_tokens
    greedy_dir = workdir / "features" / "greedy"
    plans.append(
        (
            "greedy",
            lambda: _cached(
                greedy_dir / "windows.npy", lambda: greedy_windows(model, prompt_rows, cfg.greedy_new_tokens)
            ),
            (len(prompt_rows), greedy_len),
        )
    )
    n_train = max(1, cfg.feature_tokens // cfg.seq_len)
    train_stream = load_stream(corpus_dir, "train")
    n_train = min(n_train, train_stream.size // cfg.seq_len)
    for name, make, shape in plans:
        store = FeatureStore(workdir / "features" / name, _spec(shape, hidden, aux_layer_ids))
        if not store.complete:
            extract(model, make(), store, desc=f"features {name}")
        stores[name] = store
    # The training windows are a seeded random order fixed when the store is created; a later, smaller
    # --feature-tokens uses a prefix of them (itself a uniform sample), a larger one extends up to the plan.
    store = FeatureStore(workdir / "features" / "train", _spec((n_train, cfg.seq_len), hidden, aux_layer_ids))
    if store.done < n_train:
        windows = train_windows(train_stream, cfg.seq_len, store.spec.n_seqs, cfg.seed)
        extract(model, windows, store, desc="features train", limit=n_train)
    store.limit = min(store.done, n_train)
    stores["train"] = store
    return stores


def _spec(shape: tuple[int, int], hidden: int, aux_layer_ids: list[int]) -> FeatureSpec:
    return FeatureSpec(
        seq_len=int(shape[1]), n_seqs=int(shape[0]), hidden_size=hidden, aux_layer_ids=list(aux_layer_ids)
    )


def _cached(path: Path, make) -> np.ndarray:
    if path.exists():
        return np.load(path)
    arr = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)
    return arr


# ----------------------------------------------------------------------------------------------------------
# Soft labels and losses
# ----------------------------------------------------------------------------------------------------------


class Teacher:
    """The target's lm_head restricted to the draft vocabulary: soft labels from cached final hidden states."""

    def __init__(self, target, draft_ids: torch.Tensor):
        head = target.get_output_embeddings()
        self.weight = head.weight.detach().float()[draft_ids].clone()  # [Vd, H]
        bias = getattr(head, "bias", None)
        self.bias = None if bias is None else bias.detach().float()[draft_ids].clone()
        vocab = head.weight.shape[0]
        self.t2d = torch.zeros(vocab, dtype=torch.bool)
        self.t2d[draft_ids] = True
        self.index = torch.full((vocab,), -1, dtype=torch.long)  # target id -> draft id (or -1)
        self.index[draft_ids] = torch.arange(draft_ids.numel())

    def probs(self, final: torch.Tensor) -> torch.Tensor:
        """final [B, T, H] -> the target's distribution renormalised over the draft vocabulary [B, T, Vd]."""
        return torch.softmax(F.linear(final, self.weight, self.bias), dim=-1)


def ttt_losses(
    outs: list[torch.Tensor], labels: torch.Tensor, top: torch.Tensor, teacher: Teacher
) -> tuple[list[torch.Tensor], list[float]]:
    """Per unroll step k: soft cross-entropy of row t against the target's distribution at t + k + 1, masked
    where the target's top token there is outside the draft vocabulary; and top-1 agreement with that token.

    outs[k] [B, T, Vd]; labels [B, T, Vd]; top [B, T] target ids.
    """
    losses, accs = [], []
    t = labels.shape[1]
    for k, logits in enumerate(outs):
        pred = logits[:, : t - 1 - k]  # rows with a label
        target = labels[:, 1 + k :]
        top_k = top[:, 1 + k :]
        mask = teacher.t2d[top_k].float()  # [B, T-1-k]
        ce = -(target * F.log_softmax(pred, dim=-1)).sum(-1)
        n = mask.sum().clamp_min(1.0)
        losses.append((ce * mask).sum() / n)
        hit = (pred.argmax(-1) == teacher.index[top_k]).float()
        accs.append(float((hit * mask).sum() / n))
    return losses, accs


def choose_draft_vocab(store: FeatureStore, size: int, vocab: int, max_windows: int = 2000) -> torch.Tensor:
    """The `size` target tokens the target itself predicts most often on the training windows (VOCABTRIM:
    what the head must draft is the target's own choice), ascending target ids."""
    n = min(store.limit, max_windows)
    counts = np.bincount(np.asarray(store.arrays["top"][:n]).ravel(), minlength=vocab)[:vocab]
    counts = counts + 1e-3 * np.bincount(np.asarray(store.arrays["ids"][:n]).ravel(), minlength=vocab)[:vocab]
    if size >= vocab:
        return torch.arange(vocab)
    keep = np.sort(np.argsort(-counts, kind="stable")[:size])
    return torch.from_numpy(keep.astype(np.int64))


# ----------------------------------------------------------------------------------------------------------
# Held-out acceptance (teacher-forced greedy chain drafting)
# ----------------------------------------------------------------------------------------------------------


METHODS = ("eagle", "medusa", "hydra")
NAMES = {"eagle": "EAGLE-3 head", "medusa": "Medusa heads", "hydra": "Hydra heads"}


def draft_logits(method: str, head, b: dict[str, torch.Tensor], depth: int) -> list[torch.Tensor]:
    """Per depth k, logits [B, T, Vd] whose row t drafts the token at position t + k + 2 (label: the target's
    distribution at t + k + 1). EAGLE: the head unrolled on its own features over the text's tokens (row t
    reads the target's features up to t and the token t + 1); Medusa: head k on the target's final hidden
    state at t (the target's own lm_head gives token t + 1); Hydra: head k on that state and the text's tokens
    t + 1 .. t + k + 1."""
    if method == "eagle":
        return head.forward_train(b["aux"], b["ids"], steps=depth)
    if method == "hydra":
        return head.forward_train(b["final"], b["ids"], depth)
    return head(b["final"])[:depth]


@torch.no_grad()
def chain_acceptance(
    head, store: FeatureStore, depth: int, start: int = 0, batch: int = 4, method: str = "eagle"
) -> dict:
    """At every anchor row t, the head drafts `depth` tokens (EAGLE autoregressively, with its own features
    and tokens; Medusa with its independent heads; Hydra with its heads on the text's tokens) and we count how
    many leading drafts equal the target's greedy tokens.

    Teacher-forced: the heads read the TEXT's tokens and the target's features of the text; that equals
    drafting from the target's own tokens exactly as long as the text follows the target's greedy choice
    (x[t+1+k] == top[t+k]; for EAGLE from k = 1 on, as its anchor reads token t + 1 as given; for Medusa
    and Hydra from k = 0, as the bonus token t + 1 is the target's own). So on the target's own greedy
    continuations ('greedy' store) this is exact and on real text it is a lower bound. Rows before `start` (a
    prompt) are not anchors.
    Returns acceptance by depth (fraction of anchors with >= j accepted) and tau = 1 + sum of those (expected
    tokens per target forward with a chain of this depth).
    """
    was_training = head.training
    head.eval()
    d2t = head.draft_to_target
    counts = torch.zeros(depth + 1, dtype=torch.long)
    for lo in range(0, store.done, batch):
        b = store.batch(list(range(lo, min(lo + batch, store.done))))
        outs = draft_logits(method, head, b, depth)
        x, g = b["ids"], b["top"]
        t = x.shape[1]
        anchors = t - 1 - depth  # rows whose every depth has a label
        ok = torch.ones(x.shape[0], anchors, dtype=torch.bool)
        accepted = torch.zeros(x.shape[0], anchors, dtype=torch.long)
        for k, logits in enumerate(outs):
            draft = d2t[logits[:, :anchors].argmax(-1)]
            ok &= draft == g[:, 1 + k : 1 + k + anchors]
            if k > 0 or method != "eagle":
                ok &= x[:, 1 + k : 1 + k + anchors] == g[:, k : k + anchors]
            accepted += ok.long()
        accepted = accepted[:, start:]
        counts += torch.bincount(accepted.flatten(), minlength=depth + 1)
    head.train(was_training)
    total = int(counts.sum())
    at_least = [float(counts[j:].sum()) / max(1, total) for j in range(1, depth + 1)]
    return {"anchors": total, "acceptance_by_depth": at_least, "tau": 1.0 + sum(at_least), "depth": depth}


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


@dataclass
class HeadTrainConfig:
    tokens: int = 2_000_000  # training tokens seen by the optimizer (epochs over the cached windows)
    batch_seqs: int = 2  # windows per optimizer step (2 x 1024 tokens)
    segment_len: int = 512  # the head attends within segments this long in training (its T^2 attention cost)
    ttt_steps: int = 4  # training-time-test unroll depth (the reference uses 7; CPU budget)
    step_weight: float = 0.8  # loss weight of unroll step k is step_weight ** k
    lr: float = 1e-3  # a 4M-parameter head from scratch (lm_head warm-started from the target's rows)
    min_lr_ratio: float = 0.05
    warmup_fraction: float = 0.03
    weight_decay: float = 0.01
    grad_clip: float = 0.5
    draft_vocab_size: int = 3072  # covers ~98.6% of the shipped target's greedy tokens on held-out code
    intermediate_size: int | None = None  # None: the target's MLP width
    medusa_heads: int = 4  # --method medusa: head k drafts the token k + 2 ahead (Medusa: up to 5)
    medusa_layers: int = 1  # residual SiLU layers per Medusa head
    hydra_heads: int = 4  # --method hydra: head k drafts the token k + 2 ahead (Hydra++: 4)
    hydra_layers: int = 1  # residual SiLU layers per Hydra head
    seed: int = 0
    checkpoint_minutes: float = 5.0
    eval_depth: int = 6


def _lr(cfg: HeadTrainConfig, step: int, total: int) -> float:
    warmup = max(1, int(total * cfg.warmup_fraction))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _batch_indices(n: int, seed: int, step: int, batch: int) -> list[int]:
    """Windows of optimizer step `step`: epoch-wise seeded permutations, so a resumed run sees the same data."""
    out = []
    for j in range(step * batch, (step + 1) * batch):
        epoch, pos = divmod(j, n)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n)[pos]))
    return out


def _segments(b: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """[B, S, ...] windows -> [B * S / length, length, ...] segments (the target's features keep their full
    window context; only the head's own attention span is cut)."""
    s = b["ids"].shape[1]
    if length >= s or s % length:
        return b
    return {k: v.reshape(-1, length, *v.shape[2:]) for k, v in b.items()}


def build_head(target, store: FeatureStore, cfg: HeadTrainConfig, method: str = "eagle"):
    """(a new head of `method` with its draft vocabulary set, the draft vocabulary's target ids)."""
    from specdec.heads.eagle3 import Eagle3Head, config_for_target
    from specdec.heads.hydra import HydraConfig, HydraHeads
    from specdec.heads.medusa import MedusaConfig, MedusaHeads

    tc = target.config.get_text_config(decoder=True)
    draft_ids = choose_draft_vocab(store, cfg.draft_vocab_size, tc.vocab_size)
    torch.manual_seed(cfg.seed)
    if method == "medusa":
        heads = MedusaHeads(
            MedusaConfig(
                tc.hidden_size, tc.vocab_size, cfg.medusa_heads, cfg.medusa_layers, draft_ids.numel()
            )
        )
        heads.set_draft_vocab(draft_ids)
        return heads, draft_ids
    if method == "hydra":
        hydra = HydraHeads(
            HydraConfig(tc.hidden_size, tc.vocab_size, cfg.hydra_heads, cfg.hydra_layers, draft_ids.numel())
        )
        hydra.set_draft_vocab(draft_ids)
        hydra.bind_embedding(target.get_input_embeddings().weight.float())
        return hydra, draft_ids
    hcfg = config_for_target(
        target, draft_ids.numel(), tuple(store.spec.aux_layer_ids), intermediate_size=cfg.intermediate_size
    )
    head = Eagle3Head(hcfg)
    head.set_draft_vocab(draft_ids)
    head.bind_embedding(target.get_input_embeddings().weight.float())
    return head, draft_ids


def _warm_start(head, teacher: Teacher, target, method: str = "eagle") -> None:
    """LM heads from the target's rows for the draft vocabulary (and EAGLE's final norm from the target's): a
    head then starts out predicting in the target's output space (a new Medusa or Hydra head is exactly the
    target's next-token prediction, its residual block being zero), and learns the feature."""
    with torch.no_grad():
        if method in ("medusa", "hydra"):
            for lm_head in head.lm_heads:
                lm_head.weight.copy_(teacher.weight)
            return
        head.lm_head.weight.copy_(teacher.weight)
        norm = getattr(target.get_decoder(), "norm", None)
        if (
            norm is not None
            and getattr(norm, "weight", None) is not None
            and norm.weight.shape == head.norm.weight.shape
        ):
            head.norm.weight.copy_(norm.weight.float())


def train_head(
    workdir: Path,
    target,
    store: FeatureStore,
    cfg: HeadTrainConfig,
    method: str = "eagle",
    new_budget: int | None = None,
    stop_after: int | None = None,
) -> Path:
    """Train (or resume) a head of `method` on cached features; returns the checkpoint path (METHOD.ckpt).

    A resumed run keeps the configuration recorded in its checkpoint; `new_budget` (tokens) may move the end
    of its schedule (logged). `stop_after` ends the call after that many optimizer steps (an interruption,
    for tests), saving first.
    """
    ckpt_path = workdir / f"{method}.ckpt"
    log_path = workdir / f"{method}.log.jsonl"
    state = torch.load(ckpt_path, weights_only=False) if ckpt_path.exists() else None
    if state is not None:
        cfg = HeadTrainConfig(**{**state["train_config"], "checkpoint_minutes": cfg.checkpoint_minutes})
        if new_budget is not None and new_budget != cfg.tokens:
            with log_path.open("a") as f:
                f.write(
                    json.dumps(
                        {"step": state["step"], "budget_changed": {"from": cfg.tokens, "to": new_budget}}
                    )
                    + "\n"
                )
            cfg.tokens = new_budget
    head, draft_ids = build_head(target, store, cfg, method)
    teacher = Teacher(target, draft_ids)
    decay = [p for _, p in head.named_parameters() if p.dim() >= 2]
    no_decay = [p for _, p in head.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    step, seen, elapsed = 0, 0, 0.0
    if state is not None:
        if not torch.equal(state["draft_ids"], draft_ids):
            raise InputError(
                f"{ckpt_path} was trained with another draft vocabulary; remove it to start over"
            )
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        step, seen, elapsed = state["step"], state["tokens_seen"], state["elapsed"]
    else:
        _warm_start(head, teacher, target, method)
    seq = store.spec.seq_len
    total = max(1, cfg.tokens // (cfg.batch_seqs * seq))
    depth = train_depth(cfg, method)
    weights = [cfg.step_weight**k for k in range(depth)]

    def save() -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(
            {
                "head": head.state_dict(),
                "optimizer": opt.state_dict(),
                "step": step,
                "tokens_seen": seen,
                "elapsed": elapsed,
                "train_config": asdict(cfg),
                "head_config": head.config.to_json(),
                "draft_ids": draft_ids,
            },
            tmp,
        )
        os.replace(tmp, ckpt_path)

    head.train()
    n_params = sum(p.numel() for p in head.parameters())
    bar = tqdm(total=total, initial=step, desc=f"train {method} head ({n_params / 1e6:.1f}M)", unit="step")
    last_save, done_here = time.monotonic(), 0
    restore = _stop_on_sigterm()
    try:
        while step < total and (stop_after is None or done_here < stop_after):
            t0 = time.monotonic()
            b = store.batch(_batch_indices(store.limit, cfg.seed, step, cfg.batch_seqs))
            b = _segments(b, cfg.segment_len)
            for group in opt.param_groups:
                group["lr"] = _lr(cfg, step, total)
            with torch.no_grad():
                labels = teacher.probs(b["final"])  # [B, T, Vd]
            outs = draft_logits(method, head, b, depth)
            losses, accs = ttt_losses(outs, labels, b["top"], teacher)
            loss = sum(w * lk for w, lk in zip(weights, losses, strict=True)) / sum(weights)
            assert isinstance(loss, torch.Tensor)  # depth >= 1 losses: a sum of tensors
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            done_here += 1
            seen += b["ids"].numel()
            dt = time.monotonic() - t0
            elapsed += dt
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss.item():.3f}", acc0=f"{accs[0]:.2f}", tok_s=f"{b['ids'].numel() / dt:.0f}"
            )
            if step % 10 == 0 or step == total:
                record = {
                    "step": step,
                    "loss": loss.item(),
                    "step_losses": [x.item() for x in losses],
                    "acc": accs,
                    "tokens_seen": seen,
                    "elapsed": elapsed,
                    "lr": opt.param_groups[0]["lr"],
                }
                with log_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            if time.monotonic() - last_save > cfg.checkpoint_minutes * 60:
                save()
                last_save = time.monotonic()
    finally:
        restore()
        if done_here:
            save()
        bar.close()
    return ckpt_path


def train_depth(cfg: HeadTrainConfig, method: str) -> int:
    """EAGLE's unroll steps, or the heads of Medusa and Hydra."""
    return {"eagle": cfg.ttt_steps, "medusa": cfg.medusa_heads, "hydra": cfg.hydra_heads}[method]


def _stop_on_sigterm():
    """`kill PID` of a background run ends it like Ctrl-C (a background job ignores SIGINT): the checkpoint
    is saved on the way out. Returns the function that puts the previous handler back."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def stop(_signum, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    return lambda: signal.signal(signal.SIGTERM, previous)


def load_trained(workdir: Path, target, store: FeatureStore, method: str = "eagle"):
    """(head in float32 bound to the target, checkpoint state) from workdir/METHOD.ckpt."""
    state = torch.load(workdir / f"{method}.ckpt", weights_only=False)
    cfg = HeadTrainConfig(**state["train_config"])
    head, draft_ids = build_head(target, store, cfg, method)
    head.load_state_dict(state["head"])
    return head.eval(), state


# ----------------------------------------------------------------------------------------------------------
# Export: weights, measurements, loss curve, card
# ----------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def step_latency_ms(
    head, prefix: int = 256, width: int = 1, repeats: int = 40, method: str = "eagle"
) -> float:
    """Median time of one drafting step, as a drafter runs it: EAGLE, `width` new entries after a
    `prefix`-entry cache (its layer, logits over the draft vocabulary, a top-4); Medusa, every head on `width`
    hidden states (logits and a top-4 per head); Hydra, every head in turn on `width` paths, as a tree is
    drafted depth by depth."""
    import statistics

    gen = torch.Generator().manual_seed(0)
    times = []
    if method == "medusa":
        hidden = torch.randn(width, head.config.hidden_size, generator=gen)
        for _ in range(repeats + 5):
            t = time.perf_counter()
            for logits in head(hidden):
                logits.topk(4, dim=-1)
            times.append(time.perf_counter() - t)
        return 1000 * statistics.median(times[5:])
    if method == "hydra":
        hidden = torch.randn(width, head.config.hidden_size, generator=gen)
        paths = torch.randint(0, head.config.vocab_size, (width, head.config.num_heads), generator=gen)
        for _ in range(repeats + 5):
            t = time.perf_counter()
            for k in range(head.config.num_heads):
                head.head(k, hidden, paths[:, : k + 1]).topk(4, dim=-1)
            times.append(time.perf_counter() - t)
        return 1000 * statistics.median(times[5:])
    cache = head.new_cache(prefix + (repeats + 5) * width)
    aux = torch.randn(prefix, head.fc.in_features, generator=gen)
    tokens = torch.randint(0, head.config.vocab_size, (prefix + (repeats + 5) * width,), generator=gen)
    _, feat = head.step(cache, aux, tokens[:prefix], torch.arange(prefix))
    feat = feat[-1:].expand(width, -1)
    for i in range(repeats + 5):
        pos = prefix + i * width
        t = time.perf_counter()
        logits, feat = head.step(cache, feat, tokens[pos : pos + width], torch.full((width,), pos))
        logits.topk(4, dim=-1)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times[5:])


def plot_loss(log_path: Path, out: Path, method: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    tokens = [r["tokens_seen"] / 1e6 for r in rows]
    what = "unroll step" if method == "eagle" else "head"
    for k in range(len(rows[0]["step_losses"])):
        ax.plot(tokens, [r["step_losses"][k] for r in rows], lw=1, label=f"{what} {k}")
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("soft cross-entropy (nats)")
    ax.set_title(f"{NAMES[method]}: training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


def export_head(
    workdir: Path, target, stores: dict, out_dir: Path, data: DataConfig, about: dict, method: str = "eagle"
) -> dict:
    """bf16 safetensors head + training_metrics.json + loss.png + MODEL_CARD.md in out_dir; returns metrics.
    Acceptance and latency are measured on the exported weights as loaded back (float32), as users run them."""
    from specdec.heads.eagle3 import load_head, save_head
    from specdec.heads.hydra import load_hydra, save_hydra
    from specdec.heads.medusa import load_medusa, save_medusa
    from specdec.train.card import forward_latency_ms

    formats: dict[str, tuple[Callable[..., None], Callable[..., Any]]] = {
        "eagle": (save_head, load_head),
        "medusa": (save_medusa, load_medusa),
        "hydra": (save_hydra, load_hydra),
    }
    save, load = formats[method]
    head, state = load_trained(workdir, target, stores["train"], method)
    save(head, out_dir, torch.bfloat16)
    shipped = load(out_dir, target)
    cfg = HeadTrainConfig(**state["train_config"])
    depth = cfg.eval_depth if method == "eagle" else min(cfg.eval_depth, train_depth(cfg, method))
    greedy_start = data.greedy_prompt_len - 1
    evals = {
        "greedy": chain_acceptance(shipped, stores["greedy"], depth, start=greedy_start, method=method),
        "heldout": chain_acceptance(shipped, stores["heldout"], depth, method=method),
    }
    log_path = workdir / f"{method}.log.jsonl"
    metrics = {
        "method": method,
        "tokens_seen": state["tokens_seen"],
        "steps": state["step"],
        "train_seconds": state["elapsed"],
        "feature_seconds": sum(s.seconds for s in stores.values()),
        "feature_windows": {k: s.limit for k, s in stores.items()},
        "seq_len": stores["train"].spec.seq_len,
        "parameters": sum(p.numel() for p in shipped.parameters()),
        "train_config": state["train_config"],
        "head_config": shipped.config.to_json(),
        "acceptance": evals,
        "latency_ms": {
            "head_step_1": step_latency_ms(shipped, width=1, method=method),
            "head_step_8": step_latency_ms(shipped, width=8, method=method),
            "target_forward_1": forward_latency_ms(target),
            "threads": torch.get_num_threads(),
        },
        "budget_changes": [json.loads(x) for x in log_path.read_text().splitlines() if "budget_changed" in x],
        **about,
    }
    (out_dir / "training_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    metrics["loss_png"] = plot_loss(log_path, out_dir / "loss.png", method)
    (out_dir / "MODEL_CARD.md").write_text(head_card(metrics, data))
    return metrics


def _card_intro(m: dict) -> str:
    hc, tc = m["head_config"], m["train_config"]
    vocab = f"a draft vocabulary of {_draft_vocab(m):,} of the target's {hc['vocab_size']:,} tokens"
    if m["method"] == "medusa":
        return f"""{tc["medusa_heads"]} Medusa heads on the target's last hidden state (the input of its lm_head; head
k = {tc["medusa_layers"]} residual SiLU layer(s) + an LM head, drafting the token k + 2 ahead), with {vocab}.
{m["parameters"] / 1e6:.2f}M parameters. `config.json` + `model.safetensors` (bfloat16; `token_map` int64) are in the
layout vLLM's `MedusaModel` loads; specdec loads them as float32. Built with `specdec train-drafter --method medusa`
(src/specdec/train/drafter.py)."""
    if m["method"] == "hydra":
        return f"""{tc["hydra_heads"]} Hydra heads: head k reads the target's last hidden state (the input of its lm_head) and the
token embeddings of the k + 1 tokens before the one it drafts (the root and the drafts on its path), through
a linear layer ((k + 2) x hidden -> hidden), {tc["hydra_layers"]} residual SiLU layer(s) and an LM head, drafting the token k + 2
ahead; {vocab}. {m["parameters"] / 1e6:.2f}M parameters (the token embedding is the target's and is not stored).
`config.json` + `model.safetensors` (bfloat16; `token_map` int64) in specdec's own layout (no serving engine
loads Hydra heads); specdec loads them as float32. Built with `specdec train-drafter --method hydra`
(src/specdec/train/drafter.py)."""
    layers = hc["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    return f"""An EAGLE-3-style draft head: one Llama decoder layer over the target's hidden states at layers {layers} (HF
`output_hidden_states` indices = vLLM's `eagle_aux_hidden_state_layer_ids`: the inputs of those decoder layers),
with {vocab}. {m["parameters"] / 1e6:.2f}M parameters (the token embedding is the target's and is not stored).
`config.json` + `model.safetensors` (bfloat16; d2t int64, t2d bool) are in the layout vLLM
(`Eagle3LlamaForCausalLM`) and SGLang (`LlamaForCausalLMEagle3`) load; specdec loads them as float32. Built with
`specdec train-drafter` (src/specdec/train/drafter.py)."""


def _draft_vocab(m: dict) -> int:
    hc = m["head_config"]
    return hc.get("draft_vocab_size") or hc.get("truncated_vocab_size")


def _card_objective(m: dict) -> str:
    tc = m["train_config"]
    if m["method"] in ("medusa", "hydra"):
        reads = "the text's tokens before it (teacher forcing)" if m["method"] == "hydra" else "nothing else"
        return f"""Head k reads {reads}. Loss: head k's soft cross-entropy against the target's distribution for
the token k + 2 ahead, over the draft vocabulary (masked where the target's top token is outside it), weighted
{tc["step_weight"]}^k. Residual blocks start at zero and LM heads at the target's rows, so each head starts as the
target's next-token guess."""
    return f"""Training-time test: the head unrolled {tc["ttt_steps"]} steps on its own output features, loss = soft
cross-entropy against the target's distribution over the draft vocabulary (masked where the target's top token
is outside it), step k weighted {tc["step_weight"]}^k; the head attends within {tc["segment_len"]}-token segments
of each window. lm_head and final norm warm-started from the target's."""


def head_card(m: dict, data: DataConfig) -> str:
    tc, lat = m["train_config"], m["latency_ms"]
    name = NAMES[m["method"]]

    def acc_row(label: str, e: dict) -> str:
        cells = " | ".join(f"{a:.3f}" for a in e["acceptance_by_depth"])
        return f"| {label} | {e['anchors']:,} | {cells} | {e['tau']:.2f} |"

    depth = m["acceptance"]["greedy"]["depth"]
    head_cols = " | ".join(f"depth {j}" for j in range(1, depth + 1))
    changes = " ".join(
        f"The token budget was changed from {c['budget_changed']['from']:,} to {c['budget_changed']['to']:,} "
        f"at step {c['step']} (the cosine schedule was recomputed from there)."
        for c in m["budget_changes"]
    )
    ratio = lat["head_step_1"] / lat["target_forward_1"]
    if m["method"] == "eagle":
        drafting = "autoregressively (its own features and tokens)"
        cost = (
            f"One drafting step (1 new entry after 256 cached, logits over the draft vocabulary, top-4): "
            f"{lat['head_step_1']:.2f} ms; 8 entries at once (a tree level): {lat['head_step_8']:.2f} ms"
        )
    elif m["method"] == "hydra":
        drafting = "with the heads in turn, each reading the tokens before it"
        cost = (
            f"Every head in turn on 1 path (logits over the draft vocabulary, top-4 each): "
            f"{lat['head_step_1']:.2f} ms; on 8 paths: {lat['head_step_8']:.2f} ms"
        )
    else:
        drafting = "with the independent heads"
        cost = (
            f"All heads on 1 hidden state (logits over the draft vocabulary, top-4 each): "
            f"{lat['head_step_1']:.2f} ms; on 8 hidden states: {lat['head_step_8']:.2f} ms"
        )
    windows = m["feature_windows"]["train"] * m["seq_len"]
    return f"""# {name} for {m["target"]}

{_card_intro(m)}

## Data
{m["data"]}
The target was run once over {m["feature_windows"]["train"]:,} windows of {m["seq_len"]} tokens
({windows / 1e6:.2f}M tokens, random distinct windows) and its aux hidden states, final hidden state and top token
cached to disk (float16 memmaps; {m["feature_seconds"] / 60:.0f} min for all feature sets). Soft labels = the
target's lm_head on the cached final hidden state, restricted to the draft vocabulary (the {_draft_vocab(m):,}
tokens the target itself predicts most often on those windows).

## Training
{m["tokens_seen"]:,} tokens ({m["tokens_seen"] / windows:.2f} epochs), {m["steps"]:,} optimizer steps of
{tc["batch_seqs"]} windows, {m["train_seconds"] / 3600:.2f} h on {lat["threads"]} CPU thread(s). AdamW (betas
0.9/0.95, weight decay {tc["weight_decay"]}), peak lr {tc["lr"]}, cosine to {tc["min_lr_ratio"]:.0%} after
{tc["warmup_fraction"]:.0%} warmup, gradient clipping {tc["grad_clip"]}.
{_card_objective(m)} {changes}

![loss](loss.png)

## Held-out acceptance (teacher-forced greedy chain drafting)
At every anchor position the head drafts {depth} tokens {drafting}; a draft counts while it equals the target's
greedy token. *greedy*: {data.greedy_prompts} prompts of {data.greedy_prompt_len} tokens from held-out files,
continued {data.greedy_new_tokens} tokens by the target's own greedy decoding (exactly what greedy speculative
decoding sees). *real text*: {data.heldout_windows} held-out windows of {data.seq_len} tokens; a draft is only
counted while the text itself follows the target's greedy choice, so this is a lower bound. Columns: fraction of
anchors with at least j tokens accepted; tau = 1 + their sum = expected tokens per target forward with a chain of
depth {depth} (a tree does better).

| text | anchors | {head_cols} | tau |
|---|---|{"---|" * depth}---|
{acc_row("greedy (target's own continuations)", m["acceptance"]["greedy"])}
{acc_row("real held-out text", m["acceptance"]["heldout"])}

## Cost
{cost}; the target's forward of 1 token after 256: {lat["target_forward_1"]:.2f} ms (1-entry step = {ratio:.0%}
of it), float32, {lat["threads"]} thread(s), this machine.

## Reproduce
```bash
{m["command"]}
```
"""


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

DEFAULT_TOKENS = 2_000_000


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-drafter", help="train a drafter head on the target's own hidden states (resumable)"
    )
    p.add_argument("--method", choices=list(METHODS), default="eagle")
    p.add_argument(
        "--model", default="default", help="target model path or hub name (default: the shipped one)"
    )
    p.add_argument("--out", type=Path, required=True, help="directory for the exported head and its card")
    p.add_argument(
        "--data", type=Path, nargs="+", default=None, help="text files (default: the shipped corpus)"
    )
    p.add_argument(
        "--workdir", type=Path, default=None, help="resumable working directory (default: OUT.work)"
    )
    p.add_argument("--tokens", type=int, default=None, help=f"training tokens (default {DEFAULT_TOKENS:,})")
    p.add_argument(
        "--feature-tokens",
        type=int,
        default=None,
        help="distinct tokens whose features are cached (default: --tokens)",
    )
    p.add_argument("--draft-vocab", type=int, default=HeadTrainConfig.draft_vocab_size)
    p.add_argument("--ttt-steps", type=int, default=HeadTrainConfig.ttt_steps, help="EAGLE: unroll depth")
    p.add_argument("--medusa-heads", type=int, default=HeadTrainConfig.medusa_heads, help="Medusa: heads")
    p.add_argument("--hydra-heads", type=int, default=HeadTrainConfig.hydra_heads, help="Hydra: heads")
    p.add_argument(
        "--aux-layers", default=None, help="comma-separated layer ids (default: low, middle, high)"
    )
    p.add_argument("--stage", choices=["features", "train", "export", "all"], default="all")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from specdec.heads.eagle3 import default_aux_layer_ids
    from specdec.models.loading import load_causal_lm

    workdir = args.workdir or args.out.with_name(args.out.name + ".work")
    workdir.mkdir(parents=True, exist_ok=True)
    target, tokenizer = load_causal_lm(args.model)
    layers = target.config.get_text_config(decoder=True).num_hidden_layers
    if args.aux_layers:
        try:
            aux = [int(x) for x in args.aux_layers.split(",")]
        except ValueError:
            raise InputError(f"--aux-layers {args.aux_layers!r}: expected comma-separated integers") from None
        if any(not 0 <= i < layers for i in aux):
            raise InputError(
                f"--aux-layers {args.aux_layers}: ids must be in 0..{layers - 1} for this target"
            )
    else:
        aux = list(default_aux_layer_ids(layers))
    tokens = args.tokens or DEFAULT_TOKENS
    data = DataConfig(feature_tokens=args.feature_tokens or tokens)
    corpus = prepare_corpus(workdir, args.model, tokenizer, args.data)
    stores = prepare_features(workdir, target, corpus, aux, data)
    if args.stage == "features":
        return 0
    cfg = HeadTrainConfig(
        tokens=tokens,
        draft_vocab_size=args.draft_vocab,
        ttt_steps=args.ttt_steps,
        medusa_heads=args.medusa_heads,
        hydra_heads=args.hydra_heads,
    )
    if args.stage in ("train", "all"):
        train_head(workdir, target, stores["train"], cfg, args.method, new_budget=args.tokens)
    if args.stage in ("export", "all"):
        about = {
            "target": "the shipped code model" if args.model == "default" else args.model,
            "data": _describe_data(corpus, args.data),
            "command": "specdec " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "specdec train-drafter ...",
        }
        m = export_head(workdir, target, stores, args.out, data, about, args.method)
        g = m["acceptance"]["greedy"]
        print(
            f"wrote {args.out}: {m['steps']} steps, {m['tokens_seen']:,} tokens, "
            f"tau {g['tau']:.2f} (greedy held-out, chain depth {g['depth']})"
        )
    return 0


def _describe_data(corpus_dir: Path, data: list[Path] | None) -> str:
    info = json.loads((corpus_dir / "train.json").read_text()) if (corpus_dir / "train.json").exists() else {}
    if data:
        return f"{len(data)} --data file(s); held-out split by file name (or the tail of the last file)."
    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    return (
        f"The shipped target's training corpus, rebuilt by `specdec train-lm --stage prepare` with the shipped "
        f"tokenizer: {manifest['files']:,} Python files ({manifest['bytes'] / 1e6:.0f} MB) visible to the "
        f"training interpreter, {info.get('tokens', 0) / 1e6:.1f}M training tokens; held out by file name "
        f"({manifest['held_out_rule']}), never trained on."
    )
