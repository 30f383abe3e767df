"""Training a drafter head on cached features (`features`), through the shared loop (`loop`).

Each optimizer step reads `batch_seqs` windows (an epoch-wise seeded permutation, so a resumed run sees the
same data), cuts them into the head's attention segments, computes soft labels from the target's final hidden
state (`teacher`), runs the head kind's training forward (`HeadRecipe.draft_logits`: EAGLE-3's training-time
test, Medusa's or Hydra's heads) and minimises the depth-weighted soft cross-entropy.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specdec.errors import InputError
from specdec.train.features import FeatureStore
from specdec.train.head_recipe import Batch, HeadRecipe, HeadTrainConfig
from specdec.train.loop import LoopPlan, ResumeRule, RunFiles, StepFn, StepOutput, open_run, train_run
from specdec.train.recipes import recipe
from specdec.train.teacher import Teacher, choose_draft_vocab, ttt_losses

# A resumed run keeps its recorded configuration; only the checkpoint interval may change.
HEAD_RESUME = ResumeRule(saved_key="train_config", runtime=("checkpoint_minutes",), budget="tokens")


def build_head(
    target, store: FeatureStore, cfg: HeadTrainConfig, method: str = "eagle"
) -> tuple[Any, torch.Tensor]:
    """(a new head of `method` with its draft vocabulary set, the draft vocabulary's target ids)."""
    tc = target.config.get_text_config(decoder=True)
    draft_ids = choose_draft_vocab(store, cfg.draft_vocab_size, tc.vocab_size)
    torch.manual_seed(cfg.seed)
    return recipe(method).build(target, store, cfg, draft_ids), draft_ids


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
    kind = recipe(method)
    files = RunFiles(workdir, method)
    state, cfg = open_run(files, cfg, HEAD_RESUME, new_budget)
    head, draft_ids = build_head(target, store, cfg, method)
    teacher = Teacher(target, draft_ids)
    if state is None:
        kind.warm_start(head, teacher, target)
    elif not torch.equal(state["draft_ids"], draft_ids):
        raise InputError(f"{files.ckpt} was trained with another draft vocabulary; remove it to start over")
    n_params = sum(p.numel() for p in head.parameters())
    plan = LoopPlan(
        files,
        max(1, cfg.tokens // (cfg.batch_seqs * store.spec.seq_len)),
        cfg,
        f"train {method} head ({n_params / 1e6:.1f}M)",
        log_every=10,
        saved={"train_config": asdict(cfg), "head_config": head.config.to_json(), "draft_ids": draft_ids},
        model_key="head",
        stop_after=stop_after,
    )
    train_run(head, _head_step(kind, head, teacher, store, cfg), plan, state)
    return files.ckpt


def _head_step(kind: HeadRecipe, head, teacher: Teacher, store: FeatureStore, cfg: HeadTrainConfig) -> StepFn:
    depth = kind.depth(cfg)
    weights = [cfg.step_weight**k for k in range(depth)]

    def step(i: int) -> StepOutput:
        b = _segments(store.batch(_batch_indices(store.limit, cfg.seed, i, cfg.batch_seqs)), cfg.segment_len)
        with torch.no_grad():
            labels = teacher.probs(b["final"])  # [B, T, Vd]
        outs = kind.draft_logits(head, b, depth)
        losses, accs = ttt_losses(outs, labels, b["top"], teacher)
        loss = sum(w * lk for w, lk in zip(weights, losses, strict=True)) / sum(weights)
        assert isinstance(loss, torch.Tensor)  # depth >= 1 losses: a sum of tensors
        record = {"step_losses": [x.item() for x in losses], "acc": accs}
        return StepOutput(loss, b["ids"].numel(), record=record, postfix={"acc0": f"{accs[0]:.2f}"})

    return step


def _batch_indices(n: int, seed: int, step: int, batch: int) -> list[int]:
    """Windows of optimizer step `step`: epoch-wise seeded permutations, so a resumed run sees the same data."""
    out = []
    for j in range(step * batch, (step + 1) * batch):
        epoch, pos = divmod(j, n)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n)[pos]))
    return out


def _segments(b: Batch, length: int) -> Batch:
    """[B, S, ...] windows -> [B * S / length, length, ...] segments (the target's features keep their full
    window context; only the head's own attention span is cut)."""
    s = b["ids"].shape[1]
    if length >= s or s % length:
        return b
    return {k: v.reshape(-1, length, *v.shape[2:]) for k, v in b.items()}


def load_trained(workdir: Path, target, store: FeatureStore, method: str = "eagle") -> tuple[Any, dict]:
    """(head in float32 bound to the target, checkpoint state) from workdir/METHOD.ckpt."""
    state = torch.load(RunFiles(workdir, method).ckpt, weights_only=False)
    cfg = HeadTrainConfig(**state["train_config"])
    head, _ = build_head(target, store, cfg, method)
    head.load_state_dict(state["head"])
    return head.eval(), state
