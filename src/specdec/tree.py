"""Token trees: what a drafter proposes and what the target verifies in one forward pass.

Node 0 is the root: the last token already emitted, whose KV the target has not computed yet (it is scored
inside the tree forward). Every other node is a guess for the token that follows its parent. Nodes are in
topological order (a parent's index is smaller than its children's), so one forward pass over the nodes in
index order, with each node attending to the past plus its own ancestors, scores every root-to-leaf path at
once. A chain is the tree whose parents are 0, 1, 2, ...
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DraftTree:
    """A proposal. `tokens[0]` is the root; `parents[i] < i` for i >= 1 and `parents[0] == -1`.

    `probs`, when given, holds for node i the drafter distribution q that node i was *sampled from* (a [N, V]
    tensor, row 0 unused). Without it every drafted node is a deterministic guess (a point mass), which the
    sampler verifies with the point-mass rule. Siblings must be distinct tokens when `probs` is None.
    """

    tokens: list[int]
    parents: list[int]
    probs: torch.Tensor | None = None
    # node -> the q of a sampled child a grammar cut there (with every later sibling: it was certainly
    # rejected), applied to the residual after the node's kept children (`specdec.grammar.matcher`)
    cut_q: dict[int, torch.Tensor] = field(default_factory=dict)
    # Derived, filled in __post_init__:
    depths: list[int] = field(init=False)
    children: list[list[int]] = field(init=False)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents) or not self.tokens:
            raise ValueError("a tree needs one parent per token and at least the root")
        if self.parents[0] != -1:
            raise ValueError("node 0 must be the root (parent -1)")
        self.depths = [0] * len(self.tokens)
        self.children = [[] for _ in self.tokens]
        for i in range(1, len(self.tokens)):
            p = self.parents[i]
            if not 0 <= p < i:
                raise ValueError(f"node {i} has parent {p}: parents must precede their children")
            self.depths[i] = self.depths[p] + 1
            self.children[p].append(i)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depth(self) -> int:
        return max(self.depths)

    @property
    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents) if i)

    @classmethod
    def root_only(cls, root: int) -> DraftTree:
        return cls([root], [-1])

    @classmethod
    def chain(cls, root: int, draft: list[int], probs: torch.Tensor | None = None) -> DraftTree:
        return cls([root, *draft], list(range(-1, len(draft))), probs)

    @classmethod
    def from_sequences(cls, root: int, sequences: list[list[int]], max_nodes: int | None = None) -> DraftTree:
        """A trie of deterministic continuations of the root, earlier sequences first (shared prefixes merged).

        `max_nodes` counts drafted nodes (not the root); a sequence that does not fit is cut where the budget
        ends, so the first sequences (the drafter's best guesses) are kept whole.
        """
        trie = Trie(root, max_nodes)
        for seq in sequences:
            trie.insert(seq)
        return trie.tree()

    def subtree(self, nodes: list[int]) -> DraftTree:
        """The tree of the given nodes (each one's parent must be listed before it, or be the root)."""
        new = {0: 0}
        for i in nodes:
            new[i] = len(new)
        return DraftTree(
            [self.tokens[0]] + [self.tokens[i] for i in nodes], [-1] + [new[self.parents[i]] for i in nodes]
        )

    def truncate_depth(self, max_depth: int) -> DraftTree:
        """Drop nodes deeper than `max_depth` (e.g. past the tokens the caller still allows)."""
        if self.depth <= max_depth:
            return self
        keep = [i for i, d in enumerate(self.depths) if d <= max_depth]
        remap = {old: new for new, old in enumerate(keep)}
        parents = [-1] + [remap[self.parents[i]] for i in keep[1:]]
        probs = self.probs[keep] if self.probs is not None else None
        return DraftTree([self.tokens[i] for i in keep], parents, probs)

    def child_with(self, node: int, token: int) -> int | None:
        """The child of `node` whose token is `token`, or None. Where siblings repeat a token (sampled
        children), the first: the one step of every walk by tokens (`follow`, greedy acceptance)."""
        tokens = self.tokens
        for child in self.children[node]:
            if tokens[child] == token:
                return child
        return None

    def follow(self, tokens: list[int]) -> list[int]:
        """Node indices from the root down the path whose tokens are `tokens`, as far as the tree has it
        (root first: [0] when not even the first token is a child of the root). With the emitted tokens: the
        path they took through the tree, which is what it alone would have had accepted."""
        node, path = 0, [0]
        for token in tokens:
            child = self.child_with(node, token)
            if child is None:
                break
            node = child
            path.append(node)
        return path

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root to `node`, inclusive."""
        path = []
        while node != -1:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def ancestor_mask(self) -> torch.Tensor:
        """[N, N] bool: row i is True at i's ancestors and at i itself (the tree-attention pattern)."""
        n = len(self.tokens)
        if self.is_chain:
            return torch.ones(n, n, dtype=torch.bool).tril_()
        mask = torch.eye(n, dtype=torch.bool)
        for i in range(1, n):
            mask[i] |= mask[self.parents[i]]
        return mask


class Trie:
    """The one builder of deterministic token trees: nodes are added under a parent by token, a (parent,
    token) pair that exists already is shared (siblings stay distinct, as the point-mass rule needs), and
    new nodes stop at a budget of `max_nodes` drafted nodes."""

    def __init__(self, root: int, max_nodes: int | None = None) -> None:
        self.tokens, self.parents = [root], [-1]
        self.max_nodes = max_nodes
        self.index: dict[tuple[int, int], int] = {}  # (parent node, token) -> node

    @property
    def full(self) -> bool:
        return self.max_nodes is not None and len(self.tokens) - 1 >= self.max_nodes

    def child(self, parent: int, token: int, cap: int | None = None) -> int | None:
        """The node for `token` under `parent`: existing, else new; None when a new one is over budget (or
        over `cap` drafted nodes, a caller's tighter bound for this call)."""
        key = (parent, token)
        node = self.index.get(key)
        if node is None:
            if self.full or (cap is not None and len(self.tokens) - 1 >= cap):
                return None
            node = self.index[key] = len(self.tokens)
            self.tokens.append(token)
            self.parents.append(parent)
        return node

    def insert(self, sequence: list[int], parent: int = 0) -> int:
        """Insert a path under `parent`, as far as the budget allows; returns the last node reached."""
        for token in sequence:
            node = self.child(parent, token)
            if node is None:
                break
            parent = node
        return parent

    def graft(
        self, tree: DraftTree, node_map: list[int] | None = None, limit: int | None = None
    ) -> list[int]:
        """The trie union: insert the drafted nodes of `tree` (rooted at this trie's root token) in its own node
        order, nodes it shares with what is in already merged, as far as the budget allows and at most `limit`
        new nodes. Returns `node_map`, tree node -> trie node for the nodes inserted so far; given one back, it
        goes on where that one stopped (`drafters.merge.union` grafts each tree in rounds of quotas; auto's
        `Union` keeps a value per node on top)."""
        node_map = [0] if node_map is None else node_map
        parents, tokens, child = tree.parents, tree.tokens, self.child
        cap = None if limit is None else len(self.tokens) - 1 + limit
        for i in range(len(node_map), len(tokens)):
            node = child(node_map[parents[i]], tokens[i], cap)
            if node is None:
                break
            node_map.append(node)
        return node_map

    def __len__(self) -> int:
        return len(self.tokens)

    def tree(self) -> DraftTree:
        return DraftTree(list(self.tokens), list(self.parents))
