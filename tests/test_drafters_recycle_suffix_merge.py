"""Training-free drafters: token recycling, suffix automaton retrieval, and their merge.

Each is checked end to end (greedy output equal to transformers' generate(), seeded sampling equal to vanilla's
tokens, drafts really accepted on repetitive text) and in its parts: the recycling table's update rule and
template growth, the suffix automaton against a brute-force scan, the merge's budget and shared prefixes.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specdec import SpecDecoder
from specdec.acceptance import Verdict
from specdec.drafters import make_drafter
from specdec.drafters.base import Drafter, Scored
from specdec.drafters.merge import Merge, union, would_accept
from specdec.drafters.recycle import TokenRecycling, grow_template
from specdec.drafters.suffix import SuffixAutomaton, SuffixLookup, frequency_tree
from specdec.errors import InputError
from specdec.tree import DraftTree

import tiny

ARCHS = ["llama", "qwen2", "gemma"]
METHODS = ["recycle", "suffix", "merge"]


# Cached functions rather than fixtures: a hypothesis strategy below draws from repetitive_prompt(), and a
# strategy cannot take a fixture. Still built on first use, never at collection.
@functools.cache
def models() -> dict:
    """One tiny model per architecture."""
    return {arch: tiny.model(arch, seed=i) for i, arch in enumerate(ARCHS)}


@functools.cache
def reference(arch: str, prompt: tuple[int, ...], n: int) -> list[int]:
    return tiny.hf_greedy(models()[arch], list(prompt), n)


@functools.cache
def decoder(method: str, arch: str) -> SpecDecoder:
    """One decoder per (method, arch) for the whole module: learned state carries over between examples."""
    return SpecDecoder(models()[arch], tiny.tokenizer(), method=method)


@functools.cache
def repetitive_prompt(arch: str) -> tuple[int, ...]:
    """A start plus the model's own 80 greedy tokens: a tiny random model falls into loops, so its greedy
    continuation repeats text already in the prompt (asserted where used)."""
    start = [5, 9, 14, 3]
    return tuple(start + reference(arch, tuple(start), 80))


def repeated_fraction(prompt: tuple[int, ...], out: list[int], n: int = 4) -> float:
    """Fraction of output positions whose last n tokens occurred earlier in prompt + output."""
    seq = list(prompt) + out
    hits = sum(
        any(seq[j - n : j] == seq[i - n : i] for j in range(n, i))
        for i in range(len(prompt) + 1, len(seq) + 1)
    )
    return hits / len(out)


# ---------------------------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompt=st.one_of(
        st.lists(st.integers(1, 383), min_size=1, max_size=16),  # random: few drafts accepted
        st.lists(st.integers(1, 12), min_size=1, max_size=30),  # small alphabet: copy-heavy
        st.integers(1, 20).map(lambda n: list(repetitive_prompt("llama")[:n]) * 3),  # literal repeats
    ).map(tuple),
    n=st.integers(1, 30),
)
def test_greedy_equals_generate(tok, arch, method, prompt, n):
    out = decoder(method, arch).generate(list(prompt), max_new_tokens=n)
    assert out.token_ids == reference(arch, prompt, n)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_drafts_are_accepted_on_repetitive_text(tok, arch, method):
    prompt = repetitive_prompt(arch)
    expected = reference(arch, prompt, 40)
    assert repeated_fraction(prompt, expected) > 0.5  # the premise: the model's own output repeats itself
    dec = SpecDecoder(models()[arch], tok, method=method)  # fresh: nothing learned before this prompt
    out = dec.generate(list(prompt), max_new_tokens=40)
    assert out.token_ids == expected
    assert out.stats.mean_accepted_tokens > 1.3  # recycle starts from an empty table: it learns as it goes
    again = dec.generate(list(prompt), max_new_tokens=40)  # learned table / history kept: more accepted
    assert again.token_ids == expected
    assert again.stats.mean_accepted_tokens > 2.5


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_seeded_sampling_is_deterministic_and_equals_vanilla(tok, method):
    """Point-mass trees draw one token per emitted position: a seed gives vanilla's tokens, whatever was drafted
    and whatever the drafter learned from earlier calls."""
    m = models()["llama"]
    prompt = list(repetitive_prompt("llama"))
    dec = SpecDecoder(m, tok, method=method)
    vanilla = SpecDecoder(m, tok, method="vanilla")
    accepted = 0
    for seed in (0, 1, 2):
        kwargs = dict(max_new_tokens=30, temperature=0.5, top_k=20, seed=seed, ignore_eos=True)
        first = dec.generate(prompt, **kwargs)
        assert dec.generate(prompt, **kwargs).token_ids == first.token_ids
        assert first.token_ids == vanilla.generate(prompt, **kwargs).token_ids
        accepted += sum(first.stats.accepted_by_depth)
    assert accepted > 0


def test_make_drafter_rejects_bad_options():
    for method, options in [
        ("recycle", {"max_nodes": "many"}),
        ("recycle", {"k": 0}),
        ("suffix", {"max_nodes": 0}),
        ("suffix", {"history_tokens": -1}),
        ("merge", {"members": "suffix,nope"}),
        ("merge", {"members": "draft"}),
        ("merge", {"max_nodes": -1}),
        ("recycle", {"unknown_option": 1}),
    ]:
        with pytest.raises(InputError):
            make_drafter(method, **options)


# ---------------------------------------------------------------------------------------------------------------
# Token recycling


def random_logits(tree: DraftTree, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(len(tree), vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_recycle_overwrites_every_node_row_with_its_topk():
    d = TokenRecycling(k=4)
    vocab = 50
    tree = DraftTree([7, 3, 9, 3, 11], [-1, 0, 0, 1, 3])  # token 3 twice: nodes 1 (accepted) and 3
    logits = random_logits(tree, vocab, 0)
    d.observe(None, Scored(tree, Verdict([0, 1], [3, 42]), logits))
    top = logits.topk(4, dim=-1).indices
    for node in (0, 1, 2, 4):  # each unique token (and the accepted 3) took the row of its node
        assert d.table[tree.tokens[node]].tolist() == top[node].tolist()
    assert d.seen.nonzero().flatten().tolist() == sorted({7, 3, 9, 11})
    untouched = [t for t in range(vocab) if t not in tree.tokens]
    assert not d.table[untouched].any()
    # Later steps overwrite, accepted or not (token 9 was a rejected sibling; now it is the root).
    tree2 = DraftTree([9, 7], [-1, 0])
    logits2 = random_logits(tree2, vocab, 1)
    d.observe(None, Scored(tree2, Verdict([0], [5]), logits2))
    assert d.table[9].tolist() == logits2[0].topk(4).indices.tolist()
    assert d.table[7].tolist() == logits2[1].topk(4).indices.tolist()


def _shifted_table(d: TokenRecycling, vocab: int) -> None:
    """Every row seen, and rank r of token t is t + 1 + r: a drafted tree's tokens tell which ranks it took."""
    d._ensure_table(vocab)
    d.table[:] = torch.tensor([[(t + 1) % vocab, (t + 2) % vocab, (t + 3) % vocab] for t in range(vocab)])
    d.seen[:] = True


