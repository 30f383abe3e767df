"""MODEL_CARD.md for the shipped pair and for trained drafter heads, from what was recorded and measured.

Numbers come from each model's training_metrics.json (written by export), the corpus manifest, and fresh
measurements on this machine: per-token forward latency (1 token after a 256-token prefix, median of repeats)
and, for the pair, a few greedy completions.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

from specdec.models.loading import load_causal_lm
from specdec.train.head_corpus import DataConfig
from specdec.train.head_recipe import HeadRecipe, draft_vocab_size

PROMPTS = [
    "def binary_search(items, target):\n",
    "class LRUCache:\n    def __init__(self, capacity):\n",
    'import os\n\n\ndef read_lines(path):\n    """Return the lines of a text file."""\n',
]


def forward_latency_ms(model, prefix: int = 256, repeats: int = 30) -> float:
    from specdec.runtime.hf import ModelRunner

    runner = ModelRunner(model)
    ids = list(range(1, prefix + 1))
    times = []
    with torch.inference_mode():
        runner.start(ids, prefix + repeats + 8)
        for i in range(repeats + 3):
            t = time.perf_counter()
            runner.extend([5 + i])
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times[3:])


def write_card(shipped: Path, manifest_path: Path) -> str:
    from specdec.api import SpecDecoder

    manifest = json.loads(manifest_path.read_text())
    rows, completions = [], []
    models = {}
    for role in ("target", "draft"):
        metrics = json.loads((shipped / role / "training_metrics.json").read_text())
        model, tok = load_causal_lm(str(shipped / role), role)
        models[role] = (model, tok)
        cfg = model.config
        tc = metrics["train_config"]
        rows.append(
            f"| {role} | {metrics['parameters'] / 1e6:.2f}M | {cfg.num_hidden_layers} x {cfg.hidden_size} "
            f"(heads {cfg.num_attention_heads}, MLP {cfg.intermediate_size}) | {metrics['tokens_seen'] / 1e6:.1f}M "
            f"| {metrics['steps']} | {metrics['train_seconds'] / 3600:.2f} h | {tc['lr']} | "
            f"{metrics['heldout_nats_per_token']:.3f} | {metrics['heldout_bits_per_byte']:.3f} | "
            f"{forward_latency_ms(model):.1f} ms |"
        )
    target, tok = models["target"]
    dec = SpecDecoder(target, tok, method="vanilla")
    for prompt in PROMPTS:
        out = dec.generate(prompt, max_new_tokens=48)
        completions.append(f"```python\n{prompt}{out.text}\n```")
    pkgs = sorted(manifest["packages"].items(), key=lambda kv: -kv[1]["bytes"])
    pkg_lines = ", ".join(f"{name} ({v['files']})" for name, v in pkgs[:25])
    tc = json.loads((shipped / "target" / "training_metrics.json").read_text())["train_config"]
    changes = []
    for role in ("target", "draft"):
        for c in json.loads((shipped / role / "training_metrics.json").read_text()).get("budget_changes", []):
            b = c["budget_changed"]
            changes.append(
                f"The {role}'s token budget was changed from {b['from'] / 1e6:g}M to {b['to'] / 1e6:g}M when "
                f"resumed at step {c['step']}; the cosine decay was recomputed from there."
            )
    card = f"""# The shipped code models

A target/draft pair of Llama-architecture causal LMs trained from scratch on Python source, so that every
specdec command works offline with no `--model`. Standard Hugging Face directories (`target/`, `draft/`:
config.json, model.safetensors in bfloat16, tokenizer files, generation_config.json); specdec loads them as
float32 (faster than bf16 on CPUs without bf16 units). Both share one byte-level BPE tokenizer (8192 tokens,
`<|endoftext|>` = EOS, no chat template). Context: 2048 positions.

Built with `specdec train-lm` (resumable; see `src/specdec/train/`).

## Corpus
Python files visible to the training interpreter: its standard library (test suite included) and the
pure-Python sources of the installed packages, files of 200 B–400 kB, exact duplicates removed, at most 8 MB per
top-level package, in sorted order. {manifest["files"]} files, {manifest["bytes"] / 1e6:.1f} MB. Held out:
{manifest["held_out_rule"]} over the file's name (e.g. `stdlib/json/decoder.py`) — {len(manifest["held_out_files"])}
files, never trained on; the bench tasks are built from them. Largest packages (files): {pkg_lines}.
The exact per-package counts and the held-out list are in `corpus_manifest.json`.

