"""Several generations decoded together: one target forward per step scores every live row's tree.

    prompts -> each prefilled into its own cache row -> [ every row's drafter proposes -> ONE forward over all
    rows' trees -> per row: acceptance, commit, observe, emit ] -> rows leave as they end

In that forward only the rows' real tokens go through the matrix products and the output layer; attention
works on a [rows, largest tree] grid with per-row positions and a mask of the row's own past and tree.

On a CPU a small model's forward is mostly fixed cost (weights streamed once whatever the batch), so B rows
scored together cost far less than B forwards. Each row is an ordinary `Decoding` (its own drafter state,
RNG, output and stopping): only its target is a row of the shared cache (`BatchRows`), so a row's tokens are
what the same request gives decoded alone (greedy: generate()'s; sampled: the same draws from its own seeded
generator). Rows are kept in cache order 0..B-1: a finished row's slot is filled by moving the last live row
into it.

The batch runs on the native runtime (its forward takes rows, `NativeModel.forward_rows`), whichever runtime
the engine decodes single requests on under `--runtime auto`; its forward returns the hidden states the
engine's drafter reads, split by row (the heads' rows read their own).

Tree budget across the batch: with B rows a step already scores B roots, and one more tree token costs the
whole batch's step a little time, so a row should draft only nodes likely enough to pay for that. A drafter
that sizes its tree by cost (`auto`) gets its row's view of the step (`RowBudget`, as `Request.batch`): the
batch forward's cost per tree size with the other rows' planned trees in it (`BatchCost`, measured for B rows
and T tree tokens, not the one-row curve: each row reads its own keys and values, docs/runtime.md) and the
tokens the other rows expect, and it maximises the step's total tokens per second, not its own.
"""

from __future__ import annotations

import math
import time
import weakref
from bisect import bisect_left
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from specdec.costmodel import REFINE_CLIP, REFINE_RATE, CostModel, _binary_tree
from specdec.drafters.base import BatchSizer
from specdec.errors import InputError, UnsupportedModelError
from specdec.runtime import RuntimeChoice, select_runtime
from specdec.runtime.base import Scores
from specdec.runtime.native import NativeCache, NativeModel, NativeRunner
from specdec.runtime.prefix import Committed
from specdec.tree import DraftTree

if TYPE_CHECKING:
    from specdec.engine import Decoding, Step


BATCH_ROWS = (1, 2, 4, 8, 16)  # batch sizes `BatchCost` times
ROW_TOKENS = (1, 2, 4, 8, 16)  # tree tokens per row it times them with
_BATCH_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # NativeModel -> BatchCost


@dataclass
class RowPlan:
    """What a row's tree in the coming (or last) step is expected to give and costs in tree tokens."""

    tokens: float = 1.0  # tokens the step is expected to emit for the row (1: its root alone)
    nodes: int = 1  # tree tokens it verifies, root included


@dataclass(eq=False)
class Slot:
    """A generation's row in the batch cache; the batch renumbers it when rows move."""

    row: int
    plan: RowPlan = field(default_factory=RowPlan)


@dataclass(frozen=True)
class BatchCost:
    """cost(B, T): seconds of one batch forward over B rows holding T tree tokens in all (each row after a
    512-token past). Per measured B a monotone curve over T (`CostModel`); between measured B linear, beyond
    the largest extrapolated from the last two."""

    rows: tuple[int, ...]
    curves: tuple[CostModel, ...]

    def __call__(self, b: int, tokens: float) -> float:
        rows, curves = self.rows, self.curves
        if len(rows) == 1 or b <= rows[0]:
            return curves[0](tokens)
        i = min(bisect_left(rows, b), len(rows) - 1)
        lo, hi = rows[i - 1], rows[i]
        y0, y1 = curves[i - 1](tokens), curves[i](tokens)
        return max(y0, y0 + (y1 - y0) * (b - lo) / (hi - lo))

    @classmethod
    def measure(cls, native: NativeModel, past: int = 512, repeats: int = 2) -> BatchCost:
        """Times every (B, tree tokens per row) of BATCH_ROWS x ROW_TOKENS after a `past`-token prefill of
        every row (each size after an untimed forward of its own; the least of `repeats` kept: other load
        only slows a forward; docs/runtime.md says how long it takes)."""
        vocab = native.lm_head.shape[0]
        biggest, deepest = max(BATCH_ROWS), max(ROW_TOKENS)
        limit = getattr(native.model.config, "max_position_embeddings", None) or past + deepest + 1
        past = max(1, min(past, limit - deepest - 1))
        rows = BatchRows(native, biggest, past + deepest + 1)
        first = rows.add()
        rows.prefill(first, [(7 * i + 1) % vocab for i in range(past)])
        for _ in range(biggest - 1):
            rows.cache.move(0, rows.add().row)
        trees = {n: _binary_tree(n, vocab) for n in ROW_TOKENS}
        curves = []
        with torch.inference_mode():
            for b in BATCH_ROWS:
                times = []
                for n in ROW_TOKENS:  # score() writes after each row's length and leaves it: nothing to crop
                    samples = []
                    for timed in [False] + [True] * repeats:
                        start = time.perf_counter()
                        rows.score([trees[n]] * b)
                        if timed:
                            samples.append(time.perf_counter() - start)
                    times.append(min(samples))
                curves.append(CostModel.fit([b * n for n in ROW_TOKENS], times))
        return cls(BATCH_ROWS, tuple(curves))

    @classmethod
    def for_native(cls, native: NativeModel) -> BatchCost:
        """`measure` once per model."""
        if native not in _BATCH_COSTS:
            _BATCH_COSTS[native] = cls.measure(native)
        return _BATCH_COSTS[native]


