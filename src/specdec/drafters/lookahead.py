"""Lookahead decoding (Fu et al. 2024; see docs/methods.md, lookahead), adapted to one verified tree per forward.

The method keeps two things: a Jacobi window of W guesses for the next positions, iterated one step per
target forward, and a pool of n-grams (N tokens) keyed by their first token, at most G per key with LRU
replacement. The window's new guesses form n-grams along the Jacobi "diagonal" (each token of the n-gram is
the target's guess after the previous one, one iteration earlier); those go to the pool, and the pool's
n-grams that start with the current token are drafted and verified.

How it runs here. specdec's engine scores exactly one `DraftTree` per target forward and hands the drafter
the target's logits at every node, so both branches of the paper live in that one tree, under the root:
  - verification branch: the pool's continuations (N - 1 tokens) of the root token, most recent first;
  - lookahead branch: the window as one more chain root -> w1 -> ... -> wW. Its logits give the next Jacobi
    iteration: the argmax at w_i is the new guess for position i + 1, conditioned on the exact chain above it.
Both are inserted as one trie (shared prefixes merged, siblings distinct), so a window that agrees with a
pooled n-gram costs no extra nodes, and a window chain that happens to be right is simply accepted (the
verifier treats every node as a deterministic guess: lossless under greedy and sampling; see
docs/methods.md, Lossless acceptance under sampling).

What differs from the paper:
  - The paper's 2-D window feeds all N - 1 past levels every step with a special mask, so each new token sees
    its diagonal predecessors only; here only the latest level is fed (as a plain chain) and the N - 1 levels
    are kept in memory as, per window position, the diagonal n-gram prefix that led to its token. A new guess
    sees the whole latest chain instead of the diagonal (ordinary Jacobi iteration). Cost per step: W + at
    most G * (N - 1) nodes instead of (W + G) * (N - 1).
  - After a step commits k tokens the window shifts by k; the positions it no longer covers are filled by
    following the pool from the last window token, else with a token drawn from the context (the paper
    initialises its window with random prompt tokens).
  - The pool is seeded with every n-gram of the prompt and, as the text grows, of the generated text (the
    paper seeds with the prompt only; the generated text is the same kind of evidence).
  - Sampling: drafts are point masses (no q), verified with the point-mass rule; the window iterates on the
    target's argmax whatever the temperature, as the pool only needs likely n-grams.

Defaults W = N = G = 4 keep a step at <= 16 drafted nodes, a tree that `CostModel.reference()` (this
project's 2-core CPU) prices at well under two one-token forwards (docs/methods.md, The cost model). The
values were chosen from those costs, not tuned by measurement of acceptance.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass, field

import specdec.checks as checks
from specdec.drafters.base import Drafter, Request, Scored, register
from specdec.tree import DraftTree


@dataclass
class LookaheadConfig:
    window: int = 4  # W: Jacobi guesses iterated per step (nodes of the lookahead branch)
    ngram: int = 4  # N: n-gram size; a pooled n-gram drafts its last N - 1 tokens
    guesses: int = 4  # G: n-grams kept per first token (LRU), all drafted when their key is the root
    seed_context: bool = True  # pool the prompt's (and the generated text's) n-grams too
    seed: int = 0  # RNG for the context tokens that fill the window (drafts only; never the output)

    def __post_init__(self) -> None:
        checks.integer("window", self.window, 1)
        checks.integer("ngram", self.ngram, 2)
        checks.integer("guesses", self.guesses, 1)


class NgramPool:
    """First token -> up to `cap` continuations (tuples of n - 1 tokens), least recently seen evicted first."""

    def __init__(self, n: int, cap: int) -> None:
        self.n, self.cap = n, cap
        self.table: dict[int, OrderedDict[tuple[int, ...], None]] = {}

    def add(self, gram: tuple[int, ...]) -> None:
        """gram: n tokens."""
        conts = self.table.setdefault(gram[0], OrderedDict())
        cont = gram[1:]
        if cont in conts:
            conts.move_to_end(cont)
        else:
            conts[cont] = None
            if len(conts) > self.cap:
                conts.popitem(last=False)

    def get(self, token: int) -> list[tuple[int, ...]]:
        """Continuations of `token`, most recently seen first."""
        return list(reversed(self.table.get(token, ())))

    def __len__(self) -> int:
        return sum(len(c) for c in self.table.values())


def _chain_nodes(tree: DraftTree, tokens: list[int]) -> list[int]:
    """Node indices of the path root -> tokens[0] -> tokens[1] ... as far as it exists in `tree`, root included."""
    nodes = [0]
    for tok in tokens:
        child = next((c for c in tree.children[nodes[-1]] if tree.tokens[c] == tok), None)
        if child is None:
            break
        nodes.append(child)
    return nodes


@dataclass
class LookaheadState:
    """One generation's window and pool."""

    pool: NgramPool
    rng: random.Random
    indexed: int = 0  # context positions whose n-gram (ending there) is pooled
    window: list[int] = field(default_factory=list)  # guesses for positions root + 1, root + 2, ...
    grams: list[tuple[int, ...]] = field(default_factory=list)  # per window token: its diagonal n-gram prefix
    jacobi_ngrams: int = 0  # n-grams pooled from the lookahead branch (for tests and inspection)
    # (root position, root's n-gram prefix, the window drafted, its diagonal prefixes) for `observe`
    step: tuple[int, tuple[int, ...], list[int], list[tuple[int, ...]]] | None = None


