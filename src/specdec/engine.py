"""The one decoding loop every method runs through.

    prompt -> prefill -> [ drafter proposes a tree -> target scores it in one forward -> acceptance
    -> the cache keeps the accepted path -> the drafter observes ] -> tokens stream out

The prefill covers the prompt minus its last token; that token is the root of the first tree, so the first
new token goes through the same drafting and acceptance as every other (and the first step already
speculates). Output bookkeeping (max_new_tokens, EOS, stop strings, text deltas) lives in `Output`, so the
loop itself only moves tokens. Everything that belongs to one generation (the target's cache, the drafter's
state, the RNG, the output) is local to `Engine.run`, so one engine can run interleaved generations.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from specdec.acceptance import verify_greedy, verify_sampled
from specdec.drafters.base import Drafter, ReadsOnDemand, Request, RuntimeChooser, Scored
from specdec.errors import ContextLengthError, InputError
from specdec.grammar import GrammarState
from specdec.models.gguf_target import GGUFTarget
from specdec.runtime import RuntimeChoice, select_runtime, timed_choice
from specdec.runtime.base import Scores
from specdec.runtime.check import check_tree_attention, tree_attention_ok
from specdec.runtime.hf import ModelRunner
from specdec.sampling import SamplingParams, TargetDistribution, make_generator
from specdec.text import IncrementalText
from specdec.tree import DraftTree

if TYPE_CHECKING:  # specdec.batch builds on this module
    from specdec.batch import RowBudget


@dataclass
class Stats:
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # of those, restored from the prefix cache (not prefilled again)
    new_tokens: int = 0
    target_forwards: int = 0  # tree forwards, each emitting >= 1 token (the prefill is not counted)
    mean_accepted_tokens: float = 0.0  # tau = new_tokens / target_forwards (vanilla decoding: 1.0)
    proposed_by_depth: list[int] = field(default_factory=list)  # steps that drafted a node at depth d+1
    accepted_by_depth: list[int] = field(default_factory=list)  # steps that accepted a node at depth d+1
    draft_nodes: int = 0  # drafted nodes scored by the target, over all steps
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    # under a constraint: shaping trees, masking logits and advancing the matcher (docs/structured.md)
    grammar_seconds: float = 0.0
    forced_tokens: int = 0  # emitted drafts the grammar forced (grafted into the tree, not drafted)
    grammar_complete: bool | None = None  # the output is a whole sentence of the constraint (None: none)
    other_seconds: float = 0.0
    wall_seconds: float = 0.0
    tokens_per_second: float = 0.0
    finish_reason: str = ""  # "length", "eos" or "stop"
    runtime: str = ""  # the target runtime that ran the forwards ("llamacpp", "native" or "transformers")
    drafter: dict[str, Any] = field(default_factory=dict)  # `Drafter.report` at the end of a generation

    @property
    def acceptance_by_depth(self) -> list[float]:
        return [
            a / p if p else 0.0 for a, p in zip(self.accepted_by_depth, self.proposed_by_depth, strict=True)
        ]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["acceptance_by_depth"] = self.acceptance_by_depth
        return d


@dataclass
class Generation:
    token_ids: list[int]  # generated tokens only (an EOS that ended generation included, as in generate())
    text: str  # decoded generated text, cut before a stop string
    stats: Stats


@dataclass(frozen=True)
class Step:
    """What the engine yields after every target forward; the last one has `result`."""

    text: str  # new text safe to show (never half a character, never the start of a possible stop string)
    token_ids: list[int]  # tokens emitted by this step (cut at the end of generation)
    stats: Stats  # running totals (final in the last step)
    result: Generation | None = None  # set on the last step only

    @property
    def done(self) -> bool:
        return self.result is not None


class Output:
    """Accepts emitted tokens one at a time and decides when generation ends."""

    def __init__(self, tokenizer, prompt_ids: list[int], params: SamplingParams, eos_ids: set[int]) -> None:
        self.params = params
        self.eos_ids = set() if params.ignore_eos else eos_ids
        self.token_ids: list[int] = []
        self.text = IncrementalText(tokenizer, prompt_ids)
        self.finish_reason = ""
        self.delivered = 0  # characters of text already handed to the stream
        self.max_stop = max((len(s) for s in params.stop), default=0)
        self.searched = 0  # characters of text already searched for stop strings

    def push(self, token: int) -> bool:
        """Add one token; True when generation must end after it."""
        self.token_ids.append(token)
        self.text.push(token)
        if token in self.eos_ids:
            self.finish_reason = "eos"
        elif self.params.stop and self._find_stop() is not None:
            self.finish_reason = "stop"
        elif len(self.token_ids) >= self.params.max_new_tokens:
            self.finish_reason = "length"
        return bool(self.finish_reason)

    def _find_stop(self) -> int | None:
        text = self.text.text
        # A new match must end in the text added since the last search: start max_stop - 1 characters before it.
        start = max(0, self.searched - self.max_stop + 1)
        self.searched = len(text)
        hits = [text.find(s, start) for s in self.params.stop]
        hits = [h for h in hits if h >= 0]
        return min(hits) if hits else None

    def final_text(self) -> str:
        text = self.text.finish()
        if self.params.stop:
            cut = self._find_stop_in(text)
            if cut is not None:
                text = text[:cut]
        return text

    def _find_stop_in(self, text: str) -> int | None:
        hits = [text.find(s) for s in self.params.stop]
        hits = [h for h in hits if h >= 0]
        return min(hits) if hits else None

    def take_delta(self, final: bool = False) -> str:
        """New text safe to show: never half a character, never the start of what may become a stop string."""
        text = self.final_text() if final else self.text.text
        if not final and self.params.stop:
            cut = self._find_stop_in(text)
            if cut is not None:
                text = text[:cut]
            else:  # hold back a tail that could still grow into a stop string
                text = text[: max(self.delivered, len(text) - self.max_stop + 1)]
        delta = text[self.delivered :]
        self.delivered = len(text)
        return delta


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every EOS id of the model's generation config (as generate() uses), else the config's or tokenizer's."""
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            return {eos} if isinstance(eos, int) else set(eos)
    return {tokenizer.eos_token_id} if getattr(tokenizer, "eos_token_id", None) is not None else set()


