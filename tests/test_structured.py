"""Structured generation: under a constraint every method's greedy output is transformers' `generate()` with
the same grammar as a logits processor, sampling draws exactly the masked distribution through trees (and a
rule that masks after acceptance, or forgets a cut sampled child, is caught), trees are pruned before the
forward, forced spans are drafted by the grammar, and bad constraints are refused in one line."""

from __future__ import annotations

import json

import pytest
import scipy.stats
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specdec import Constraint, DraftTree, InputError, SamplingParams, SpecDecoder
from specdec.acceptance import verify_sampled
from specdec.drafters import methods
from specdec.grammar import GrammarState
from specdec.grammar.hf import ConstraintLogitsProcessor
from specdec.sampling import TargetDistribution

import tiny

SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer"}, "kind": {"type": "string", "enum": ["ab", "cde"]}},
    "required": ["n", "kind"],
    "additionalProperties": False,
}
CONSTRAINTS = {
    "json_schema": Constraint.json_schema(SCHEMA),
    "regex": Constraint.regex(r"(ab|ba)+-[0-9]{1,3}"),
    "lark": Constraint.grammar('start: e\ne: NUM | "(" e "+" e ")"\nNUM: /[0-9]/'),
    "choice": Constraint.choice(["the", "then", "another"]),
}
PROMPT = "def add(a, b):\n    return a + b\n"


@pytest.fixture(scope="module")
def model():
    return tiny.model("llama", seed=0)


def reference(model, tok, prompt_ids: list[int], constraint: Constraint, n: int) -> list[int]:
    """generate()'s greedy tokens under the constraint (the same grammar engine as a logits processor)."""
    processor = ConstraintLogitsProcessor(constraint, tok, model.config.vocab_size, {0})
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, pad_token_id=0,
        logits_processor=[processor],
    )  # fmt: skip
    return out[0, len(prompt_ids) :].tolist()


def options(method: str, model) -> dict:
    if method == "draft":
        return {"draft_model": tiny.model("llama", seed=0, layers=1)}
    if method in ("eagle", "medusa", "hydra"):
        return {"head": tiny.untrained_head(method, model)}
    return {}


@pytest.mark.parametrize("kind", list(CONSTRAINTS))
@pytest.mark.parametrize("method", methods())
def test_every_method_equals_constrained_generate(model, tok, method, kind):
    constraint = CONSTRAINTS[kind]
    ids = tok(PROMPT)["input_ids"]
    want = reference(model, tok, ids, constraint, 40)
    dec = SpecDecoder(model, tok, method, **options(method, model))
    out = dec.generate(ids, max_new_tokens=40, constraint=constraint)
    assert out.token_ids == want
    text = tok.decode(out.token_ids, skip_special_tokens=True)
    if out.stats.finish_reason == "eos":  # a finished output is a sentence of the grammar
        GrammarState(constraint, tok, model.config.vocab_size, {0}).advance(out.token_ids)
        if kind == "json_schema":
            assert set(json.loads(text)) == {"n", "kind"}


def test_the_grammar_drafts_forced_spans_and_prunes_before_the_forward(model, tok, monkeypatch):
    """Under a schema with fixed keys, the grammar's forced tokens are drafted (and accepted), and every node
    of every tree the target scores is legal after its path."""
    shaped: list[tuple[DraftTree, int]] = []  # (the tree scored, tokens emitted before it)
    emitted = [0]
    real_shape, real_advance = GrammarState.shape, GrammarState.advance

    def shape(self, tree, max_depth):
        out = real_shape(self, tree, max_depth)
        shaped.append((out[0], emitted[0]))
        return out

    def advance(self, tokens, drafted):
        emitted[0] += len(tokens)
        return real_advance(self, tokens, drafted)

    monkeypatch.setattr(GrammarState, "shape", shape)
    monkeypatch.setattr(GrammarState, "advance", advance)
    constraint = CONSTRAINTS["json_schema"]
    out = SpecDecoder(model, tok, "pld").generate(
        tok(PROMPT)["input_ids"], max_new_tokens=40, constraint=constraint
    )
    monkeypatch.undo()
    assert out.stats.forced_tokens > 0 and out.stats.mean_accepted_tokens > 1.0
    assert out.stats.grammar_seconds > 0
    assert any(len(tree) > 1 for tree, _ in shaped)
    for tree, before in shaped:
        state = GrammarState(constraint, tok, model.config.vocab_size, {0})
        state.advance(out.token_ids[:before])
        for node in range(1, len(tree)):
            path = [tree.tokens[i] for i in tree.path_to(node)[1:]]
            assert state.matcher.validate_tokens(path) == len(path), (node, path)


