"""Heads at size for `specdec bench --scale`: what a trained head of the size a real model would use costs per
drafting step, and the speedup that PROJECTS from the shipped heads' τ.

No head is trained for a target with random weights, so a head's acceptance cannot be measured at size, but its
cost can: a drafting step costs the same for random weights of the same shape. Each kind is built at the shape
a real model's head has (`head_shapes`), from its config class with its own seeded initialisation, in the
target's dtype, and one drafting step is timed as specdec's drafters run it, on their packed paths
(`head_costs`). The speedup over plain decoding is a PROJECTION (`projection`): τ · cost(1) / (cost(n + 1) +
drafting), with τ what the shipped heads reach on held-out text (`YARDSTICK_TAU`). It assumes a head of that
size reaches that τ on the bigger model, which nothing here measures.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from types import SimpleNamespace

import torch

from specdec.bench.yardstick import HEAD_NODES
from specdec.costmodel import CostModel
from specdec.drafters.eagle import EagleConfig
from specdec.drafters.medusa import PRIOR, PRIOR_DECAY, PRIOR_WEIGHT
from specdec.drafters.medusa import MedusaConfig as MedusaDrafting
from specdec.heads.eagle3 import Eagle3Config, Eagle3Head, config_for_target
from specdec.heads.eagle3_packed import PackedHead
from specdec.heads.hydra import HydraConfig, HydraHeads, PackedHydra
from specdec.heads.medusa import MedusaConfig, MedusaHeads, PackedMedusa
from specdec.templates import grow_template, rank_acceptance

EAGLE_DRAFT_VOCAB = 32000  # the draft vocabulary published EAGLE-3 heads use (capped at the target's)
# τ of the shipped heads (trained for the shipped 13.8M target) on held-out code, forced along the real
# continuation: `specdec bench --yardstick`, task "complete", HEAD_NODES-node trees (docs/bench.md, A yardstick)
YARDSTICK_TAU = {"eagle": 1.96, "medusa": 1.63, "hydra": 1.76}
REPEATS = 7  # timed drafting steps per kind; the least is kept (other load only ever slows a step)
WARMUP = 2  # untimed steps first (first-call allocations)
PAST = 512  # EAGLE's cache holds a request's context, as the cost curve's forwards do (CostModel.measure)
ACCEPTED = 2  # verified tokens EAGLE appends to its cache per step (about the yardstick's τ)
TITLE = "heads at size: measured drafting cost, PROJECTED speedup (random weights; τ from the shipped heads' yardstick)"

HeadConfig = Eagle3Config | MedusaConfig  # HydraConfig is a MedusaConfig


def head_shapes(target_config) -> dict[str, HeadConfig]:
    """Per kind, the head a real model of `target_config` (a transformers config) would use: EAGLE-3 as one
    decoder layer of the target's own shape over the default low/mid/high aux layers with a 32,000-token draft
    vocabulary; Medusa and Hydra at their config defaults (4 heads of 1 residual layer, the full vocabulary)."""
    tc = target_config.get_text_config(decoder=True)
    vocab = min(EAGLE_DRAFT_VOCAB, tc.vocab_size)
    # config_for_target reads only `.config` of the model it is given: the config stands in for it
    eagle = config_for_target(SimpleNamespace(config=target_config), vocab)
    return {
        "eagle": eagle,
        "medusa": MedusaConfig(tc.hidden_size, tc.vocab_size),
        "hydra": HydraConfig(tc.hidden_size, tc.vocab_size),
    }


def build_head(config: HeadConfig, target_model, seed: int = 0) -> Eagle3Head | MedusaHeads | HydraHeads:
    """A head of `config` with its own (seeded) initialisation in the target's dtype, bound to the target's
    embedding where it reads it. Nothing is trained: a step costs the same whatever the weights are."""
    dtype = next(target_model.parameters()).dtype
    embedding = target_model.get_input_embeddings().weight
    torch.manual_seed(seed)
    head: Eagle3Head | MedusaHeads | HydraHeads
    # built in the target's dtype from the start: a full-vocabulary Medusa head is the target's lm_head four
    # times over, which built in float32 first would take three times its memory for a moment
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if isinstance(config, Eagle3Config):
            head = Eagle3Head(config).to(dtype)
            head.bind_embedding(embedding)
        elif isinstance(config, HydraConfig):  # before Medusa's: a HydraConfig is a MedusaConfig
            head = HydraHeads(config).to(dtype)
            head.bind_embedding(embedding)
        else:
            head = MedusaHeads(config).to(dtype)
    finally:
        torch.set_default_dtype(default)
    return head.eval()


def _top(logits: torch.Tensor, k: int, draft_to_target: torch.Tensor, log_softmax: bool = False) -> list:
    """What a drafter does with a head call's logits: the top-k of each row as target ids (EAGLE ranks
    log-probabilities, which it adds up along a path)."""
    if log_softmax:
        logits = torch.log_softmax(logits.float(), dim=-1)
    top = logits.topk(min(k, logits.shape[-1]), dim=-1)
    if log_softmax:
        top.values.tolist()
    return draft_to_target[top.indices].tolist()


def _eagle_step(head: Eagle3Head, tree: EagleConfig) -> Callable[[], None]:
    """Eagle.observe's append of the accepted tokens, then Eagle.propose's `depth - 1` levels of `beam` nodes
    with tree attention over their ancestors, top-k each (drafters/eagle.py), after a PAST-entry cache."""
    packed, c, beam = PackedHead(head), head.config, tree.beam
    gen = torch.Generator().manual_seed(0)
    dtype = head.lm_head.weight.dtype
    cache = head.new_cache(PAST + ACCEPTED + (tree.depth - 1) * beam)
    aux = torch.randn(PAST + ACCEPTED, head.fc.in_features, generator=gen).to(dtype)
    tokens = torch.randint(0, c.vocab_size, (PAST + ACCEPTED,), generator=gen)
    packed.step(cache, aux[:PAST], tokens[:PAST], torch.arange(PAST))
    d2t, committed = head.draft_to_target, PAST + ACCEPTED

    def step() -> None:
        cache.crop(PAST)
        logits, out = packed.step(cache, aux[PAST:], tokens[PAST:], torch.arange(PAST, committed))
        _top(logits[-1:], tree.top_k, d2t, log_softmax=True)  # the root's children
        feature, node_tokens = out[-1:].expand(beam, -1), tokens[:beam]
        for d in range(1, tree.depth):
            start = cache.length
            visible = torch.zeros(beam, start + beam, dtype=torch.bool)
            visible[:, :committed] = True
            for row in range(beam):  # its own entry and its ancestors' (one per level above)
                visible[row, start + row] = True
                for level in range(d - 1):
                    visible[row, committed + level * beam + row] = True
            positions = torch.full((beam,), committed + d - 1)
            logits, feature = packed.step(cache, feature, node_tokens, positions, visible)
            _top(logits, tree.top_k, d2t, log_softmax=True)

    return step


def _frontiers(num_heads: int, width: int, tree_nodes: int) -> list[int]:
    """Per depth, how many nodes of the drafter's starting template (its prior, `tree_nodes` drafted nodes)
    have their children drafted there: Hydra's head call sizes (drafters/hydra.py)."""
    acceptance = rank_acceptance(PRIOR, PRIOR_DECAY, PRIOR_WEIGHT, num_heads, width)
    tpl = grow_template(acceptance, tree_nodes)
    parents = set(tpl.parents[1:])
    sizes = [1] + [sum(1 for i in parents if tpl.depths[i] == d) for d in range(1, num_heads)]
    return sizes[: sizes.index(0)] if 0 in sizes else sizes


