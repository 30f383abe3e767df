"""The target runtime seam: what the engine needs from whatever runs the target model.

    reset(positions, slack) -> prefill(prompt) -> [ score(tree) -> commit(accepted path) ]* -> free()

Two runtimes implement it:

- `transformers` (`specdec.runner.ModelRunner`): the unmodified Hugging Face model with a 4D tree mask; runs
  any causal LM specdec accepts, and is the reference every other runtime is checked against;
- `native` (`specdec.runtime.native`): specdec's own forward over the same weights for Llama, Mistral, Qwen2
  and Qwen3, with far less per-call overhead (docs/runtime.md says why this design and what it measures).

`select_runtime(model, "auto")` picks `native` when it supports the model and agrees with transformers on
sample inputs (`specdec.runtime.check`), else `transformers` with a one-line notice saying why.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from specdec.errors import InputError, UnsupportedModelError
from specdec.runner import ModelRunner, Scores
from specdec.tree import DraftTree

log = logging.getLogger("specdec.runtime")

RUNTIMES = ("auto", "native", "transformers")


class Runtime(Protocol):
    """One generation's target: its cache and the forwards over it."""

    name: str

    @property
    def length(self) -> int: ...  # committed positions in the cache

    def reset(self, positions: int, slack: int = 0) -> None: ...

    def prefill(self, token_ids: list[int], layers: Sequence[int] = ()) -> Scores: ...

    def score(self, tree: DraftTree, layers: Sequence[int] = ()) -> Scores: ...

    def commit(self, tree_start: int, accepted_nodes: list[int]) -> None: ...

    def free(self) -> None: ...


@dataclass(frozen=True)
class RuntimeChoice:
    """The runtime chosen for a model: its name, why `auto` fell back (""), and a per-generation factory."""

    name: str
    new: Callable[[], Runtime]
    notice: str = ""


_CHOSEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {requested name: RuntimeChoice}
_LAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the RuntimeChoice made last


def _transformers(model, notice: str = "") -> RuntimeChoice:
    return RuntimeChoice("transformers", lambda: ModelRunner(model), notice)


def _native(model) -> RuntimeChoice:
    """The native runtime, checked against transformers; raises UnsupportedModelError when it cannot be used."""
    from specdec.runtime.check import check_runtime
    from specdec.runtime.native import NativeModel, NativeRunner, unsupported_reason

    reason = unsupported_reason(model)
    if reason:
        raise UnsupportedModelError(f"the native runtime does not run {type(model).__name__}: {reason}")
    native = NativeModel(model)
    check_runtime(model, lambda: NativeRunner(native))
    return RuntimeChoice("native", lambda: NativeRunner(native))


def select_runtime(model, name: str = "auto") -> RuntimeChoice:
    """The runtime `name` for `model` ("auto": native when it supports and reproduces the model, else
    transformers with a notice). Decided once per model and name; the check runs at the first choice."""
    if name not in RUNTIMES:
        raise InputError(f"unknown runtime {name!r} (choose from {', '.join(RUNTIMES)})")
    chosen = _CHOSEN.setdefault(model, {})
    if name not in chosen:
        if name == "transformers":
            chosen[name] = _transformers(model)
        elif name == "native":
            chosen[name] = _native(model)
        else:
            try:
                chosen[name] = _native(model)
            except UnsupportedModelError as err:
                chosen[name] = _transformers(model, notice=f"{err}; using the transformers runtime")
                log.warning("%s", chosen[name].notice)
    _LAST[model] = chosen[name]
    return chosen[name]


def runtime_for(model) -> RuntimeChoice:
    """The runtime last chosen for `model` (what its engine decodes with), else the `auto` choice: what
    cost models must time."""
    return _LAST.get(model) or select_runtime(model, "auto")


__all__ = ["RUNTIMES", "Runtime", "RuntimeChoice", "Scores", "runtime_for", "select_runtime"]
