"""Block-diffusion LMs: conversion and training, the attention masks, the engine's caches, the policies'
contract, the bench's scoring and the command-line errors. Tiny random models; not lossless by design, so the
tests check the contracts (caches equal the uncached reference, committed tokens stay, every forward commits)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from specdec.cli import main
from specdec.dllm.api import DllmDecoder
from specdec.dllm.engine import DllmEngine, DllmSettings
from specdec.dllm.learn2pd_train import Tracer
from specdec.dllm.model import MASK_TOKEN, convert_from_ar, dllm_spec, is_dllm_dir, training_mask
from specdec.dllm.policies import POLICIES, BlockView, Policy, Selection, make_policy
from specdec.dllm.policies.learn2pd import FEATURES, features, new_filter
from specdec.errors import InputError
from specdec.sampling import SamplingParams

import tiny

PROMPTS = ["def f(x):\n    return", "import json\n\n", "class A:\n    def __init__(self"]


def tiny_dllm(block: int = 8, seed: int = 0, dtype=torch.float64):
    model = tiny.model("llama", seed=seed, dtype=dtype)
    tok = copy.deepcopy(tiny.tokenizer())
    convert_from_ar(model, tok, block)
    return model.to(dtype), tok


@pytest.fixture(scope="module")
def dllm():
    return tiny_dllm()


@pytest.fixture(scope="module")
def filter_file(tmp_path_factory):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("l2pd") / "filter.safetensors"
    save_file({k: v.contiguous() for k, v in new_filter().state_dict().items()}, str(path))
    return str(path)


def policy_options(name: str, filter_file: str) -> dict:
    # low thresholds so that the random tiny model commits several tokens per forward somewhere
    return {
        "one": {},
        "threshold": {"threshold": 0.2},
        "localleap": {"threshold": 0.3, "relaxed_threshold": 0.1},
        "credit": {"threshold": 0.2},
        "adablock": {"threshold": 0.2, "delimiter_threshold": 0.01, "min_block": 2},
        "learn2pd": {"threshold": 0.5, "filter": filter_file},
    }[name]


# --- the model ----------------------------------------------------------------------------------------------


def test_conversion_adds_a_mask_token_and_records_the_spec(dllm):
    model, tok = dllm
    spec = dllm_spec(model)
    assert spec is not None and spec.block_size == 8
    assert tok.convert_tokens_to_ids(MASK_TOKEN) == spec.mask_id == len(tiny.tokenizer())
    assert model.get_input_embeddings().weight.shape[0] == spec.mask_id + 1
    assert dllm_spec(tiny.model("llama")) is None


def test_training_mask_is_causal_clean_and_block_local_noisy():
    m = training_mask(seq_len=4, block_size=2, streams=2).int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0],  # noisy block 0: nothing clean before it, its own block
            [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0],  # noisy block 1: clean block 0 and its own block
            [1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0],  # the second noisy copy, same shape
            [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1],
            [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1],
        ]
    )
    assert torch.equal(m, expected)


def test_complementary_masks_cover_every_position_once():
    from specdec.train.dllm import noisy_inputs

    x0 = torch.randint(1, 50, (3, 20))
    noisy, masked = noisy_inputs(x0, block=4, mask_id=99, gen=torch.Generator().manual_seed(0))
    assert torch.equal(masked[:, 0] ^ masked[:, 1], torch.ones(3, 20, dtype=torch.bool))
    assert torch.equal(noisy == 99, masked)
    assert torch.equal(torch.where(masked, x0[:, None], noisy), x0[:, None].expand(-1, 2, -1))


def test_train_dllm_smoke_resumes_and_exports(tmp_path):
    from specdec.models.loading import load_causal_lm
    from specdec.train.dllm import DllmTrainConfig, export_dllm, train_dllm

    base = tiny.save(tmp_path / "base")
    work = tmp_path / "work"
    work.mkdir()
    rng = np.random.default_rng(0)
    vocab = len(tiny.tokenizer())
    rng.integers(1, vocab, 6000).astype(np.uint16).tofile(work / "train.bin")
    rng.integers(1, vocab, 1200).astype(np.uint16).tofile(work / "heldout.bin")
    (work / "heldout.json").write_text(json.dumps({"tokens": 1200, "bytes": 3600}))
    cfg = DllmTrainConfig(
        total_tokens=3 * 128, batch_tokens=128, seq_len=64, block_size=8, block_sizes=[4, 8]
    )
    ckpt = train_dllm(work, str(base), cfg)
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 3
    records = [json.loads(line) for line in (work / "dllm.log.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 3 and np.isfinite(records[-1]["masked"])
    train_dllm(work, str(base), cfg)  # finished: resuming runs no more steps
    assert torch.load(ckpt, weights_only=False)["step"] == 3
    out = tmp_path / "exported"
    metrics = export_dllm(work, out)
    assert metrics["steps"] == 3 and set(metrics["heldout_masked_nats_per_token_by_block"]) == {"4", "8"}
    assert is_dllm_dir(out)
    from specdec.train.dllm import write_card

    card = write_card(out, metrics, {"files": 2, "bytes": 100, "held_out_files": ["a"]})
    assert "| 3 |" in card and (out / "MODEL_CARD.md").exists()
    model, tok = load_causal_lm(str(out))
    spec = dllm_spec(model)
    assert spec is not None and tok.convert_tokens_to_ids(MASK_TOKEN) == spec.mask_id


# --- the engine -----------------------------------------------------------------------------------------------


def decode(model, tok, policy: Policy, prompt: str, **settings) -> list[int]:
    engine = DllmEngine(model, tok, policy, DllmSettings(**settings))
    steps = list(engine.run(tok(prompt)["input_ids"], SamplingParams(max_new_tokens=20, ignore_eos=True)))
    result = steps[-1].result
    assert result is not None
    assert [t for s in steps for t in s.token_ids] == result.token_ids  # streamed in order, nothing lost
    return result.token_ids


@pytest.mark.parametrize("prompt", PROMPTS)
def test_prefix_cache_equals_recomputing_everything(dllm, prompt):
    model, tok = dllm
    one = make_policy("one", order="left")
    reference = decode(model, tok, one, prompt, cache="none")
    assert decode(model, tok, one, prompt, cache="prefix") == reference
    # the dual cache without sub-blocks reruns the whole block each forward: exact as well
    assert decode(model, tok, one, prompt, cache="dual", sub_block=None) == reference


def test_cached_predictions_equal_uncached_ones(dllm):
    """Every block position's prediction, not only the argmax path: with the most-confident order, positions
    deep in an all-mask suffix are near ties, so token equality would test rounding rather than the cache."""
    from specdec.dllm.engine import BlockDecoding

    model, tok = dllm
    spec = dllm_spec(model)
    ids = tok(PROMPTS[1])["input_ids"]
    runs = {}
    for cache in ("none", "prefix"):
        engine = DllmEngine(model, tok, make_policy("one"), DllmSettings(cache=cache, block_size=8))
        run = BlockDecoding(engine, ids, SamplingParams(max_new_tokens=16))
        with torch.inference_mode():
            run.prefill()
            first = run._forward_block([spec.mask_id] * 8)
            run.context += [11, 12, 13, 14, 15, 16, 17, 18]  # a finished block, carried into the next forward
            run.carry = [11, 12, 13, 14, 15, 16, 17, 18]
            second = run._forward_block([19, 20] + [spec.mask_id] * 6)
        runs[cache] = (first, second)
    for a, b in zip(runs["none"], runs["prefix"], strict=True):
        assert torch.allclose(a, b, atol=1e-9, rtol=0)


def test_uncached_decoding_is_the_model_forward(dllm):
    """The reference itself: block position j is predicted by the HF model's output at j - 1 under the
    block-causal mask."""
    model, tok = dllm
    spec = dllm_spec(model)
    assert spec is not None
    ids = tok(PROMPTS[0])["input_ids"]
    got = decode(model, tok, make_policy("one", order="left"), PROMPTS[0], cache="none", block_size=8)
    # first block, left to right: each token is the argmax at the previous position with masks after it
    seq = list(ids)
    for j in range(8):
        block = seq[len(ids) :] + [spec.mask_id] * (8 - j)
        n_past, n = len(ids), len(block)
        visible = torch.ones(n_past + n, n_past + n, dtype=torch.bool)
        visible[:n_past] = torch.ones(n_past, n_past + n, dtype=torch.bool).tril_()
        bias = torch.zeros(visible.shape, dtype=model.dtype).masked_fill_(
            ~visible, torch.finfo(model.dtype).min
        )
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + block]), attention_mask=bias[None, None]).logits[0]
        row = logits[n_past + j - 1].clone()
        row[spec.mask_id] = -torch.inf
        seq.append(int(row.argmax()))
    assert got[:8] == seq[len(ids) :]


class Checked(Policy):
    """Wraps a policy and checks the contract at every forward: a non-empty subset of the eligible positions,
    and committed tokens never change afterwards."""

    name = "checked"

    def __init__(self, inner: Policy) -> None:
        self.inner = inner
        self.commits: list[dict[int, int]] = []
        self.blocks: list[list[int]] = []
        self.forwards = 0

    def fresh(self) -> Checked:
        return self

    def settings(self) -> dict:
        return {}

    def start_block(self, length: int) -> None:
        self.inner.start_block(length)
        self.commits.append({})

    def block_length(self, view: BlockView) -> int | None:
        return self.inner.block_length(view)

    def select(self, view: BlockView) -> Selection:
        self.forwards += 1
        sel = self.inner.select(view)
        assert sel.commit.any(), "a forward committed nothing"
        assert not (sel.commit & ~view.eligible).any(), "committed a position that was not eligible"
        tokens = view.tokens if sel.tokens is None else sel.tokens
        for j in sel.commit.nonzero()[:, 0].tolist():
            assert j not in self.commits[-1], "a position was committed twice"
            self.commits[-1][j] = int(tokens[j])
        return sel

    def end_block(self, tokens: list[int]) -> None:
        self.blocks.append(tokens)
        for j, t in self.commits[-1].items():
            if j < len(tokens):
                assert tokens[j] == t, "a committed token was rewritten"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("cache", ["dual", "prefix"])
def test_every_policy_commits_at_least_one_and_never_rewrites(dllm, filter_file, name, temperature, cache):
    model, tok = dllm
    checked = Checked(make_policy(name, **policy_options(name, filter_file)))
    engine = DllmEngine(model, tok, checked, DllmSettings(cache=cache, sub_block=4, block_size=8))
    params = SamplingParams(max_new_tokens=24, temperature=temperature, seed=1, ignore_eos=True)
    steps = list(engine.run(tok(PROMPTS[1])["input_ids"], params))
    result = steps[-1].result
    assert result is not None and len(result.token_ids) == 24
    assert result.stats.target_forwards == checked.forwards <= 24
    assert sum(len(b) for b in checked.blocks) == 24
    assert dllm_spec(model).mask_id not in result.token_ids


def test_policies_commit_several_tokens_when_confident(dllm):
    """At threshold 1e-9 every eligible position is committed: a sub-block per forward."""
    model, tok = dllm
    engine = DllmEngine(
        model, tok, make_policy("threshold", threshold=1e-9), DllmSettings(sub_block=4, block_size=8)
    )
    steps = list(engine.run(tok(PROMPTS[0])["input_ids"], SamplingParams(max_new_tokens=16, ignore_eos=True)))
    assert steps[-1].result.stats.target_forwards == 4


def test_adablock_ends_blocks_at_a_confident_line_end(dllm):
    model, tok = dllm
    policy = make_policy("adablock", delimiter_threshold=1e-9, min_block=1)
    engine = DllmEngine(model, tok, policy, DllmSettings(block_size=8))
    newline = torch.zeros(len(engine.delimiters), dtype=torch.bool)
    newline[3] = True
    logits = torch.zeros(8, len(newline))
    tokens = torch.tensor([5, 5, 3, 5, 3, 5, 5, 5])
    conf = torch.tensor([0.9, 0.9, 0.5, 0.9, 0.7, 0.9, 0.9, 0.9])
    view = BlockView(
        logits,
        tokens,
        conf,
        torch.ones(8, dtype=torch.bool),
        torch.ones(8, dtype=torch.bool),
        1,
        lambda x: (x, x),
        newline,
    )
    assert policy.block_length(view) == 5  # the more confident of the two predicted line ends
    no_newline = BlockView(
        logits, torch.full((8,), 5), conf, view.masked, view.eligible, 1, view.pick, newline
    )
    assert policy.block_length(no_newline) is None


def test_localleap_commits_neighbours_of_anchors_only():
    policy = make_policy("localleap", threshold=0.9, relaxed_threshold=0.5, radius=1)
    conf = torch.tensor([0.6, 0.95, 0.6, 0.1, 0.6, 0.6])
    everything = torch.ones(6, dtype=torch.bool)
    view = BlockView(
        torch.zeros(6, 4), torch.zeros(6, dtype=torch.long), conf, everything, everything, 1, lambda x: (x, x)
    )
    assert policy.select(view).commit.tolist() == [True, True, True, False, False, False]


def test_credit_accumulates_over_forwards():
    policy = make_policy("credit", threshold=0.6)
    policy.start_block(1)
    logits = torch.log(torch.tensor([[0.55, 0.45]]))
    one = torch.ones(1, dtype=torch.bool)

    def pick(x):
        p = torch.softmax(x, -1)
        c, t = p.max(-1)
        return t, c

    t, c = pick(logits)
    view = BlockView(logits, t, c, one, one, 1, pick)
    first = policy.select(view)
    assert first.commit.all()  # the floor of one per forward, whatever the credit
    second_conf = pick(logits + 0.7 * torch.log1p(policy.credit * 0.65 + torch.tensor([[0.55**0.5, 0]])))[1]
    policy.select(view)
    assert float(second_conf) > 0.6 > 0.55  # repeated agreement raised the confidence past the threshold


def test_learn2pd_features_and_tracer_labels(dllm):
    model, tok = dllm
    tracer = Tracer()
    engine = DllmEngine(model, tok, tracer, DllmSettings(block_size=8, sub_block=8))
    for _ in engine.run(tok(PROMPTS[0])["input_ids"], SamplingParams(max_new_tokens=16, ignore_eos=True)):
        pass
    x, y = torch.cat(tracer.rows), torch.cat(tracer.labels)
    assert x.shape[1] == len(FEATURES) and len(x) == len(y)
    # with one token per forward: 8 + 7 + ... + 1 eligible rows per block of 8, two blocks
    assert len(y) == 2 * sum(range(1, 9))
    assert 0 < float(y.mean()) <= 1  # committed positions' own rows are labelled final
    ones = torch.ones(4, dtype=torch.bool)
    view = BlockView(
        torch.zeros(4, 10),
        torch.zeros(4, dtype=torch.long),
        torch.full((4,), 0.1),
        ones,
        ones,
        1,
        lambda x: (x, x),
    )
    assert features(view).shape == (4, len(FEATURES))


# --- the API, CLI, server and bench ---------------------------------------------------------------------------


def test_api_stream_matches_generate_and_reports_the_policy(dllm):
    model, tok = dllm
    dec = DllmDecoder(model, tok, "threshold", threshold=0.3, block_size=8)
    stream = dec.stream(PROMPTS[2], max_new_tokens=12)
    text = "".join(stream)
    assert stream.result is not None and text == stream.result.text
    assert dec.generate(PROMPTS[2], max_new_tokens=12).token_ids == stream.result.token_ids
    assert stream.result.stats.drafter["policy"] == "threshold"


def test_a_plain_causal_lm_is_refused():
    model = tiny.model("llama")
    with pytest.raises(InputError, match="not a diffusion LM"):
        DllmDecoder(model, tiny.tokenizer(), "one")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--policy", "nope"], "unknown policy 'nope'"),
        (["--policy", "threshold", "--threshold", "0"], "threshold must be in (0, 1]"),
        (["--policy", "threshold", "--threshold", "1.5"], "threshold must be in (0, 1]"),
        (["--policy", "one", "--threshold", "0.5"], "policy 'one' takes no option 'threshold'"),
        (["--policy", "localleap", "--radius", "0"], "radius must be an integer >= 1"),
        (["--threshold", "0.5"], "--threshold is a diffusion-LM policy setting"),
    ],
)
def test_cli_bad_input_is_one_line(capsys, argv, message):
    assert main(["generate", "x", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_cli_refuses_a_model_that_is_not_a_diffusion_lm(tmp_path, capsys):
    path = tiny.save(tmp_path / "ar")
    assert main(["generate", "x", "--model", str(path), "--policy", "one"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a diffusion LM" in err and "\n" not in err


def test_cli_generates_with_a_saved_diffusion_lm(tmp_path, capsys):
    model, tok = tiny_dllm(dtype=torch.float32)
    model.save_pretrained(tmp_path / "d")
    tok.save_pretrained(tmp_path / "d")
    code = main(["generate", "def f(", "--model", str(tmp_path / "d"), "--json", "--max-new-tokens", "9"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 9 and out["stats"]["drafter"]["policy"] == "threshold"


@pytest.mark.slow
def test_server_answers_with_a_diffusion_lm(dllm):
    from fastapi.testclient import TestClient

    from specdec.server.app import create_app

    model, tok = dllm
    dec = DllmDecoder(model, tok, "threshold", threshold=0.3, block_size=8)
    with TestClient(create_app({"threshold": dec}, model_name="tiny-dllm")) as c:
        r = c.post(
            "/v1/completions",
            json={"model": "tiny-dllm", "prompt": "def f(", "max_tokens": 10, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] == 10
        expected = dec.generate("def f(", max_new_tokens=10).text
        assert body["choices"][0]["text"] == expected


def test_parallel_suite_answers_are_right_and_scoring_works():
    from specdec.bench.dllm import Sample, parallel_suite, python_tokenises, summarise

    suite = parallel_suite(per_kind=3)
    assert {s.kind for s in suite} == {"copy", "reverse", "count", "brackets"}
    for s in suite:
        if s.kind in ("copy", "reverse", "brackets"):
            compile(s.prompt + s.answer, "<task>", "exec")  # the known answer completes valid Python
    assert python_tokenises("x = (1,\n 2)\n")
    assert python_tokenises("x = (1,\n") and python_tokenises('s = """ab\n')  # cut inside: not a defect
    assert not python_tokenises("s = 'ab\nx = 1\n")  # an unterminated string before the last line
    assert not python_tokenises("if x:\n    y = 1\n  z = 2\n")  # a dedent to no outer level
    samples = [
        Sample("t", "hf-vanilla", 2.0, 10, 10, 1.0, 8.0, 10, True),
        Sample("t", "one", 4.0, 10, 10, 0.5, 10.0, 10, True),
        Sample("t", "threshold", 1.0, 10, 4, 0.4, 12.0, 10, False),
    ]
    rows = {r.label: r for r in summarise(samples, ["hf-vanilla", "one", "threshold"])}
    assert rows["threshold"].speedup_vs_one == pytest.approx(4.0)
    assert rows["threshold"].speedup_vs_hf == pytest.approx(2.0)
    assert rows["threshold"].tokens_per_forward == pytest.approx(2.5)
    assert rows["threshold"].bpb_vs_one == pytest.approx(1.2)
    assert rows["threshold"].python_ok == 0.0


