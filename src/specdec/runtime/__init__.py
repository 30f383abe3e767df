"""Choosing the target runtime: what runs the target model's forwards (the protocol: `specdec.runtime.base`).

Three runtimes implement it:

- `transformers` (`specdec.runtime.hf.ModelRunner`): the unmodified Hugging Face model with a 4D tree mask; runs
  any causal LM specdec accepts, and is the reference every other runtime is checked against;
- `native` (`specdec.runtime.native`): specdec's own forward over the same weights for Llama, Mistral, Qwen2
  and Qwen3, with far less per-call overhead; returns hidden states;
- `llamacpp` (`specdec.runtime.llamacpp`, with the `llamacpp` extra): llama.cpp's forward over a GGUF
  conversion of a Llama, Mistral, Qwen2 or Qwen3 model, the fastest one-token forward on a CPU; returns logits
  and the final hidden state.

`select_runtime(model, "auto")` takes the first that runs the model and agrees with transformers on sample
inputs (`specdec.runtime.check`) of: llamacpp, native, transformers; falling back says why in one line. For
plain decoding (one-token forwards) llamacpp is taken outright: it was the fastest on every machine tried.
For drafting methods the two are timed on this machine over a tree of the size the drafter's steps typically
verify (`Drafter.tree_tokens`, default `TREE_TOKENS`) and the cheaper one is taken, because the answer depends
on the tree and the CPU (docs/runtime.md). That race (`TimedChoice`) is run again on `specdec.timing`'s
schedule of generations, keeping each runtime's least time and switching only by a margin, so a burst of load
while the process starts cannot decide for its whole life; the engine asks it for every generation. A drafter
that reads hidden states gets native (llama.cpp returns none); one that picks its runtime per request (`auto`)
starts on native and is offered llamacpp beside it (`specdec.engine`).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from specdec.errors import InputError, UnsupportedModelError
from specdec.models.gguf_target import GGUFTarget
from specdec.runtime.base import Runtime, Scores
from specdec.runtime.hf import ModelRunner
from specdec.runtime.prefix import PrefixCache
from specdec.timing import Fastest, Recheck, prefer

log = logging.getLogger("specdec.runtime")

RUNTIMES = ("auto", "llamacpp", "native", "transformers")
# tree size at which drafting methods compare runtimes: about what pld/suffix/merge verify per step (auto's
# trees averaged 5-9 nodes in the bench), and where the two runtimes' curves crossed on the Intel machine
TREE_TOKENS = 8


@dataclass(frozen=True)
class RuntimeChoice:
    """The runtime chosen for a model: its name, a per-generation factory, whether its forwards return hidden
    states, and why `auto` fell back ("" when it did not)."""

    name: str
    new: Callable[[], Runtime]
    hidden_states: bool = True
    notice: str = ""


_CHOSEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(name, ...): RuntimeChoice}
_RACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {tree tokens: TimedChoice}


def _transformers(model, notice: str = "") -> RuntimeChoice:
    return RuntimeChoice("transformers", lambda: ModelRunner(model), notice=notice)


def _llamacpp(model) -> RuntimeChoice:
    """llama.cpp over a GGUF conversion, checked against transformers; UnsupportedModelError otherwise."""
    from specdec.runtime.check import check_runtime
    from specdec.runtime.gguf import gguf_reason, llamacpp_reason

    reason = llamacpp_reason() or gguf_reason(model)
    if reason:
        raise UnsupportedModelError(f"the llamacpp runtime does not run {type(model).__name__}: {reason}")
    from specdec.runtime.llamacpp import LlamaCppModel, LlamaCppRunner

    shared = LlamaCppModel(model)
    shared.probe_state_layout()
    check_runtime(model, lambda: LlamaCppRunner(shared), "llamacpp")
    return RuntimeChoice("llamacpp", lambda: LlamaCppRunner(shared), hidden_states=False)


def _gguf_file(target: GGUFTarget, name: str, hidden_states: bool) -> RuntimeChoice:
    """A GGUF file runs on llama.cpp's forward of it, and on nothing else (there are no transformers weights
    to run or compare with: the file's own llama.cpp decoding is the reference)."""
    if name not in ("auto", "llamacpp"):
        raise InputError(
            f"a GGUF target runs on llama.cpp's forward only (--runtime llamacpp or auto), not {name}"
        )
    if hidden_states:
        raise InputError(
            "this method reads the target's inner hidden states, which llama.cpp does not return: on a GGUF "
            "target run one that reads none (auto, pld, suffix, recycle, merge, lookahead)"
        )
    from specdec.runtime.llamacpp import LlamaCppRunner

    shared = target.shared
    return RuntimeChoice("llamacpp", lambda: LlamaCppRunner(shared), hidden_states=False)


