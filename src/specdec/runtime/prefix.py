"""Committed keys/values kept across requests, so a prompt that starts as an earlier one did (a chat's history,
a shared system prompt or file) is prefilled only past the part already computed.

A trie of token blocks (BLOCK tokens each, as vLLM's automatic prefix caching and SGLang's radix cache key
their pages): a node is one block of tokens given every block before it, and holds that block's keys and
values [layers, kv_heads, BLOCK, head_dim] (keys already rotated: a cached prefix always starts at position 0,
so its positions are the new request's). Only whole blocks are kept. When the blocks take more than the
budget, the least recently used leaves go first; an interior block is never dropped before the blocks
under it, so every path from the root stays a valid prefix.

Lossless: restored entries are the ones an earlier generation committed for the same tokens at the same
positions, computed by the same model. Where they were computed by another kernel shape (a tree forward, a
batch's rows) than a fresh prefill would use, they can differ from a fresh prefill by float rounding; the
tests compare cached and fresh generations.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch

BLOCK = 16


class _Node:
    __slots__ = ("children", "hidden", "k", "parent", "tokens", "used", "v")

    def __init__(self, parent: _Node | None, tokens: tuple[int, ...], k=None, v=None) -> None:
        self.parent, self.tokens, self.k, self.v = parent, tokens, k, v
        self.hidden: dict[int, torch.Tensor] = {}  # layer id -> [BLOCK, H]: where a drafter read them
        self.children: dict[tuple[int, ...], _Node] = {}
        self.used = 0

    @property
    def nbytes(self) -> int:
        tensors = [self.k, self.v, *self.hidden.values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class PrefixCache:
    """The blocks of committed prefixes, within `budget_bytes`. Used from one thread (the engine's).

    A block also keeps the hidden states of the layers its generation's drafter read (eagle's, the heads'
    final one), so that a request whose drafter reads them at prefill gets the cached positions' states too:
    such a request is served only as far as every block has the layers it asks for."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.root = _Node(None, ())
        self.bytes = 0
        self.blocks = 0
        self.clock = 0
        self.looked_up = 0  # prompt tokens asked for (whole blocks of them)
        self.hit = 0  # of those, found

    def restore(
        self, tokens: list[int], k: torch.Tensor, v: torch.Tensor, limit: int, layers: Sequence[int] = ()
    ) -> tuple[int, dict[int, torch.Tensor]]:
        """Copy the longest cached prefix of `tokens` (at most `limit` tokens, whole blocks, each holding the
        hidden states of `layers`) into k, v [layers, kv_heads, capacity, head_dim] from slot 0; returns its
        length and those hidden states [length, H] per layer."""
        self.clock += 1
        node, n = self.root, 0
        found: list[_Node] = []
        self.looked_up += (min(len(tokens), limit) // BLOCK) * BLOCK
        while n + BLOCK <= min(len(tokens), limit):
            child = node.children.get(tuple(tokens[n : n + BLOCK]))
            if child is None or any(layer not in child.hidden for layer in layers):
                break
            k[:, :, n : n + BLOCK] = child.k
            v[:, :, n : n + BLOCK] = child.v
            child.used = self.clock
            found.append(child)
            node, n = child, n + BLOCK
        self.hit += n
        hidden = {layer: torch.cat([b.hidden[layer] for b in found]) for layer in layers} if found else {}
        return n, hidden

    def store(
        self,
        tokens: list[int],
        k: torch.Tensor,
        v: torch.Tensor,
        hidden: dict[int, torch.Tensor] | None = None,
    ) -> None:
        """Keep the whole blocks of a committed sequence: `tokens`, their k, v [layers, kv_heads, >= n,
        head_dim] from slot 0, and the hidden states a drafter read for them ([>= n, H] per layer; a block
        already kept gains the layers it lacked)."""
        self.clock += 1
        hidden = hidden or {}
        node = self.root
        for n in range(0, len(tokens) - BLOCK + 1, BLOCK):
            key = tuple(tokens[n : n + BLOCK])
            child = node.children.get(key)
            if child is None:
                child = _Node(node, key, k[:, :, n : n + BLOCK].clone(), v[:, :, n : n + BLOCK].clone())
                node.children[key] = child
                self.blocks += 1
            else:
                self.bytes -= child.nbytes
            for layer, h in hidden.items():
                if layer not in child.hidden and h.shape[0] >= n + BLOCK:
                    child.hidden[layer] = h[n : n + BLOCK].clone()
            self.bytes += child.nbytes
            child.used = self.clock
            node = child
        self._evict()

    def _evict(self) -> None:
        """Drop least recently used leaves until within the budget (a parent left childless is a leaf then)."""
        if self.bytes <= self.budget:
            return
        heap = [(n.used, id(n), n) for n in self._nodes() if not n.children]
        heapq.heapify(heap)
        while self.bytes > self.budget and heap:
            _, _, victim = heapq.heappop(heap)
            parent = victim.parent
            assert parent is not None and victim.k is not None
            del parent.children[victim.tokens]
            self.bytes -= victim.nbytes
            self.blocks -= 1
            if parent is not self.root and not parent.children:
                heapq.heappush(heap, (parent.used, id(parent), parent))

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            yield node

    @property
    def hit_rate(self) -> float:
        """Share of the prompt tokens looked up (whole blocks) that were found."""
        return self.hit / self.looked_up if self.looked_up else 0.0


class Committed:
    """One generation's committed tokens, and the hidden states its drafter read of them, in cache order:
    what it offers the prefix cache when it ends (`keep`). Off (`on` False: no prefix cache on the weights)
    it records nothing, so a generation without a cache pays nothing per step for it."""

    def __init__(self, on: bool = False) -> None:
        self.on = on
        self.tokens: list[int] = []
        self.hidden: dict[int, list[torch.Tensor]] = {}  # layer id -> [n_i, H] pieces

    def begin(self, tokens: list[int], hidden: dict[int, torch.Tensor]) -> None:
        """The prefill: the prompt's tokens and (where read) their hidden states [len(tokens), H]."""
        if not self.on:
            return
        self.tokens = list(tokens)
        self.hidden = {layer: [h] for layer, h in hidden.items() if h.shape[0] == len(tokens)}

    def add(self, tokens: list[int], hidden: dict[int, torch.Tensor], rows: list[int] | None = None) -> None:
        """Tokens appended (a tree's accepted path, or causal ones); `hidden` the forward's, `rows` theirs."""
        if not self.on:
            return
        self.tokens += tokens
        for layer in list(self.hidden):
            h = hidden.get(layer)
            if h is None:  # a forward that read none: nothing to keep past here
                del self.hidden[layer]
            else:
                self.hidden[layer].append(h if rows is None else h[rows])

    def crop(self, length: int) -> None:
        if not self.on:
            return
        del self.tokens[length:]
        self.hidden = {layer: [torch.cat(parts)[:length]] for layer, parts in self.hidden.items()}

    def keep(self, cache: PrefixCache, k: torch.Tensor, v: torch.Tensor, length: int) -> None:
        """Store the first `length` positions (k, v [layers, kv_heads, >= length, head_dim])."""
        hidden = {layer: torch.cat(parts) for layer, parts in self.hidden.items()}
        cache.store(self.tokens[:length], k, v, {layer: h[:length] for layer, h in hidden.items()})