def _heads_step(heads: MedusaHeads | HydraHeads, width: int, tree_nodes: int) -> Callable[[], None]:
    """Medusa.propose: every head once on h_t, top-`width` each; Hydra.propose: head k on the paths of the
    template's depth-k nodes that have children, top-`width` each (drafters/medusa.py, hydra.py)."""
    gen = torch.Generator().manual_seed(0)
    c, d2t = heads.config, heads.draft_to_target
    width = min(width, c.draft_vocab_size)
    dtype = next(heads.parameters()).dtype
    hidden = torch.randn(c.hidden_size, generator=gen).to(dtype)
    if isinstance(heads, MedusaHeads):
        medusa = PackedMedusa(heads)

        def medusa_step() -> None:
            _top(torch.cat(medusa(hidden)), width, d2t)

        return medusa_step
    hydra = PackedHydra(heads)
    sizes = _frontiers(c.num_heads, width, tree_nodes)
    paths = torch.randint(0, c.vocab_size, (max(sizes), c.num_heads), generator=gen)

    def hydra_step() -> None:
        for depth, m in enumerate(sizes):
            _top(hydra.head(depth, hidden.expand(m, -1), paths[:m, : depth + 1]), width, d2t)

    return hydra_step


def _least(step: Callable[[], None], repeats: int, clock: Callable[[], float]) -> float:
    for _ in range(WARMUP):
        step()
    times = []
    for _ in range(repeats):
        start = clock()
        step()
        times.append(clock() - start)
    return min(times)


