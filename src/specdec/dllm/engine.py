"""Block-by-block decoding of a block-diffusion LM. NOT lossless: a policy trades quality for tokens per forward.

    prompt -> prefill (causal, cached) -> [ block of masks -> forwards over the block, each followed by the
    policy committing >= 1 positions -> the finished block joins the cache ]* -> tokens stream out in order

Caches (see `specdec.dllm.model` for the attention the model was trained with):
- `prefix`: committed tokens' keys/values are cached; every forward runs the whole block after them. Exact:
  committed tokens attend causally, so their cache is what a full recomputation would give.
- `dual`: also keeps the block's keys/values from its first forward, and later forwards run only the current
  sub-block (plus the position before it, whose output predicts the sub-block's first token) against them: the
  rest of the block's keys are stale by the time they are used, which is Fast-dLLM's approximation.
- `none`: every forward recomputes the whole sequence; the reference the caches are tested against.
A finished block is not forwarded on its own: its tokens ride along, causally, in the next block's first forward
(which also yields the next block's first prediction), so a block costs exactly the forwards its policy takes.

Shared with the speculative engine: sampling parameters, `Output` (EOS, stop strings, max_new_tokens, text
deltas), `Stats`, `Step` and `Generation`, so the API, CLI, server and bench shells take both.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass

import torch

import specdec.checks as checks
from specdec.dllm.grammar import BlockGrammar
from specdec.dllm.model import DllmSpec, require_dllm
from specdec.dllm.policies import Policy
from specdec.dllm.policies.base import BlockView, Selection
from specdec.engine import Generation, Output, Stats, Step, check_request, eos_token_ids
from specdec.errors import InputError, UnsupportedModelError
from specdec.grammar import GrammarState
from specdec.runtime.native import NativeCache, NativeModel, unsupported_reason
from specdec.sampling import SamplingParams, TargetDistribution, make_generator

CACHES = ("dual", "prefix", "none")


@dataclass(frozen=True)
class DllmSettings:
    block_size: int | None = None  # tokens decoded together; None = the block the model was trained with
    sub_block: int | None = 8  # positions decodable at a time inside a block (Fast-dLLM v2's sub-blocks)
    cache: str = "dual"  # "dual", "prefix" or "none" (module docstring)
    # what a forward commits when a policy's rule picks no position: the leftmost decodable one ("left", the AR
    # order: measured far closer to the AR model's output on the shipped model) or the most confident one
    # ("confidence", Fast-dLLM's rule)
    floor: str = "left"

    def check(self) -> None:
        for name in ("block_size", "sub_block"):
            if getattr(self, name) is not None:
                checks.integer(name, getattr(self, name), 1, error=InputError)
        checks.choice("cache", self.cache, CACHES, error=InputError)
        checks.choice("floor", self.floor, ("left", "confidence"), error=InputError)


class DllmEngine:
    """A block-diffusion model + tokenizer + policy. Per-generation state lives in `run`."""

    def __init__(
        self, model, tokenizer, policy: Policy, settings: DllmSettings | None = None, name: str = "model"
    ):
        self.spec: DllmSpec = require_dllm(model, name)
        reason = unsupported_reason(model)
        if reason:
            raise UnsupportedModelError(f"the diffusion engine runs on the native forward, which {reason}")
        self.settings = settings or DllmSettings()
        self.settings.check()
        self.model, self.tokenizer, self.policy = model, tokenizer, policy
        self.native = NativeModel(model)
        self.eos_ids = eos_token_ids(model, tokenizer)
        vocab = model.get_output_embeddings().weight.shape[0]
        # adablock ends blocks at predicted line ends: every token whose text holds a newline
        self.delimiters = torch.tensor(
            ["\n" in tokenizer.decode([i]) for i in range(vocab)], dtype=torch.bool
        )

    @property
    def max_positions(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    @property
    def block_size(self) -> int:
        return self.settings.block_size or self.spec.block_size

    def run(self, prompt_ids: list[int], params: SamplingParams) -> Generator[Step, None, None]:
        check_request(prompt_ids, params, self.max_positions)
        run = BlockDecoding(self, prompt_ids, params)
        steps = run.steps()
        # inference mode around each forward, never held across a yield (as in the speculative engine)
        with torch.inference_mode():
            run.prefill()
        while True:
            with torch.inference_mode():
                step = next(steps)
            yield step
            if step.done:
                return


class BlockDecoding:
    """One generation: the cache, the committed tokens, the block in progress, the output."""

    def __init__(self, engine: DllmEngine, prompt_ids: list[int], params: SamplingParams) -> None:
        self.t_start = time.perf_counter()
        self.engine, self.params = engine, params
        self.native = engine.native
        self.mask_id = engine.spec.mask_id
        self.policy = engine.policy.fresh()
        self.settings = engine.settings
        self.generator = make_generator(params.seed)
        self.dist = None if params.greedy else TargetDistribution(params)
        self.out = Output(engine.tokenizer, prompt_ids, params, engine.eos_ids)
        self.stats = Stats(prompt_tokens=len(prompt_ids), runtime="native")
        self.context = list(prompt_ids)  # prompt + committed blocks; the cache holds all but the carry
        self.carry: list[int] = []  # the last finished block (the end of `context`), not yet in the cache: it
        # is forwarded causally with the next block's first forward
        self.cache: NativeCache = self.native.new_cache(len(prompt_ids) + params.max_new_tokens + 1)
        self.pending: torch.Tensor | None = None  # [V] the prediction for the token after the committed ones
        self.blocks = 0  # finished blocks
        self.block_tokens = 0  # tokens they committed
        self.grammar: BlockGrammar | None = None  # the output's constraint (committed in order under it)
        if params.constraint is not None:
            vocab = engine.model.get_output_embeddings().weight.shape[0]
            state = GrammarState(params.constraint, engine.tokenizer, vocab, engine.eos_ids)
            self.grammar = BlockGrammar(state)

    # --- forwards -------------------------------------------------------------------------------------------

    def prefill(self) -> None:
        t0 = time.perf_counter()
        if self.settings.cache != "none":
            ids = torch.tensor(self.context, dtype=torch.long)
            scores = self.native.forward(self.cache, ids, torch.arange(len(ids)), None, logits="last")
            self.pending = scores.logits[-1]
        self.stats.verify_seconds += time.perf_counter() - t0

    def _forward_block(self, tokens: list[int]) -> torch.Tensor:
        """One forward over the carried block (causal) and `tokens` (the block: it sees everything before it
        and all of itself); the carry joins the cache. Returns [n, V]: row j predicts block position j."""
        n = len(tokens)
        if self.settings.cache == "none":
            return self._forward_uncached(tokens)
        cache, carry = self.cache, self.carry
        past, c = cache.length, len(carry)
        ids = torch.tensor(carry + tokens, dtype=torch.long)
        positions = torch.arange(past, past + c + n)
        visible = torch.ones(c + n, past + c + n, dtype=torch.bool)
        visible[:c, past:] = torch.ones(
            c, c + n, dtype=torch.bool
        ).tril_()  # the carry: causal, not the block
        # rows from the carry's last on: [n + 1, V] with a carry ([n, V] without)
        logits = self.native.forward_block(cache, ids, positions, visible, logits_from=max(c - 1, 0))
        cache.length = past + c  # the block's keys stay in the slots after it (the dual cache)
        if c:
            self.pending, logits = logits[0], logits[1:]
            self.carry = []
        assert self.pending is not None
        return torch.cat([self.pending[None], logits[: n - 1]])

    def _forward_uncached(self, tokens: list[int]) -> torch.Tensor:
        """The reference: the whole sequence from scratch, committed tokens causal, the block bidirectional."""
        self.carry = []
        past, n = len(self.context), len(tokens)
        cache = self.native.new_cache(past + n)
        ids = torch.tensor(self.context + tokens, dtype=torch.long)
        visible = torch.ones(past + n, past + n, dtype=torch.bool)
        visible[:past] = torch.ones(past, past + n, dtype=torch.bool).tril_()
        logits = self.native.forward(cache, ids, torch.arange(past + n), visible).logits
        return logits[past - 1 : past + n - 1]

    def _forward_sub_block(self, tokens: list[int], lo: int, hi: int) -> torch.Tensor:
        """Dual cache: positions lo..hi-1 of the block rerun against the cached prefix and the block's cached
        keys; returns their outputs [hi - lo, V] (row i predicts block position lo + i + 1)."""
        cache = self.cache
        base, n = cache.length, len(tokens)
        cache.length = base + lo
        ids = torch.tensor(tokens[lo:hi], dtype=torch.long)
        visible = torch.ones(hi - lo, base + n, dtype=torch.bool)
        logits = self.native.forward_block(
            cache, ids, torch.arange(base + lo, base + hi), visible, keys_end=base + n
        )
        cache.length = base
        return logits

    # --- the token choice -------------------------------------------------------------------------------------

    def pick(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidates [n] and their probabilities [n] for logits [n, V] under the request's sampling settings."""
        if self.dist is None:
            probs = torch.softmax(logits.float(), dim=-1)
            confidence, tokens = probs.max(dim=-1)
            return tokens, confidence
        probs = self.dist(logits)
        tokens = torch.multinomial(probs, 1, generator=self.generator)[:, 0]
        return tokens, probs.gather(1, tokens[:, None])[:, 0]

    # --- one block ------------------------------------------------------------------------------------------

    def steps(self) -> Generator[Step, None, None]:
        """One `Step` per forward (the tokens it made the block's committed prefix longer by, in order); the
        last carries the result. Block by block until the output is done."""
        done = False
        while not done:
            remaining = self.params.max_new_tokens - len(self.out.token_ids)
            n = min(self.engine.block_size, remaining)
            tokens = [self.mask_id] * n
            masked = torch.ones(n, dtype=torch.bool)
            alive = torch.ones(n, dtype=torch.bool)  # False after a committed end-of-text
            sub = self.settings.sub_block or n
            self.policy.start_block(n)
            emitted: list[int] = []
            pred: torch.Tensor | None = None  # [n, V]: row j predicts block position j
            forward = 0  # forwards over this block
            while not done and bool((masked & alive).any()):
                forward += 1
                t0 = time.perf_counter()
                lo = (int((masked & alive).nonzero()[0, 0]) // sub) * sub  # the current sub-block: lo..hi-1
                hi = min(lo + sub, n)
                if pred is None or self.settings.cache != "dual" or sub >= n:
                    pred = self._forward_block(tokens)
                else:  # rerun the sub-block and the position before it against the cached rest of the block
                    start = max(lo - 1, 0)
                    rows = self._forward_sub_block(tokens, start, hi)
                    pred = pred.clone()
                    upto = min(hi, n - 1)
                    pred[start + 1 : upto + 1] = rows[: upto - start]
                logits = pred.float()
                logits[:, self.mask_id] = -torch.inf  # the mask token is never an answer
                cand, conf = self.pick(logits)
                eligible = masked & alive
                eligible[:lo] = False
                eligible[hi:] = False
                if self.grammar is not None:  # in order from the first undecided position (dllm.grammar)
                    logits, cand, conf, end = self.grammar.candidates(logits, len(emitted), hi, self.pick)
                    eligible[end:] = False
                view = self._view(logits, cand, conf, masked & alive, eligible, forward)
                if forward == 1:  # adablock may end the block early, at a predicted line end
                    cut = self.policy.block_length(view)
                    if cut is not None and 1 <= cut < n:
                        n = cut
                        tokens, masked, alive, pred = tokens[:n], masked[:n], alive[:n], pred[:n]
                        logits, cand, conf, eligible = logits[:n], cand[:n], conf[:n], eligible[:n]
                        view = self._view(logits, cand, conf, masked & alive, eligible, forward)
                selection = self.policy.select(view)
                chosen = self._checked(selection, eligible)
                values = cand if selection.tokens is None else selection.tokens
                if self.grammar is not None:
                    chosen, values = self.grammar.in_order(chosen, values, cand, len(emitted))
                for j in chosen.nonzero()[:, 0].tolist():
                    tokens[j] = int(values[j])
                    masked[j] = False
                    if tokens[j] in self.out.eos_ids:
                        alive[j + 1 :] = False
                new: list[int] = []  # the block's committed prefix grows: stream it, in order
                while not done and len(emitted) < n and not masked[len(emitted)]:
                    emitted.append(tokens[len(emitted)])
                    new.append(emitted[-1])
                    done = self.out.push(emitted[-1])
                if self.grammar is not None:
                    self.grammar.advance(new)
                self.stats.verify_seconds += time.perf_counter() - t0
                self.stats.target_forwards += 1
                if done or not bool((masked & alive).any()):  # the block is over
                    self._end_block(emitted)
                yield self._step(new, done)

    def _view(self, logits, cand, conf, masked, eligible, forward: int) -> BlockView:
        return BlockView(
            logits,
            cand,
            conf,
            masked,
            eligible,
            forward,
            self.pick,
            self.engine.delimiters,
            self.settings.floor,
        )

    def _end_block(self, emitted: list[int]) -> None:
        self.policy.end_block(list(emitted))
        self.blocks += 1
        self.block_tokens += len(emitted)
        self.context += emitted
        self.carry = list(emitted)

    def _step(self, new: list[int], done: bool) -> Step:
        stats = self.stats
        stats.new_tokens = len(self.out.token_ids)
        stats.mean_accepted_tokens = stats.new_tokens / max(1, stats.target_forwards)
        stats.wall_seconds = time.perf_counter() - self.t_start
        stats.tokens_per_second = stats.new_tokens / stats.wall_seconds if stats.wall_seconds else 0.0
        text = self.out.take_delta(final=done)
        if not done:
            return Step(text, new, stats)
        stats.finish_reason = self.out.finish_reason
        stats.drafter = {
            "policy": self.policy.name,
            **self.policy.settings(),
            "block_size": self.engine.block_size,
            "sub_block": self.settings.sub_block,
            "cache": self.settings.cache,
            "floor": self.settings.floor,
            "blocks": self.blocks,
            "mean_block_tokens": self.block_tokens / max(1, self.blocks),
        }
        return Step(text, new, stats, Generation(list(self.out.token_ids), self.out.final_text(), stats))

    def _checked(self, selection: Selection, eligible: torch.Tensor) -> torch.Tensor:
        """The policy contract: a non-empty subset of the eligible positions."""
        chosen = selection.commit
        if not bool(chosen.any()) or bool((chosen & ~eligible).any()):
            raise RuntimeError(
                f"policy {self.policy.name!r} chose {chosen.nonzero()[:, 0].tolist()} of eligible "
                f"{eligible.nonzero()[:, 0].tolist()}: it must commit at least one eligible position and no other"
            )
        return chosen
