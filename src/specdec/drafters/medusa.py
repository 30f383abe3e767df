"""Medusa (Cai et al. 2024): K independent heads on the target's last hidden state draft K tokens ahead.

The target's hidden state h_t at the last verified position already gives the root (the target's own next
token); head i reads the same h_t and ranks candidates for the token i + 1 places after the root. The tree is
a template of (depth, rank) slots filled from those rankings: node [r1, r2] is head 0's rank-r1 candidate
followed by head 1's rank-r2 candidate. The template is grown greedily from how often each head's rank-r
candidate turned out to be right (measured online from every step, warm-started across requests, starting
from a prior), and its size is the one that maximises expected tokens per second under the target's measured
cost per tree size (`CostModel.for_runtime`), unless `max_nodes` fixes it. See docs/methods.md, trained heads.

The heads cost one small matrix product per head per step and no cache. Their drafts are deterministic top-k
guesses (point masses), so greedy and sampled verification are the engine's usual lossless rules (Medusa's own
"typical acceptance" is lossy and not used).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import nn

import specdec.checks as checks
from specdec.acceptance import Verdict
from specdec.costmodel import CostModel
from specdec.drafters.base import Drafter, Reads, Request, Scored, register
from specdec.errors import InputError
from specdec.heads.medusa import PackedMedusa, load_medusa
from specdec.runtime import RuntimeChoice
from specdec.templates import Template, grow_template, rank_acceptance
from specdec.tree import DraftTree, Trie

PRIOR = (0.3, 0.1, 0.05, 0.03, 0.02, 0.015, 0.01, 0.01)  # assumed P(head 0's rank-r candidate is right)
PRIOR_DECAY = 0.6  # later heads are less accurate (Medusa reports ~0.6 -> 0.4 -> 0.3 top-1 for heads 1-3)
PRIOR_WEIGHT = 16.0  # pseudo-observations behind the prior
MAX_TEMPLATE = 64  # largest template the cost model may choose


@dataclass
class MedusaConfig:
    # heads directory or object (MedusaHeads; HydraHeads for hydra); None: the shipped target's heads
    head: str | nn.Module | None = None
    width: int = 8  # candidates ranked per head (template ranks)
    max_nodes: int | Literal["auto"] = "auto"  # drafted nodes per step, or "auto": the measured cost model
    regrow_every: int = 16  # re-grow the template from the measured acceptance every this many steps

    def __post_init__(self) -> None:
        checks.integer("width", self.width, 1)
        checks.integer("max_nodes", self.max_nodes, 0, also=("auto",))
        checks.integer("regrow_every", self.regrow_every, 1)


@dataclass
class MedusaState:
    hidden: torch.Tensor | None = None  # [H]: the target's hidden state whose next token is the root
    candidates: torch.Tensor | None = None  # [K, width] target ids each head ranked at the last propose
    steps: int = 0


MS = TypeVar("MS", bound=MedusaState)  # a heads drafter's per-generation state (Hydra's adds to Medusa's)


def shipped_head_dir(name: str = "heads/medusa") -> Path:
    """Heads trained for the shipped target, under models/shipped/."""
    from specdec.models.shipped import SHIPPED_DIR

    return SHIPPED_DIR / name


class HeadsDrafter(Drafter[MS]):
    """What Medusa and Hydra share: trained heads on the target's final hidden state fill a template of
    (depth, rank) slots, grown from how often each rank was right and sized by the target's measured cost.
    A subclass loads and packs its heads, and drafts and learns on its own state (`MS`)."""

    reads = Reads.FINAL_HIDDEN  # the heads read h_t, the LM head's input (llama.cpp returns it too)
    uses_head = True
    # its cost-sized trees are small where the one-token forward is cheap: Hydra's verified 2-3 tokens a step on
    # llama.cpp, so --runtime auto compares the runtimes at 3 (compared at 8, native's forward won, and Hydra ran
    # slower there than on llama.cpp: docs/runtime.md)
    tree_tokens = 3
    # under models/shipped/: the heads trained for the shipped target
    shipped_head: ClassVar[str]
    # the heads' rank statistics (warm-started across requests) and the template grown from them
    learned_attributes: ClassVar[tuple[str, ...]] = ("hits", "trials", "template", "sized_for")

    def __init__(self, config: MedusaConfig | None = None, **options) -> None:
        self.config = config or MedusaConfig(**options)
        self.heads: Any = None  # MedusaHeads (HydraHeads in the Hydra subclass), once bound
        self.packed: Any = None  # their weights packed for drafting (`_pack`), once bound
        # max_nodes "auto": the target's cost per tree size on each runtime a generation ran on, by its name,
        # and the one the template's size was chosen by
        self.costs: dict[str, CostModel] = {}
        self.sized_for = ""
        self.layer = 0  # the target's final hidden state: the LM head's input
        self.hits: torch.Tensor | None = None  # [K, width]: head d's rank-r candidate was the next token
        self.trials: torch.Tensor | None = None  # [K]: steps where head d's token became known
        self.template: Template | None = None

    def bind(self, model, runtime: RuntimeChoice) -> None:
        source = self.config.head
        dtype = next(model.parameters()).dtype
        heads: Any
        if isinstance(source, nn.Module):  # heads given as an object
            heads = source.to(dtype)
            _check(heads, model)
            self._attach(heads, model)
        else:
            path = Path(source) if source is not None else shipped_head_dir(self.shipped_head)
            if source is None and not (path / "config.json").exists():
                raise InputError(
                    f"{self.name} needs trained heads for this model: --draft HEADS_DIR (train them with "
                    f"`specdec train-drafter --method {self.name}`)"
                )
            heads = self._load(path, model, dtype)
        # on the target's device, where the hidden states they read are (loaded heads come on the CPU)
        self.heads = heads.to(next(model.parameters()).device).eval()
        self.packed = self._pack(self.heads)
        self.layer = model.config.get_text_config(decoder=True).num_hidden_layers
        k, width = heads.config.num_heads, min(self.config.width, heads.config.draft_vocab_size)
        self.hits = torch.zeros(k, width, dtype=torch.float64)
        self.trials = torch.zeros(k, dtype=torch.float64)
        self.model = model
        if self.config.max_nodes == "auto":
            self.costs[runtime.name] = CostModel.for_runtime(model, runtime)
        self.sized_for = runtime.name
        self._grow()

    @property
    def cost(self) -> CostModel | None:
        """What the template is sized by (None: `max_nodes` fixes its size)."""
        return self.costs.get(self.sized_for)

    def _follow(self, runtime: RuntimeChoice | None) -> None:
        """A generation starts on `runtime` (`Request.runtime`): the template's size is the one that pays on
        the runtime the target runs on. `--runtime auto` re-times its choice now and then, so a generation may
        run elsewhere than the runtime bound: the template is re-sized for that runtime's cost."""
        if self.config.max_nodes != "auto" or runtime is None or runtime.name == self.sized_for:
            return
        if runtime.name not in self.costs:
            self.costs[runtime.name] = CostModel.for_runtime(self.model, runtime)
        self.sized_for = runtime.name
        self._grow()

    @abstractmethod
    def _load(self, path: Path, model, dtype: torch.dtype) -> Any:
        """The heads of the directory `path`, checked against (and bound to) the target."""

    @abstractmethod
    def _pack(self, heads) -> Any:
        """What drafting calls: the same function as the heads, on faster kernels."""

    def _attach(self, heads, model) -> None:
        """Heads given as an object: bind what they read from the target (Medusa's read nothing more)."""

    def hidden_layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def acceptance(self) -> list[list[float]]:
        assert self.hits is not None and self.trials is not None, "bind first"
        k, width = self.hits.shape
        return rank_acceptance(PRIOR, PRIOR_DECAY, PRIOR_WEIGHT, k, width, (self.hits, self.trials))

    def _grow(self) -> None:
        if self.cost is None:
            assert isinstance(self.config.max_nodes, int)
            self.template = grow_template(self.acceptance(), self.config.max_nodes)
            return
        full = grow_template(self.acceptance(), MAX_TEMPLATE)
        self.template = full.prefix(self.cost.best_size(full.gains()))

    def prefilled(self, state: MS, hidden: dict[int, torch.Tensor]) -> None:
        if hidden and hidden[self.layer].shape[0]:
            state.hidden = hidden[self.layer][-1]  # position P - 2: its next token is the root

    def observe(self, state: MS, scored: Scored) -> None:
        verdict = scored.verdict
        learned = self._learn(state, verdict)
        state.hidden = scored.hidden[self.layer][verdict.accepted_nodes[-1]]  # its next token: the new root
        # the template is regrown from what was counted: as an `auto` member it may sit steps out
        state.steps += learned
        if learned and state.steps % self.config.regrow_every == 0:
            self._grow()

    @abstractmethod
    def _learn(self, state: MS, verdict: Verdict) -> bool:
        """Count, for the rank statistics, what this verification says about the heads' last rankings (False:
        there were none since the last count)."""


