"""Suffix-automaton retrieval: continue the longest earlier match of the context, weighted by frequency.

Two online suffix automata: each generation builds one over its own context (its private state), and the
drafter keeps one over a bounded history of the earlier generations it served (prompt and output each, so a
later request that repeats an earlier one, as in multi-turn chat, code edits or SAM-decoding's retrieval, is
matched; learned across requests on purpose). History documents are separated by unique negative tokens, so
no match crosses a boundary; a generation's context joins the history when it ends, less the prefix the
history already holds (a chat's earlier turns, a shared system prompt: learned once). Appending a token costs
O(1) amortized in both; the context is never rescanned. Per step:

1. The longest suffix of the context that also ends earlier in the context is the state link(last) of the
   context automaton (its length is the match length), found in O(1); the longest suffix of the context that
   occurs in the history is tracked as the context grows (matching statistics: O(1) amortized per token).
2. The end positions of a match (owned by the states of its subtree in the suffix-link tree) give the
   continuations that followed each earlier occurrence: the newest `max_occurrences` of them, exactly when
   the match occurs at most 4x that often (otherwise the newest of the 4x read first), the context's before
   the history's. Longer matches count first; shorter ones (up to `backoff` suffix links below the longest)
   are read too, and their counts only break the longer matches' ties.
3. The continuations are merged into a trie counting how many occurrences pass through each node; the
   `max_nodes` most frequent nodes are the draft (a child is never more frequent than its parent, so they form
   a tree). With one occurrence it is prompt lookup's chain; with many, the frequent branches.

Memory is bounded by `history_tokens`: when the history outgrows it, the oldest documents are dropped and the
automaton is rebuilt from the newest half (O(1) amortized per token as well). At the default 32768 tokens the
automaton of code text takes about 20 MB of Python objects.
Defaults (not tuned): 16 nodes, depth 8, the same budget as `pld`; what a step must gain to pay for that
budget by `CostModel.reference()`: docs/methods.md, The cost model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import specdec.checks as checks
from specdec.drafters.base import Drafter, Request, register
from specdec.tree import DraftTree, Trie

# tokens of an already kept prefix that a context's new part repeats when it joins the history (`release`): a
# match of up to this many tokens running from the known part into the new one is still found
SEAM = 32


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
            checks.integer(name, getattr(self, name), 1)
        checks.integer("backoff", self.backoff, 0)
        checks.integer("history_tokens", self.history_tokens, 0)


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
        # suffix-link tree children as linked lists in flat int lists (a list per state would be one more
        # object for the garbage collector per state: a long prompt's automaton then triggered full
        # collections of the whole process, each a pause in some generation, docs/methods.md); an entry is stale when its child was re-linked under
        # a clone since
        self.first_entry: list[int] = [-1]  # per state: its newest child entry (-1: none)
        self.entry_child: list[int] = []  # per entry: the child state
        self.entry_next: list[int] = []  # per entry: the parent's next older entry (-1: none)
        self.last = 0

    def _state(self, length: int, owner: int) -> int:
        self.next.append({})
        self.link.append(-1)
        self.length.append(length)
        self.owner.append(owner)
        self.first_entry.append(-1)
        return len(self.length) - 1

    def _set_link(self, state: int, parent: int) -> None:
        self.link[state] = parent
        self.entry_child.append(state)
        self.entry_next.append(self.first_entry[parent])
        self.first_entry[parent] = len(self.entry_child) - 1

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
            entry = self.first_entry[s]
            while entry >= 0:
                c = self.entry_child[entry]
                if self.link[c] == s:
                    newest.append(c)
                    if len(newest) >= 4 * limit:
                        break
                entry = self.entry_next[entry]
            stack.extend(reversed(newest))  # the newest child is popped first
        found.sort(reverse=True)
        return found[:limit]


@dataclass
class SuffixState:
    """One generation's automaton over its own context, and where its suffix stands in the history."""

    sam: SuffixAutomaton = field(default_factory=SuffixAutomaton)
    history_version: int = -1  # the history automaton the match below was computed in
    match_state: int = 0  # state of the longest suffix of the context found in the history
    match_length: int = 0


