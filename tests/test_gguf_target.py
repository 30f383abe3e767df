"""A GGUF file as the target: the tests write tiny GGUF files (float32, and Q8_0 through llama.cpp's quantizer),
then check that greedy output equals llama-cpp-python's own plain loop over the same file for every method
that can run on it, that sampling draws from llama.cpp's distribution, that the file's tokenizer is llama.cpp's,
and that what cannot work is refused in one line."""

from __future__ import annotations

import json

import pytest
import scipy.stats
import torch

from specdec import SpecDecoder
from specdec.cli import main
from specdec.errors import InputError
from specdec.models.gguf_target import GGUFTarget, LlamaCppTokenizer
from specdec.models.loading import load_tokenizer
from specdec.models.shipped import SHIPPED_DIR
from specdec.runtime.gguf import to_gguf

import tiny

PROMPT = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n\ndef add(a, b):\n"
TOKEN_METHODS = ["vanilla", "auto", "pld", "suffix", "recycle", "merge", "lookahead"]
Q8_0 = 7  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q8_0
CHAT_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant:\n{% endif %}"
)


def _quantize(source, target, ftype: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) == 0


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{"f32": path, "q8_0": path}: a tiny Llama with the shipped tokenizer (so prompts are real text), its
    greedy continuations repetitive enough that copy drafters get accepted."""
    folder = tmp_path_factory.mktemp("gguf")
    tok = load_tokenizer(str(SHIPPED_DIR / "target"))
    tok.chat_template = CHAT_TEMPLATE  # written into the file (the shipped tokenizer has none)
    model = tiny.model("llama", seed=8, vocab_size=len(tok), dtype=torch.float32)  # seed 8: it loops
    f32 = folder / "tiny-f32.gguf"
    to_gguf(model, tok, f32)
    q8 = folder / "tiny-q8_0.gguf"
    _quantize(f32, q8, Q8_0)
    hf = folder / "hf"  # the model as Hugging Face weights (a draft of the file's vocabulary)
    model.save_pretrained(hf)
    tok.save_pretrained(hf)
    other = folder / "other-vocab.gguf"  # a draft whose vocabulary is not the target's
    to_gguf(tiny.model("llama", seed=1, dtype=torch.float32), tiny.tokenizer(), other)
    return {"f32": f32, "q8_0": q8, "hf-dir": hf, "other": other, "hf": model}


def _llamacpp_greedy(path, text: str, n: int) -> list[int]:
    """llama-cpp-python's own plain greedy loop over the file (its default context settings)."""
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=512, n_threads=1, verbose=False)
    ids = llm.tokenize(text.encode(), add_bos=llm._model.add_bos_token(), special=True)
    out: list[int] = []
    for token in llm.generate(ids, temp=0.0, top_k=1):
        out.append(token)
        if len(out) == n:
            return out
    return out


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_plain_decoding_equals_llamacpps_own_loop(files, kind):
    dec = SpecDecoder.from_pretrained(str(files[kind]), method="vanilla")
    assert isinstance(dec.model, GGUFTarget) and dec.engine.runtime.name == "llamacpp"
    out = dec.generate(PROMPT, max_new_tokens=24, ignore_eos=True)
    assert out.token_ids == _llamacpp_greedy(files[kind], PROMPT, 24)


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
@pytest.mark.parametrize("method", TOKEN_METHODS[1:])
def test_every_token_drafter_equals_llamacpps_own_loop(files, kind, method):
    """Drafting, tree scoring and acceptance over the file's own forward (quantized too) decode what
    llama.cpp's loop decodes."""
    want = _llamacpp_greedy(files[kind], PROMPT, 32)
    dec = SpecDecoder.from_pretrained(str(files[kind]), method=method)
    out = dec.generate(PROMPT, max_new_tokens=32, ignore_eos=True)
    assert out.token_ids == want
    assert out.stats.runtime == "llamacpp"


def test_drafts_are_accepted_on_the_file(files):
    """The copy drafters do speculate here (so the equality above covers accepted trees, not plain steps)."""
    out = SpecDecoder.from_pretrained(str(files["f32"]), method="pld").generate(
        PROMPT, max_new_tokens=32, ignore_eos=True
    )
    assert out.stats.mean_accepted_tokens > 1.2