class BatchBudget:
    """The batch's step cost for the rows' drafters: the measured `BatchCost` (on first use), scaled by what
    the batch's forwards took since (one factor, refined like `OnlineCost` refines a root alone)."""

    def __init__(self, native: NativeModel) -> None:
        self.native = native
        self._cost: BatchCost | None = None
        self.scale = 1.0

    def measure(self) -> BatchCost:
        """The measured cost (timed on the first call for this model, `BatchCost.for_native`)."""
        if self._cost is None:
            self._cost = BatchCost.for_native(self.native)
        return self._cost

    def __call__(self, b: int, tokens: float) -> float:
        return self.scale * self.measure()(b, tokens)

    def update(self, b: int, tokens: int, seconds: float) -> None:
        """One batch forward of `tokens` tree tokens over `b` rows took `seconds` (only once measured)."""
        if self._cost is None or seconds <= 0:
            return
        surprise = min(max(seconds / self(b, tokens), 1 / REFINE_CLIP), REFINE_CLIP)
        self.scale *= math.exp(REFINE_RATE * math.log(surprise))


class RowBudget:
    """One row's view of the batch step, for a drafter that sizes its tree by cost (`Request.batch`)."""

    def __init__(self, rows: BatchRows, slot: Slot, budget: BatchBudget) -> None:
        self.rows, self.slot, self.budget = rows, slot, budget

    def terms(self) -> tuple[float, Callable[[int], float]]:
        """(tokens the other live rows expect from this step, seconds of the step's forward as a function of
        the tree tokens this row verifies, root included). The other rows' trees are this step's where they
        were already chosen, else their last step's."""
        others, nodes = 0.0, 0
        for slot in self.rows.slots:
            if slot is not self.slot:
                others += slot.plan.tokens
                nodes += slot.plan.nodes
        b, budget = len(self.rows.slots), self.budget
        return others, lambda k: budget(b, nodes + k)

    def plan(self, tokens: float, nodes: int) -> None:
        """This row's choice for the step: expected tokens, tree tokens (root included)."""
        self.slot.plan = RowPlan(tokens, nodes)


