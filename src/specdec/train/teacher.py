"""What a drafter head learns from: the target's distribution over a draft vocabulary, and the loss."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from specdec.train.features import FeatureStore


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
    """Per unroll step (or head) k: soft cross-entropy of row t against the target's distribution at
    t + k + 1, masked where the target's top token there is outside the draft vocabulary; and top-1 agreement
    with that token.

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
