"""Held-out acceptance of a drafter head (teacher-forced greedy chain drafting) and its drafting latency."""

from __future__ import annotations

import torch

from specdec.train.card import forward_latency_ms
from specdec.train.features import FeatureStore
from specdec.train.head_recipe import HeadRecipe
from specdec.train.recipes import recipe


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
    kind = recipe(method)
    was_training = head.training
    head.eval()
    counts = torch.zeros(depth + 1, dtype=torch.long)
    for lo in range(0, store.done, batch):
        b = store.batch(list(range(lo, min(lo + batch, store.done))))
        accepted = _accepted(kind, head, b, depth)[:, start:]
        counts += torch.bincount(accepted.flatten(), minlength=depth + 1)
    head.train(was_training)
    total = int(counts.sum())
    at_least = [float(counts[j:].sum()) / max(1, total) for j in range(1, depth + 1)]
    return {"anchors": total, "acceptance_by_depth": at_least, "tau": 1.0 + sum(at_least), "depth": depth}


def _accepted(kind: HeadRecipe, head, b: dict[str, torch.Tensor], depth: int) -> torch.Tensor:
    """[B, anchors] how many leading drafts of each anchor row count as accepted."""
    outs = kind.draft_logits(head, b, depth)
    x, g = b["ids"], b["top"]
    anchors = x.shape[1] - 1 - depth  # rows whose every depth has a label
    ok = torch.ones(x.shape[0], anchors, dtype=torch.bool)
    accepted = torch.zeros(x.shape[0], anchors, dtype=torch.long)
    for k, logits in enumerate(outs):
        draft = head.draft_to_target[logits[:, :anchors].argmax(-1)]
        ok &= draft == g[:, 1 + k : 1 + k + anchors]
        if k > 0 or not kind.anchor_reads_next_token:
            ok &= x[:, 1 + k : 1 + k + anchors] == g[:, k : k + anchors]
        accepted += ok.long()
    return accepted


def evaluate_head(
    head, stores: dict[str, FeatureStore], depth: int, greedy_prompt_len: int, method: str
) -> dict:
    """Chain acceptance on the target's own greedy continuations (anchors after the prompt) and on real
    held-out text."""
    return {
        "greedy": chain_acceptance(head, stores["greedy"], depth, start=greedy_prompt_len - 1, method=method),
        "heldout": chain_acceptance(head, stores["heldout"], depth, method=method),
    }


def latencies_ms(head, target, kind: HeadRecipe) -> dict:
    """One drafting step on 1 and on 8 entries, and the target's forward of 1 token, on this machine."""
    return {
        "head_step_1": kind.latency_ms(head, width=1),
        "head_step_8": kind.latency_ms(head, width=8),
        "target_forward_1": forward_latency_ms(target),
        "threads": torch.get_num_threads(),
    }
