"""Suffix-automaton retrieval: continue the longest earlier match of the context, weighted by frequency.

One online suffix automaton holds a bounded history of earlier generations of this drafter instance (prompt
and output each, so a later request that repeats an earlier one, as in multi-turn chat, code edits or
SAM-decoding's retrieval, is matched) followed by the current context; documents are separated by unique
negative tokens, so no match crosses a boundary. Appending a token costs O(1) amortized; the context is never
rescanned. Per step:

1. The longest suffix of the text that also ends somewhere earlier is the state link(last) of the automaton
   (its length is the match length), found in O(1).
2. Its earlier end positions (owned by the states of its subtree in the suffix-link tree) give the
   continuations that followed each earlier occurrence: the newest `max_occurrences` of them, exactly when
   the match occurs at most 4x that often (otherwise the newest of the 4x read first). Shorter matches (up
   to `backoff` suffix links) are read too; their counts only break the longer match's ties.
3. The continuations are merged into a trie counting how many occurrences pass through each node; the
   `max_nodes` most frequent nodes are the draft (a child is never more frequent than its parent, so they form
   a tree). With one occurrence it is prompt lookup's chain; with many, the frequent branches.

Memory is bounded by `history_tokens`: when the history outgrows it, the oldest documents are dropped and the
automaton is rebuilt from the newest half (O(1) amortized per token as well). At the default 32768 tokens the
automaton of code text takes about 20 MB of Python objects.
Defaults (not tuned): 16 nodes, depth 8, the same budget as `pld`; with `CostModel.reference()` a 17-token
forward costs 1.67x a 1-token one, so a step must gain about 0.7 accepted tokens on average to pay off.
"""

from __future__ import annotations

from dataclasses import dataclass

from specdec.drafters.base import Drafter, Request, register
from specdec.tree import DraftTree


