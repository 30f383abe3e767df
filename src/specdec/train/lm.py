"""Resumable CPU training of the shipped Llama-architecture code models.

One working directory holds everything a run needs to resume after an interruption: the corpus manifest,
the tokenizer, the tokenized corpus (uint16 memmaps), and per-model checkpoints written atomically every few
minutes. The sampler is a pure function of (seed, step), so a resumed run sees exactly the batches an
uninterrupted one would have.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from specdec.train.corpus import CorpusConfig, collect_files, iter_texts, write_manifest
from specdec.train.loop import LoopPlan, ResumeRule, RunFiles, StepOutput, open_run, run_metrics, train_run
from specdec.train.tokenizer import EOS, train_tokenizer


@dataclass(frozen=True)
class ModelSize:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int


# Sizes chosen for 2 CPU cores without bf16 hardware, by fp32 training's throughput there (the shipped
# MODEL_CARD.md records each model's training time).
SIZES = {
    "target": ModelSize(hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1024),  # ~14M params
    "draft": ModelSize(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=384),  # ~1.5M params
    # the stronger target, for one accelerator run (docs/train.md): ~45M parameters, the same tokenizer
    "target-50m": ModelSize(hidden_size=512, num_layers=12, num_heads=8, intermediate_size=1536),
}


@dataclass(frozen=True)
class TrainConfig:
    size: str = "target"
    total_tokens: int = 16_000_000
    batch_tokens: int = 8192  # tokens per optimizer step
    seq_len: int = 1024
    long_seq_len: int = 2048  # the last `long_fraction` of steps train on long windows so 2k contexts work
    long_fraction: float = 0.15
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.02
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_minutes: float = 10.0
    threads: int = 2
    device: str = "cpu"  # "cuda" on an accelerator
    bf16: bool = False  # autocast the forward to bfloat16 (the accelerator run; master weights stay float32)
    compile: bool = False  # torch.compile the forward (the accelerator run; minutes of compile on a CPU)
    minutes: float | None = (
        None  # stop this run after that much wall time, checkpointed (a lent machine's budget)
    )


# A resumed run keeps the schedule it started with (token budget, lr, windows); only how it runs may change.
STREAM_RESUME = ResumeRule(
    saved_key="config", runtime=("threads", "checkpoint_minutes"), budget="total_tokens"
)
# train-lm's own: where and how fast it runs may change too (a run prepared on the CPU resumes on a GPU)
LM_RESUME = ResumeRule(
    saved_key="config",
    runtime=(*STREAM_RESUME.runtime, "device", "bf16", "compile", "minutes"),
    budget="total_tokens",
)

VOCAB_SIZE = 8192
MAX_POSITIONS = 2048


def prepare(
    workdir: Path,
    corpus: CorpusConfig | None = None,
    tokenizer_sample_bytes: int = 40_000_000,
    tokenizer_from: Path | None = None,
    max_train_tokens: int | None = None,
) -> None:
    """Corpus manifest, tokenizer and token memmaps; each step is skipped when its output already exists.
    `tokenizer_from`: a tokenizer directory to use as it is (the shipped one: the heads, the server and the
    tests keep working with a new target) instead of training one; `max_train_tokens`: the train split cut
    to that many tokens (what fits the accelerator machine: 60 MiB of uint16 is 31M tokens)."""
    workdir.mkdir(parents=True, exist_ok=True)
    files = collect_files(corpus or CorpusConfig())
    if not (workdir / "manifest.json").exists():
        write_manifest(files, workdir / "manifest.json")
    train_files = [f for f in files if not f.held_out]
    held_files = [f for f in files if f.held_out]
    tok_dir = workdir / "tokenizer"
    if tokenizer_from is not None and not (tok_dir / "tokenizer.json").exists():
        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(tok_dir)
    if not (tok_dir / "tokenizer.json").exists():
        rng = random.Random(0)
        sample = list(train_files)
        rng.shuffle(sample)

        def limited():
            used = 0
            for text in iter_texts(sample):
                if used > tokenizer_sample_bytes:
                    return
                used += len(text)
                yield text

        train_tokenizer(limited(), VOCAB_SIZE, tok_dir, MAX_POSITIONS)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    for split, split_files in (("train", train_files), ("heldout", held_files)):
        out = workdir / f"{split}.bin"
        if out.exists():
            continue
        chunks: list[np.ndarray] = []
        n_bytes = 0
        texts = list(iter_texts(split_files))
        for i in tqdm(range(0, len(texts), 256), desc=f"tokenize {split}", unit="batch"):
            batch = texts[i : i + 256]
            n_bytes += sum(len(t.encode()) for t in batch)
            for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                chunks.append(np.asarray(ids + [eos], dtype=np.uint16))
        arr = np.concatenate(chunks)
        if split == "train" and max_train_tokens is not None and arr.size > max_train_tokens:
            n_bytes = int(n_bytes * max_train_tokens / arr.size)  # about what was kept
            arr = arr[:max_train_tokens]
        tmp = out.with_suffix(".tmp")
        arr.tofile(tmp)
        os.replace(tmp, out)
        (workdir / f"{split}.json").write_text(json.dumps({"tokens": int(arr.size), "bytes": n_bytes}))


def build_model(size: ModelSize, tokenizer) -> LlamaForCausalLM:
    eos = tokenizer.convert_tokens_to_ids(EOS)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_heads,
        intermediate_size=size.intermediate_size,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return LlamaForCausalLM(config)


def token_stream(workdir: Path, split: str) -> np.memmap:
    """The tokenized split ("train" or "heldout") that `prepare` wrote (uint16: the vocabulary is 8192)."""
    return np.memmap(workdir / f"{split}.bin", dtype=np.uint16, mode="r")


def token_batch(data: np.ndarray, seed: int, step: int, seq_len: int, batch_size: int) -> torch.Tensor:
    """[batch_size, seq_len + 1] windows at random offsets: a pure function of (seed, step), so a resumed run
    sees the batches an uninterrupted one would have."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, data.size - seq_len - 1, size=batch_size)
    return torch.from_numpy(np.stack([data[s : s + seq_len + 1].astype(np.int64) for s in starts]))