def _native(model) -> RuntimeChoice:
    """The native runtime, checked against transformers; raises UnsupportedModelError when it cannot be used."""
    from specdec.runtime.check import check_runtime
    from specdec.runtime.native import NativeModel, NativeRunner, choose_one_token_kernel, unsupported_reason

    reason = unsupported_reason(model)
    if reason:
        raise UnsupportedModelError(f"the native runtime does not run {type(model).__name__}: {reason}")
    native = NativeModel(model)
    choose_one_token_kernel(native)  # before the check, which then covers the kernel chosen
    check_runtime(model, lambda: NativeRunner(native))
    return RuntimeChoice("native", lambda: NativeRunner(native))


def _auto(model, hidden_states: bool, drafts: bool, timed: bool, tree_tokens: int) -> RuntimeChoice:
    """llamacpp, native, transformers: the first that runs the model (for drafts: llamacpp only when timed
    cheaper than native); one line when it falls back (none when llamacpp is not a candidate: native is then
    the first choice)."""
    from specdec.runtime.gguf import llamacpp_reason
    from specdec.runtime.native import unsupported_reason

    # a model native cannot run is no llama.cpp model either: its reason alone is said, below
    candidate = not hidden_states and (timed or not drafts)
    if candidate and not llamacpp_reason() and not unsupported_reason(model):
        try:
            fast = select_runtime(model, "llamacpp")
        except UnsupportedModelError as err:
            fallback = select_runtime(model, "native")
            log.warning("%s; using the native runtime", err)
            return RuntimeChoice(fallback.name, fallback.new, fallback.hidden_states, f"{err}; using native")
        if not drafts:
            return fast
        native = select_runtime(model, "native")
        race = _RACES.setdefault(model, {}).setdefault(tree_tokens, TimedChoice((native, fast), tree_tokens))
        return race.choose(model)
    try:
        return select_runtime(model, "native")
    except UnsupportedModelError as err:
        choice = _transformers(model, notice=f"{err}; using the transformers runtime")
        log.warning("%s", choice.notice)
        return choice


def _tree_seconds(model, choice: RuntimeChoice, tokens: int, clock: Callable[[], float]) -> float:
    """A `tokens`-token tree forward on this runtime after a typical context (least of 5)."""
    from specdec.costmodel import CostModel

    return CostModel.measure(model, sizes=(tokens,), repeats=5, runtime=choice.new, clock=clock)(tokens)


class TimedChoice:
    """Native against llama.cpp for a drafting method, by the time of a `tree_tokens`-token tree forward on
    each: timed at the first choice and again on `Recheck`'s schedule of generations (`next_generation`),
    keeping each one's least time and switching only by a margin (`prefer`)."""

    def __init__(
        self,
        options: tuple[RuntimeChoice, ...],
        tree_tokens: int,
        clock: Callable[[], float] = time.perf_counter,
        timer: Callable[..., float] | None = None,
    ) -> None:
        self.options = options  # the first is kept when they are within the margin at the start
        self.tree_tokens = tree_tokens
        self.clock = clock
        self.timer = timer  # (model, choice, tokens, clock) -> seconds; None: `_tree_seconds`
        self.fastest = Fastest()
        self.recheck = Recheck()
        self.current = 0
        self.timed = 0  # times the options were timed

    def choose(self, model) -> RuntimeChoice:
        """The runtime chosen now (timed first if it never was)."""
        if not self.timed:
            self.time(model)
        return self.options[self.current]

    def next_generation(self, model) -> RuntimeChoice:
        """The runtime for a generation about to start, re-timed first when a re-check is due."""
        if self.recheck.tick() or not self.timed:
            self.time(model)
        return self.options[self.current]

    def time(self, model) -> None:
        timer = self.timer or _tree_seconds
        start = time.perf_counter()
        seconds = [
            self.fastest.add(o.name, timer(model, o, self.tree_tokens, self.clock)) for o in self.options
        ]
        self.recheck.took(time.perf_counter() - start)
        previous, self.current = self.current, prefer(self.current, seconds)
        self.timed += 1
        if self.current != previous:
            log.info("runtime for drafting: %s (re-timed)", self.options[self.current].name)