def _masked_dist(logits: torch.Tensor, allowed: list[int], temperature: float) -> torch.Tensor:
    masked = torch.full_like(logits, float("-inf"))
    masked[allowed] = logits[allowed]
    return torch.softmax(masked.double() / temperature, dim=-1)


def _first_tokens(dec, ids, constraint, draws: int, temperature: float) -> list[int]:
    return [
        dec.generate(ids, max_new_tokens=2, temperature=temperature, seed=s, constraint=constraint).token_ids[
            0
        ]
        for s in range(draws)
    ]


@pytest.mark.parametrize("method", ["draft", "pld", "auto"])
def test_sampling_through_trees_draws_the_masked_distribution(model, tok, method):
    """Chi-square of the first emitted token against softmax(masked logits / T): `draft` samples its drafts
    from its own q (often outside the grammar: those children are cut and their q kept for the residual),
    pld and auto draft point masses."""
    constraint = Constraint.choice(["the", "then", "another", "def", "return"])
    ids = tok("x = 1\n")["input_ids"]
    state = GrammarState(constraint, tok, model.config.vocab_size, {0})
    bits = state.committed_mask()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
    allowed = [t for t in range(model.config.vocab_size) if (int(bits[0, t >> 5]) >> (t & 31)) & 1]
    p = _masked_dist(logits, allowed, 1.5)
    dec = SpecDecoder(model, tok, method, **options(method, model))
    draws = 500
    counts = torch.bincount(torch.tensor(_first_tokens(dec, ids, constraint, draws, 1.5)), minlength=len(p))
    support = [t for t in allowed if p[t] * draws >= 5]
    observed = [int(counts[t]) for t in support] + [draws - int(counts[support].sum())]
    expected = [float(p[t] * draws) for t in support] + [draws - float(p[support].sum() * draws)]
    keep = [i for i, e in enumerate(expected) if e > 0]
    assert len(keep) >= 3, expected  # the test's own power
    result = scipy.stats.chisquare([observed[i] for i in keep], [expected[i] for i in keep])
    assert result.pvalue > 1e-3, (observed, expected)