@dataclass(frozen=True)
class HeadCost:
    kind: str
    shape: str  # the head's shape, in words
    parameters: int  # the head's own (the target's embedding it reads is not counted)
    draft_seconds: float  # one drafting step
    one_token_seconds: float  # the target's one-token forward: cost(1)
    tree_seconds: float  # the target's forward over a tree of `tree_nodes` drafted nodes and the root
    tree_nodes: int
    curve: CostModel = field(repr=False, compare=False)

    @property
    def share(self) -> float:
        """Drafting as a share of the target's one-token forward."""
        return self.draft_seconds / self.one_token_seconds


def _describe(c: HeadConfig) -> str:
    if isinstance(c, Eagle3Config):
        ids = ",".join(map(str, c.aux_layer_ids))
        return f"1 layer H={c.hidden_size}, draft vocab {c.draft_vocab_size}, aux layers {ids}"
    return f"{c.num_heads} heads x {c.num_hidden_layers} layer H={c.hidden_size}, vocab {c.draft_vocab_size}"


def head_costs(
    target_model,
    cost_curve: CostModel,
    tree_nodes: int = HEAD_NODES,
    repeats: int = REPEATS,
    clock: Callable[[], float] = time.perf_counter,
) -> list[HeadCost]:
    """Per kind: one drafting step of the head `head_shapes` gives (least of `repeats`, by `clock`), built and
    timed one kind at a time (a full-vocabulary head is large), with the target's forwards from `cost_curve`."""
    costs = []
    width = MedusaDrafting().width
    for kind, config in head_shapes(target_model.config).items():
        head = build_head(config, target_model)
        if isinstance(head, Eagle3Head):
            step = _eagle_step(head, EagleConfig())
        else:
            step = _heads_step(head, width, tree_nodes)
        with torch.inference_mode():
            seconds = _least(step, repeats, clock)
        params = sum(p.numel() for p in head.parameters())
        one, tree = cost_curve(1), cost_curve(tree_nodes + 1)
        costs.append(HeadCost(kind, _describe(config), params, seconds, one, tree, tree_nodes, cost_curve))
        del head, step
    return costs


@dataclass(frozen=True)
class HeadProjection:
    cost: HeadCost
    tau: float  # the yardstick τ assumed
    speedup: float  # PROJECTED over plain decoding

    def to_dict(self) -> dict:
        c = self.cost  # its curve is the report's native cost curve already
        measured = {f.name: getattr(c, f.name) for f in fields(c) if f.name != "curve"}
        return {**measured, "share": c.share, "yardstick_tau": self.tau, "projected_speedup": self.speedup}


def projection(
    costs: Sequence[HeadCost], taus: dict[str, float] = YARDSTICK_TAU, tree_nodes: int = HEAD_NODES
) -> list[HeadProjection]:
    """Per head, the PROJECTED speedup over plain decoding: τ tokens per step of one tree forward (`tree_nodes`
    drafted nodes and the root) plus the drafting, against one token per one-token forward. It assumes a head
    of this size reaches the τ given (the shipped 13.8M model's heads' yardstick) on the bigger model."""
    out = []
    for c in costs:
        tau = taus[c.kind]
        out.append(HeadProjection(c, tau, tau * c.curve(1) / (c.curve(tree_nodes + 1) + c.draft_seconds)))
    return out


def heads_table(rows: Sequence[HeadProjection]) -> str:
    """Markdown: the heads' measured cost and projected speedup."""
    tokens = rows[0].cost.tree_nodes + 1 if rows else HEAD_NODES + 1
    out = [
        TITLE,
        "",
        f"| head | shape | params | drafting step | share of 1-token forward | 1-token forward | {tokens}-token "
        "tree forward | τ (yardstick) | PROJECTED speedup vs plain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r.cost
        out.append(
            f"| {c.kind} | {c.shape} | {c.parameters / 1e6:.1f}M | {1e3 * c.draft_seconds:.2f} ms "
            f"| {100 * c.share:.0f} % | {1e3 * c.one_token_seconds:.2f} ms | {1e3 * c.tree_seconds:.2f} ms "
            f"| {r.tau:.2f} | {r.speedup:.2f}x (projected) |"
        )
    return "\n".join(out)


def heads_at_size(model) -> tuple[str, dict]:
    """(the table, its JSON) for `specdec bench --scale`: the heads' costs on the native runtime's cost curve
    (the runtime specdec's heads draft on) and their projected speedups, or why not, where native cannot run
    the model."""
    from specdec.errors import InputError, UnsupportedModelError
    from specdec.runtime import select_runtime

    try:
        choice = select_runtime(model, "native")
    except (UnsupportedModelError, InputError) as e:
        return f"{TITLE}: not run: {e}", {"skipped": str(e)}
    rows = projection(head_costs(model, CostModel.for_runtime(model, choice)))
    return heads_table(rows), {"projection": True, "rows": [r.to_dict() for r in rows]}
