"""`specdec train-lm` end to end on a tiny corpus: prepare, train, resume, export a loadable HF directory."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specdec.train.corpus import CorpusConfig, collect_files
from specdec.train.lm import TrainConfig, export, prepare, train


def test_prepare_train_resume_export(tmp_path):
    # The stdlib's json package: small, and its encoder.py is a held-out file (sha1 split), so both splits exist.
    corpus = CorpusConfig(roots={"stdlib/json": str(Path(sysconfig.get_paths()["stdlib"]) / "json")})
    files = collect_files(corpus)
    assert any(f.held_out for f in files) and any(not f.held_out for f in files)
    work = tmp_path / "work"
    prepare(work, corpus, tokenizer_sample_bytes=200_000)
    manifest = json.loads((work / "manifest.json").read_text())
    assert manifest["held_out_files"] == [f.name for f in files if f.held_out]

    cfg = TrainConfig(
        size="draft", total_tokens=2 * 512, batch_tokens=512, seq_len=128, long_seq_len=256, threads=1
    )
    ckpt = train(work, "draft", cfg)
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 2 and state["tokens_seen"] == 2 * 512
    # Resuming keeps the recorded schedule: a different budget on the command line does not extend it.
    train(work, "draft", TrainConfig(size="draft", total_tokens=100 * 512, batch_tokens=512, threads=1))
    assert torch.load(ckpt, weights_only=False)["step"] == 2
    # An explicit new budget moves the end of the schedule, and the log records it for the model card.
    train(work, "draft", cfg, new_budget=3 * 512)
    assert torch.load(ckpt, weights_only=False)["step"] == 3

    out = tmp_path / "export" / "draft"
    metrics = export(work, "draft", out)
    assert metrics["steps"] == 3 and metrics["heldout_nats_per_token"] > 0
    assert metrics["budget_changes"] == [{"step": 2, "budget_changed": {"from": 2 * 512, "to": 3 * 512}}]
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.bfloat16  # stored in 16 bits
    assert tok.decode(tok("def f(x):\n    return x\n")["input_ids"]) == "def f(x):\n    return x\n"
    assert tok.convert_ids_to_tokens(tok("):\n")["input_ids"])[-1] == "Ċ"  # a newline is its own token