@pytest.mark.slow
def test_the_trade_off_plot_is_written(tmp_path):
    from specdec.bench.dllm import Sample, _short, plot, summarise

    assert (
        _short("localleap:threshold=0.7;relaxed_threshold=0.3") == "localleap 0.7/0.3"
        and _short("one") == "one"
    )
    samples = [
        Sample("t", label, 1.0 + i, 10, 10, 1.0, 8.0, 10, True) for i, label in enumerate(["auto", "one"])
    ]
    out = tmp_path / "trade.png"
    plot(summarise(samples, ["auto", "one"]), out, references={"auto"})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("floor", ["left", "confidence"])
def test_the_floor_decides_when_the_rule_picks_nothing(dllm, floor):
    """A threshold no candidate reaches leaves every forward to the floor: `one` in that order."""
    model, tok = dllm
    never = make_policy("threshold", threshold=1.0)
    got = decode(model, tok, never, PROMPTS[0], floor=floor, block_size=8)
    assert got == decode(model, tok, make_policy("one", order=floor), PROMPTS[0], block_size=8)


def test_streams_a_step_per_forward(dllm):
    model, tok = dllm
    engine = DllmEngine(model, tok, make_policy("one"), DllmSettings(block_size=8))
    steps = list(engine.run(tok(PROMPTS[0])["input_ids"], SamplingParams(max_new_tokens=12, ignore_eos=True)))
    assert len(steps) == 12 and all(len(s.token_ids) == 1 for s in steps)  # one token per forward, each shown
    assert steps[-1].result is not None and steps[-1].result.stats.drafter["blocks"] == 2


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_every_policy_keeps_a_constrained_output_a_valid_prefix(dllm, filter_file, name, temperature):
    """Under a constraint a block is committed in order, each position by the grammar state after the ones
    before it: whatever the policy, the output is a prefix the grammar accepts (a whole sentence when it
    ended with an EOS), and at least one position is committed per forward."""
    from specdec import Constraint
    from specdec.grammar import GrammarState

    model, tok = dllm
    policy = make_policy(name, **policy_options(name, filter_file))  # what it selects is cut to the legal run
    engine = DllmEngine(model, tok, policy, DllmSettings(sub_block=4, block_size=8))
    for constraint in (
        Constraint.json_schema(
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
        ),
        Constraint.regex(r"(ab|ba){1,6}-[0-9]{1,3}"),
    ):
        params = SamplingParams(max_new_tokens=24, temperature=temperature, seed=1, constraint=constraint)
        result = list(engine.run(tok(PROMPTS[1])["input_ids"], params))[-1].result
        assert result is not None and result.stats.target_forwards <= len(result.token_ids)
        state = GrammarState(constraint, tok, model.get_output_embeddings().weight.shape[0], {0})
        body = result.token_ids[:-1] if result.stats.finish_reason == "eos" else result.token_ids
        state.advance(body)  # raises on a token outside the grammar
        assert state.complete or result.stats.finish_reason == "length"