@dataclass
class SuffixConfig:
    max_nodes: int = 16  # drafted nodes per step: bounds the verification cost
    num_tokens: int = 8  # deepest continuation drafted
    max_occurrences: int = 32  # earlier occurrences of the match read per step
    min_match: int = 1  # shortest match (in tokens) worth drafting from
    backoff: int = 2  # also read this many shorter matches (each a tie-breaker for the longer one's counts)
    history_tokens: int = 32768  # earlier prompts/outputs kept for retrieval (0: the current context only)

    def __post_init__(self) -> None:
        for name in ("max_nodes", "num_tokens", "max_occurrences", "min_match"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.history_tokens < 0 or self.backoff < 0:
            raise ValueError("history_tokens and backoff must be >= 0")


class SuffixAutomaton:
    """The minimal automaton of all substrings of `text`, built online (Blumer et al.), plus the suffix-link
    tree's children so the end positions of any state can be listed.

    State 0 is the empty string. A state created for position i (not a clone) owns end position i; the end
    positions of a state are those owned in its suffix-link subtree.
    """

    def __init__(self) -> None:
        self.text: list[int] = []
        self.next: list[dict[int, int]] = [{}]  # transitions
        self.link: list[int] = [-1]  # suffix link
        self.length: list[int] = [0]  # longest string of the state
        self.owner: list[int] = [-1]  # the end position the state was created for (-1: root or clone)
        # suffix-link tree children; an entry is stale when the child was re-linked under a clone since
        self.children: list[list[int]] = [[]]
        self.last = 0

    def _state(self, length: int, owner: int) -> int:
        self.next.append({})
        self.link.append(-1)
        self.length.append(length)
        self.owner.append(owner)
        self.children.append([])
        return len(self.length) - 1

    def _set_link(self, state: int, parent: int) -> None:
        self.link[state] = parent
        self.children[parent].append(state)

    def append(self, token: int) -> None:
        pos = len(self.text)
        self.text.append(token)
        cur = self._state(self.length[self.last] + 1, pos)
        p = self.last
        while p != -1 and token not in self.next[p]:
            self.next[p][token] = cur
            p = self.link[p]
        if p == -1:
            self._set_link(cur, 0)
        else:
            q = self.next[p][token]
            if self.length[p] + 1 == self.length[q]:
                self._set_link(cur, q)
            else:  # split q: the strings of q up to length[p] + 1 also end at pos
                clone = self._state(self.length[p] + 1, -1)
                self.next[clone] = dict(self.next[q])
                self._set_link(clone, self.link[q])
                while p != -1 and self.next[p].get(token) == q:
                    self.next[p][token] = clone
                    p = self.link[p]
                self._set_link(q, clone)
                self._set_link(cur, clone)
        self.last = cur

    def longest_repeat(self) -> tuple[int, int]:
        """(state, length) of the longest suffix of the text that also ends at an earlier position."""
        state = self.link[self.last]
        return max(state, 0), self.length[state] if state > 0 else 0

    def end_positions(self, state: int, limit: int) -> list[int]:
        """Up to `limit` end positions of the state's strings, newest first.

        Reads at most 4 * limit owned positions of the subtree (newest child first) and keeps the newest, so
        the result is exact when the strings occur at most 4 * limit times; beyond that it is a bounded read
        (the query costs O(limit), whatever the number of occurrences).
        """
        found: list[int] = []
        stack = [state]
        while stack and len(found) < 4 * limit:
            s = stack.pop()
            if self.owner[s] >= 0:
                found.append(self.owner[s])
            newest = []
            for c in reversed(self.children[s]):
                if self.link[c] == s:
                    newest.append(c)
                    if len(newest) >= 4 * limit:
                        break
            stack.extend(reversed(newest))  # the newest child is popped first
        found.sort(reverse=True)
        return found[:limit]


@register
class SuffixLookup(Drafter):
    name = "suffix"

    def __init__(self, config: SuffixConfig | None = None, **options) -> None:
        self.config = config or SuffixConfig(**options)
        self.sam = SuffixAutomaton()
        self.docs: list[tuple[int, int]] = []  # finished documents: [start, end) in sam.text
        self.doc_start = 0  # where the current generation's context starts in sam.text
        self.fed = 0  # tokens of the current context already appended
        self.separator = -1  # the next document separator (each is used once)

    def reset(self, request: Request) -> None:
        self._close()
        if len(self.sam.text) > self.config.history_tokens:
            self._forget()
        if self.sam.text and self.sam.text[-1] >= 0:
            self._separate()
        self.doc_start, self.fed = len(self.sam.text), 0

    def release(self) -> None:
        self._close()

    def _close(self) -> None:
        """The current generation's tokens become history."""
        if self.fed:
            self.docs.append((self.doc_start, len(self.sam.text)))
            self.fed = 0

    def _forget(self) -> None:
        """Rebuild from the newest documents that fit in half the history budget."""
        keep, total = [], 0
        for start, end in reversed(self.docs):
            if total + end - start > self.config.history_tokens // 2:
                break
            keep.append(self.sam.text[start:end])
            total += end - start
        self.sam, self.docs = SuffixAutomaton(), []
        for i, doc in enumerate(reversed(keep)):
            if i:
                self._separate()
            start = len(self.sam.text)
            for tok in doc:
                self.sam.append(tok)
            self.docs.append((start, len(self.sam.text)))

    def _separate(self) -> None:
        self.sam.append(self.separator)  # a token that occurs nowhere else: no match crosses it
        self.separator -= 1

    def propose(self, context: list[int], max_depth: int) -> DraftTree:
        for tok in context[self.fed :]:
            self.sam.append(tok)
        self.fed = len(context)
        cfg = self.config
        state, length = self.sam.longest_repeat()
        depth = min(cfg.num_tokens, max_depth)
        if length < cfg.min_match or depth < 1:
            return DraftTree.root_only(context[-1])
        conts: list[list[int]] = []
        weights: list[float] = []
        read: set[int] = set()
        weight = 1.0
        for _ in range(cfg.backoff + 1):  # the longest match, then shorter ones (suffix links)
            if length < cfg.min_match or len(conts) >= cfg.max_occurrences:
                break
            for end in self.sam.end_positions(state, cfg.max_occurrences + 1):
                cont = self._continuation(end, depth) if end not in read else []
                read.add(end)
                if cont and len(conts) < cfg.max_occurrences:
                    conts.append(cont)
                    weights.append(weight)
            state = self.sam.link[state]
            length = self.sam.length[state] if state > 0 else 0
            weight /= cfg.max_occurrences + 1  # a shorter match's counts only break the longer one's ties
        return frequency_tree(context[-1], conts, cfg.max_nodes, weights)

    def _continuation(self, end: int, depth: int) -> list[int]:
        """Up to `depth` tokens after position `end`, stopping at a document separator. A copy that runs into
        the end of the text continues copying itself (period n - 1 - end), as an LZ77 match would."""
        text, n = self.sam.text, len(self.sam.text)
        period = n - 1 - end  # 0 for the current end position, which has no continuation
        cont: list[int] = []
        for j in range(depth if period else 0):
            tok = text[end + 1 + j] if end + 1 + j < n else cont[j - period]
            if tok < 0:
                break
            cont.append(tok)
        return cont


def frequency_tree(
    root: int, sequences: list[list[int]], max_nodes: int, weights: list[float] | None = None
) -> DraftTree:
    """The trie of `sequences` cut to its `max_nodes` most frequent nodes (ties: shallower, then earlier);
    sequence i counts weights[i] times (default 1)."""
    tokens, parents, counts, depths = [root], [-1], [0.0], [0]
    index: dict[tuple[int, int], int] = {}
    for seq, weight in zip(sequences, weights or [1.0] * len(sequences), strict=True):
        node = 0
        for tok in seq:
            key = (node, tok)
            if key not in index:
                index[key] = len(tokens)
                tokens.append(tok), parents.append(node), counts.append(0.0), depths.append(depths[node] + 1)
            node = index[key]
            counts[node] += weight
    # A child's count never exceeds its parent's and it is deeper, so parents sort first.
    order = sorted(range(1, len(tokens)), key=lambda i: (-counts[i], depths[i], i))[:max_nodes]
    new = {0: 0}
    for i in order:
        new[i] = len(new)
    return DraftTree([root] + [tokens[i] for i in order], [-1] + [new[parents[i]] for i in order])
