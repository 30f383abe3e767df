"""EAGLE-3 heads: one Llama decoder layer over three of the target's hidden states, trained with the
training-time test (the head unrolled on its own output features), stored in the layout vLLM and SGLang
load."""

from __future__ import annotations

from collections.abc import Callable

import torch

from specdec.heads.eagle3 import Eagle3Head, config_for_target, load_head, save_head
from specdec.train.features import FeatureStore
from specdec.train.head_recipe import WARMUP, Batch, HeadRecipe, HeadTrainConfig, vocab_phrase
from specdec.train.teacher import Teacher


class EagleRecipe(HeadRecipe):
    name = "eagle"
    title = "EAGLE-3 head"
    curve = "unroll step"
    drafting = "autoregressively (its own features and tokens)"
    anchor_reads_next_token = True

    def depth(self, cfg: HeadTrainConfig) -> int:
        return cfg.ttt_steps

    def eval_depth(self, cfg: HeadTrainConfig) -> int:
        return cfg.eval_depth  # drafting autoregressively, it can go deeper than it was unrolled in training

    def build(self, target, store: FeatureStore, cfg: HeadTrainConfig, draft_ids: torch.Tensor) -> Eagle3Head:
        hcfg = config_for_target(
            target,
            draft_ids.numel(),
            tuple(store.spec.aux_layer_ids),
            intermediate_size=cfg.intermediate_size,
        )
        head = Eagle3Head(hcfg)
        head.set_draft_vocab(draft_ids)
        head.bind_embedding(target.get_input_embeddings().weight.float())
        return head

    def warm_start(self, head, teacher: Teacher, target) -> None:
        # The final norm too, where the target's has the head's shape: its features then start normed alike.
        with torch.no_grad():
            head.lm_head.weight.copy_(teacher.weight)
            norm = getattr(target.get_decoder(), "norm", None)
            if (
                norm is not None
                and getattr(norm, "weight", None) is not None
                and norm.weight.shape == head.norm.weight.shape
            ):
                head.norm.weight.copy_(norm.weight.float())

    def draft_logits(self, head, b: Batch, depth: int) -> list[torch.Tensor]:
        # The head unrolled on its own features over the text's tokens: row t reads the target's features up
        # to t and the token t + 1.
        return head.forward_train(b["aux"], b["ids"], steps=depth)

    save = staticmethod(save_head)
    load = staticmethod(load_head)

    def drafting_step(self, head, width: int, prefix: int, repeats: int) -> Callable[[int], object]:
        # `width` new entries after a `prefix`-entry cache: its layer, logits over the draft vocabulary and
        # a top-4.
        gen = torch.Generator().manual_seed(0)
        length = prefix + (repeats + WARMUP) * width  # every timed and warm-up call's entries
        cache = head.new_cache(length)
        aux = torch.randn(prefix, head.fc.in_features, generator=gen)
        tokens = torch.randint(0, head.config.vocab_size, (length,), generator=gen)
        _, feat = head.step(cache, aux, tokens[:prefix], torch.arange(prefix))
        feat = feat[-1:].expand(width, -1)

        def step(i: int) -> None:
            nonlocal feat
            pos = prefix + i * width
            logits, feat = head.step(cache, feat, tokens[pos : pos + width], torch.full((width,), pos))
            logits.topk(4, dim=-1)

        return step

    def card_intro(self, m: dict) -> str:
        layers = m["head_config"]["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
        return f"""An EAGLE-3-style draft head: one Llama decoder layer over the target's hidden states at layers {layers} (HF
`output_hidden_states` indices = vLLM's `eagle_aux_hidden_state_layer_ids`: the inputs of those decoder layers),
with {vocab_phrase(m)}. {m["parameters"] / 1e6:.2f}M parameters (the token embedding is the target's and is not stored).
`config.json` + `model.safetensors` (bfloat16; d2t int64, t2d bool) are in the layout vLLM
(`Eagle3LlamaForCausalLM`) and SGLang (`LlamaForCausalLMEagle3`) load; specdec loads them as float32. Built with
`specdec train-drafter` (src/specdec/train/drafter.py)."""

    def card_objective(self, m: dict) -> str:
        tc = m["train_config"]
        return f"""Training-time test: the head unrolled {tc["ttt_steps"]} steps on its own output features, loss = soft
cross-entropy against the target's distribution over the draft vocabulary (masked where the target's top token
is outside it), step k weighted {tc["step_weight"]}^k; the head attends within {tc["segment_len"]}-token segments
of each window. lm_head and final norm warm-started from the target's."""

    def card_cost(self, lat: dict) -> str:
        return (
            f"One drafting step (1 new entry after 256 cached, logits over the draft vocabulary, top-4): "
            f"{lat['head_step_1']:.2f} ms; 8 entries at once (a tree level): {lat['head_step_8']:.2f} ms"
        )