@register
class Lookahead(Drafter[LookaheadState]):
    name = "lookahead"

    def __init__(self, config: LookaheadConfig | None = None, **options) -> None:
        self.config = config or LookaheadConfig(**options)

    def start(self, request: Request | None) -> LookaheadState:
        cfg = self.config
        return LookaheadState(NgramPool(cfg.ngram, cfg.guesses), random.Random(cfg.seed))

    def propose(self, state: LookaheadState, context: list[int], max_depth: int) -> DraftTree:
        cfg = self.config
        n = cfg.ngram
        root = context[-1]
        if cfg.seed_context:
            for end in range(max(state.indexed, n - 1), len(context)):
                state.pool.add(tuple(context[end - n + 1 : end + 1]))
            state.indexed = len(context)
        if max_depth <= 0:
            state.step = None
            return DraftTree.root_only(root)
        self._fill_window(state, context)
        window = state.window[:max_depth]
        candidates = [list(c[:max_depth]) for c in state.pool.get(root)]
        state.step = (len(context) - 1, tuple(context[-(n - 1) :]), window, state.grams[: len(window)])
        return DraftTree.from_sequences(root, [*candidates, window])

    def _fill_window(self, state: LookaheadState, context: list[int]) -> None:
        """Extend the window to W tokens: follow the pool from its last token, else draw from the context."""
        keep = self.config.ngram - 1
        while len(state.window) < self.config.window:
            last = state.window[-1] if state.window else context[-1]
            last_gram = state.grams[-1] if state.grams else tuple(context[-keep:])
            conts = state.pool.get(last)
            if conts:
                for tok in conts[0][: self.config.window - len(state.window)]:
                    last_gram = (*last_gram, tok)[-keep:]
                    state.window.append(tok)
                    state.grams.append(last_gram)
            else:
                tok = context[state.rng.randrange(len(context))]
                state.window.append(tok)
                state.grams.append((tok,))

    def observe(self, state: LookaheadState, scored: Scored) -> None:
        if state.step is None:
            return
        root_pos, root_gram, window, grams = state.step
        n = self.config.ngram
        nodes = _chain_nodes(scored.tree, window)  # the engine may have cut the tree deeper than it allows
        guesses = scored.logits[nodes].argmax(dim=-1).tolist()  # guesses[i]: for position root_pos + 1 + i
        prefixes = [root_gram, *grams]
        new_window, new_grams = [], []
        for tok, prefix in zip(guesses, prefixes, strict=False):
            gram = (*prefix, tok)
            if len(gram) == n:
                state.pool.add(gram)
                state.jacobi_ngrams += 1
            new_window.append(tok)
            new_grams.append(gram[-(n - 1) :])
        # The new root sits len(verdict.tokens) positions further: drop the guesses it has passed.
        shift = len(scored.verdict.tokens)
        state.window, state.grams = new_window[shift:], new_grams[shift:]
        state.step = None