@torch.no_grad()
def heldout_loss(
    model: LlamaForCausalLM, data: np.ndarray, seq_len: int = 1024, max_tokens: int = 200_000
) -> float:
    """Mean next-token cross-entropy (nats) over consecutive non-overlapping windows of the held-out stream."""
    model.eval()
    total, count = 0.0, 0
    n = min(data.size - 1, max_tokens)
    for start in range(0, n - 1, seq_len):
        chunk = torch.from_numpy(data[start : min(start + seq_len + 1, n + 1)].astype(np.int64))[None]
        if chunk.shape[1] < 2:
            break
        logits = model(input_ids=chunk[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
        total += loss.item()
        count += chunk.shape[1] - 1
    model.train()
    return total / count


def train(workdir: Path, name: str, cfg: TrainConfig, new_budget: int | None = None) -> Path:
    """Train (or resume training) model `name`; returns the checkpoint path.

    A resumed run keeps the schedule recorded in its checkpoint, except that `new_budget` (tokens) may move its
    end: the cosine decay is then recomputed from the current step, and the change is written to the log so
    the model card can say the run was not one uninterrupted schedule.
    """
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    files = RunFiles(workdir, name)
    state, cfg = open_run(files, cfg, LM_RESUME, new_budget)
    tokenizer = AutoTokenizer.from_pretrained(workdir / "tokenizer")
    data = token_stream(workdir, "train")
    model = build_model(SIZES[cfg.size], tokenizer)
    model.to(torch.device(cfg.device))  # type: ignore[arg-type]  # transformers types .to by its dtype overload
    forward = torch.compile(model) if cfg.compile else model  # the checkpoint keeps `model`'s own names
    total_steps = cfg.total_tokens // cfg.batch_tokens
    long_from = int(total_steps * (1 - cfg.long_fraction))
    autocast = torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.bf16)

    def step(i: int) -> StepOutput:
        seq_len = cfg.long_seq_len if i >= long_from else cfg.seq_len
        batch = token_batch(data, cfg.seed, i, seq_len, max(1, cfg.batch_tokens // seq_len)).to(cfg.device)
        with autocast:
            logits = forward(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        return StepOutput(loss, batch[:, 1:].numel())

    n_params = sum(p.numel() for p in model.parameters())
    desc = f"train {name} ({n_params / 1e6:.1f}M)"
    seconds = None if cfg.minutes is None else cfg.minutes * 60
    plan = LoopPlan(
        files, total_steps, cfg, desc, log_every=50, saved={"config": asdict(cfg)}, stop_at_seconds=seconds
    )
    train_run(model, step, plan, state, fused=True)
    return files.ckpt


def heldout_tokens_per_byte(workdir: Path) -> float:
    """Tokens per byte of the held-out text (bits/byte = nats/token / ln 2 x this)."""
    info = json.loads((workdir / "heldout.json").read_text())
    return info["tokens"] / info["bytes"]


def save_hf_dir(model, tokenizer, out_dir: Path, metrics: dict, dtype: torch.dtype) -> None:
    """A standard HF model directory: 16-bit safetensors, the tokenizer and training_metrics.json."""
    model.to(dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "training_metrics.json").write_text(json.dumps(metrics, indent=1))


def export(workdir: Path, name: str, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Write a standard HF model directory (16-bit safetensors + tokenizer) and return its held-out metrics."""
    tokenizer = AutoTokenizer.from_pretrained(workdir / "tokenizer")
    files = RunFiles(workdir, name)
    state = torch.load(files.ckpt, weights_only=False)
    cfg = TrainConfig(**state["config"])
    model = build_model(SIZES[cfg.size], tokenizer)
    model.load_state_dict(state["model"])
    nats = heldout_loss(model, np.asarray(token_stream(workdir, "heldout")))
    metrics = {
        "heldout_nats_per_token": nats,
        "heldout_bits_per_byte": nats / math.log(2) * heldout_tokens_per_byte(workdir),
        **run_metrics(state, model, files, "config"),
    }
    eos = tokenizer.convert_tokens_to_ids(EOS)
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    save_hf_dir(model, tokenizer, out_dir, metrics, dtype)
    return metrics