def check_request(prompt_ids: list[int], params: SamplingParams, limit: int | None) -> None:
    """What every engine refuses before any forward: bad parameters, an empty prompt, too long a request."""
    params.validate()
    if not prompt_ids:
        raise InputError("the prompt is empty (it must contain at least one token)")
    if limit is not None and len(prompt_ids) + params.max_new_tokens > limit:
        raise ContextLengthError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
            f"model's context of {limit} positions"
        )


class Engine:
    """Target model + tokenizer + drafter. Holds no per-generation state: `run` owns all of it."""

    def __init__(self, model, tokenizer, drafter: Drafter, runtime: str = "auto") -> None:
        needs = drafter.gguf_needs() if isinstance(model, GGUFTarget) else ""
        if needs:
            raise InputError(f"the {drafter.name} method needs {needs}, which a GGUF target does not have")
        self.model = model
        self.tokenizer = tokenizer
        self.drafter = drafter
        self.eos_ids = eos_token_ids(model, tokenizer)
        # where the target's logits are (a CUDA model's transformers runtime: its GPU); the sampler's generator
        # is made there, as a CUDA multinomial draws only from a CUDA generator
        self.device = next(model.parameters()).device
        self.runtime_name = runtime  # as asked ("auto": chosen below, and re-timed for drafting methods)
        # a drafter that picks the runtime per request (auto), checked once: not on every generation's path
        self.chooser: RuntimeChooser | None = drafter if isinstance(drafter, RuntimeChooser) else None
        self.on_demand: ReadsOnDemand | None = drafter if isinstance(drafter, ReadsOnDemand) else None
        # chosen before the drafter binds: drafters that size trees by cost time this runtime's forwards, and a
        # drafter whose hidden-state readers are optional (auto's eagle member) leaves them out without them
        all_layers = drafter.reads.requires_all_layers
        self.runtime = select_runtime(
            model,
            runtime,
            hidden_states=all_layers,
            drafts=drafter.drafts,
            timed=self.chooser is None,
            tree_tokens=drafter.tree_tokens,
        )
        # a drafting method's runtime was timed against the other's: that race runs again now and then, and
        # every generation takes its current winner (`next_runtime`)
        timed = runtime == "auto" and drafter.drafts and not all_layers and self.chooser is None
        self.race = timed_choice(model, drafter.tree_tokens) if timed else None
        drafter.bind(model, self.runtime)
        self.layers = tuple(drafter.hidden_layers()) if drafter.reads.any else ()
        self.final_layer = model.config.get_text_config(decoder=True).num_hidden_layers  # the LM head's input
        # a drafter that picks the runtime per request may also use plain decoding's fastest one
        self.runtimes = [self.runtime]
        if runtime == "auto" and self.chooser is not None:
            plain = select_runtime(model, "auto", drafts=False)
            if plain.name != self.runtime.name:
                self.runtimes.append(plain)
        if self.chooser is not None and tree_attention_ok(model):  # else refused at the first request
            self.chooser.prepare(self.runtimes)

    def next_runtime(self, params: SamplingParams) -> RuntimeChoice:
        """The runtime a generation with these parameters runs on: the drafter's pick among `runtimes`, or
        the timed race's current winner (re-timed when due: `specdec.runtime.TimedChoice`)."""
        if self.race is not None:
            self.runtime = self.runtimes[0] = self.race.next_generation(self.model)
            return self.runtime
        if self.chooser is None:
            return self.runtimes[0]
        return self.runtimes[self.chooser.choose_runtime(params, self.runtimes)]

    @property
    def max_positions(self) -> int | None:
        return ModelRunner(self.model).max_positions

    def run(self, prompt_ids: list[int], params: SamplingParams) -> Generator[Step, None, None]:
        """Yields a `Step` after every target forward; the last one carries the finished `Generation`."""
        check_request(prompt_ids, params, self.max_positions)
        check_tree_attention(self.model)
        run = Decoding(self, prompt_ids, params)
        try:
            # inference_mode is thread-local state: it is entered around each step's work, never held across
            # a yield, so interleaved generations (or the caller's own torch code between steps) see none of it
            with torch.inference_mode():
                run.prefill()
            while True:
                with torch.inference_mode():
                    step = run.step()
                yield step
                if step.done:
                    return
        finally:  # finished, failed or abandoned (a closed stream): free per-generation memory
            run.close()