def test_recycle_drafts_the_template_from_the_table_and_dedupes_siblings():
    d = TokenRecycling(k=3, max_nodes=12, max_depth=3, adapt_every=0)
    vocab = 20
    _shifted_table(d, vocab)
    tree = d.propose(None, [4, 5], max_depth=3)
    tpl = d.template
    assert len(tree) == len(tpl)  # distinct rows: nothing merged
    for i in range(1, len(tree)):  # node i is rank ranks[i] of its parent's row (template order kept)
        assert tree.parents[i] == tpl.parents[i]
        assert tree.tokens[i] == (tree.tokens[tree.parents[i]] + 1 + tpl.ranks[i]) % vocab
    assert d.propose(None, [4, 5], max_depth=1).depth == 1
    # A fresh-looking table (all zeros, yet "seen"): every rank is token 0; siblings must be merged.
    d.table.zero_()
    tree = d.propose(None, [4, 5], max_depth=3)
    assert tree.tokens == [5, 0, 0, 0] and tree.is_chain
    # Rows never written draft nothing under them.
    d.seen[:] = False
    assert len(d.propose(None, [4, 5], max_depth=3)) == 1


def test_recycle_regrown_template_is_what_it_drafts():
    """The template re-grows from measured acceptance (here: only rank 1 is ever right), and drafting follows."""
    d = TokenRecycling(k=3, max_nodes=6, max_depth=3, adapt_every=1)
    vocab = 20
    _shifted_table(d, vocab)
    before = d.template
    for step in range(40):
        tree = d.propose(None, [4, step % vocab], max_depth=3)
        root = tree.tokens[0]
        truth = [(root + 2) % vocab, (root + 4) % vocab]  # rank 1, then rank 1 again
        logits = torch.zeros(len(tree), vocab)
        for i, t in enumerate(tree.tokens):
            logits[i, (t + 1) % vocab], logits[i, (t + 2) % vocab], logits[i, (t + 3) % vocab] = 3, 2, 1
        accepted = [0] + [c for c in tree.children[0] if tree.tokens[c] == truth[0]]
        d.observe(None, Scored(tree, Verdict(accepted, truth[: len(accepted)]), logits))
    tpl = d.template

    def rank_path(i):
        return () if i == 0 else (*rank_path(tpl.parents[i]), tpl.ranks[i])

    value = {rank_path(i): tpl.values[i] for i in range(len(tpl))}
    assert tpl != before and value[(1,)] > value[(0,)] and (1, 1) in value and (0, 0) not in value
    tree = d.propose(None, [4, 5], max_depth=3)
    assert tree.parents == list(tpl.parents)
    assert all(
        tree.tokens[i] == (tree.tokens[tpl.parents[i]] + 1 + tpl.ranks[i]) % vocab
        for i in range(1, len(tree))
    )