def test_seeded_sampling_draws_from_llamacpps_distribution(files):
    """vanilla's first sampled token follows softmax(llama.cpp's top-8 logits / T) (chi-square), and a drafting
    method's seeded tokens are vanilla's (one draw per emitted token, in order), so its distribution is too."""
    path = files["f32"]
    target = GGUFTarget(path)
    tok = LlamaCppTokenizer(target)
    ids = tok(PROMPT)["input_ids"]
    from specdec.runtime.llamacpp import LlamaCppRunner

    runner = LlamaCppRunner(target.shared)
    logits = runner.start(ids, 64).double()
    runner.free()
    top = logits.topk(8).indices.tolist()  # sampling at top-k 8: the target's p is these, renormalised
    p = torch.softmax(logits[top] / 0.7, dim=-1)
    draws = 600
    vanilla = SpecDecoder(target, tok, "vanilla")
    counts = [0] * len(top)
    for seed in range(draws):
        params = {"max_new_tokens": 1, "temperature": 0.7, "top_k": 8, "seed": seed, "ignore_eos": True}
        counts[top.index(vanilla.generate(ids, **params).token_ids[0])] += 1
    expected = (p * draws).tolist()
    assert min(expected) > 5, expected  # the test's own validity
    assert scipy.stats.chisquare(counts, expected).pvalue > 1e-3, (counts, expected)
    pld = SpecDecoder(target, tok, "pld")
    for seed in range(4):
        params = {"max_new_tokens": 16, "temperature": 1.0, "seed": seed, "ignore_eos": True}
        assert pld.generate(ids, **params).token_ids == vanilla.generate(ids, **params).token_ids


def test_the_tokenizer_is_llamacpps_and_round_trips(files):
    """Text becomes the ids llama.cpp gives it (special tokens in the text parsed as such), and decodes back."""
    from llama_cpp import Llama

    target = GGUFTarget(files["f32"])
    tok = LlamaCppTokenizer(target)
    llm = Llama(str(files["f32"]), vocab_only=True, verbose=False)
    for text in (PROMPT, "naïve café ✓ — 日本語\n\tx<|endoftext|>y", " leading space"):
        ids = tok(text)["input_ids"]
        assert ids == llm.tokenize(text.encode(), add_bos=False, special=True)
        assert tok.decode(ids) == text
    assert tok.eos_token_id in target.generation_config.eos_token_id
    assert tok.decode([tok.eos_token_id], skip_special_tokens=True) == ""


@pytest.mark.parametrize("method", ["eagle", "layerskip"])
def test_methods_that_need_more_than_the_file_are_refused_in_one_line(files, method):
    with pytest.raises(InputError) as err:
        SpecDecoder.from_pretrained(str(files["f32"]), method=method)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
@pytest.mark.parametrize("draft", ["f32", "hf-dir"])
def test_a_draft_model_drafts_for_the_file(files, kind, draft):
    """`draft` with a GGUF draft file (llama.cpp runs both) or a Hugging Face draft (native) of the file's
    vocabulary decodes what llama.cpp's loop decodes. The draft here is the file's own model, so its drafts
    are mostly accepted and the equality covers verified chains (of a fixed length: a draft as costly as the
    target pays for one draft a step by the break-even rule)."""
    dec = SpecDecoder.from_pretrained(
        str(files[kind]), method="draft", draft=str(files[draft]), break_even=False, num_tokens=4
    )
    assert isinstance(dec.drafter.draft, GGUFTarget) == (draft == "f32")
    out = dec.generate(PROMPT, max_new_tokens=32, ignore_eos=True)
    assert out.token_ids == _llamacpp_greedy(files[kind], PROMPT, 32)
    assert out.stats.mean_accepted_tokens > 2.5


def test_a_draft_of_another_vocabulary_is_refused_in_one_line(files, capsys):
    with pytest.raises(InputError, match="vocabularies differ"):
        SpecDecoder.from_pretrained(str(files["f32"]), method="draft", draft=str(files["other"]))
    code, _, err = _cli(capsys, "generate", "x", "--model", files["f32"], "--method", "draft", "--draft",
                        files["other"])  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1 and "vocabularies differ" in err, err


