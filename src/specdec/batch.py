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

The batch runs on the native runtime (its forward takes rows, `NativeModel.forward_rows`) and for drafters
that read no hidden states (`auto` batches without its members that do).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from specdec.errors import ContextLengthError, InputError
from specdec.runner import Scores
from specdec.runtime.native import NativeCache, NativeModel, NativeRunner
from specdec.tree import DraftTree

if TYPE_CHECKING:
    from specdec.engine import Decoding, Step


@dataclass
class Slot:
    """A generation's row in the batch cache; the batch renumbers it when rows move."""

    row: int


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

    def prefill(self, slot: Slot, token_ids: list[int]) -> None:
        """The row's prompt, run alone (a one-row forward into a scratch cache), then copied into its row."""
        if not token_ids:
            self.cache.lengths[slot.row] = 0
            return
        single = NativeRunner(self.native)
        single.reset(len(token_ids))
        single.prefill(token_ids)
        assert single.cache is not None  # reset() made it
        n = len(token_ids)
        self.cache.reserve(n)
        self.cache.k[:, slot.row, :, :n] = single.cache.k[:, 0, :, :n]
        self.cache.v[:, slot.row, :, :n] = single.cache.v[:, 0, :, :n]
        self.cache.lengths[slot.row] = n

    def score(self, trees: Sequence[DraftTree]) -> list[torch.Tensor]:
        """One forward over the trees of rows 0..B-1 (in that order): logits [len(tree), V] per row."""
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
        logits = self.native.forward_rows(self.cache, ids, positions, mask, real)  # [sum(sizes), V]
        return list(logits.split(sizes))


class RowTarget:
    """One generation's view of the batch: the target runtime surface `Decoding` uses (scoring is the
    batch's, one forward for all rows)."""

    def __init__(self, rows: BatchRows, slot: Slot) -> None:
        self.rows, self.slot = rows, slot

    @property
    def length(self) -> int:
        return self.rows.cache.lengths[self.slot.row]

    def reset(self, positions: int, slack: int = 0) -> None:
        self.rows.cache.reserve(positions + slack)

    def prefill(self, token_ids: list[int], layers: Sequence[int] = ()) -> Scores:
        self.rows.prefill(self.slot, token_ids)
        return Scores(torch.empty(0), {})

    def score(self, tree: DraftTree, layers: Sequence[int] = ()) -> Scores:
        raise RuntimeError("a row of a batch is scored with the others (BatchRows.score)")

    def commit(self, tree_start: int, accepted_nodes: list[int]) -> None:
        self.rows.cache.keep(tree_start, accepted_nodes, self.slot.row)

    def free(self) -> None:
        pass  # the batch frees the row when the generation ends


def check_batchable(engine) -> NativeModel:
    """The native model under the engine, or InputError saying why this engine cannot batch."""
    if engine.runtime.name != "native":
        raise InputError(
            f"batched decoding runs on the native runtime (Llama, Mistral, Qwen2, Qwen3); this engine uses "
            f"{engine.runtime.name}"
        )
    if engine.layers and not engine.drafter.hidden_states_optional:  # auto leaves its eagle member out
        raise InputError(
            f"batched decoding does not yet serve {engine.drafter.name}, which reads hidden states"
        )
    runner = engine.runtime.new()
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
        self.rows = BatchRows(check_batchable(engine), rows, capacity)
        self.members: list[Member] = []

    @property
    def full(self) -> bool:
        return len(self.members) >= self.rows.cache.k.shape[1]

    def join(self, prompt_ids: list[int], params) -> Member:
        """Prefill a new row (InputError / ContextLengthError for a request that cannot run; the batch is
        unchanged then)."""
        from specdec.engine import Decoding

        params.validate()
        if not prompt_ids:
            raise InputError("the prompt is empty (it must contain at least one token)")
        limit = self.engine.max_positions
        if limit is not None and len(prompt_ids) + params.max_new_tokens > limit:
            raise ContextLengthError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                f"model's context of {limit} positions"
            )
        if self.full:
            raise InputError("the batch is full")
        slot = self.rows.add()
        try:
            with torch.inference_mode():
                run = Decoding(self.engine, prompt_ids, params, target=RowTarget(self.rows, slot))
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
            logits = self.rows.score(trees)  # each row's verify time spans the shared forward
            steps = [
                (m, m.run.finish(tree, Scores(row_logits, {})))
                for m, tree, row_logits in zip(members, trees, logits, strict=True)
            ]
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