class Decoding:
    """One generation's state and its steps: the target's cache, the drafter's state, the RNG, the output."""

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams, target=None) -> None:
        """`target`: this generation's runtime (a row of a batch, `specdec.batch`); default: a new one of
        the runtime chosen for the request."""
        self.t_start = time.perf_counter()
        self.drafter = engine.drafter
        # a batch row runs on the batch's runtime (`target.runtime`: native, which returns every layer's states)
        runtime = engine.next_runtime(params) if target is None else target.runtime
        # the hidden states asked for at prefill and at every scoring (`Reads.layers_on`)
        self.prefill_layers, self.layers = self.drafter.reads.layers_on(
            runtime, engine.layers, engine.final_layer
        )
        self.on_demand = engine.on_demand
        self.stats = Stats(prompt_tokens=len(prompt_ids), runtime=runtime.name)
        self.params = params
        self.generator = make_generator(params.seed, engine.device)
        self.dist = None if params.greedy else TargetDistribution(params)
        self.out = Output(engine.tokenizer, prompt_ids, params, engine.eos_ids)
        self.target = runtime.new() if target is None else target  # this generation's cache
        # a batch row's (`specdec.batch.RowTarget`): the step as its drafter sees it
        budget: RowBudget | None = getattr(self.target, "budget", None)
        self.state = self.drafter.start(Request(list(prompt_ids), params, self.generator, runtime, budget))
        self.context = list(prompt_ids)  # prompt + emitted tokens; context[-1] is the next tree's root
        self.grammar: GrammarState | None = None  # the output's constraint, at the committed text
        self.masks: torch.Tensor | None = None  # [N, W]: the shaped tree's per-node token bitmasks
        if params.constraint is not None:
            vocab = engine.model.config.get_text_config(decoder=True).vocab_size
            self.grammar = GrammarState(params.constraint, engine.tokenizer, vocab, engine.eos_ids)

    def prefill(self) -> None:
        """The prompt minus its last token (the first tree's root) goes into the cache."""
        t0 = time.perf_counter()
        self.target.reset(len(self.context) + self.params.max_new_tokens, slack=64)
        prefill = self.target.prefill(self.context[:-1], self.wanted(self.prefill_layers))
        self.stats.cached_prompt_tokens = self.target.cached_tokens
        self.stats.verify_seconds += time.perf_counter() - t0
        self.drafter.prefilled(self.state, prefill.hidden)

    def step(self) -> Step:
        """propose -> one target forward -> accept -> commit -> observe -> emit."""
        tree = self.propose()
        return self.finish(tree, self.target.score(tree, self.wanted(self.layers)))

    def wanted(self, layers: tuple[int, ...]) -> tuple[int, ...]:
        """`layers`, or none where the drafter reads them on demand and wants none now (`ReadsOnDemand`)."""
        on_demand = self.on_demand
        return layers if not layers or on_demand is None or on_demand.reads_hidden(self.state) else ()

    def propose(self) -> DraftTree:
        """The drafter's tree for this step (cut to the tokens still allowed)."""
        remaining = self.params.max_new_tokens - len(self.out.token_ids)  # >= 1: the bonus token fits
        t0 = time.perf_counter()
        tree = self.drafter.propose(self.state, self.context, remaining - 1).truncate_depth(remaining - 1)
        self._proposed = time.perf_counter()
        self.stats.draft_seconds += self._proposed - t0
        if self.grammar is not None:  # pruned (and forced tokens grafted in) before the forward
            tree, self.masks = self.grammar.shape(tree, remaining - 1)
            self._proposed = time.perf_counter()
        return tree

    def finish(self, tree: DraftTree, scores: Scores) -> Step:
        """accept -> commit -> observe -> emit, for the tree `propose` returned, scored."""
        stats, target, drafter, out = self.stats, self.target, self.drafter, self.out
        t1 = self._proposed
        if self.grammar is not None:
            assert self.masks is not None, "propose() shapes the tree first"
            # every node by its own mask, before acceptance (its time is the grammar's, not verification's)
            t1 += self.grammar.mask(scores.logits, self.masks)
        verdict = (
            verify_greedy(tree, scores.logits)
            if self.dist is None
            else verify_sampled(tree, scores.logits, self.dist, self.generator)
        )
        target.commit(scores, verdict.accepted_nodes)
        t2 = time.perf_counter()
        drafter.observe(self.state, Scored(tree, verdict, scores.logits, scores.hidden, t2 - t1))
        t3 = time.perf_counter()
        stats.draft_seconds += t3 - t2
        stats.verify_seconds += t2 - t1
        stats.target_forwards += 1
        self._count_depths(tree, verdict.accepted_drafts)
        emitted, done = [], False
        for tok in verdict.tokens:
            self.context.append(tok)
            emitted.append(tok)
            if out.push(tok):
                done = True
                break
        if self.grammar is not None:
            self.grammar.advance(emitted, verdict.accepted_nodes[: len(emitted) + 1])
            if self.grammar.stopped and not done and not out.eos_ids:
                done, out.finish_reason = True, "stop"  # no EOS to end with: the grammar's end is the end
        text = out.take_delta(final=done)
        if done:
            stats.drafter = drafter.report(self.state)
        self._finish()
        result = Generation(list(out.token_ids), out.final_text(), stats) if done else None
        return Step(text, emitted, stats, result)

    def close(self) -> None:
        self.target.keep_prefix()
        self.target.free()
        self.drafter.release(self.state)

    def _count_depths(self, tree: DraftTree, accepted: int) -> None:
        stats, depth = self.stats, tree.depth
        stats.draft_nodes += len(tree) - 1
        while len(stats.proposed_by_depth) < depth:
            stats.proposed_by_depth.append(0)
            stats.accepted_by_depth.append(0)
        for d in range(depth):
            stats.proposed_by_depth[d] += 1
        for d in range(accepted):
            stats.accepted_by_depth[d] += 1

    def _finish(self) -> None:
        stats = self.stats
        stats.new_tokens = len(self.out.token_ids)
        stats.mean_accepted_tokens = stats.new_tokens / max(1, stats.target_forwards)
        stats.wall_seconds = time.perf_counter() - self.t_start
        if self.grammar is not None:
            stats.grammar_seconds, stats.forced_tokens = self.grammar.seconds, self.grammar.forced_tokens
            stats.grammar_complete = self.grammar.complete
        spent = stats.draft_seconds + stats.verify_seconds + stats.grammar_seconds
        stats.other_seconds = max(0.0, stats.wall_seconds - spent)
        stats.tokens_per_second = stats.new_tokens / stats.wall_seconds if stats.wall_seconds else 0.0
        stats.finish_reason = self.out.finish_reason