@register
class Medusa(HeadsDrafter[MedusaState]):
    """K independent heads, each ranking its depth's candidates from h_t alone (the module docstring)."""

    name = "medusa"
    shipped_head = "heads/medusa"

    def _load(self, path: Path, model, dtype: torch.dtype) -> Any:
        return load_medusa(path, model, dtype=dtype)

    def _pack(self, heads) -> PackedMedusa:
        return PackedMedusa(heads)

    def start(self, request: Request) -> MedusaState:
        self._follow(request.runtime)
        return MedusaState()

    def propose(self, state: MedusaState, context: list[int], max_depth: int) -> DraftTree:
        root = context[-1]
        tpl, heads = self.template, self.heads
        assert tpl is not None and heads is not None
        if state.hidden is None or max_depth < 1:
            state.candidates = None
            return DraftTree.root_only(root)
        width = self.hits.shape[1] if self.hits is not None else self.config.width
        logits = torch.cat(self.packed(state.hidden))  # [K, draft_vocab]
        # ranked even when the template is empty: the rank statistics keep learning, so it can grow again
        # [K, width], on the host (one read on a GPU): the tree is built from it here, and `_learn` counts
        # against it into the host's rank statistics
        state.candidates = heads.draft_to_target[logits.topk(width, dim=-1).indices].cpu()
        ranked = state.candidates.tolist()
        trie = Trie(root)
        node_of = [0] * len(tpl)
        for i in range(1, len(tpl)):
            depth = tpl.depths[i]
            if depth > max_depth or node_of[tpl.parents[i]] < 0:
                node_of[i] = -1
                continue
            node_of[i] = trie.insert([ranked[depth - 1][tpl.ranks[i]]], node_of[tpl.parents[i]])
        return trie.tree()

    def _learn(self, state: MedusaState, verdict: Verdict) -> bool:
        """The next token after each accepted depth is now known: count the rank each head gave it."""
        if state.candidates is None:
            return False
        assert self.hits is not None and self.trials is not None
        k = min(len(verdict.tokens), state.candidates.shape[0])
        truth = torch.tensor(verdict.tokens[:k])
        self.trials[:k] += 1
        self.hits[:k] += (state.candidates[:k] == truth[:, None]).double()
        # counted: a step in which it did not propose (as an `auto` member) counts nothing
        state.candidates = None
        return True


def _check(heads, model) -> None:
    tc = model.config.get_text_config(decoder=True)
    if heads.config.hidden_size != tc.hidden_size or heads.config.vocab_size != tc.vocab_size:
        raise InputError(
            f"the heads were trained for hidden size {heads.config.hidden_size} and "
            f"{heads.config.vocab_size} tokens; this target has {tc.hidden_size} and {tc.vocab_size}"
        )