def test_recycle_learns_rank_acceptance_from_emitted_tokens():
    d = TokenRecycling(k=2, max_depth=3)
    d._ensure_table(10)
    d.table[1], d.table[2] = torch.tensor([2, 3]), torch.tensor([4, 5])
    d.seen[[1, 2]] = True
    tree = DraftTree([1, 2, 9], [-1, 0, 1])  # any tree: only the accepted path and emitted tokens matter
    d.observe(None, Scored(tree, Verdict([0, 1], [2, 5]), random_logits(tree, 10, 0)))
    assert d.trials.tolist() == [1, 1, 0]
    assert d.hits.tolist() == [[1, 0], [0, 1], [0, 0]]  # 2 was rank 0 after 1; 5 was rank 1 after 2


def test_recycle_table_persists_and_round_trips(tmp_path, tok):
    dec = SpecDecoder(models()["llama"], tok, method="recycle")
    dec.generate([5, 9, 14, 3], max_new_tokens=12)
    drafter = dec.drafter
    table, seen = drafter.table.clone(), drafter.seen.clone()
    assert seen.sum() > 0
    dec.generate([1, 2], max_new_tokens=1)  # one more step, observed: the rows seen before stay seen
    assert drafter.seen[seen].all()
    table, seen = drafter.table.clone(), drafter.seen.clone()
    path = str(tmp_path / "recycle.safetensors")
    drafter.save(path)
    other = TokenRecycling()
    other.load(path)
    assert torch.equal(other.table, drafter.table) and torch.equal(other.seen, drafter.seen)
    assert other.acceptance() == drafter.acceptance()  # the measured rank statistics came along
    assert table.shape == (models()["llama"].config.vocab_size, 8)
    with pytest.raises(ValueError):
        TokenRecycling(k=4).load(path)


@settings(max_examples=60, deadline=None)
@given(
    acc=st.lists(
        st.lists(st.floats(0.0, 1.0), min_size=1, max_size=3).map(lambda r: sorted(r, reverse=True)),
        min_size=1,
        max_size=3,
    ),
    n=st.integers(0, 20),
)
def test_template_growth_takes_the_most_valuable_nodes(acc, n):
    """With acceptance non-increasing in rank, greedy growth picks a set of maximal total value: the n largest
    values among all (path) nodes up to the given depth and ranks."""
    tpl = grow_template(acc, n)
    tree = DraftTree([0] * len(tpl), [-1, *tpl.parents[1:]])  # validates parents-before-children
    assert tree.depth <= len(acc)
    all_values = []
    for depth in range(1, len(acc) + 1):
        for ranks in itertools.product(*(range(len(acc[d])) for d in range(depth))):
            all_values.append(math.prod(acc[d][r] for d, r in enumerate(ranks)))
    assert len(tpl) - 1 == min(n, len(all_values))
    best = sorted(all_values, reverse=True)[: len(tpl) - 1]
    assert sum(tpl.values[1:]) == pytest.approx(sum(best), abs=1e-12)
    assert list(tpl.values[1:]) == sorted(tpl.values[1:], reverse=True)


def test_recycle_auto_size_uses_the_measured_cost(tok):
    dec = SpecDecoder(models()["qwen2"], tok, method="recycle", max_nodes="auto")
    prompt = repetitive_prompt("qwen2")
    assert dec.generate(list(prompt), max_new_tokens=20).token_ids == reference("qwen2", prompt, 20)
    assert not dec.drafter.stale and len(dec.drafter.template) <= 65


# ---------------------------------------------------------------------------------------------------------------
# Suffix automaton


def brute_force(text: list[int]) -> tuple[int, list[int]]:
    """Longest suffix that also ends earlier, and all its earlier end positions."""
    n, best, ends = len(text), 0, []
    for length in range(1, n):
        found = [e for e in range(length - 1, n - 1) if text[e - length + 1 : e + 1] == text[n - length :]]
        if not found:
            break
        best, ends = length, found
    return best, ends