def test_the_file_returns_the_final_hidden_state_and_embeddings_heads_read(files):
    """medusa and hydra heads trained on a Hugging Face model read its final hidden state (and hydra its token
    embeddings): llama.cpp's for the same weights are the same, so such heads fit the file."""
    hf = files["hf"]
    target = GGUFTarget(files["f32"])
    ids = LlamaCppTokenizer(target)(PROMPT)["input_ids"]
    from specdec.runtime.llamacpp import LlamaCppRunner

    runner = LlamaCppRunner(target.shared)
    runner.reset(64)
    layer = target.config.num_hidden_layers
    got = runner.prefill(ids, layers=(layer,)).hidden[layer]
    runner.free()
    with torch.no_grad():
        want = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)  # llama.cpp keeps a float16 cache
    assert torch.equal(target.get_input_embeddings().weight, hf.get_input_embeddings().weight)


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
@pytest.mark.parametrize("method", ["medusa", "hydra"])
def test_heads_draft_for_the_file(files, kind, method):
    """Heads for the model the file holds draft on its final hidden state; output is llama.cpp's loop's."""
    target = GGUFTarget(files[kind])
    heads = tiny.untrained_head(method, files["hf"])
    dec = SpecDecoder(target, LlamaCppTokenizer(target), method, head=heads, max_nodes=8)
    out = dec.generate(PROMPT, max_new_tokens=32, ignore_eos=True)
    assert out.token_ids == _llamacpp_greedy(files[kind], PROMPT, 32)
    assert out.stats.draft_nodes >= out.stats.target_forwards  # every step scored drafted nodes


def test_other_runtimes_and_dtypes_are_refused(files):
    target = GGUFTarget(files["f32"])
    tok = LlamaCppTokenizer(target)
    for runtime in ("native", "transformers"):
        with pytest.raises(InputError, match="llama.cpp's forward only"):
            SpecDecoder(target, tok, "pld", runtime=runtime)
    with pytest.raises(InputError, match="does not apply to a GGUF file"):
        SpecDecoder.from_pretrained(str(files["f32"]), dtype="bfloat16")