@register
class SuffixLookup(Drafter[SuffixState]):
    name = "suffix"
    mergeable = True  # point masses; learns nothing from the target (the history grows from contexts)
    learned_attributes = ("history", "docs", "separator", "version")  # the earlier generations' contexts

    def __init__(self, config: SuffixConfig | None = None, **options) -> None:
        self.config = config or SuffixConfig(**options)
        self.history = SuffixAutomaton()  # earlier generations' contexts, shared across requests on purpose
        self.docs: list[tuple[int, int]] = []  # history documents: [start, end) in history.text
        self.separator = -1  # the next document separator (each is used once)
        self.version = 0  # bumped whenever the history changes (a state's match must then be recomputed)

    def start(self, request: Request) -> SuffixState:
        return SuffixState()

    def release(self, state: SuffixState) -> None:
        """The generation's context becomes history: the part of it the history does not hold yet. A chat's
        turn resends the history before it, and requests share a system prompt: kept once, not per request
        (the budget holds more distinct text, and a repeated text does not outweigh the rest in the counts)."""
        text = state.sam.text
        if not text or not self.config.history_tokens:
            return
        known = self._known_prefix(text)
        if known == len(text):  # all of it is in the history already
            return
        # the new part, after the last SEAM tokens of the known prefix: a match running into it still holds
        doc = text[known - SEAM :] if known >= 2 * SEAM else text
        if self.history.text:
            self._separate()
        start = len(self.history.text)
        for tok in doc:
            self.history.append(tok)
        self.docs.append((start, len(self.history.text)))
        if len(self.history.text) > self.config.history_tokens:
            self._forget()
        self.version += 1

    def _known_prefix(self, text: list[int]) -> int:
        """How far from its start `text` is held in the history: the first position whose last SEAM tokens (all
        before it, near the start) occur nowhere in it, by the matching statistics of `_match_history`. A turn
        held in pieces (its first request, then each later turn's new part after its seam) counts whole."""
        h, s, length = self.history, 0, 0
        for i, tok in enumerate(text):
            while s > 0 and tok not in h.next[s]:
                s = h.link[s]
                length = h.length[s]
            if tok not in h.next[s]:
                return i
            s, length = h.next[s][tok], length + 1
            if length < min(i + 1, SEAM):
                return i
        return len(text)

    def _forget(self) -> None:
        """Rebuild from the newest documents that fit in half the history budget."""
        keep, total = [], 0
        for start, end in reversed(self.docs):
            if total + end - start > self.config.history_tokens // 2:
                break
            keep.append(self.history.text[start:end])
            total += end - start
        self.history, self.docs = SuffixAutomaton(), []
        for i, doc in enumerate(reversed(keep)):
            if i:
                self._separate()
            start = len(self.history.text)
            for tok in doc:
                self.history.append(tok)
            self.docs.append((start, len(self.history.text)))

    def _separate(self) -> None:
        self.history.append(self.separator)  # a token that occurs nowhere else: no match crosses it
        self.separator -= 1

    def _match_history(self, state: SuffixState, context: list[int]) -> None:
        """Advance the context's longest match in the history over the tokens not yet matched (all of them
        when the history changed since)."""
        if state.history_version != self.version:
            state.history_version, state.match_state, state.match_length = self.version, 0, 0
            new = context
        else:
            new = context[len(state.sam.text) :]
        h, s, length = self.history, state.match_state, state.match_length
        for tok in new:
            while s > 0 and tok not in h.next[s]:
                s = h.link[s]
                length = h.length[s]
            if tok in h.next[s]:
                s, length = h.next[s][tok], length + 1
        state.match_state, state.match_length = s, length

    def propose(self, state: SuffixState, context: list[int], max_depth: int) -> DraftTree:
        if self.history.text:
            self._match_history(state, context)
        for tok in context[len(state.sam.text) :]:
            state.sam.append(tok)
        cfg = self.config
        depth = min(cfg.num_tokens, max_depth)
        levels = self._levels(state)
        if not levels or depth < 1:
            return DraftTree.root_only(context[-1])
        conts: list[list[int]] = []
        weights: list[float] = []
        read: set[tuple[int, int]] = set()  # (source, end position) already read at a longer match
        lengths = sorted({length for length, _, _ in levels}, reverse=True)
        for length, source, s in levels:  # longest first; the context's before the history's
            if len(conts) >= cfg.max_occurrences:
                break
            weight = float(cfg.max_occurrences + 1) ** -lengths.index(length)
            sam = state.sam if source == 0 else self.history
            for end in sam.end_positions(s, cfg.max_occurrences + 1):
                cont = _continuation(sam.text, end, depth, source == 0) if (source, end) not in read else []
                read.add((source, end))
                if cont and len(conts) < cfg.max_occurrences:
                    conts.append(cont)
                    weights.append(weight)
        return frequency_tree(context[-1], conts, cfg.max_nodes, weights)

    def _levels(self, state: SuffixState) -> list[tuple[int, int, int]]:
        """(match length, source (0: context, 1: history), automaton state) for the longest match of each
        source and up to `backoff` shorter ones, longest first, cut to `backoff + 1` distinct lengths."""
        cfg = self.config
        levels = []
        starts = [(0, *state.sam.longest_repeat())]
        if self.history.text:
            starts.append((1, state.match_state, state.match_length))
        for source, s, length in starts:
            sam = state.sam if source == 0 else self.history
            for _ in range(cfg.backoff + 1):
                if length < cfg.min_match or s <= 0:
                    break
                levels.append((length, source, s))
                s = sam.link[s]
                length = sam.length[s] if s > 0 else 0
        levels.sort(key=lambda level: (-level[0], level[1]))
        keep = sorted({length for length, _, _ in levels}, reverse=True)[: cfg.backoff + 1]
        return [level for level in levels if level[0] >= keep[-1]] if keep else []


def _continuation(text: list[int], end: int, depth: int, self_copy: bool) -> list[int]:
    """Up to `depth` tokens after position `end`, stopping at a document separator or the end of the text.
    In the current context (`self_copy`), a copy that runs into the end of the text continues copying itself
    (period n - 1 - end), as an LZ77 match would."""
    n = len(text)
    period = n - 1 - end  # 0 for the current end position, which has no continuation
    cont: list[int] = []
    for j in range(depth if period else 0):
        if end + 1 + j < n:
            tok = text[end + 1 + j]
        elif self_copy:
            tok = cont[j - period]
        else:
            break
        if tok < 0:
            break
        cont.append(tok)
    return cont


def frequency_tree(
    root: int, sequences: list[list[int]], max_nodes: int, weights: list[float] | None = None
) -> DraftTree:
    """The trie of `sequences` cut to its `max_nodes` most frequent nodes (ties: shallower, then earlier);
    sequence i counts weights[i] times (default 1)."""
    trie = Trie(root)
    counts = [0.0]
    for seq, weight in zip(sequences, weights or [1.0] * len(sequences), strict=True):
        node = 0
        for tok in seq:
            node = trie.insert([tok], node)
            if node == len(counts):
                counts.append(0.0)
            counts[node] += weight
    full = trie.tree()
    # A child's count never exceeds its parent's and it is deeper, so parents sort first.
    order = sorted(range(1, len(full)), key=lambda i: (-counts[i], full.depths[i], i))[:max_nodes]
    return full.subtree(order)