class BatchRows:
    """The batch's target: a native cache with one row per live generation, scored in one forward."""

    def __init__(self, native: NativeModel, rows: int, capacity: int) -> None:
        self.native = native
        self.cache: NativeCache = native.new_cache(capacity, rows)
        self.slots: list[Slot] = []  # live rows in cache order

    def add(self) -> Slot:
        slot = Slot(len(self.slots))
        self.slots.append(slot)
        self.cache.lengths[slot.row] = 0
        return slot

    def remove(self, slot: Slot) -> None:
        """Free a row: the last live row moves into it, so live rows stay 0..B-1."""
        last = self.slots.pop()
        if last is not slot:
            self.cache.move(last.row, slot.row)
            last.row = slot.row
            self.slots[slot.row] = last

    def prefill(self, slot: Slot, token_ids: list[int], layers: Sequence[int] = ()) -> tuple[int, Scores]:
        """The row's prompt, run alone (a one-row forward into a scratch cache: past what the prefix cache
        holds of it, unless `layers` are asked for), then copied into its row; returns (the prompt tokens
        the prefix cache gave, the prefill's scores: the hidden states of `layers`)."""
        if not token_ids:
            self.cache.lengths[slot.row] = 0
            return 0, Scores(torch.empty(0), {})
        single = NativeRunner(self.native)
        single.reset(len(token_ids))
        scores = single.prefill(token_ids, layers)
        assert single.cache is not None  # reset() made it
        n = len(token_ids)
        self.cache.reserve(n)
        self.cache.k[:, slot.row, :, :n] = single.cache.k[:, 0, :, :n]
        self.cache.v[:, slot.row, :, :n] = single.cache.v[:, 0, :, :n]
        self.cache.lengths[slot.row] = n
        return single.cached_tokens, scores

    def keep_prefix(self, slot: Slot, committed: Committed) -> None:
        """A row's generation ended: its committed entries go to the prefix cache, if there is one."""
        prefix = self.native.prefix_cache
        if prefix is not None:
            row = slot.row
            committed.keep(prefix, self.cache.k[:, row], self.cache.v[:, row], self.cache.lengths[row])

    def score(
        self, trees: Sequence[DraftTree], layers: Sequence[int] = ()
    ) -> list[tuple[torch.Tensor, dict[int, torch.Tensor]]]:
        """One forward over the trees of rows 0..B-1 (in that order): per row, logits [len(tree), V] and the
        hidden states of `layers` [len(tree), H] (the heads' rows read them)."""
        b, n = len(trees), max(len(t) for t in trees)
        pasts = self.cache.lengths[:b]
        width = max(pasts) + n
        device = self.native.device
        ids = torch.zeros(b, n, dtype=torch.long, device=device)
        positions = torch.zeros(b, n, dtype=torch.long, device=device)
        mask = torch.zeros(b, n, width, dtype=torch.bool, device=device)  # True = visible
        for r, (tree, past) in enumerate(zip(trees, pasts, strict=True)):
            m = len(tree)
            ids[r, :m] = torch.tensor(tree.tokens)
            positions[r, :m] = torch.tensor(tree.depths) + past
            positions[r, m:] = past
            mask[r, :m, :past] = True
            mask[r, :m, past : past + m] = tree.ancestor_mask().to(device)
            mask[r, m:, 0] = True  # padding queries see one key (an all-masked row would give NaN); unused
        sizes = [len(tree) for tree in trees]
        real = None  # no padding (every tree the same size, plain decoding say): no gathering either
        if sum(sizes) < b * n:
            real = torch.cat([torch.arange(m, device=device) + r * n for r, m in enumerate(sizes)])
        scores = self.native.forward_rows(self.cache, ids, positions, mask, real, layers)  # [sum(sizes), V]
        hidden = {layer: h.split(sizes) for layer, h in scores.hidden.items()}
        return [
            (logits, {layer: parts[r] for layer, parts in hidden.items()})
            for r, logits in enumerate(scores.logits.split(sizes))
        ]


class RowTarget:
    """One generation's view of the batch: the target runtime surface `Decoding` uses (scoring is the
    batch's, one forward for all rows)."""

    def __init__(
        self, rows: BatchRows, slot: Slot, runtime: RuntimeChoice, budget: BatchBudget | None = None
    ) -> None:
        self.rows, self.slot = rows, slot
        # the row's committed tokens and states, for the prefix cache (when the weights have one)
        self.committed = Committed(rows.native.prefix_cache is not None)
        self.cached_tokens = 0
        self.runtime = runtime  # the batch's (native), which may not be the engine's solo runtime
        # the step as this row's drafter sees it when sizing its tree (`Request.batch`)
        self.budget = RowBudget(rows, slot, budget) if budget is not None else None

    @property
    def length(self) -> int:
        return self.rows.cache.lengths[self.slot.row]

    def reset(self, positions: int, slack: int = 0) -> None:
        self.rows.cache.reserve(positions + slack)

    def prefill(self, token_ids: list[int], layers: Sequence[int] = ()) -> Scores:
        self.cached_tokens, scores = self.rows.prefill(self.slot, token_ids, layers)
        self.committed.begin(token_ids, scores.hidden)
        return scores

    def score(self, tree: DraftTree, layers: Sequence[int] = ()) -> Scores:
        raise RuntimeError("a row of a batch is scored with the others (BatchRows.score)")

    def commit(self, scores: Scores, accepted_nodes: list[int]) -> None:
        self.rows.cache.keep(scores.start, accepted_nodes, self.slot.row)
        if scores.tree is not None and self.committed.on:
            self.committed.add([scores.tree.tokens[i] for i in accepted_nodes], scores.hidden, accepted_nodes)

    def keep_prefix(self) -> None:
        self.rows.keep_prefix(self.slot, self.committed)

    def free(self) -> None:
        pass  # the batch frees the row when the generation ends


def batch_runtime(engine) -> RuntimeChoice:
    """The native runtime the engine's batches run on, or InputError saying why it cannot batch. An engine
    whose solo runtime `auto` timed to llama.cpp batches on native all the same (it runs every model llama.cpp
    does here, and is checked against transformers alike): which runtime won a timing must not decide what
    the engine can do."""
    if engine.runtime.name == "native":
        return engine.runtime
    if engine.runtime_name != "auto":
        raise InputError(
            f"batched decoding runs on the native runtime; this engine was given --runtime "
            f"{engine.runtime_name} (use native or auto)"
        )
    try:
        return select_runtime(engine.model, "native")
    except UnsupportedModelError as err:
        raise InputError(
            f"batched decoding runs on the native runtime (Llama, Mistral, Qwen2, Qwen3): {err}"
        ) from None