def test_a_request_longer_than_the_context_is_refused(files):
    target = GGUFTarget(files["f32"], context=64)
    dec = SpecDecoder(target, LlamaCppTokenizer(target), "pld")
    with pytest.raises(InputError, match="context of 64 positions"):
        dec.generate(PROMPT * 4, max_new_tokens=8)


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generates_from_a_gguf_file_and_refuses_bad_ones_in_one_line(files, tmp_path, capsys):
    code, out, err = _cli(
        capsys, "generate", PROMPT, "--model", files["q8_0"], "--max-new-tokens", "12", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["token_ids"] == _llamacpp_greedy(files["q8_0"], PROMPT, 12)
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(files["f32"].read_bytes()[:4096])  # the magic is there, the rest cut off
    missing = tmp_path / "missing.gguf"
    for path, says in ((corrupt, "cannot load"), (missing, "not found")):
        code, _, err = _cli(capsys, "generate", "x", "--model", path)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and says in lines[0], err


def test_bench_runs_llamacpps_loops_beside_every_method_with_the_check_against_them(files, tmp_path, capsys):
    """`specdec bench --model x.gguf`: llama.cpp's plain loop on the file is the baseline (speedups over it,
    outputs checked against it), its prompt lookup and the specdec methods the file can serve run beside."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": PROMPT[: 20 + 9 * i]}) for i in range(2)) + "\n")
    out = tmp_path / "bench.json"
    code, text, err = _cli(
        capsys, "bench", "--model", files["f32"], "--prompts-file", prompts, "--max-new-tokens", 16,
        "--warmup", 0, "--json", out,
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["settings"]["baseline"] == "llamacpp"
    assert data["settings"]["methods"][0] == "llamacpp"
    assert {"llamacpp-lookup", "auto", "vanilla", "pld", "suffix"} <= set(data["settings"]["methods"])
    assert not {"hf-vanilla", "eagle", "layerskip", "draft"} & set(data["settings"]["methods"])
    assert {"medusa", "hydra"} <= set(data["skipped_methods"])  # the shipped heads do not fit this model
    assert all(row["lossless"] for row in data["overall"]), data["mismatches"]
    assert data["env"]["model"]["class"] == "GGUFTarget" and data["env"]["model"]["file_bytes"] > 0
    assert "llamacpp" in text


def test_bench_refuses_transformers_methods_on_a_gguf_file(files, capsys):
    code, _, err = _cli(capsys, "bench", "--model", files["f32"], "--methods", "hf-vanilla,pld")
    assert code == 2 and "has no transformers model" in err and len(err.strip().splitlines()) == 1


def test_quantize_converts_once_and_the_file_becomes_the_target(tmp_path, monkeypatch, caplog):
    """--quantize q8_0: the Hugging Face model is written as GGUF and quantized by llama.cpp, cached (the
    second load finds it), said in one line, and what decodes is then that file, as llama.cpp decodes it."""
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    model_dir = tiny.save(tmp_path / "tiny", seed=8)
    with caplog.at_level("WARNING", logger="specdec"):
        dec = SpecDecoder.from_pretrained(str(model_dir), method="pld", quantize="q8_0")
    assert isinstance(dec.model, GGUFTarget) and "Q8_0" in dec.model.description
    cached = list((tmp_path / "cache" / "gguf").glob("*-q8_0.gguf"))
    assert cached == [dec.model.path]
    notes = [r.getMessage() for r in caplog.records if "the target is now" in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0] and str(dec.model.path) in notes[0]
    mtime = cached[0].stat().st_mtime_ns
    again = SpecDecoder.from_pretrained(str(model_dir), method="vanilla", quantize="q8_0")
    assert again.model.path == cached[0] and cached[0].stat().st_mtime_ns == mtime  # not converted again
    text = "x = 1\ny = 2\nx = 1\n"
    want = _llamacpp_greedy(cached[0], text, 16)
    assert dec.generate(text, max_new_tokens=16, ignore_eos=True).token_ids == want
    with pytest.raises(InputError, match="already quantized"):
        SpecDecoder.from_pretrained(str(cached[0]), quantize="q8_0")


def test_the_server_completes_and_chats_through_the_files_own_template(files):
    """A GGUF target served: completions are generate()'s, and a chat is rendered by the file's chat template
    (written into the file from the tokenizer's) before decoding."""
    from fastapi.testclient import TestClient

    from specdec.server.app import create_app

    target = GGUFTarget(files["f32"])
    tok = LlamaCppTokenizer(target)
    assert tok.chat_template
    dec = SpecDecoder(target, tok, "pld")
    chat = [{"role": "user", "content": "def add(a, b):"}]
    rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == "### user:\ndef add(a, b):\n### assistant:\n"
    want_chat = dec.generate(tok(rendered, add_special_tokens=False)["input_ids"], max_new_tokens=8)
    want_text = dec.generate(PROMPT, max_new_tokens=8)
    with TestClient(create_app(dec)) as c:
        r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want_text.text
        r = c.post("/v1/chat/completions", json={"messages": chat, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == want_chat.text


@pytest.mark.parametrize("method", ["pld", "auto"])
def test_a_constraint_on_the_file_masks_with_its_own_tokenizer(files, method):
    """Under a regex, each method's output on the file is constrained vanilla's on it, and matches."""
    import re

    from specdec import Constraint

    target = GGUFTarget(files["f32"])
    tok = LlamaCppTokenizer(target)
    constraint = Constraint.regex(r"(def|return) [a-z]{1,8}\(\)")
    want = SpecDecoder(target, tok, "vanilla").generate(PROMPT, max_new_tokens=24, constraint=constraint)
    got = SpecDecoder(target, tok, method).generate(PROMPT, max_new_tokens=24, constraint=constraint)
    assert got.token_ids == want.token_ids
    text = tok.decode(got.token_ids, skip_special_tokens=True)
    assert re.fullmatch(r"(def|return) [a-z]{1,8}\(\)", text) or got.stats.finish_reason == "length", text
