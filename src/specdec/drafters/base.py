"""The drafter protocol: the only thing a new speculative method implements.

A drafter never touches verification, the KV cache of the target or the sampler. It is split in two on
purpose:
  - the drafter object is shared by every generation of a `SpecDecoder` (its config, the model it is bound
    to, and tables it learns across requests on purpose, such as Token Recycling's);
  - everything that belongs to ONE generation (an n-gram index of its context, a draft model's KV cache, a
    Jacobi window) lives in a state object that `start` returns and the engine owns, passes back to every
    call, and hands to `release` at the end. Two interleaved streams, or a batch of generations, therefore
    share one drafter without seeing each other's state.

Per generation the engine calls `start` once, `prefilled` once (with the target's hidden states of the prompt,
if the drafter asked for any), then repeatedly `propose` (a token tree rooted at the last token) and `observe`
(what the target said about that tree), and finally `release`.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from specdec.acceptance import Verdict
from specdec.sampling import SamplingParams
from specdec.tree import DraftTree


@dataclass
class Request:
    """What a drafter may know about the generation it drafts for."""

    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator  # the call's private RNG; sampled drafts must draw from it for seeded runs
    runtime: Any = None  # the `RuntimeChoice` this generation's target runs on (None: outside an engine)
    # a batch row's view of the shared step (`specdec.batch.RowBudget`: the other rows' expected tokens and the
    # step's cost per tree size), for drafters that size trees by cost; None: decoded alone
    batch: Any = None


@dataclass(frozen=True)
class Scored:
    """The target's verdict on one proposed tree, as the drafter observes it."""

    tree: DraftTree
    verdict: Verdict
    logits: torch.Tensor  # [N, V] raw target logits, row i for node i
    # layer id -> [N, H]: the target's hidden states at the layers the drafter asked for (`hidden_layers`)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    # what the verification took (the forward and the acceptance), as the engine measured it: what a drafter
    # that sizes trees by cost learns the forward's cost from, without timing the engine itself (0: not
    # measured, outside an engine)
    verify_seconds: float = 0.0


class Drafter(ABC):
    """Subclasses set `name` and the capability flags, and implement `propose` (plus `start` when they keep
    per-generation state, `observe` when they learn from the target)."""

    name: ClassVar[str]
    # Capabilities, declared here rather than discovered by introspection:
    needs_draft_model: ClassVar[bool] = False  # built with a second causal LM of the same vocabulary
    needs_hidden_states: ClassVar[bool] = False  # reads the target's hidden states (see `hidden_layers`)
    # ...but can do without them (auto: its members that read them are left out on a runtime without them)
    hidden_states_optional: ClassVar[bool] = False
    # reads only the target's final hidden state (the LM head's input, layer L), which every runtime returns,
    # llama.cpp's included: such a drafter is not confined to the runtimes that return every layer
    final_hidden_only: ClassVar[bool] = False
    # proposes drafts (False: every tree is the root alone, so the target runtime with the cheapest one-token
    # forward is the fastest; see specdec.runtime)
    drafts: ClassVar[bool] = True
    # tree tokens (root included) its steps typically verify: `--runtime auto` times llama.cpp against native
    # over a tree this size (which forward is cheaper depends on it: specdec.runtime)
    tree_tokens: ClassVar[int] = 8
    # picks the target runtime per request among the engine's candidates (`choose_runtime`; auto)
    chooses_runtime: ClassVar[bool] = False
    # in a batch, sizes its trees by the batch step's cost (`Request.batch`; auto): the batch measures that cost
    # when it is made, not inside a request
    sizes_batch_trees: ClassVar[bool] = False
    samples_drafts: ClassVar[bool] = False  # under sampling its nodes carry the q they were drawn from
    mergeable: ClassVar[bool] = False  # drafts point masses and learns from any scored tree: can join `merge`
    uses_head: ClassVar[bool] = (
        False  # a trained head: its `head` option (the CLI's --draft) names its directory
    )

    @classmethod
    def create(cls, draft_model=None, **options) -> Drafter:
        """Build from CLI/API options; drafters with a config dataclass take its fields as options."""
        if cls.needs_draft_model:
            return cls(draft_model, **options)  # type: ignore[call-arg]
        return cls(**options)

    def choose_runtime(self, params: SamplingParams, runtimes: list) -> int:
        """For `chooses_runtime` drafters: the index of the runtime (`RuntimeChoice`, the engine's default
        first) a request with these parameters should run on."""
        return 0

    def bind(self, model) -> None:  # noqa: B027 - optional hook
        """Called once by the engine with the target model (for drafters that run or measure it)."""

    def hidden_layers(self) -> tuple[int, ...]:
        """Layer ids of the target's hidden states this drafter reads (after `bind`), as Hugging Face's
        `output_hidden_states` numbers them: i < L is the input of decoder layer i (0: the embeddings), L the
        final hidden state the LM head reads. Drafters that read none pay nothing."""
        return ()

    def start(self, request: Request) -> Any:
        """A generation starts: return its private state (None for drafters that keep none)."""
        return None

    def prefilled(self, state: Any, hidden: dict[int, torch.Tensor]) -> None:  # noqa: B027
        """The prompt minus its last token was prefilled; `hidden` maps layer id -> [P - 1, H] (empty unless
        the drafter asked for layers, or when the prompt is one token)."""

    @abstractmethod
    def propose(self, state: Any, context: list[int], max_depth: int) -> DraftTree:
        """Guess continuations of `context` (prompt + emitted tokens; `context[-1]` is the tree root).

        `context` is the engine's own list, append-only within a generation: read it, never mutate it.
        No node may be deeper than `max_depth` (the engine trims if one is, but drafting it was wasted work).
        """

    def observe(self, state: Any, scored: Scored) -> None:  # noqa: B027
        """The target scored the proposed tree and accepted `scored.verdict`."""

    def release(self, state: Any) -> None:  # noqa: B027
        """The generation ended (finished, failed or cancelled): drop per-generation memory such as caches."""

    def report(self, state: Any) -> dict[str, Any]:
        """What the drafter has to say about a finished generation (say, which members it chose how often):
        JSON-serialisable; the engine puts it in `Stats.drafter` before `release`. Most drafters have nothing."""
        return {}

    # The attributes holding what the drafter learns across requests on purpose (recycle's table, suffix's
    # history, eagle's calibration...): what `snapshot_learned` copies. Never a model, head or packed weight:
    # decoding does not change those, so they are shared rather than copied (and oneDNN's packed tensors
    # cannot be copied at all).
    learned_attributes: ClassVar[tuple[str, ...]] = ()

    def snapshot_learned(self) -> dict[str, Any]:
        """A copy of what the drafter learned across requests so far (empty: it learns nothing across
        requests), for `restore_learned`. Drafters with members add theirs."""
        return copy.deepcopy({name: getattr(self, name) for name in self.learned_attributes})

    def restore_learned(self, snapshot: dict[str, Any]) -> None:
        """Back to what `snapshot_learned` returned (a benchmark's repeated rounds of a prompt each start from
        it); `snapshot` itself stays as it was, for the next restore. Call it between generations only."""
        for name, value in copy.deepcopy(snapshot).items():
            setattr(self, name, value)


REGISTRY: dict[str, type[Drafter]] = {}


def register(cls: type[Drafter]) -> type[Drafter]:
    REGISTRY[cls.name] = cls
    return cls