@settings(max_examples=80, deadline=None)
@given(st.lists(st.one_of(st.integers(1, 3), st.just(-1), st.integers(-1000, -2)), max_size=50))
def test_suffix_automaton_matches_a_brute_force_scan(text):
    sam = SuffixAutomaton()
    for i, tok in enumerate(text):
        sam.append(tok)
        prefix = text[: i + 1]
        length, ends = brute_force(prefix)
        state, got = sam.longest_repeat()
        assert got == length
        if length:
            positions = sam.end_positions(state, limit=10**6)
            assert positions == sorted(ends + [i], reverse=True)  # every occurrence, newest first
            assert Counter(prefix[e + 1] for e in positions if e < i) == Counter(prefix[e + 1] for e in ends)
    assert len(sam.length) <= max(2 * len(text) - 1, len(text) + 1)  # the automaton's linear size


def test_suffix_end_positions_newest_first_when_limited():
    sam = SuffixAutomaton()
    for tok in [1, 2] * 20:
        sam.append(tok)
    state, length = sam.longest_repeat()
    assert length == 38
    assert sam.end_positions(state, limit=2) == [39, 37]
    state = sam.next[0][2]  # the string "2": ends at all 20 odd positions
    assert sam.end_positions(state, limit=5) == [39, 37, 35, 33, 31]  # 20 <= 4 * 5: all read, newest kept
    assert len(sam.end_positions(state, limit=2)) == 2  # a bounded read: some two of them


@settings(max_examples=60, deadline=None)
@given(
    seqs=st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=6), max_size=8),
    max_nodes=st.integers(1, 12),
)
def test_frequency_tree_keeps_the_most_frequent_prefixes(seqs, max_nodes):
    tree = frequency_tree(99, seqs, max_nodes)
    assert len(tree) - 1 <= max_nodes
    for node in range(len(tree)):  # distinct siblings
        kids = [tree.tokens[c] for c in tree.children[node]]
        assert len(kids) == len(set(kids))
    prefix_counts = Counter(tuple(s[:d]) for s in seqs for d in range(1, len(s) + 1))
    kept = [tuple(tree.tokens[i] for i in tree.path_to(n)[1:]) for n in range(1, len(tree))]
    assert all(p in prefix_counts for p in kept)
    if kept:  # nothing left out is more frequent than anything kept
        assert max((c for p, c in prefix_counts.items() if p not in kept), default=0) <= min(
            prefix_counts[p] for p in kept
        )
    assert len(kept) == min(max_nodes, len(prefix_counts))


def test_suffix_drafts_a_self_overlapping_copy():
    d = SuffixLookup(num_tokens=7, max_nodes=7)
    tree = d.propose(
        d.start(None), [8, 1, 2, 3, 1, 2, 3, 1], max_depth=10
    )  # "1 2 3" repeats: keep copying the period
    assert tree.tokens == [1, 2, 3, 1, 2, 3, 1, 2] and tree.is_chain


def test_suffix_history_is_retrieved_and_bounded(tok):
    m = models()["gemma"]
    dec = SpecDecoder(m, tok, method="suffix", history_tokens=200)
    prompt = [5, 9, 14, 3, 77, 1]
    expected = reference("gemma", tuple(prompt), 40)
    first = dec.generate(prompt, max_new_tokens=40)
    second = dec.generate(prompt, max_new_tokens=40)  # the earlier output is in the history now
    assert first.token_ids == second.token_ids == expected
    assert second.stats.target_forwards < first.stats.target_forwards
    assert second.stats.mean_accepted_tokens > 3
    drafter = dec.drafter
    for i in range(12):
        dec.generate([i + 1, 2, 3, 4], max_new_tokens=20)
        newest = drafter.docs[-1]
        assert drafter.history.text[newest[0] : newest[1]][:4] == [i + 1, 2, 3, 4]  # the context joined it
        assert len(drafter.history.text) <= 200 + 1  # old documents dropped
    without = SpecDecoder(m, tok, method="suffix", history_tokens=0)
    without.generate(prompt, max_new_tokens=40)
    assert without.generate(prompt, max_new_tokens=40).stats.target_forwards == first.stats.target_forwards


