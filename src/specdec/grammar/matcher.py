"""One generation's grammar state, and what each step asks of it: shape the drafted tree, mask its logits,
advance over the emitted tokens.

What is preserved (docs/structured.md): at every position the target's distribution masked by the grammar and
renormalised, the one plain constrained decoding samples from token by token (transformers' `generate()`
with the same mask as a logits processor). It is not the target's distribution conditioned on the whole
output being valid, which no engine decodes.

Per step, before the forward (`shape`):
- the tokens the grammar forces from the committed text (`compute_ff_tokens`: keys, braces, fixed literals)
  are grafted into a point-mass tree as a chain under the root, and those it forces after each leaf's text
  under that leaf (GRAFT_BUDGET a step): drafts the target verifies like any other, in the same forward
  (where the mask allows a forced token alone, as llguidance's does along a forced span, the target emits it
  there, so it is accepted);
- the tree is walked depth first with the matcher (advance on a node's token, compute its mask, recurse,
  roll back), and a child the grammar rejects is cut with its subtree, so it is never scored. A point-mass
  child may be cut anywhere (its rejection would leave the residual as it was). A child *sampled* from a
  drafter's q is another matter: its rejection moves the residual to norm(max(r - q, 0)). So the first
  illegal sampled child is cut with every later sibling, and its q is kept on the parent (`DraftTree.cut_q`):
  after the kept earlier siblings are rejected, the sampler applies that residual step and draws from it,
  exactly what testing the cut child (certainly rejected) would have led to.
Each kept node's mask is its row of a [N, W] int32 bitmask (bit t: token t may follow the node's path).
After the forward (`mask`) every row's illegal logits are set to -inf before acceptance; after acceptance
(`advance`) the committed matcher moves over the emitted tokens (the accepted drafts and the bonus) only.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from specdec.errors import InputError
from specdec.grammar.constraint import Constraint, ll_tokenizer
from specdec.tree import DraftTree, Trie

ALL = -1  # an int32 bitmask word with every bit set
# tokens the grammar may graft under the tree's leaves per step (a leaf whose text the grammar continues in
# one way only): each is one more token in the forward, so a tree with many leaves gets a few, the first
# (best-ranked, visited first) branches first
GRAFT_BUDGET = 16


def fill(matcher, masks: torch.Tensor, row: int) -> None:
    """Row `row` of masks [N, W] (int32, contiguous, CPU): the tokens the matcher allows next. What
    `llguidance.torch.fill_next_token_bitmask` does, without importing that module (it compiles a kernel with
    torch.compile at import: 1.4 s in a first request)."""
    view = masks[row]
    matcher.unsafe_compute_mask_ptr(view.data_ptr(), view.numel() * view.element_size())


class GrammarState:
    """The matcher at the committed text (prompt excluded: the constraint is on the output)."""

    def __init__(self, constraint: Constraint, tokenizer, vocab_size: int, eos_ids: set[int]) -> None:
        from llguidance import LLMatcher

        grammar = constraint.llguidance_grammar()
        self.matcher = LLMatcher(ll_tokenizer(tokenizer, vocab_size, eos_ids), grammar, log_level=0)
        if self.matcher.is_error():
            raise InputError(
                f"invalid {constraint.describe()}: {' '.join(self.matcher.get_error().split())[:300]}"
            )
        self.vocab = vocab_size
        self.words = (vocab_size + 31) // 32
        self.eos_ids = eos_ids
        self.seconds = 0.0  # shaping, masking and advancing: the grammar's share of the generation
        self.forced_tokens = 0  # emitted tokens the grammar forced (accepted drafts it grafted in)
        self._grafted: set[int] = set()  # this step's shaped-tree nodes the grammar drafted

    @property
    def stopped(self) -> bool:
        """The grammar admits no further token (it may still end with an EOS)."""
        return self.matcher.is_stopped()

    @property
    def complete(self) -> bool:
        """The text so far is a whole sentence of the grammar."""
        return self.matcher.is_accepting()

    def committed_mask(self) -> torch.Tensor:
        """[1, W]: the tokens that may follow the committed text."""
        masks = torch.full((1, self.words), ALL, dtype=torch.int32)
        fill(self.matcher, masks, 0)
        return masks

    def shape(self, tree: DraftTree, max_depth: int) -> tuple[DraftTree, torch.Tensor]:
        """(the tree as the grammar allows it, its masks [N, W]); module docstring."""
        t0 = time.perf_counter()
        forced = self.matcher.compute_ff_tokens()[:max_depth] if max_depth > 0 else []
        grafted: set[int] = set()
        if forced and tree.probs is None:
            trie = Trie(tree.tokens[0])
            trie.graft(tree)
            trie.insert(forced)
            tree = trie.tree()
            grafted = set(tree.follow(forced)[1:])
        walk = _Walk(self, tree, grafted, max_depth)
        shaped, masks = walk.run()
        self._grafted = walk.grafted
        self.seconds += time.perf_counter() - t0
        return shaped, masks

    def mask(self, logits: torch.Tensor, masks: torch.Tensor) -> float:
        """logits [N, V] (row i: node i of the shaped tree), illegal tokens set to -inf in place; returns
        the seconds it took."""
        t0 = time.perf_counter()
        n, v = logits.shape
        bits = np.unpackbits(masks[:n].numpy().view(np.uint8), axis=1, bitorder="little")  # [N, 32W]
        allowed = torch.zeros(n, v, dtype=torch.bool)
        width = min(v, bits.shape[1], self.vocab)
        allowed[:, :width] = torch.from_numpy(bits[:, :width]).bool()
        logits.masked_fill_(~allowed.to(logits.device), float("-inf"))
        took = time.perf_counter() - t0
        self.seconds += took
        return took

    def advance(self, tokens: list[int], accepted_nodes: list[int] | tuple[int, ...] = ()) -> None:
        """The committed text grew by `tokens`: along `accepted_nodes` of the last shaped tree (root first),
        then the bonus token."""
        t0 = time.perf_counter()
        self.forced_tokens += sum(node in self._grafted for node in accepted_nodes[1:])
        for token in tokens:
            if self.matcher.is_stopped():
                break  # only an EOS may follow, and it ends the generation
            if not self.matcher.consume_token(token):
                raise RuntimeError(
                    f"grammar desync: token {token} was emitted outside the grammar ({self.matcher.get_error()})"
                )
        self.seconds += time.perf_counter() - t0


class _Walk:
    """The depth-first walk of one tree with the committed matcher (rolled back to where it was)."""

    def __init__(self, state: GrammarState, tree: DraftTree, grafted: set[int], max_depth: int) -> None:
        self.state, self.tree, self.matcher = state, tree, state.matcher
        self.grafted_in, self.max_depth = grafted, max_depth  # (old indices the grammar drafted)
        self.budget = GRAFT_BUDGET if tree.probs is None else 0  # under sampled children: none (their q)
        self.masks = torch.full((len(tree) + self.budget, state.words), ALL, dtype=torch.int32)
        self.tokens: list[int] = [tree.tokens[0]]
        self.parents: list[int] = [-1]
        self.depths: list[int] = [0]
        self.kept: list[int] = [0]  # old index of each kept node (-1: grafted under a leaf)
        self.grafted: set[int] = set()  # new indices of the nodes the grammar drafted
        self.cut_q: dict[int, torch.Tensor] = {}

    def run(self) -> tuple[DraftTree, torch.Tensor]:
        self._fill(0)
        self._visit(0, 0)
        tree = self.tree
        probs = None if tree.probs is None else tree.probs[self.kept]
        return DraftTree(self.tokens, self.parents, probs, self.cut_q), self.masks[: len(self.tokens)]

    def _fill(self, row: int) -> None:
        """Row `row`: the tokens that may follow the matcher's current text (only an EOS, once the grammar
        has stopped). An EOS node's row is left all ones: nothing after an EOS is emitted."""
        fill(self.matcher, self.masks, row)

    def _allowed(self, row: int, token: int) -> bool:
        return token < self.state.vocab and bool((int(self.masks[row, token >> 5]) >> (token & 31)) & 1)

    def _add(self, old: int, token: int, parent: int) -> int:
        new = len(self.tokens)
        self.kept.append(old)
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1)
        if old in self.grafted_in:
            self.grafted.add(new)
        return new

    def _visit(self, node: int, row: int) -> None:
        tree, probs = self.tree, self.tree.probs
        leaf = True
        for child in tree.children[node]:
            token = tree.tokens[child]
            if not self._allowed(row, token):
                if probs is not None and float(probs[child, token]) < 1.0:  # sampled from q: module docstring
                    self.cut_q[row] = probs[child]
                    return
                continue
            leaf = False
            new = self._add(child, token, row)
            if token in self.state.eos_ids:
                continue  # an EOS ends the text: nothing is scored under it, and its row is never used
            if not self.matcher.consume_token(token):
                raise RuntimeError(f"grammar desync at token {token}: {self.matcher.get_error()}")
            self._fill(new)
            self._visit(child, new)
            self.matcher.rollback(1)
        if leaf:
            self._graft(row)

    def _graft(self, row: int) -> None:
        """Under a leaf: the tokens the grammar forces from its text (within the budget and the depth)."""
        room = min(self.budget, self.max_depth - self.depths[row])
        if room <= 0 or self.matcher.is_stopped():
            return
        consumed = 0
        for token in self.matcher.compute_ff_tokens()[:room]:
            row = self._add(-1, token, row)
            self.grafted.add(row)
            self.budget -= 1
            if token in self.state.eos_ids:
                break
            if not self.matcher.consume_token(token):  # a forced token is one the grammar allows
                raise RuntimeError(f"grammar desync at forced token {token}: {self.matcher.get_error()}")
            consumed += 1
            self._fill(row)
        self.matcher.rollback(consumed)