def _one_step(tree: DraftTree, logits: torch.Tensor, dist, seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    return verify_sampled(tree, logits, dist, gen).tokens[0]


def test_broken_rules_fail_the_same_test():
    """The power check: at a node with target p, grammar mask m and a sampled child x ~ q, the correct rule
    (mask before acceptance; a cut child's q kept for the residual) emits norm(p m); masking after acceptance,
    or cutting the child without its residual step, does not."""
    vocab, legal = 6, [0, 1, 2]
    p = torch.tensor([0.05, 0.15, 0.3, 0.3, 0.1, 0.1])
    q = torch.tensor([0.6, 0.05, 0.05, 0.1, 0.1, 0.1])
    want = p[legal] / p[legal].sum()
    logits = p.log()[None].repeat(2, 1)
    masked = logits.clone()
    masked[:, 3:] = float("-inf")
    dist = TargetDistribution(SamplingParams(temperature=1.0))
    draws = 3000

    def rate(rule) -> float:
        counts = torch.zeros(vocab)
        for seed in range(draws):
            gen = torch.Generator().manual_seed(10_000 + seed)
            x = int(torch.multinomial(q, 1, generator=gen))
            counts[rule(x, seed)] += 1
        observed = counts[legal].tolist()
        if counts[3:].sum() > 0:
            return 0.0  # an illegal token emitted: broken outright
        expected = (want.double() / want.double().sum() * sum(observed)).tolist()
        return float(scipy.stats.chisquare(observed, expected).pvalue)

    probs = torch.stack([torch.zeros(vocab), q])

    def correct(x: int, seed: int) -> int:
        if x in legal:
            return _one_step(DraftTree([9, x], [-1, 0], probs), masked, dist, seed)
        return _one_step(DraftTree([9], [-1], probs[:1], {0: q}), masked, dist, seed)  # cut, q kept

    def cut_without_residual(x: int, seed: int) -> int:
        if x in legal:
            return _one_step(DraftTree([9, x], [-1, 0], probs), masked, dist, seed)
        return _one_step(DraftTree([9], [-1], probs[:1]), masked, dist, seed)

    def mask_after_acceptance(x: int, seed: int) -> int:  # drafts tested against the raw p, the bonus masked
        gen = torch.Generator().manual_seed(seed)
        if x in legal and float(torch.rand((), generator=gen, dtype=torch.float64)) * q[x] < p[x]:
            return x
        residual = (torch.softmax(masked[0], dim=-1) - q).clamp_min(0)
        return int(torch.multinomial(residual / residual.sum(), 1, generator=gen))

    assert rate(correct) > 1e-3
    assert rate(cut_without_residual) < 1e-6
    assert rate(mask_after_acceptance) < 1e-6


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fields=st.dictionaries(
        st.sampled_from(["id", "name", "ok", "tags", "score"]),
        st.sampled_from(["integer", "string", "boolean", "array", "number"]),
        min_size=1,
        max_size=4,
    ),
    method=st.sampled_from(["pld", "suffix", "auto"]),
)
def test_generated_schemas_always_yield_valid_json(model, tok, fields, method):
    props = {
        k: ({"type": "array", "items": {"type": "string"}} if t == "array" else {"type": t})
        for k, t in fields.items()
    }
    schema = {"type": "object", "properties": props, "required": sorted(props), "additionalProperties": False}
    constraint = Constraint.json_schema(schema)
    dec = SpecDecoder(model, tok, method)
    out = dec.generate(
        tok(PROMPT)["input_ids"], max_new_tokens=200, constraint=constraint, temperature=0.8, seed=1
    )
    if out.stats.finish_reason == "eos":
        assert set(json.loads(tok.decode(out.token_ids, skip_special_tokens=True))) == set(props)
    else:  # cut by the length: what there is is a prefix the grammar accepts
        state = GrammarState(constraint, tok, model.config.vocab_size, {0})
        state.advance(out.token_ids)


@pytest.mark.parametrize(
    "constraint, says",
    [
        (Constraint.json_schema('{"type": "object", '), "not valid JSON"),
        (Constraint.json_schema({"type": "frobnicate"}), "json schema"),
        (Constraint.regex("(ab"), "regex"),
        (Constraint.grammar("start: x y"), "lark grammar"),
        (Constraint.grammar("root ::= [a-", syntax="gbnf"), "gbnf grammar"),
        (Constraint.choice([]), "empty"),
    ],
)
def test_bad_constraints_are_refused_in_one_line(model, tok, constraint, says):
    dec = SpecDecoder(model, tok, "pld")
    with pytest.raises(InputError) as err:
        dec.generate(PROMPT, max_new_tokens=4, constraint=constraint)
    assert "\n" not in str(err.value) and says.lower() in str(err.value).lower(), str(err.value)


def test_ignore_eos_with_a_constraint_is_refused(model, tok):
    with pytest.raises(InputError, match="ignore_eos"):
        SpecDecoder(model, tok, "pld").generate(
            PROMPT, max_new_tokens=4, ignore_eos=True, constraint=CONSTRAINTS["regex"]
        )


def test_a_grammar_that_cannot_finish_in_time_ends_with_length(model, tok):
    constraint = Constraint.regex("a{30}")
    out = SpecDecoder(model, tok, "pld").generate(PROMPT, max_new_tokens=5, constraint=constraint)
    assert out.stats.finish_reason == "length" and len(out.token_ids) == 5


