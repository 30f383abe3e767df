"""`specdec train-lm` end to end on a tiny corpus: prepare, train, resume, export a loadable HF directory; the
training loop every trainer shares; the head kinds `specdec train-drafter` knows."""

from __future__ import annotations

import argparse
import json
import sysconfig
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specdec.train.corpus import CorpusConfig, collect_files
from specdec.train.drafter import register
from specdec.train.lm import STREAM_RESUME, TrainConfig, export, prepare, train
from specdec.train.loop import LoopPlan, RunFiles, StepOutput, cosine_lr, open_run, train_run
from specdec.train.recipes import METHODS, RECIPES


@pytest.mark.slow
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


def _toy_run(tmp_path: Path, stop_after: int | None = None) -> tuple[torch.nn.Module, Path]:
    """A linear model through the shared loop, its batches a pure function of the step (as every trainer's)."""
    cfg = TrainConfig(total_tokens=6 * 8, batch_tokens=8, lr=0.1, warmup_fraction=0.2, threads=1)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    tmp_path.mkdir(exist_ok=True)
    files = RunFiles(tmp_path, "toy")
    state, cfg = open_run(files, cfg, STREAM_RESUME, None)

    def step(i: int) -> StepOutput:
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(i))
        return StepOutput(((model(x) - x.sum(1, keepdim=True)) ** 2).mean(), 8)

    plan = LoopPlan(files, 6, cfg, "toy", log_every=1, saved={"config": asdict(cfg)}, stop_after=stop_after)
    train_run(model, step, plan, state)
    return model, files.log


def test_the_shared_loop_resumes_an_interrupted_run_exactly(tmp_path):
    whole, log = _toy_run(tmp_path / "whole")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and all(r["tokens_seen"] > 0 for r in records)
    _toy_run(tmp_path / "cut", stop_after=2)  # "interrupted": the checkpoint is written on the way out
    assert torch.load(tmp_path / "cut" / "toy.ckpt", weights_only=False)["step"] == 2
    resumed, _ = _toy_run(tmp_path / "cut")
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_fraction=0.1)
    lrs = [cosine_lr(cfg, s, 100) for s in range(100)]
    assert lrs[:10] == [(s + 1) / 10 for s in range(10)]
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False)) and 0.1 <= lrs[-1] < 0.11


def test_every_head_kind_has_a_recipe_named_as_its_method():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert METHODS == ("eagle", "medusa", "hydra")  # --method's choices; eagle is the default
    assert all(RECIPES[m].name == m for m in METHODS)
    args = parser.parse_args(["train-drafter", "--out", "x"])
    assert args.method == "eagle"


def _fake_package(root: Path, name: str, license_text: str, files: int = 3) -> None:
    """An installed package as pip leaves it: sources and a *.dist-info with its license."""
    pkg = root / name
    pkg.mkdir(parents=True)
    for i in range(files):
        body = f'"""{name} module {i}."""\n\n' + "".join(
            f"def f{j}(x):\n    return x * {j} + {i}\n\n" for j in range(12)
        )
        (pkg / f"m{i}.py").write_text(body)
    info = root / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\nLicense-Expression: {license_text}\n"
    )
    (info / "top_level.txt").write_text(name + "\n")
    (info / "RECORD").write_text("")


def test_the_accelerator_runs_corpus_and_script_at_tiny_size(tmp_path):
    """The stronger target's run, at tiny size on CPU: a strict corpus keeps permissively licensed packages
    that no evaluation holds out (and records their licenses), the shipped tokenizer is used as it is, the
    train split is cut to its token budget, and training in bf16 autocast stops at its wall-time budget with
    a checkpoint that resumes and exports."""
    from specdec.models.shipped import SHIPPED_DIR

    site = tmp_path / "site"
    _fake_package(site, "okpkg", "MIT")
    _fake_package(site, "gplpkg", "GPL-3.0-or-later")
    _fake_package(site, "toolz", "BSD-3-Clause")  # held out by name
    _fake_package(site, "sympy", "BSD-3-Clause")  # the bench takes prompts from it
    stdlib_json = str(Path(sysconfig.get_paths()["stdlib"]) / "json")
    corpus = CorpusConfig(roots={"stdlib/json": stdlib_json, "site-packages": str(site)}, strict=True)
    work = tmp_path / "work"
    prepare(work, corpus, tokenizer_from=SHIPPED_DIR / "target", max_train_tokens=3000)
    manifest = json.loads((work / "manifest.json").read_text())
    packages = {p.split("/")[1] for p in manifest["packages"] if p.startswith("site-packages/")}
    assert packages == {"okpkg"}
    assert manifest["licenses"] == {"site-packages/okpkg": "MIT"}
    assert {"toolz", "sympy"} <= set(manifest["excluded_packages"])
    assert json.loads((work / "train.json").read_text())["tokens"] == 3000
    shipped = AutoTokenizer.from_pretrained(SHIPPED_DIR / "target")
    assert AutoTokenizer.from_pretrained(work / "tokenizer").get_vocab() == shipped.get_vocab()

    cfg = TrainConfig(size="draft", total_tokens=10_000 * 256, batch_tokens=256, seq_len=64, long_seq_len=128,
                      threads=1, bf16=True, minutes=0.02)  # fmt: skip
    ckpt = train(work, "draft", cfg)
    first = torch.load(ckpt, weights_only=False)["step"]
    assert 0 < first < 10_000  # stopped by the clock, not the schedule
    train(work, "draft", cfg)  # resumes where it stopped
    assert torch.load(ckpt, weights_only=False)["step"] > first
    metrics = export(work, "draft", tmp_path / "out" / "draft")
    assert metrics["heldout_nats_per_token"] > 0
