"""EAGLE-3 drafting with an EAGLE-2 dynamic tree: a one-layer head reads the target's own hidden states.

The head (`specdec.heads.eagle3`) sees, per position t, the target's hidden states at three layers and the
token at t + 1, and predicts the token at t + 2 plus its own guess of the next position's features, which it
feeds back to draft further. Its KV cache holds one entry per verified position; entries made while drafting
are dropped after verification and replaced by the true ones (the target's hidden states of the accepted
path, which the engine hands over at every step: see `hidden_layers`).

Per step (see docs/methods.md, EAGLE):
  1. The root's children are the top-k of the head's last prediction (made when the previous step's accepted
     tokens were appended, so it costs nothing here).
  2. For `depth - 1` more levels, the `beam` frontier nodes with the highest cumulative draft log-probability
     are expanded in one head call (tree attention over their ancestors' entries), each adding its top-k.
  3. All drafted nodes are reranked by cumulative log-probability and the best N are kept: a child never
     scores above its parent, so they form a tree. N maximises expected tokens per second, with the
     cumulative draft probability as each node's chance of acceptance and the target's measured cost per tree
     size (`CostModel.for_model`), or is fixed by `max_nodes`.
The tree's nodes are deterministic top-k guesses (point masses), so greedy and sampled verification are the
engine's usual lossless rules.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specdec.costmodel import CostModel
from specdec.drafters.base import Drafter, Request, Scored, register
from specdec.errors import InputError
from specdec.heads.eagle3 import Eagle3Head, HeadCache, check_target, load_head
from specdec.tree import DraftTree

SHIPPED_HEAD = "heads/eagle"  # under models/shipped/: the head trained for the shipped target
DRAFT_TIME_EMA = 0.1  # weight of the newest step in the measured drafting time
CALIBRATION_PRIOR = 4.0  # pseudo-observations behind the head's own probability in each calibration bucket


@dataclass
class EagleConfig:
    head: str | Eagle3Head | None = None  # a head directory or object; None: the shipped target's head
    top_k: int = 8  # children drafted under each expanded node (EAGLE-2: 10; fewer suit a small target)
    beam: int = 8  # frontier nodes expanded per level, in one head call
    depth: int = 6  # tree depth (head calls per step: depth - 1)
    max_nodes: int | str = "auto"  # drafted nodes verified per step, or "auto": the measured cost model

    def __post_init__(self) -> None:
        for name in ("top_k", "beam", "depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1 (got {value!r})")
        if self.max_nodes != "auto" and (
            isinstance(self.max_nodes, bool) or not isinstance(self.max_nodes, int) or self.max_nodes < 0
        ):
            raise ValueError(f"max_nodes must be an integer >= 0 or 'auto' (got {self.max_nodes!r})")


@dataclass
class EagleState:
    cache: HeadCache  # entries for the verified positions [0, committed), then this step's drafting entries
    committed: int  # head entries of verified positions
    root_pos: int  # position of the next tree's root
    logits: (
        torch.Tensor | None
    )  # [draft_vocab]: the head's draft for the token after the root (None: none yet)
    feature: torch.Tensor | None  # [H]: the head's guess of the features at the root's position
    prompt: list[int]
    draft_seconds: float = 0.0  # moving average of propose() time (reported; the tree size ignores it: sunk)
    tree_scores: list[float] = field(default_factory=list)  # cumulative draft log-prob of each drafted node


class Calibration:
    """How often a drafted node with cumulative draft probability p was accepted, by bucket of log2 p.

    A head's softmax is not a calibrated acceptance probability (the shipped head is underconfident: its
    16-node trees were accepted 2.8 tokens deep while their probabilities summed to under 1), so the tree
    size is chosen from these measured rates; each bucket starts from the head's own probability, worth
    `CALIBRATION_PRIOR` observations. Learned across requests on purpose."""

    BUCKETS = 16  # p in (1/2, 1], (1/4, 1/2], ..., everything below 2^-15

    def __init__(self) -> None:
        self.accepted = [0.0] * self.BUCKETS
        self.seen = [0.0] * self.BUCKETS

    @classmethod
    def bucket(cls, score: float) -> int:
        return min(cls.BUCKETS - 1, int(-score / math.log(2)))

    def record(self, score: float, accepted: bool) -> None:
        b = self.bucket(score)
        self.seen[b] += 1
        self.accepted[b] += accepted

    def value(self, score: float) -> float:
        """Estimated probability that a node of this cumulative log-probability is accepted."""
        b = self.bucket(score)
        return (self.accepted[b] + CALIBRATION_PRIOR * math.exp(score)) / (self.seen[b] + CALIBRATION_PRIOR)


def shipped_head_dir() -> Path:
    from specdec.models.shipped import SHIPPED_DIR

    return SHIPPED_DIR / SHIPPED_HEAD


@register
class Eagle(Drafter):
    name = "eagle"
    needs_hidden_states = True
    uses_head = True

    def __init__(self, config: EagleConfig | None = None, **options) -> None:
        self.config = config or EagleConfig(**options)
        self.head: Eagle3Head | None = None
        self.cost: CostModel | None = None
        self.calibration = Calibration()

    def bind(self, model) -> None:
        source = self.config.head
        if isinstance(source, Eagle3Head):
            check_target(source.config, model)
            source.bind_embedding(model.get_input_embeddings().weight)
            head = source
        else:
            path = Path(source) if source else shipped_head_dir()
            if source is None and not (path / "config.json").exists():
                raise InputError(
                    "eagle needs a trained head for this model: --draft HEAD_DIR (train one with "
                    "`specdec train-drafter --method eagle`)"
                )
            head = load_head(path, model, dtype=next(model.parameters()).dtype)
        self.head = head.eval()
        self.cost = CostModel.for_model(model) if self.config.max_nodes == "auto" else None

    def hidden_layers(self) -> tuple[int, ...]:
        assert self.head is not None, "bind first"
        return tuple(self.head.config.aux_layer_ids)

    def start(self, request: Request) -> EagleState:
        assert self.head is not None, "bind first"
        cfg = self.config
        room = len(request.prompt_ids) + request.params.max_new_tokens + (cfg.depth - 1) * cfg.beam + 8
        prompt = list(request.prompt_ids)
        return EagleState(self.head.new_cache(room), 0, len(prompt) - 1, None, None, prompt)

    def _append(self, state: EagleState, hidden: dict[int, torch.Tensor], rows, tokens: list[int]) -> None:
        """Append verified entries: the target's features at `rows` of `hidden`, each with the token after it."""
        assert self.head is not None
        if not tokens:
            return
        features = torch.cat([hidden[i][rows] for i in self.head.config.aux_layer_ids], dim=-1)  # [m, 3H]
        positions = torch.arange(state.committed, state.committed + len(tokens))
        logits, out = self.head.step(state.cache, features, torch.tensor(tokens), positions)
        state.committed = state.cache.length
        state.logits, state.feature = logits[-1], out[-1]

    def prefilled(self, state: EagleState, hidden: dict[int, torch.Tensor]) -> None:
        # Prompt positions 0 .. P-2 were prefilled; the token after each is the next prompt token.
        if hidden:
            n = next(iter(hidden.values())).shape[0]
            self._append(state, hidden, slice(0, n), state.prompt[1 : n + 1])

    def propose(self, state: EagleState, context: list[int], max_depth: int) -> DraftTree:
        root = context[-1]
        if state.logits is None or max_depth < 1 or self.config.max_nodes == 0:
            return DraftTree.root_only(root)
        t0 = time.perf_counter()
        tokens, parents, scores, depths = self._grow(state, min(self.config.depth, max_depth))
        keep = self._select(state, scores, depths)
        order = sorted(keep, key=lambda i: (-scores[i], depths[i], i))
        new = {0: 0}
        for i in order:
            new[i] = len(new)
        tree = DraftTree([root] + [tokens[i] for i in order], [-1] + [new[parents[i]] for i in order])
        state.tree_scores = [scores[i] for i in order]
        state.cache.crop(state.committed)  # drafting entries are replaced by verified ones in observe
        elapsed = time.perf_counter() - t0
        state.draft_seconds += DRAFT_TIME_EMA * (elapsed - state.draft_seconds)
        return tree

    def _grow(self, state: EagleState, depth: int):
        """EAGLE-2 expansion. Node 0 is the root; returns per node: target token, parent, cumulative draft
        log-probability, depth."""
        head, cfg = self.head, self.config
        assert head is not None and state.logits is not None and state.feature is not None
        to_target = head.draft_to_target
        tokens, parents, scores, depths = [-1], [-1], [0.0], [0]
        entry = [-1]  # per node: its head cache entry once expanded (-1: not expanded)
        out_feature: dict[int, torch.Tensor] = {0: state.feature}
        frontier = self._children(0, state.logits, 0.0, 1, tokens, parents, scores, depths, entry, to_target)
        for d in range(1, depth):
            expand = sorted(frontier, key=lambda i: -scores[i])[: cfg.beam]
            start = state.cache.length
            visible = torch.zeros(len(expand), start + len(expand), dtype=torch.bool)  # [m, L + m]
            visible[:, : state.committed] = True
            for row, node in enumerate(expand):
                visible[row, start + row] = True
                p = parents[node]
                while p > 0:  # the drafting entries of its ancestors (the root has none)
                    visible[row, entry[p]] = True
                    p = parents[p]
                entry[node] = start + row
            features = torch.stack([out_feature[parents[i]] for i in expand])  # [m, H]
            node_tokens = torch.tensor([tokens[i] for i in expand])
            positions = torch.full((len(expand),), state.root_pos + d - 1)
            logits, out = head.step(state.cache, features, node_tokens, positions, visible)
            frontier = []
            for row, node in enumerate(expand):
                out_feature[node] = out[row]
                frontier += self._children(
                    node, logits[row], scores[node], d + 1, tokens, parents, scores, depths, entry, to_target
                )
        return tokens, parents, scores, depths

    def _children(self, node, logits, base, depth, tokens, parents, scores, depths, entry, to_target):
        """Add the top-k of `logits` [draft_vocab] under `node`; returns the new node indices."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        top = logp.topk(min(self.config.top_k, logp.numel()))
        new = []
        for lp, idx in zip(top.values.tolist(), to_target[top.indices].tolist(), strict=True):
            new.append(len(tokens))
            tokens.append(idx)
            parents.append(node)
            scores.append(base + lp)
            depths.append(depth)
            entry.append(-1)
        return new

    def _select(self, state: EagleState, scores: list[float], depths: list[int]) -> list[int]:
        """The drafted nodes to verify: the best N by cumulative log-probability."""
        ranked = sorted(range(1, len(scores)), key=lambda i: (-scores[i], depths[i], i))
        if self.cost is None:
            assert isinstance(self.config.max_nodes, int)
            return ranked[: self.config.max_nodes]
        gains = [0.0]
        for i in ranked:  # expected accepted tokens with the best n nodes (calibrated draft probabilities)
            gains.append(gains[-1] + self.calibration.value(scores[i]))
        return ranked[: self.cost.best_size(gains)]  # the drafting time is spent already: not counted

    def observe(self, state: EagleState, scored: Scored) -> None:
        """Calibrate on this step's nodes; replace its drafting entries by the verified path's true features."""
        accepted = set(scored.verdict.accepted_nodes)
        for node, score in enumerate(state.tree_scores, start=1):  # tree node i >= 1 <-> tree_scores[i - 1]
            self.calibration.record(score, node in accepted)
        state.tree_scores = []
        state.cache.crop(state.committed)
        self._append(state, scored.hidden, scored.verdict.accepted_nodes, scored.verdict.tokens)
        state.root_pos += len(scored.verdict.tokens)
