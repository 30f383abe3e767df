"""EAGLE-3 drafting with an EAGLE-2 dynamic tree: a one-layer head reads the target's own hidden states.

The head (`specdec.heads.eagle3`) sees, per position t, the target's hidden states at three layers and the
token at t + 1, and predicts the token at t + 2 plus its own guess of the next position's features, which it
feeds back to draft further. Its KV cache holds one entry per verified position; entries made while drafting
are dropped after verification and replaced by the true ones (the target's hidden states of the accepted
path, which the engine hands over at every step: see `hidden_layers`).

Per step (see docs/methods.md, EAGLE):
  1. The root's children are the top-k of the head's last prediction (made when the previous step's accepted
     tokens were appended, so it costs nothing here).
  2. For up to `depth - 1` more levels, the `beam` frontier nodes with the highest cumulative draft
     log-probability are expanded in one head call (tree attention over their ancestors' entries), each adding
     its top-k. With the cost model (`max_nodes="auto"`) drafting stops early (SpecDec++'s rule, on a tree):
     a level is drafted only while what it is expected to add pays for its own time and the larger forward
     (`_worth_expanding`), and only frontier nodes whose children could earn their verification are expanded.
  3. All drafted nodes are reranked by cumulative log-probability and the best N are kept: a child never
     scores above its parent, so they form a tree. N maximises expected tokens per second, with each node's
     calibrated chance of acceptance (`Calibration`: the head's cumulative probability, corrected by how
     often nodes like it were accepted) and the target's measured cost per tree size
     (`CostModel.for_runtime`), or is fixed by `max_nodes`.
The head runs through `PackedHead` (packed weights, one op per step of the layer).
The tree's nodes are deterministic top-k guesses (point masses), so greedy and sampled verification are the
engine's usual lossless rules.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import specdec.checks as checks
from specdec.costmodel import CostModel, OnlineCost
from specdec.drafters.base import Drafter, Reads, Request, Scored, register
from specdec.errors import InputError
from specdec.heads.eagle3 import Eagle3Head, HeadCache, check_target, load_head
from specdec.heads.eagle3_packed import PackedHead
from specdec.runtime import RuntimeChoice
from specdec.tree import DraftTree

SHIPPED_HEAD = "heads/eagle"  # under models/shipped/: the head trained for the shipped target
DRAFT_TIME_EMA = 0.1  # weight of the newest step in the measured drafting time
LEVEL_TIME_EMA = 0.1  # weight of the newest level in the measured time of one drafting level
CALIBRATION_PRIOR = 4.0  # pseudo-observations behind the head's own probability in each calibration bucket


@dataclass
class EagleConfig:
    head: str | Eagle3Head | None = None  # a head directory or object; None: the shipped target's head
    top_k: int = 8  # children drafted under each expanded node (EAGLE-2: 10; fewer suit a small target)
    beam: int = 8  # frontier nodes expanded per level, in one head call
    depth: int = 6  # tree depth (head calls per step: depth - 1)
    max_nodes: int | str = "auto"  # drafted nodes verified per step, or "auto": the measured cost model
    # whose numbering a head directory's layer ids are in ("vllm" | "sglang"), where its files do not say
    # (specdec.heads.layer_ids); None: what they say, else the documented default, said in one line
    layer_ids_from: str | None = None

    def __post_init__(self) -> None:
        from specdec.heads.layer_ids import SEMANTICS

        if self.layer_ids_from not in (None, *SEMANTICS):
            raise ValueError(
                f"layer_ids_from must be one of {', '.join(SEMANTICS)} (got {self.layer_ids_from!r})"
            )
        for name in ("top_k", "beam", "depth"):
            checks.integer(name, getattr(self, name), 1)
        checks.integer("max_nodes", self.max_nodes, 0, also=("auto",))


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
    tree_size: int = 0  # nodes (root included) of the last proposed tree (0: none since the last observe)


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
class Eagle(Drafter[EagleState]):
    name = "eagle"
    reads = Reads.HIDDEN_LAYERS  # three inner layers' (`hidden_layers`)
    uses_head = True
    # what sizes its trees: acceptance by draft probability, the refined forward cost, a level's time
    learned_attributes = ("calibration", "cost", "level_seconds")

    def __init__(self, config: EagleConfig | None = None, **options) -> None:
        self.config = config or EagleConfig(**options)
        self.head: Eagle3Head | None = None
        self.packed: PackedHead | None = None
        self.cost: OnlineCost | None = None  # the target's forward time per tree size, refined as it decodes
        self.calibration = Calibration()
        self.level_seconds = 0.0  # moving average of one expansion level's time (0: not measured yet)

    def bind(self, model, runtime: RuntimeChoice) -> None:
        source = self.config.head
        if isinstance(source, Eagle3Head):
            if self.config.layer_ids_from is not None:
                raise InputError("layer_ids_from is for a head directory; this head's ids are read already")
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
            dtype = next(model.parameters()).dtype
            head = load_head(path, model, dtype=dtype, layer_ids_from=self.config.layer_ids_from)
        # on the target's device, where the hidden states it reads are (a loaded head comes on the CPU)
        self.head = head.to(next(model.parameters()).device).eval()
        self.packed = PackedHead(self.head)
        auto = self.config.max_nodes == "auto"
        self.cost = OnlineCost(CostModel.for_runtime(model, runtime)) if auto else None
        self.level_seconds = 0.0

    def hidden_layers(self) -> tuple[int, ...]:
        assert self.head is not None, "bind first"
        return tuple(self.head.config.aux_layer_ids)

    def report(self, state: EagleState) -> dict:
        """The layers the head read (HF numbering) and how its config.json's ids were read to get them."""
        assert self.head is not None, "bind first"
        c = self.head.config
        return {
            "layer_ids": list(c.aux_layer_ids),
            "layer_ids_read_as": c.layer_ids_reading or "given as an object",
        }

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
        # positions stay on the host (`PackedHead.step` reads their largest); the tokens go to the features
        positions = torch.arange(state.committed, state.committed + len(tokens))
        assert self.packed is not None
        ids = torch.tensor(tokens, device=features.device)
        logits, out = self.packed.step(state.cache, features, ids, positions)
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
        state.tree_size = len(tree)
        state.draft_seconds += DRAFT_TIME_EMA * (time.perf_counter() - t0 - state.draft_seconds)
        return tree

    def _grow(self, state: EagleState, depth: int):
        """EAGLE-2 expansion. Node 0 is the root; returns per node: target token, parent, cumulative draft
        log-probability, depth."""
        packed, cfg = self.packed, self.config
        assert packed is not None and state.logits is not None and state.feature is not None
        tokens, parents, scores, depths = [-1], [-1], [0.0], [0]
        entry = [-1]  # per node: its head cache entry once expanded (-1: not expanded)
        out_feature: dict[int, torch.Tensor] = {0: state.feature}
        frontier = self._children([0], state.logits[None], 1, tokens, parents, scores, depths, entry)
        expanded = [0]
        for d in range(1, depth):
            expand = sorted(frontier, key=lambda i: -scores[i])[: cfg.beam]
            if self.cost is not None:
                expand = self._worth_expanding(expand, expanded, parents, scores)
                if not expand:
                    break
            t0 = time.perf_counter()
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
            node_tokens = torch.tensor([tokens[i] for i in expand], device=features.device)
            positions = torch.full((len(expand),), state.root_pos + d - 1)  # on the host, as in `_append`
            # the mask is filled on the host (one write per ancestor) and goes to the features' device whole
            visible = visible.to(features.device)
            logits, out = packed.step(state.cache, features, node_tokens, positions, visible)
            for row, node in enumerate(expand):
                out_feature[node] = out[row]
            frontier = self._children(expand, logits, d + 1, tokens, parents, scores, depths, entry)
            expanded += expand
            seconds = time.perf_counter() - t0
            old = self.level_seconds
            self.level_seconds = old + LEVEL_TIME_EMA * (seconds - old) if old else seconds
        return tokens, parents, scores, depths

    def _children(self, nodes, logits, depth, tokens, parents, scores, depths, entry) -> list[int]:
        """Add the top-k of each row of `logits` [len(nodes), draft_vocab] under that node; returns the new
        node indices."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        top = logp.topk(min(self.config.top_k, logp.shape[-1]), dim=-1)
        assert self.head is not None
        ids = self.head.draft_to_target[top.indices].tolist()
        new = []
        for node, lps, row in zip(nodes, top.values.tolist(), ids, strict=True):
            base = scores[node]
            for lp, idx in zip(lps, row, strict=True):
                new.append(len(tokens))
                tokens.append(idx)
                parents.append(node)
                scores.append(base + lp)
                depths.append(depth)
                entry.append(-1)
        return new

    def _worth_expanding(
        self, candidates: list[int], expanded: list[int], parents: list[int], scores: list[float]
    ) -> list[int]:
        """The candidates worth expanding now (SpecDec++'s stop rule, on a tree; [] = stop drafting).

        An expanded node is expected to add about rho times its own value in accepted children, rho being what
        the nodes expanded so far this step got from their children (sum of the children's calibrated values
        over the parent's). A candidate is kept when that exceeds what its child would cost to verify (the
        current best tree's tokens per second times the forward's marginal cost of one node); the level is
        drafted when the tree it may give, (1 + gain + rho * their values) / (level time + forward of the
        larger tree), beats the best tree without it."""
        assert self.cost is not None
        cost, value = self.cost, self.calibration.value
        children: dict[int, float] = {}
        for i in range(1, len(scores)):
            children[parents[i]] = children.get(parents[i], 0.0) + value(scores[i])
        rho = sum(children.get(p, 0.0) for p in expanded) / sum(
            value(scores[p]) if p else 1.0 for p in expanded
        )
        ranked = sorted((value(scores[i]) for i in range(1, len(scores))), reverse=True)
        gains = [0.0]
        for v in ranked:
            gains.append(gains[-1] + v)
        n = cost.best_size(gains)
        rate = (1.0 + gains[n]) / cost(n + 1)
        marginal = cost(n + 2) - cost(n + 1)
        keep = [c for c in candidates if rho * value(scores[c]) > rate * marginal]
        if not keep:
            return []
        gain = rho * sum(value(scores[c]) for c in keep)
        level = self.level_seconds
        return keep if (1.0 + gains[n] + gain) / (level + cost(n + 1 + len(keep))) > rate else []

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
        """Learn the verification's time (the engine's: the cost model learns this context's forwards),
        calibrate on this step's nodes, and replace its drafting entries by the verified path's true features."""
        if self.cost is not None and state.tree_size:  # it proposed this step (as auto's member, the tree
            # verified may be another's: its size is the scored tree's)
            self.cost.update(len(scored.tree), scored.verify_seconds)
            state.tree_size = 0
        accepted = set(scored.verdict.accepted_nodes)
        for node, score in enumerate(state.tree_scores, start=1):  # tree node i >= 1 <-> tree_scores[i - 1]
            self.calibration.record(score, node in accepted)
        state.tree_scores = []
        state.cache.crop(state.committed)
        self._append(state, scored.hidden, scored.verdict.accepted_nodes, scored.verdict.tokens)
        state.root_pos += len(scored.verdict.tokens)
