"""What one kind of drafter head brings to `specdec train-drafter`: a `HeadRecipe`.

The trainer (`head_train`), the evaluation (`evaluate`), the export and the card are the same for every kind;
a recipe says how to build the head, warm-start it from the target, run it over cached features in training,
time one drafting step, store it, and describe it on its card. The kinds: `eagle_recipe`, `medusa_recipe`,
`hydra_recipe`, collected in `recipes`.
"""

from __future__ import annotations

import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from specdec.train.features import FeatureStore
from specdec.train.teacher import Teacher


@dataclass(frozen=True)
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


Batch = dict[str, torch.Tensor]  # FeatureStore.batch: ids, aux, final, top


class HeadRecipe(ABC):
    name: ClassVar[str]  # --method; also names the run's checkpoint and log (NAME.ckpt, NAME.log.jsonl)
    title: ClassVar[str]  # the card's and the loss plot's name for the head
    curve: ClassVar[str]  # what one of the loss plot's curves is (curve k = training depth k)
    drafting: ClassVar[str]  # how the head drafts a chain, as the card says it
    # Whether depth 0 drafts after the text's token t + 1 read as given (EAGLE's anchor is a verified state),
    # so only deeper drafts need the text to follow the target's greedy path to count as exact; Medusa and
    # Hydra draft after the target's own bonus token, so every depth needs it (see evaluate.chain_acceptance).
    anchor_reads_next_token: ClassVar[bool] = False

    @abstractmethod
    def depth(self, cfg: HeadTrainConfig) -> int:
        """Depths trained: EAGLE's unroll steps, or the heads of Medusa and Hydra."""

    def eval_depth(self, cfg: HeadTrainConfig) -> int:
        """Chain depth of the held-out acceptance (a head cannot draft deeper than it has heads)."""
        return min(cfg.eval_depth, self.depth(cfg))

    @abstractmethod
    def build(self, target, store: FeatureStore, cfg: HeadTrainConfig, draft_ids: torch.Tensor) -> Any:
        """A new head (weights from the current torch seed) with its draft vocabulary set."""

    @abstractmethod
    def warm_start(self, head, teacher: Teacher, target) -> None:
        """A new head's LM heads from the target's rows for the draft vocabulary: it then starts out
        predicting in the target's output space, and learns the feature."""

    @abstractmethod
    def draft_logits(self, head, b: Batch, depth: int) -> list[torch.Tensor]:
        """Per depth k, logits [B, T, Vd] whose row t drafts the token at position t + k + 2 (label: the
        target's distribution at t + k + 1), teacher-forced on the text's tokens and the target's features."""

    @abstractmethod
    def drafting_step(self, head, width: int, prefix: int, repeats: int) -> Callable[[int], object]:
        """step(i): one drafting step on `width` entries as the drafter runs it, the i-th of the timed calls
        (`repeats` and median_ms's warm-up; after a `prefix`-entry cache where the kind has one)."""

    @torch.inference_mode()
    def latency_ms(self, head, width: int, prefix: int = 256, repeats: int = 40) -> float:
        """Median time of one drafting step on `width` entries, as the drafter runs it."""
        return median_ms(self.drafting_step(head, width, prefix, repeats), repeats)

    # The kind's files, by its heads module: save(head, out_dir, dtype), load(out_dir, target) -> head.
    save: ClassVar[Callable[..., None]]
    load: ClassVar[Callable[..., Any]]

    @abstractmethod
    def card_intro(self, m: dict) -> str:
        """The card's first paragraph: the head's architecture and file layout (m: training_metrics.json)."""

    @abstractmethod
    def card_objective(self, m: dict) -> str:
        """What the head reads and the loss it was trained with."""

    @abstractmethod
    def card_cost(self, lat: dict) -> str:
        """The card's sentence on one drafting step's latency (lat: training_metrics.json's latency_ms)."""


class PerDepthHeads(HeadRecipe):
    """Medusa-like kinds: head k (a residual SiLU block and an LM head) on the target's last hidden state
    drafts the token k + 2 ahead; what else head k reads is the kind's own."""

    curve = "head"
    reads: ClassVar[str]  # what head k reads besides the target's last hidden state, as the card says it

    def warm_start(self, head, teacher: Teacher, target) -> None:
        # A new head is then exactly the target's next-token prediction, its residual block being zero.
        with torch.no_grad():
            for lm_head in head.lm_heads:
                lm_head.weight.copy_(teacher.weight)

    def card_objective(self, m: dict) -> str:
        tc = m["train_config"]
        return f"""Head k reads {self.reads}. Loss: head k's soft cross-entropy against the target's distribution for
the token k + 2 ahead, over the draft vocabulary (masked where the target's top token is outside it), weighted
{tc["step_weight"]}^k. Residual blocks start at zero and LM heads at the target's rows, so each head starts as the
target's next-token guess."""


WARMUP = 5  # untimed calls before a latency's timed ones


def median_ms(run: Callable[[int], object], repeats: int, warmup: int = WARMUP) -> float:
    """Median wall time (ms) of run(i) over i = 0 .. warmup + repeats - 1, the first `warmup` calls left out."""
    times = []
    for i in range(repeats + warmup):
        t = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times[warmup:])


def draft_vocab_size(m: dict) -> int:
    """The draft vocabulary's size from an exported head's metrics (EAGLE and Medusa name it differently)."""
    hc = m["head_config"]
    return hc.get("draft_vocab_size") or hc.get("truncated_vocab_size")


def vocab_phrase(m: dict) -> str:
    vocab = m["head_config"]["vocab_size"]
    return f"a draft vocabulary of {draft_vocab_size(m):,} of the target's {vocab:,} tokens"
