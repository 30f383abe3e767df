"""`specdec train-drafter`: self-distil a drafter head from the target's own hidden states and distributions.

Pipeline, every stage resumable from what the working directory already holds (re-run the same command):

1. corpus (`head_corpus`): token ids of the training text. For the shipped target, `specdec train-lm --stage
   prepare` with the shipped tokenizer; for a user's model, `--data` text files with the model's tokenizer.
2. features (`features`): the target is run ONCE over fixed-length windows of the corpus; its auxiliary and
   final hidden states and top tokens go to numpy memmaps, so epochs never re-run the target.
3. training (`head_train`, on the shared loop `loop`): AdamW, cosine schedule, the head kind's training
   forward (`recipes`: EAGLE-3's training-time test, Medusa's or Hydra's heads), gradient clipping, atomic
   checkpoints.
4. export (here): the head in its kind's layout (EAGLE-3's is the one vLLM/SGLang load, see
   specdec.heads.eagle3), a loss curve and a card (`card`) with held-out acceptance by depth and tau
   (`evaluate`).

The pipeline's pieces are importable from here too (their home modules are named above).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from specdec.errors import InputError
from specdec.train.card import head_card
from specdec.train.evaluate import chain_acceptance, evaluate_head, latencies_ms
from specdec.train.features import FeatureSpec, FeatureStore, extract, prepare_features, target_features
from specdec.train.head_corpus import (
    DataConfig,
    describe_data,
    greedy_windows,
    heldout_windows,
    load_stream,
    prepare_corpus,
    train_windows,
)
from specdec.train.head_recipe import HeadTrainConfig
from specdec.train.head_train import build_head, load_trained, train_head
from specdec.train.loop import RunFiles, plot_loss, run_metrics
from specdec.train.recipes import METHODS, RECIPES, recipe
from specdec.train.teacher import Teacher, choose_draft_vocab, ttt_losses

__all__ = [
    "METHODS",
    "RECIPES",
    "DataConfig",
    "FeatureSpec",
    "FeatureStore",
    "HeadTrainConfig",
    "Teacher",
    "build_head",
    "chain_acceptance",
    "choose_draft_vocab",
    "export_head",
    "extract",
    "greedy_windows",
    "heldout_windows",
    "load_stream",
    "load_trained",
    "prepare_corpus",
    "prepare_features",
    "register",
    "run",
    "target_features",
    "train_head",
    "train_windows",
    "ttt_losses",
]

DEFAULT_TOKENS = 2_000_000


def export_head(
    workdir: Path, target, stores: dict, out_dir: Path, data: DataConfig, about: dict, method: str = "eagle"
) -> dict:
    """bf16 safetensors head + training_metrics.json + loss.png + MODEL_CARD.md in out_dir; returns metrics.
    Acceptance and latency are measured on the exported weights as loaded back (float32), as users run them."""
    kind = recipe(method)
    head, state = load_trained(workdir, target, stores["train"], method)
    kind.save(head, out_dir, torch.bfloat16)
    shipped = kind.load(out_dir, target)
    files = RunFiles(workdir, method)
    depth = kind.eval_depth(HeadTrainConfig(**state["train_config"]))
    metrics = {
        "method": method,
        **run_metrics(state, shipped, files, "train_config"),
        "feature_seconds": sum(s.seconds for s in stores.values()),
        "feature_windows": {k: s.limit for k, s in stores.items()},
        "seq_len": stores["train"].spec.seq_len,
        "head_config": shipped.config.to_json(),
        "acceptance": evaluate_head(shipped, stores, depth, data.greedy_prompt_len, method),
        "latency_ms": latencies_ms(shipped, target, kind),
        **about,
    }
    (out_dir / "training_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    title = f"{kind.title}: training loss"
    curve = plot_loss(files.log, out_dir / "loss.png", title, kind.curve, "soft cross-entropy (nats)")
    metrics["loss_png"] = curve
    (out_dir / "MODEL_CARD.md").write_text(head_card(metrics, data, kind))
    return metrics


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-drafter", help="train a drafter head on the target's own hidden states (resumable)"
    )
    p.add_argument("--method", choices=list(METHODS), default="eagle")
    p.add_argument(
        "--model", default="default", help="target model path or hub name (default: the shipped one)"
    )
    p.add_argument("--out", type=Path, required=True, help="directory for the exported head and its card")
    p.add_argument(
        "--data", type=Path, nargs="+", default=None, help="text files (default: the shipped corpus)"
    )
    p.add_argument(
        "--workdir", type=Path, default=None, help="resumable working directory (default: OUT.work)"
    )
    p.add_argument("--tokens", type=int, default=None, help=f"training tokens (default {DEFAULT_TOKENS:,})")
    p.add_argument(
        "--feature-tokens",
        type=int,
        default=None,
        help="distinct tokens whose features are cached (default: --tokens)",
    )
    p.add_argument("--draft-vocab", type=int, default=HeadTrainConfig.draft_vocab_size)
    p.add_argument("--ttt-steps", type=int, default=HeadTrainConfig.ttt_steps, help="EAGLE: unroll depth")
    p.add_argument("--medusa-heads", type=int, default=HeadTrainConfig.medusa_heads, help="Medusa: heads")
    p.add_argument("--hydra-heads", type=int, default=HeadTrainConfig.hydra_heads, help="Hydra: heads")
    p.add_argument(
        "--aux-layers", default=None, help="comma-separated layer ids (default: low, middle, high)"
    )
    p.add_argument("--stage", choices=["features", "train", "export", "all"], default="all")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from specdec.models.loading import load_causal_lm

    workdir = args.workdir or args.out.with_name(args.out.name + ".work")
    workdir.mkdir(parents=True, exist_ok=True)
    target, tokenizer = load_causal_lm(args.model)
    aux = _aux_layers(args.aux_layers, target.config.get_text_config(decoder=True).num_hidden_layers)
    tokens = args.tokens or DEFAULT_TOKENS
    data = DataConfig(feature_tokens=args.feature_tokens or tokens)
    corpus = prepare_corpus(workdir, args.model, tokenizer, args.data)
    stores = prepare_features(workdir, target, corpus, aux, data)
    if args.stage == "features":
        return 0
    cfg = HeadTrainConfig(
        tokens=tokens,
        draft_vocab_size=args.draft_vocab,
        ttt_steps=args.ttt_steps,
        medusa_heads=args.medusa_heads,
        hydra_heads=args.hydra_heads,
    )
    if args.stage in ("train", "all"):
        train_head(workdir, target, stores["train"], cfg, args.method, new_budget=args.tokens)
    if args.stage in ("export", "all"):
        m = export_head(workdir, target, stores, args.out, data, _about(args, corpus), args.method)
        g = m["acceptance"]["greedy"]
        print(
            f"wrote {args.out}: {m['steps']} steps, {m['tokens_seen']:,} tokens, "
            f"tau {g['tau']:.2f} (greedy held-out, chain depth {g['depth']})"
        )
    return 0


def _aux_layers(given: str | None, layers: int) -> list[int]:
    """--aux-layers checked against the target's depth, or the default low, middle and high layers."""
    from specdec.heads.eagle3 import default_aux_layer_ids

    if not given:
        return list(default_aux_layer_ids(layers))
    try:
        aux = [int(x) for x in given.split(",")]
    except ValueError:
        raise InputError(f"--aux-layers {given!r}: expected comma-separated integers") from None
    if any(not 0 <= i < layers for i in aux):
        raise InputError(f"--aux-layers {given}: ids must be in 0..{layers - 1} for this target")
    return aux


def _about(args: argparse.Namespace, corpus: Path) -> dict:
    """The card's target, data and reproduce command."""
    import shlex
    import sys

    return {
        "target": "the shipped code model" if args.model == "default" else args.model,
        "data": describe_data(corpus, args.data),
        "command": "specdec " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "specdec train-drafter ...",
    }
