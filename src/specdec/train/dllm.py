"""Resumable CPU fine-tuning of an AR causal LM into a block-diffusion LM (the Fast-dLLM v2 recipe).

Each step takes windows of the training stream and builds one input of three streams per window: the clean
window (causal, trained with the ordinary next-token loss so the committed-token path stays the AR model), and
two noisy copies of it in which every block is masked with a ratio drawn per block: the second copy masks
exactly the positions the first leaves visible (complementary masks), so every token is a masked target once.
A noisy block sees the clean tokens before it and its own stream's block (`specdec.dllm.model.training_mask`),
which is what it sees when decoding. The masked token at j is predicted from the noisy output at j - 1 (token
shift); a block's first token is the clean stream's next-token prediction.

Block sizes are drawn per step from `block_sizes` so that decoding with another block length (adablock) stays
in distribution. Same working-directory discipline as `specdec.train.lm`, and the same loop
(`specdec.train.loop`): the tokenized corpus, an atomic checkpoint every few minutes, and batches that are a
pure function of (seed, step).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from specdec.cliargs import integer
from specdec.dllm.model import MASK_TOKEN, DllmSpec, convert_from_ar, training_mask
from specdec.train.cli import add_run_arguments, add_tokens_argument
from specdec.train.lm import (
    STREAM_RESUME,
    heldout_loss,
    heldout_tokens_per_byte,
    prepare,
    save_hf_dir,
    token_batch,
    token_stream,
)
from specdec.train.loop import LoopPlan, RunFiles, StepFn, StepOutput, open_run, run_metrics, train_run


@dataclass(frozen=True)
class DllmTrainConfig:
    # clean tokens; each is also a masked target once (complementary masks). 1M kept the shipped model's AR
    # held-out loss within 1.4% of the base's (its wall time on the training machine: docs/dllm.md)
    total_tokens: int = 1_000_000
    batch_tokens: int = 4096  # clean tokens per optimizer step
    seq_len: int = 512  # windows of 512: 3 streams make 1536-token inputs, still cheap attention on 2 cores
    block_size: int = 32  # recorded in the checkpoint as the model's default decoding block
    block_sizes: list[int] = field(default_factory=lambda: [8, 16, 32])
    lr: float = 5e-4  # a third of the AR run's peak: adaptation, not pretraining
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.03
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    ar_weight: float = 1.0  # keeps the clean stream (the cache and the block's first token) the AR model
    seed: int = 0
    checkpoint_minutes: float = 5.0
    threads: int = 2


def noisy_inputs(
    x0: torch.Tensor, block: int, mask_id: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 [B, L] -> (noisy [B, 2, L] token ids, masked [B, 2, L] bool): per block a ratio t ~ U(0, 1), the
    first copy masks each position with probability t, the second copy masks the rest."""
    b, n = x0.shape
    blocks = (n + block - 1) // block
    ratio = torch.rand(b, blocks, generator=gen).repeat_interleave(block, dim=1)[:, :n]
    first = torch.rand(b, n, generator=gen) < ratio
    masked = torch.stack([first, ~first], dim=1)
    noisy = torch.where(masked, torch.full_like(x0, mask_id)[:, None], x0[:, None])
    return noisy, masked


def dllm_loss(model, x: torch.Tensor, spec: DllmSpec, block: int, gen: torch.Generator, ar_weight: float):
    """x [B, L + 1] token windows -> (total loss, {"ar": ..., "masked": ...}) as floats for logging."""
    x0, target = x[:, :-1], x[:, 1:]
    b, n = x0.shape
    noisy, masked = noisy_inputs(x0, block, spec.mask_id, gen)
    ids = torch.cat([x0, noisy.flatten(1)], dim=1)  # [B, 3L]
    positions = torch.arange(n).repeat(3)[None].expand(b, -1)
    visible = training_mask(n, block, streams=2)
    bias = torch.zeros(visible.shape, dtype=torch.float32).masked_fill_(
        ~visible, torch.finfo(torch.float32).min
    )
    hidden = model.model(
        input_ids=ids, attention_mask=bias[None, None], position_ids=positions
    ).last_hidden_state
    head = model.get_output_embeddings()
    ar = F.cross_entropy(head(hidden[:, :n]).flatten(0, 1), target.flatten())
    # masked position j (not a block start) is read from the same stream's output at j - 1
    j = torch.arange(n)
    inside = (j % block != 0)[None, None]  # [1, 1, L]
    take = masked & inside  # [B, 2, L]
    bi, si, ji = take.nonzero(as_tuple=True)
    rows = hidden[bi, n * (1 + si) + ji - 1]  # [M, H]
    masked_loss = F.cross_entropy(head(rows), x0[bi, ji])
    total = ar_weight * ar + masked_loss
    return total, {"ar": ar.item(), "masked": masked_loss.item()}