@pytest.mark.parametrize("method", ["pld", "auto"])
def test_a_batch_whose_rows_have_different_grammars_gives_each_row_its_solo_result(model, tok, method):
    from specdec.api import sampling_params
    from specdec.batch import run_batch

    dec = SpecDecoder(model, tok, method, runtime="native")
    rows = [
        (PROMPT, CONSTRAINTS["json_schema"]),
        ("import os\n", CONSTRAINTS["regex"]),
        ("x = [1, 2]\n", None),
        (PROMPT, CONSTRAINTS["lark"]),
    ]
    ids = [tok(p)["input_ids"] for p, _ in rows]
    params = [sampling_params(max_new_tokens=30, constraint=c) for _, c in rows]
    results: dict[int, list[int]] = {}
    for i, step in run_batch(dec.engine, ids, params):
        if step.result is not None:
            results[i] = step.result.token_ids
    for i, (_, constraint) in enumerate(rows):
        assert results[i] == dec.generate(ids[i], max_new_tokens=30, constraint=constraint).token_ids


def test_shape_cuts_illegal_nodes_grafts_forced_tokens_and_masks_each_node(tok):
    """A hand-made tree under the regex "abcde|abdxe": an illegal root child is cut with its subtree, the
    text the grammar forces after a leaf is grafted under it, and each kept node's mask is the grammar's
    after its path."""
    vocab = len(tok)
    state = GrammarState(Constraint.regex("abcde|abdxe"), tok, vocab, {0})
    ids = {s: tok(s, add_special_tokens=False)["input_ids"] for s in ("a", "b", "c", "d", "x", "e", "z")}
    assert all(len(v) == 1 for v in ids.values()), ids  # single-character tokens in the tiny vocabulary
    a, b, c, d, x, e, z = (ids[s][0] for s in ("a", "b", "c", "d", "x", "e", "z"))
    # root (the last prompt token) -> z (illegal, with a child), a -> b -> c
    tree = DraftTree([9, z, e, a, b, c], [-1, 0, 1, 0, 3, 4])
    shaped, masks = state.shape(tree, max_depth=8)
    paths = {tuple(shaped.tokens[i] for i in shaped.path_to(n)[1:]) for n in range(1, len(shaped))}
    assert (z,) not in paths and (z, e) not in paths
    de = tuple(tok("de", add_special_tokens=False)["input_ids"])  # the forced text, as the tokenizer cuts it
    assert (a, b, c) in paths and (a, b, c, *de) in paths  # the drafted path, then the forced "de" under it
    for node in range(len(shaped)):
        path = [shaped.tokens[i] for i in shaped.path_to(node)[1:]]
        check = GrammarState(Constraint.regex("abcde|abdxe"), tok, vocab, {0})
        check.advance(path)
        assert torch.equal(masks[node], check.committed_mask()[0]), (node, path)
    state.advance([a, b, c, *de], shaped.follow([a, b, c, *de]))
    # the grammar forces "ab" from the start too (both alternatives begin so: the drafter's a and b are its
    # forced chain as well), and "de" after c; c was the drafter's alone
    assert state.forced_tokens == 2 + len(de)


def test_cli_constraint_flags_and_their_errors(tmp_path, capsys):
    from specdec.cli import main

    model_dir = tiny.save(tmp_path / "m")
    base = ["generate", "x = ", "--model", str(model_dir), "--max-new-tokens", "12", "--json"]
    assert main([*base, "--choice", "yes", "--choice", "no"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert tok_text(out) in ("yes", "no") or out["stats"]["finish_reason"] == "length"
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMA))
    assert main([*base, "--json-schema", str(schema)]) == 0
    capsys.readouterr()
    for flags, says in (
        (["--regex", "(ab"], "invalid regex"),
        (["--json-schema", str(tmp_path / "missing.json")], "no such file"),
        (["--grammar", str(tmp_path / "missing.lark")], "no such file"),
        (["--regex", "a", "--choice", "b"], "not allowed with"),
    ):
        code = main([*base, *flags]) if "not allowed" not in says else _exit_code(main, [*base, *flags])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and says in err, err


def tok_text(out: dict) -> str:
    return out["text"]


def _exit_code(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own refusals exit
        return int(e.code or 0)