def test_suffix_history_learns_a_resent_prefix_once(tok):
    """Turns of a chat resend the history: each joins the suffix history with its new part only (and the seam
    before it), and a resent request adds nothing; what was learned is still drafted from, losslessly."""
    from specdec.drafters.suffix import SEAM

    m = models()["gemma"]
    dec = SpecDecoder(m, tok, method="suffix")
    drafter = dec.drafter
    first = context = [5, 9, 14, 3, 77, 1] + list(range(100, 160))
    sizes = []
    for turn in range(3):
        out = dec.generate(context, max_new_tokens=24)
        assert out.token_ids == reference("gemma", tuple(context), 24)
        sizes.append(len(drafter.history.text))
        # the separator, the seam, this turn's question and answer, and the last answer's unread tail
        if turn:
            assert sizes[-1] - sizes[-2] <= 1 + SEAM + 7 + 2 * len(out.token_ids) < len(context)
        context = context + out.token_ids + [turn + 20, 30, 31, 32, 33, 34, 35]  # the next turn's question
    again = dec.generate(first, max_new_tokens=24)  # a resent request: its context is held whole already
    assert len(drafter.history.text) == sizes[-1]
    assert again.stats.mean_accepted_tokens > 3  # the history's continuation is drafted


# ---------------------------------------------------------------------------------------------------------------
# Merge


class Fixed(Drafter):
    """Proposes the same sequences every step; records what it observed."""

    name = "fixed"
    mergeable = True

    def __init__(self, sequences: list[list[int]]) -> None:
        self.sequences = sequences
        self.observed: list[DraftTree] = []

    def propose(self, state, context, max_depth):
        return DraftTree.from_sequences(context[-1], self.sequences).truncate_depth(max_depth)

    def observe(self, state, scored):
        self.observed.append(scored.tree)


@settings(max_examples=80, deadline=None)
@given(
    members=st.lists(
        st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=4), max_size=4), min_size=1, max_size=3
    ),
    max_nodes=st.integers(0, 10),
    weights=st.lists(st.floats(0.0, 5.0), min_size=3, max_size=3),
)
def test_merge_is_a_budgeted_trie_union(members, max_nodes, weights):
    merge = Merge(members=[Fixed(s) for s in members], max_nodes=max_nodes)
    state = merge.start(None)
    state.weights = weights[: len(members)]
    tree = merge.propose(state, [7, 9], max_depth=10)
    own = [DraftTree.from_sequences(9, s) for s in members]
    paths = lambda t: {tuple(t.tokens[i] for i in t.path_to(n)[1:]) for n in range(1, len(t))}  # noqa: E731
    union_paths = set().union(*(paths(t) for t in own))
    assert len(tree) - 1 == min(max_nodes, len(union_paths))  # shared prefixes count once; budget filled
    assert paths(tree) <= union_paths
    for node in range(len(tree)):
        kids = [tree.tokens[c] for c in tree.children[node]]
        assert len(kids) == len(set(kids))
    best = max(range(len(members)), key=lambda i: (weights[i], -i))
    quota = round(max_nodes * (weights[best] + 0.25) / sum(w + 0.25 for w in weights[: len(members)]))
    # The favoured member's first `quota` nodes (its own order) are all in.
    head = [tuple(own[best].tokens[i] for i in own[best].path_to(n)[1:]) for n in range(1, len(own[best]))]
    assert set(head[:quota]) <= paths(tree)


def test_merge_forwards_the_merged_tree_and_tracks_members(tok):
    a, b = Fixed([[1, 2, 3]]), Fixed([[1, 2, 4], [5]])
    merge = Merge(members=[a, b], max_nodes=8)
    state = merge.start(None)
    tree = merge.propose(state, [0, 9], max_depth=5)
    assert sorted(tree.tokens) == [1, 2, 3, 4, 5, 9] and len(tree) == 6
    logits = torch.zeros(len(tree), 10)
    merge.observe(state, Scored(tree, Verdict([0, 1, 2], [1, 2, 4]), logits))
    assert a.observed == [tree] and b.observed == [tree]
    assert state.weights[1] > state.weights[0]  # b's own tree held all three emitted tokens, a's two
    assert would_accept(DraftTree.from_sequences(9, [[1, 2, 4]]), [1, 2, 4]) == 3
    assert would_accept(DraftTree.from_sequences(9, [[1, 2, 3]]), [1, 2, 4]) == 2
    assert union(9, [tree], [0], 0).tokens == [9]


def test_merge_refuses_members_it_cannot_feed():
    class OwnTreesOnly(Drafter):
        name = "own"

        def propose(self, state, context, max_depth):
            return DraftTree.root_only(context[-1])

        def observe(self, state, scored):
            pass

    with pytest.raises(ValueError, match="own"):
        Merge(members=[OwnTreesOnly()])
    with pytest.raises(ValueError, match="at least one"):
        Merge(members=" , ")