def native_model(runtime: RuntimeChoice) -> NativeModel:
    runner = runtime.new()
    assert isinstance(runner, NativeRunner)  # the native runtime's factory
    return runner.native


@dataclass(eq=False)
class Member:
    """A generation in a batch: its `Decoding` and its row."""

    run: Decoding
    slot: Slot


class Batch:
    """Generations that join, step together and leave: one target forward per `step` for all live rows.
    `rows` is the most live at once (the cache is allocated for that many)."""

    def __init__(self, engine, rows: int, capacity: int = 256) -> None:
        self.engine = engine
        self.runtime = batch_runtime(engine)
        native = native_model(self.runtime)
        self.rows = BatchRows(native, rows, capacity)
        self.budget = BatchBudget(native)
        if isinstance(engine.drafter, BatchSizer):  # it measures the step's cost now, not in a request's step
            engine.drafter.prepare_batch(self.budget)
        self.members: list[Member] = []

    @property
    def full(self) -> bool:
        return len(self.members) >= self.rows.cache.k.shape[1]

    def join(self, prompt_ids: list[int], params) -> Member:
        """Prefill a new row (InputError / ContextLengthError for a request that cannot run; the batch is
        unchanged then)."""
        from specdec.engine import Decoding, check_request

        check_request(prompt_ids, params, self.engine.max_positions)
        if self.full:
            raise InputError("the batch is full")
        slot = self.rows.add()
        try:
            with torch.inference_mode():
                run = Decoding(
                    self.engine,
                    prompt_ids,
                    params,
                    target=RowTarget(self.rows, slot, self.runtime, self.budget),
                )
                run.prefill()
        except BaseException:
            with torch.inference_mode():
                self.rows.remove(slot)
            raise
        member = Member(run, slot)
        self.members.append(member)
        return member

    def leave(self, member: Member) -> None:
        """End a generation (finished or abandoned) and free its row."""
        self.members.remove(member)
        member.run.close()
        # the cache may have been (re)allocated inside inference mode (a forward that grew it): only touched there
        with torch.inference_mode():
            self.rows.remove(member.slot)

    def step(self) -> list[tuple[Member, Step]]:
        """One shared forward: every live row proposes, is scored, accepts and emits; rows whose generation
        ended leave. Returns each row's `Step`."""
        if not self.members:
            return []
        with torch.inference_mode():
            members = sorted(self.members, key=lambda m: m.slot.row)  # cache order: row r is members[r]
            trees = [m.run.propose() for m in members]
            starts = list(self.rows.cache.lengths[: len(members)])  # where each row's tree enters its cache
            tokens = sum(len(tree) for tree in trees)
            start = time.perf_counter()
            rows = self.rows.score(
                trees, self.engine.layers
            )  # each row's verify time spans the shared forward
            self.budget.update(len(trees), tokens, time.perf_counter() - start)
            steps = [
                (m, m.run.finish(tree, Scores(logits, hidden if m.run.layers else {}, start, tree)))
                for m, tree, (logits, hidden), start in zip(members, trees, rows, starts, strict=True)
            ]
        for (member, step), tree in zip(steps, trees, strict=True):
            # what the row's step gave: the plan the other rows size their next trees against until a drafter
            # that sizes by cost plans this row's next one
            member.slot.plan = RowPlan(len(step.token_ids), len(tree))
        for member, step in steps:
            if step.done:
                self.leave(member)
        return steps

    def close(self) -> None:
        for member in list(self.members):
            self.leave(member)


def run_batch(engine, prompts: list[list[int]], params_list: list) -> Generator[tuple[int, Step], None, None]:
    """Decode the prompts together; yields (prompt index, `Step`) after every shared forward, for each row
    still live, until all are done. Rows end independently (their own max_new_tokens, EOS, stop strings)."""
    capacity = (
        max(len(p) + params.max_new_tokens for p, params in zip(prompts, params_list, strict=True)) + 64
    )
    batch = Batch(engine, len(prompts), capacity)
    index: dict[int, int] = {}  # id(member) -> prompt index
    try:
        for i, (prompt, params) in enumerate(zip(prompts, params_list, strict=True)):
            try:
                index[id(batch.join(prompt, params))] = i
            except InputError as e:
                raise type(e)(f"prompt {i}: {e}") from None
        while batch.members:
            for member, step in batch.step():
                yield index[id(member)], step
    finally:
        batch.close()