@torch.no_grad()
def heldout_masked_loss(
    model, spec: DllmSpec, data: np.ndarray, block: int, max_tokens: int = 100_000
) -> float:
    """Mean masked-token cross-entropy (nats) over windows of the held-out stream, masks from a fixed seed."""
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    total, count = 0.0, 0
    seq = 512
    n = min(data.size - 1, max_tokens)
    for start in range(0, n - seq - 1, seq):
        x = torch.from_numpy(data[start : start + seq + 1].astype(np.int64))[None]
        _, parts = dllm_loss(model, x, spec, block, gen, ar_weight=0.0)
        total += parts["masked"]
        count += 1
    model.train()
    return total / max(1, count)


def _load_start(base_model: str):
    from specdec.models.loading import load_causal_lm

    model, tokenizer = load_causal_lm(base_model, "target", "float32")
    return model, tokenizer


def train_dllm(
    workdir: Path, base_model: str, cfg: DllmTrainConfig, name: str = "dllm", new_budget: int | None = None
) -> Path:
    """Fine-tune (or resume fine-tuning) `base_model` into a block-diffusion LM; returns the checkpoint path.
    A resumed run keeps its recorded schedule, except that `new_budget` (clean tokens) may move its end (the
    cosine decay then follows the new end from the current step; the change is logged for the card)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    files = RunFiles(workdir, name)
    data = token_stream(workdir, "train")
    model, tokenizer = _load_start(base_model)
    state, cfg = open_run(files, cfg, STREAM_RESUME, new_budget)  # train-lm's rule: the schedule is kept
    spec = convert_from_ar(model, tokenizer, cfg.block_size)  # before the optimizer: it adds an embedding row
    plan = LoopPlan(
        files,
        max(1, cfg.total_tokens // cfg.batch_tokens),
        cfg,
        "train-dllm",
        log_every=10,
        saved={"config": asdict(cfg), "base_model": base_model},
    )
    train_run(model, _dllm_step(model, data, spec, cfg), plan, state)
    return files.ckpt


def _dllm_step(model, data: np.ndarray, spec: DllmSpec, cfg: DllmTrainConfig) -> StepFn:
    """Step i: a block size and the noise drawn from (seed, i), windows from `token_batch`."""

    def step(i: int) -> StepOutput:
        rng = np.random.default_rng([cfg.seed, i, 7])
        block = int(rng.choice(cfg.block_sizes))
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        batch = token_batch(data, cfg.seed, i, cfg.seq_len, max(1, cfg.batch_tokens // cfg.seq_len))
        loss, parts = dllm_loss(model, batch, spec, block, gen, cfg.ar_weight)
        postfix = {"ar": f"{parts['ar']:.3f}", "masked": f"{parts['masked']:.3f}", "block": block}
        return StepOutput(loss, batch[:, 1:].numel(), record={**parts, "block": block}, postfix=postfix)

    return step


def export_dllm(
    workdir: Path, out_dir: Path, name: str = "dllm", dtype: torch.dtype = torch.bfloat16
) -> dict:
    """Write the HF directory (16-bit safetensors, tokenizer with the mask token, the spec in config.json) and
    training_metrics.json; returns the metrics."""
    files = RunFiles(workdir, name)
    state = torch.load(files.ckpt, weights_only=False)
    cfg = DllmTrainConfig(**state["config"])
    model, tokenizer = _load_start(state["base_model"])
    spec = convert_from_ar(model, tokenizer, cfg.block_size)
    model.load_state_dict(state["model"])
    held = np.asarray(token_stream(workdir, "heldout"))
    ar_nats = heldout_loss(model, held)
    masked = {str(b): heldout_masked_loss(model, spec, held, b) for b in cfg.block_sizes}
    metrics = {
        "heldout_ar_nats_per_token": ar_nats,
        "heldout_ar_bits_per_byte": ar_nats / math.log(2) * heldout_tokens_per_byte(workdir),
        "heldout_masked_nats_per_token_by_block": masked,
        **run_metrics(state, model, files, "config"),
        "base_model": "default" if "shipped" in str(state["base_model"]) else state["base_model"],
        "mask_token_id": spec.mask_id,
    }
    save_hf_dir(model, tokenizer, out_dir, metrics, dtype)
    return metrics


def write_card(out_dir: Path, metrics: dict, manifest: dict) -> str:
    """MODEL_CARD.md for an exported block-diffusion model, from its training_metrics.json and corpus manifest."""
    cfg = metrics["train_config"]
    masked = ", ".join(
        f"block {b}: {v:.3f}" for b, v in metrics["heldout_masked_nats_per_token_by_block"].items()
    )
    changes = "".join(
        f" The token budget was changed from {c['budget_changed']['from']:,} to {c['budget_changed']['to']:,} "
        f"when resumed at step {c['step']} (the cosine decay then followed the new end)."
        for c in metrics.get("budget_changes", [])
    )
    text = f"""# default-dllm: the shipped target, converted to a block-diffusion LM

