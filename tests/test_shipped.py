"""The shipped code models: load by name offline, decode deterministically, and still model held-out code.

The loss bound catches a broken re-export (wrong dtype round trip, shuffled weights, a tokenizer that no longer
matches) without re-running training: it is the exported target's measured loss plus a small margin.
"""

from __future__ import annotations

import json
import math
from importlib import resources

import pytest
import torch

from specdec import SpecDecoder
from specdec.models.loading import check_same_vocabulary, load_causal_lm

# Measured on the exported models (nats/token over SAMPLE_TOKENS tokens of the first `long` bench prompt, a
# held-out file): target 2.282, draft 2.934. The bound leaves room for float noise, not for a broken model.
TARGET_BOUND = 2.33
SAMPLE_TOKENS = 1024


@pytest.fixture(scope="module")
def shipped(monkeypatch_module):
    target, tok = load_causal_lm("default", "target")
    draft, draft_tok = load_causal_lm("default", "draft")
    return target, draft, tok, draft_tok


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield mp


def _sample_ids(tok) -> torch.Tensor:
    path = resources.files("specdec.bench") / "tasks" / "long.jsonl"
    text = json.loads(path.read_text().splitlines()[0])["prompt"]
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :SAMPLE_TOKENS]
    assert ids.shape[1] == SAMPLE_TOKENS
    return ids


def _greedy(target, tok, prompt: str, n: int) -> list[int]:
    """transformers' own greedy continuation: the reference every lossless method must reproduce."""
    ids = tok(prompt, return_tensors="pt").input_ids
    out = target.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=tok.eos_token_id,
    )
    return out[0, ids.shape[1] :].tolist()


@torch.no_grad()
def _loss(model, ids: torch.Tensor) -> float:
    logits = model(input_ids=ids).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:]).item()


def test_load_by_name_offline(shipped):
    target, draft, tok, draft_tok = shipped
    assert target.dtype == torch.float32  # stored in bf16, upcast for CPU speed
    assert type(target).__name__ == type(draft).__name__ == "LlamaForCausalLM"
    n_target = sum(p.numel() for p in target.parameters())
    n_draft = sum(p.numel() for p in draft.parameters())
    assert n_draft * 5 < n_target  # the draft must be cheap against the target
    check_same_vocabulary(target, tok, draft, draft_tok)
    assert tok.eos_token_id is not None and target.generation_config.eos_token_id == tok.eos_token_id


def test_heldout_loss_under_recorded_bound(shipped):
    target, draft, tok, _ = shipped
    ids = _sample_ids(tok)
    target_loss, draft_loss = _loss(target, ids), _loss(draft, ids)
    assert math.isfinite(target_loss) and target_loss < TARGET_BOUND, target_loss
    assert target_loss < draft_loss - 0.2, (target_loss, draft_loss)


def test_greedy_decode_is_deterministic_and_lossless(shipped):
    target, draft, tok, _ = shipped
    prompt = "import os\n\n\ndef read_lines(path):\n    "
    reference = _greedy(target, tok, prompt, 40)
    outs = []
    for method, kwargs in [("vanilla", {}), ("vanilla", {}), ("pld", {}), ("draft", {"draft_model": draft})]:
        dec = SpecDecoder(target, tok, method=method, **kwargs)
        outs.append(dec.generate(prompt, max_new_tokens=40).token_ids)
    assert all(o == reference for o in outs), (reference, outs)
    assert tok.decode(reference).strip()  # it writes something, not only end-of-text
    # By name, as the CLI does: no model means the shipped target, and the draft method pairs it with its draft.
    dec = SpecDecoder.from_pretrained(method="draft")
    assert dec.generate(prompt, max_new_tokens=40).token_ids == reference


@pytest.mark.parametrize("method", ["eagle", "medusa", "hydra"])
def test_shipped_heads_load_by_name_and_decode_losslessly(shipped, method):
    """No --draft: each head method finds the head trained for the shipped target, drafts, and its greedy output
    is generate()'s."""
    target, _, tok, _ = shipped
    prompt = "def parse_args(argv):\n    parser = argparse.ArgumentParser()\n    "
    reference = _greedy(target, tok, prompt, 32)
    dec = SpecDecoder(target, tok, method=method)
    assert dec.engine.drafter.config.head is None  # the shipped head, found by name
    assert dec.generate(prompt, max_new_tokens=32).token_ids == reference


def test_shipped_diffusion_lm_loads_by_name_and_decodes(monkeypatch_module):
    """default-dllm: the target converted to a block-diffusion LM; its committed-token path is still a good
    AR model of held-out code, and its policies decode."""
    from specdec.dllm.api import DllmDecoder
    from specdec.dllm.model import MASK_TOKEN, dllm_spec

    model, tok = load_causal_lm("default-dllm")
    spec = dllm_spec(model)
    assert spec is not None and tok.convert_tokens_to_ids(MASK_TOKEN) == spec.mask_id
    loss = _loss(model, _sample_ids(tok))
    assert math.isfinite(loss) and loss < TARGET_BOUND + 0.3, loss  # fine-tuning kept it close to the target
    prompt = "import os\n\n\ndef read_lines(path):\n    "
    for policy in ("one", "threshold", "learn2pd"):
        out = DllmDecoder(model, tok, policy).generate(prompt, max_new_tokens=32)
        assert len(out.token_ids) >= 1 and out.text.strip()
        assert spec.mask_id not in out.token_ids