## Training and results
AdamW (betas 0.9/0.95, weight decay 0.1), cosine schedule with {tc["warmup_fraction"]:.0%} warmup to
{tc["min_lr_ratio"]:.0%} of peak, {tc["batch_tokens"]} tokens per step, windows of {tc["seq_len"]} tokens
(the last {tc["long_fraction"]:.0%} of steps on {tc["long_seq_len"]}-token windows so 2k contexts work),
fp32 on 2 CPU cores ({platform.processor() or platform.machine()}; bf16 autocast measured slower there: no bf16
units). Held-out loss over the first 200k tokens of the held-out stream; bits/byte = nats/token / ln 2 x
tokens/byte of the held-out text. Latency: one forward of 1 token after a 256-token prefix, float32, this machine.
{" ".join(changes)}

| model | params | layers x width | tokens seen | steps | train time | peak lr | held-out nats/token | bits/byte | forward |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

## Greedy completions (target)
{chr(10).join(completions)}
"""
    (shipped / "MODEL_CARD.md").write_text(card)
    return card


# ----------------------------------------------------------------------------------------------------------
# A trained drafter head's card (`specdec train-drafter`)
# ----------------------------------------------------------------------------------------------------------


def head_card(m: dict, data: DataConfig, kind: HeadRecipe) -> str:
    """MODEL_CARD.md of an exported head, from its training_metrics.json (`m`) and the data settings."""
    lat = m["latency_ms"]
    ratio = lat["head_step_1"] / lat["target_forward_1"]
    windows = m["feature_windows"]["train"] * m["seq_len"]
    return f"""# {kind.title} for {m["target"]}

{kind.card_intro(m)}

## Data
{m["data"]}
The target was run once over {m["feature_windows"]["train"]:,} windows of {m["seq_len"]} tokens
({windows / 1e6:.2f}M tokens, random distinct windows) and its aux hidden states, final hidden state and top token
cached to disk (float16 memmaps; {m["feature_seconds"] / 60:.0f} min for all feature sets). Soft labels = the
target's lm_head on the cached final hidden state, restricted to the draft vocabulary (the {draft_vocab_size(m):,}
tokens the target itself predicts most often on those windows).

{_head_training(m, kind, windows)}

![loss](loss.png)

{_head_acceptance(m, data, kind)}

## Cost
{kind.card_cost(lat)}; the target's forward of 1 token after 256: {lat["target_forward_1"]:.2f} ms (1-entry step = {ratio:.0%}
of it), float32, {lat["threads"]} thread(s), this machine.

## Reproduce
```bash
{m["command"]}
```
"""


def _head_training(m: dict, kind: HeadRecipe, windows: int) -> str:
    tc, lat = m["train_config"], m["latency_ms"]
    changes = " ".join(
        f"The token budget was changed from {c['budget_changed']['from']:,} to {c['budget_changed']['to']:,} "
        f"at step {c['step']} (the cosine schedule was recomputed from there)."
        for c in m["budget_changes"]
    )
    return f"""## Training
{m["tokens_seen"]:,} tokens ({m["tokens_seen"] / windows:.2f} epochs), {m["steps"]:,} optimizer steps of
{tc["batch_seqs"]} windows, {m["train_seconds"] / 3600:.2f} h on {lat["threads"]} CPU thread(s). AdamW (betas
0.9/0.95, weight decay {tc["weight_decay"]}), peak lr {tc["lr"]}, cosine to {tc["min_lr_ratio"]:.0%} after
{tc["warmup_fraction"]:.0%} warmup, gradient clipping {tc["grad_clip"]}.
{kind.card_objective(m)} {changes}"""


def _head_acceptance(m: dict, data: DataConfig, kind: HeadRecipe) -> str:
    def row(label: str, e: dict) -> str:
        cells = " | ".join(f"{a:.3f}" for a in e["acceptance_by_depth"])
        return f"| {label} | {e['anchors']:,} | {cells} | {e['tau']:.2f} |"

    depth = m["acceptance"]["greedy"]["depth"]
    head_cols = " | ".join(f"depth {j}" for j in range(1, depth + 1))
    return f"""## Held-out acceptance (teacher-forced greedy chain drafting)
At every anchor position the head drafts {depth} tokens {kind.drafting}; a draft counts while it equals the target's
greedy token. *greedy*: {data.greedy_prompts} prompts of {data.greedy_prompt_len} tokens from held-out files,
continued {data.greedy_new_tokens} tokens by the target's own greedy decoding (exactly what greedy speculative
decoding sees). *real text*: {data.heldout_windows} held-out windows of {data.seq_len} tokens; a draft is only
counted while the text itself follows the target's greedy choice, so this is a lower bound. Columns: fraction of
anchors with at least j tokens accepted; tau = 1 + their sum = expected tokens per target forward with a chain of
depth {depth} (a tree does better).

| text | anchors | {head_cols} | tau |
|---|---|{"---|" * depth}---|
{row("greedy (target's own continuations)", m["acceptance"]["greedy"])}
{row("real held-out text", m["acceptance"]["heldout"])}"""