A Llama-architecture model of {metrics["parameters"] / 1e6:.2f}M parameters: the shipped AR target (`default`)
fine-tuned with `specdec train-dllm` into a block-diffusion LM that fills a block of masked positions in
parallel. NOT lossless: how many tokens it commits per forward, and what that costs in quality, depends on the
decoding policy (`docs/dllm.md`). Standard Hugging Face directory (bf16 safetensors, loaded as float32); the
tokenizer is the target's plus `{MASK_TOKEN}` (id {metrics["mask_token_id"]}); config.json records
`dllm_mask_token_id` and `dllm_block_size` ({cfg["block_size"]}).

## Recipe (Fast-dLLM v2 style)
Every training window (of {cfg["seq_len"]} tokens) is fed as three streams in one forward: the clean window,
causal, with the ordinary next-token loss (weight {cfg["ar_weight"]}), and two noisy copies in which each block
is masked with a ratio drawn per block, the second copy masking exactly what the first leaves (complementary
masks). A noisy block sees the clean tokens before it and itself (bidirectionally); the masked token at j is
predicted from the output at j - 1 (token shift). Block sizes drawn per step from {cfg["block_sizes"]}.
AdamW (betas 0.9/0.95, weight decay {cfg["weight_decay"]}), peak lr {cfg["lr"]}, {cfg["warmup_fraction"]:.0%}
warm-up, cosine to {cfg["min_lr_ratio"]:.0%}, {cfg["batch_tokens"]} clean tokens per step, fp32 on
{cfg["threads"]} CPU threads.{changes}

## Data
The corpus rule of the shipped pair (`../MODEL_CARD.md`): Python sources visible to the training interpreter,
files held out by a hash of their name. Rebuilt on the training machine: {manifest["files"]} files,
{manifest["bytes"] / 1e6:.1f} MB ({len(manifest["held_out_files"])} held out; the bench tasks come from held-out
files, which no model here has trained on).

## Training and held-out results
| steps | clean tokens | wall time | held-out AR nats/token (bits/byte) | held-out masked-token nats/token |
|---|---|---|---|---|
| {metrics["steps"]} | {metrics["tokens_seen"] / 1e6:.2f}M | {metrics["train_seconds"] / 3600:.2f} h | \
{metrics["heldout_ar_nats_per_token"]:.3f} ({metrics["heldout_ar_bits_per_byte"]:.3f}) | {masked} |

The held-out AR loss is the clean stream's (the path committed tokens take); the masked-token loss is over
held-out windows masked as in training (fixed seed), per block size. Decoding speed and output quality per
policy: `docs/dllm.md` (measured with `specdec bench --model default-dllm`).
"""
    (out_dir / "MODEL_CARD.md").write_text(text)
    return text


def register(sub) -> None:
    p = sub.add_parser(
        "train-dllm",
        help="fine-tune the shipped AR model into a block-diffusion LM (resumable), or --filter: train learn2pd's",
        description="Stages: prepare (corpus and token files in --workdir, as train-lm), train (resumable: run "
        "the same command again after an interruption), export (a HF directory with MODEL_CARD.md). --filter "
        "instead trains the learn2pd policy's small filter on decoding traces of an exported model.",
    )
    add_run_arguments(p, Path("runs/dllm"))
    p.add_argument("--base", default="default", help="the AR model to convert (default: the shipped target)")
    add_tokens_argument(p, "--tokens", "clean training tokens", DllmTrainConfig.total_tokens)
    p.add_argument(
        "--block-size", type=integer(2), default=DllmTrainConfig.block_size, help="default decoding block"
    )
    p.add_argument("--export-dir", type=Path, default=None, help="default: the shipped dllm directory")
    p.add_argument(
        "--filter",
        action="store_true",
        help="train the learn2pd filter for the model in --export-dir (default: the shipped dllm) instead",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from specdec.models.shipped import SHIPPED_DIR

    out_dir = args.export_dir or SHIPPED_DIR / "dllm"
    if args.filter:
        from specdec.dllm.learn2pd_train import train_filter

        train_filter(out_dir, args.workdir, threads=args.threads)
        return 0
    if args.stage in ("prepare", "all"):
        tok_dir = args.workdir / "tokenizer"
        if not (tok_dir / "tokenizer.json").exists():  # the base model's tokenizer, not a new one
            from specdec.models.loading import load_causal_lm

            _, tokenizer = load_causal_lm(args.base, "target")
            tokenizer.save_pretrained(tok_dir)
        prepare(args.workdir)
    if args.stage in ("train", "all"):
        tokens = args.tokens or DllmTrainConfig.total_tokens
        cfg = DllmTrainConfig(total_tokens=tokens, block_size=args.block_size, threads=args.threads)
        train_dllm(args.workdir, args.base, cfg, new_budget=args.tokens)
    if args.stage in ("export", "all"):
        metrics = export_dllm(args.workdir, out_dir)
        write_card(out_dir, metrics, json.loads((args.workdir / "manifest.json").read_text()))
        print(json.dumps({k: v for k, v in metrics.items() if k != "train_config"}))
    return 0
