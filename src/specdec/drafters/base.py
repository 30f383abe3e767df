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
import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar, cast, runtime_checkable

import torch

from specdec.acceptance import Verdict
from specdec.runtime import RuntimeChoice
from specdec.sampling import SamplingParams
from specdec.tree import DraftTree

if TYPE_CHECKING:  # specdec.batch builds on the engine, which builds on this module
    from specdec.batch import BatchBudget, RowBudget

S = TypeVar("S")  # a drafter's per-generation state (`Drafter.start`)


@dataclass
class Request:
    """What a drafter may know about the generation it drafts for."""

    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator  # the call's private RNG; sampled drafts must draw from it for seeded runs
    runtime: RuntimeChoice | None = None  # what this generation's target runs on (None: outside an engine)
    # a batch row's view of the shared step (the other rows' expected tokens and the step's cost per tree size),
    # for drafters that size trees by cost; None: decoded alone
    batch: RowBudget | None = None


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


class Reads(enum.Enum):
    """What a drafter reads of the target's forwards besides the logits (`Drafter.reads`): it decides which
    runtimes can serve the drafter, and whether the engine asks the target for hidden states at all (a forward
    that returns none is cheaper). The properties below are the one place these cases are told apart."""

    NOTHING = "nothing"
    """Logits only (copy and retrieval drafters, a draft model): every runtime serves it, and no forward
    returns hidden states for it."""

    FINAL_HIDDEN = "final hidden"
    """The target's final hidden state alone (layer L, the LM head's input: medusa, hydra). Every runtime
    returns it, llama.cpp's included, so such a drafter is not confined to the runtimes that return every
    layer."""

    HIDDEN_LAYERS = "hidden layers"
    """Hidden states at inner layers (eagle's three): only a runtime that returns every layer serves it
    (native, transformers; not llama.cpp)."""

    HIDDEN_LAYERS_IF_AVAILABLE = "hidden layers if available"
    """Inner layers where the runtime returns them, and the final one alone elsewhere (auto: its members that
    read inner layers sit out on a runtime without them, its heads on the final one draft there too), so it
    does not confine the runtime choice."""

    @property
    def any(self) -> bool:
        """It may read some hidden state: the engine asks for its `hidden_layers()`."""
        return self is not Reads.NOTHING

    @property
    def requires_all_layers(self) -> bool:
        """It runs only on a runtime that returns every layer's hidden states (`RuntimeChoice.hidden_states`)."""
        return self is Reads.HIDDEN_LAYERS

    @property
    def required(self) -> bool:
        """It cannot decode without the hidden states it reads (a batch row, which scores none, cannot serve
        it)."""
        return self is Reads.FINAL_HIDDEN or self is Reads.HIDDEN_LAYERS

    def on(self, runtime: RuntimeChoice) -> bool:
        """It reads hidden states from this runtime's forwards: the final one from any runtime, inner layers
        only from one that returns every layer."""
        return self is Reads.FINAL_HIDDEN or (self.any and runtime.hidden_states)

    def layers_on(
        self, runtime: RuntimeChoice, layers: tuple[int, ...], final: int
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The layers (of `layers`, what the drafter reads; `final` the final hidden state's id) a generation on
        `runtime` asks for at prefill and at every scoring. Where the runtime returns none of the inner ones
        (llama.cpp), the final one alone, at scoring only, for a drafter whose readers of them are optional
        (auto's heads members): for the prompt's hidden states llama.cpp makes every prompt position an output
        (its LM head over the whole prompt) and its prefix cache cannot serve them, so those members draft from
        the first verification on."""
        if self.on(runtime):
            return layers, layers
        if self is Reads.HIDDEN_LAYERS_IF_AVAILABLE and final in layers:
            return (), (final,)
        return (), ()


class Drafter(ABC, Generic[S]):
    """Subclasses set `name` and the capability flags, and implement `propose` (plus `start` when they keep
    per-generation state, `observe` when they learn from the target). `S` is the type of that state: a
    subclass declares it (`class PromptLookup(Drafter[NgramIndex])`; `Drafter[None]` for one that keeps
    none), so that each method's `state` is checked against what its `start` returns."""

    name: ClassVar[str]
    # Capabilities, declared here rather than discovered by introspection:
    needs_draft_model: ClassVar[bool] = False  # built with a second causal LM of the same vocabulary
    # drafts by running the target's own weights another way (layerskip's shallower view of them): a GGUF
    # target, whose weights only llama.cpp holds, cannot serve it
    needs_target_weights: ClassVar[bool] = False
    reads: ClassVar[Reads] = Reads.NOTHING  # of the target's hidden states (see `hidden_layers`)
    # proposes drafts (False: every tree is the root alone, so the target runtime with the cheapest one-token
    # forward is the fastest; see specdec.runtime)
    drafts: ClassVar[bool] = True
    # tree tokens (root included) its steps typically verify: `--runtime auto` times llama.cpp against native
    # over a tree this size (which forward is cheaper depends on it: specdec.runtime)
    tree_tokens: ClassVar[int] = 8
    samples_drafts: ClassVar[bool] = False  # under sampling its nodes carry the q they were drawn from
    mergeable: ClassVar[bool] = False  # drafts point masses and learns from any scored tree: can join `merge`
    uses_head: ClassVar[bool] = (
        False  # a trained head: its `head` option (the CLI's --draft) names its directory
    )

    @classmethod
    def gguf_needs(cls) -> str:
        """What this method needs that a GGUF target (llama.cpp's forward of a file) does not have; "" when it
        runs on one. The one rule the engine refuses by and the bench picks a GGUF target's methods by (a draft
        model, GGUF or not, drafts for it as for any target)."""
        if cls.needs_target_weights:
            return "the target's own weights in PyTorch"
        if cls.reads.requires_all_layers:
            return "the target's inner hidden states (llama.cpp returns the final one only)"
        return ""

    @classmethod
    def create(cls, draft_model=None, **options) -> Drafter[Any]:
        """Build from CLI/API options; drafters with a config dataclass take its fields as options."""
        if cls.needs_draft_model:
            return cls(draft_model, **options)  # type: ignore[call-arg]
        return cls(**options)

    def bind(self, model, runtime: RuntimeChoice) -> None:  # noqa: B027 - optional hook
        """Called once by the engine with the target model and the runtime it chose for it (its default, for a
        drafter that picks one per request: `RuntimeChooser`), before any generation: for drafters that run
        the model or measure what its forwards cost there (`CostModel.for_runtime`)."""

    def hidden_layers(self) -> tuple[int, ...]:
        """Layer ids of the target's hidden states this drafter reads (after `bind`), as Hugging Face's
        `output_hidden_states` numbers them: i < L is the input of decoder layer i (0: the embeddings), L the
        final hidden state the LM head reads. Drafters that read none pay nothing."""
        return ()

    def start(self, request: Request) -> S:
        """A generation starts: return its private state (None for drafters that keep none)."""
        # a drafter that keeps state overrides this; one that keeps none is a `Drafter[None]`
        return cast(S, None)

    def prefilled(self, state: S, hidden: dict[int, torch.Tensor]) -> None:  # noqa: B027
        """The prompt minus its last token was prefilled; `hidden` maps layer id -> [P - 1, H] (empty unless
        the drafter asked for layers, or when the prompt is one token)."""

    @abstractmethod
    def propose(self, state: S, context: list[int], max_depth: int) -> DraftTree:
        """Guess continuations of `context` (prompt + emitted tokens; `context[-1]` is the tree root).

        `context` is the engine's own list, append-only within a generation: read it, never mutate it.
        No node may be deeper than `max_depth` (the engine trims if one is, but drafting it was wasted work).
        """

    def observe(self, state: S, scored: Scored) -> None:  # noqa: B027
        """The target scored the proposed tree and accepted `scored.verdict`."""

    def release(self, state: S) -> None:  # noqa: B027
        """The generation ended (finished, failed or cancelled): drop per-generation memory such as caches."""

    def report(self, state: S) -> dict[str, Any]:
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


# Hooks for what few drafters do (auto alone, so far): apart from `Drafter`, so that the base class carries no
# flag or default method for them; the engine and the batch check for each (`isinstance`).


@runtime_checkable
class RuntimeChooser(Protocol):
    """Picks the target runtime per request among the engine's candidates (auto: llama.cpp where it mostly
    decodes plainly). For such a drafter the engine runs no timed race of its own, offers plain decoding's
    fastest runtime beside its default, and asks `choose_runtime` at every generation."""

    def choose_runtime(self, params: SamplingParams, runtimes: Sequence[RuntimeChoice]) -> int:
        """The index in `runtimes` (the engine's default first) of the runtime a request with these parameters
        runs on."""
        ...

    def prepare(self, runtimes: Sequence[RuntimeChoice]) -> None:
        """The engine was built with these candidates: measure now what choosing among them needs (the
        timing then lands in loading the model, not in its first requests)."""
        ...


@runtime_checkable
class ReadsOnDemand(Protocol):
    """Reads hidden states through members that may drop out within a generation (auto): the engine asks before
    the prefill and every forward whether they are wanted, since a forward returning none is cheaper (on
    llama.cpp by 2-4% of a one-token step: docs/runtime.md)."""

    def reads_hidden(self, state: Any) -> bool:
        """The generation with this state reads the hidden states `hidden_layers` names from its next forward
        (False: none of its members that read them takes part now; it must then not need them later in the
        generation, as the forwards in between return none)."""
        ...


@runtime_checkable
class BatchSizer(Protocol):
    """In a batch, sizes its rows' trees by the batch step's cost (`Request.batch`; auto)."""

    def prepare_batch(self, budget: BatchBudget) -> None:
        """A batch that drafts with this drafter was made; `budget` is the step cost its rows' trees will be
        sized by (what must be measured is measured now, not inside the first request's step)."""
        ...


REGISTRY: dict[str, type[Drafter]] = {}


def register(cls: type[Drafter]) -> type[Drafter]:
    REGISTRY[cls.name] = cls
    return cls