def select_runtime(
    model,
    name: str = "auto",
    hidden_states: bool = False,
    drafts: bool = True,
    timed: bool = True,
    tree_tokens: int = TREE_TOKENS,
) -> RuntimeChoice:
    """The runtime `name` for `model` ("auto": see the module docstring); `hidden_states`: the drafter reads
    the target's hidden states, which the llamacpp runtime does not return; `drafts`: the drafter proposes
    drafts (else every forward is one token); `timed`: with drafts, time llamacpp against native over a
    `tree_tokens`-token tree (False: native, for a drafter offered both anyway). Decided once per model and
    arguments; the load-time check runs at the first choice. The engine hands its choice to its drafter
    (`Drafter.bind`): nothing here remembers which choice a model's engine took."""
    if name not in RUNTIMES:
        raise InputError(f"unknown runtime {name!r} (choose from {', '.join(RUNTIMES)})")
    if isinstance(model, GGUFTarget):
        return _gguf_file(model, name, hidden_states)
    if name == "llamacpp" and hidden_states:
        raise InputError(
            "this method reads the target's hidden states, which the llamacpp runtime does not return "
            "(use --runtime native or auto)"
        )
    chosen = _CHOSEN.setdefault(model, {})
    # a named runtime is built once per model (llama.cpp's holds a converted copy of the weights); the flags
    # only steer the `auto` choice
    key = (name, hidden_states, drafts, timed, tree_tokens) if name == "auto" else (name,)
    if key not in chosen:
        if name == "transformers":
            chosen[key] = _transformers(model)
        elif name == "native":
            chosen[key] = _native(model)
        elif name == "llamacpp":
            chosen[key] = _llamacpp(model)
        else:
            chosen[key] = _auto(model, hidden_states, drafts, timed, tree_tokens)
    return chosen[key]


def chosen_runtimes(model) -> list[RuntimeChoice]:
    """The runtimes built for `model` so far (a GGUF target's: llama.cpp's forward of its file)."""
    if isinstance(model, GGUFTarget):
        return [_gguf_file(model, "llamacpp", False)]
    return list({id(c): c for c in _CHOSEN.get(model, {}).values()}.values())


def attach_prefix_cache(model, megabytes: float) -> PrefixCache | None:
    """Keep committed prefixes across the generations of `model` on the native runtime (single and
    batched: its weights and this cache are shared by every decoder of the model) within `megabytes`; 0
    turns it off. On llama.cpp, where that runtime was built, pooled contexts keep their cells for a prompt
    that starts the same (`reuse_llamacpp`). Returns the native cache, or None (off, or a model the native
    runtime does not run)."""
    if megabytes > 0:
        reuse_llamacpp(model)
    try:
        runner = select_runtime(model, "native").new()
    except (UnsupportedModelError, InputError):  # not a model native runs (a GGUF file, say)
        return None
    native = runner.native  # type: ignore[attr-defined]
    native.prefix_cache = PrefixCache(int(megabytes * 2**20)) if megabytes > 0 else None
    return native.prefix_cache


def reuse_llamacpp(model) -> bool:
    """Let the llama.cpp runtime of `model` reuse its pooled contexts' cells for prompts that start as their
    last generations did (`LlamaCppModel.acquire`), where that runtime was chosen already (it is not built
    here: converting a model to GGUF takes time); True when it was."""
    for choice in chosen_runtimes(model):
        if choice.name == "llamacpp":
            runner = choice.new()
            runner.shared.reuse_prefixes = True  # type: ignore[attr-defined]
            runner.free()
            return True
    return False


def timed_choice(model, tree_tokens: int = TREE_TOKENS) -> TimedChoice | None:
    """The race `select_runtime(model, "auto")` runs for drafts over `tree_tokens`-token trees, if it ran one
    (both llamacpp and native run the model): the engine asks it again for every generation."""
    return _RACES.get(model, {}).get(tree_tokens)


__all__ = [
    "RUNTIMES",
    "Runtime",
    "RuntimeChoice",
    "Scores",
    "TimedChoice",
    "attach_prefix_cache",
    "chosen_runtimes",
    "select_runtime",
    "timed_choice",
]
