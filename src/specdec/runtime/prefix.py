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

import torch

BLOCK = 16


class _Node:
    __slots__ = ("children", "k", "parent", "tokens", "used", "v")

    def __init__(self, parent: _Node | None, tokens: tuple[int, ...], k=None, v=None) -> None:
        self.parent, self.tokens, self.k, self.v = parent, tokens, k, v
        self.children: dict[tuple[int, ...], _Node] = {}
        self.used = 0


class PrefixCache:
    """The blocks of committed prefixes, within `budget_bytes`. Used from one thread (the engine's)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.root = _Node(None, ())
        self.bytes = 0
        self.blocks = 0
        self.clock = 0
        self.looked_up = 0  # prompt tokens asked for (whole blocks of them)
        self.hit = 0  # of those, found

    def restore(self, tokens: list[int], k: torch.Tensor, v: torch.Tensor, limit: int) -> int:
        """Copy the longest cached prefix of `tokens` (at most `limit` tokens, whole blocks) into k, v
        [layers, kv_heads, capacity, head_dim] from slot 0; returns its length."""
        self.clock += 1
        node, n = self.root, 0
        self.looked_up += (min(len(tokens), limit) // BLOCK) * BLOCK
        while n + BLOCK <= min(len(tokens), limit):
            child = node.children.get(tuple(tokens[n : n + BLOCK]))
            if child is None:
                break
            k[:, :, n : n + BLOCK] = child.k
            v[:, :, n : n + BLOCK] = child.v
            child.used = self.clock
            node, n = child, n + BLOCK
        self.hit += n
        return n

    def store(self, tokens: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the whole blocks of a committed sequence: `tokens` and their k, v [layers, kv_heads, >= n,
        head_dim] from slot 0."""
        self.clock += 1
        node = self.root
        for n in range(0, len(tokens) - BLOCK + 1, BLOCK):
            key = tuple(tokens[n : n + BLOCK])
            child = node.children.get(key)
            if child is None:
                child = _Node(node, key, k[:, :, n : n + BLOCK].clone(), v[:, :, n : n + BLOCK].clone())
                node.children[key] = child
                self.bytes += 2 * child.k.numel() * child.k.element_size()
                self.blocks += 1
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
            self.bytes -= 2 * victim.k.numel() * victim.k.element_size()
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
