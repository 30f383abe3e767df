"""Every causal-LM class of transformers either decodes exactly like its own generate() or is refused.

Each class is built tiny in memory with random weights (float64, so a tree forward and token-by-token
decoding differ by rounding only) and decoded through the public API with a chain drafter (a draft model: the
same model, so every draft is accepted, or a random tiny Llama, so nearly every draft is rejected) and a
branching one (token recycling, whose table is filled by a first generation, so the second scores trees
with accepted and rejected branches). Exact classes must give `generate(do_sample=False)`'s tokens; refused
ones must raise `UnsupportedModelError` before the first token, in one line naming the class and the reason.
Which outcome each class has is pinned here, so a class that changes from one to the other fails a test.

The list is a representative subset of the ~170 causal-LM classes of transformers 5.x: each position scheme,
block layout, attention span, expert routing and recurrent layer kind at least once. Encoder-decoder,
multimodal and remote-code models are not in it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import pytest
import torch
import transformers

from specdec.api import SpecDecoder
from specdec.errors import UnsupportedModelError
from specdec.models import support

import tiny

V = 384  # tiny.tokenizer()'s vocabulary
H = 32
N = 16  # new tokens per generation
# Llama-style keyword arguments, shared by the configs that use these names
DECODER = dict(
    vocab_size=V,
    hidden_size=H,
    intermediate_size=2 * H,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=H // 4,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
MOE = dict(experts_implementation="eager")  # grouped_mm has no float64 kernel on CPU
SSM = dict(vocab_size=V, hidden_size=H, num_hidden_layers=2)


@dataclass
class Case:
    id: str
    family: str
    model_class: str
    config_class: str
    kwargs: dict = field(default_factory=dict)
    refused: str = ""  # "" = exact; else a phrase the refusal must contain
    window: int = 0  # span of sliding-window / chunked attention: a longer request must be refused
    seed: int = 0  # weights (some seeds give a model that repeats one or two tokens: too easy a test)
    dtype: torch.dtype = torch.float64


RECURRENT = "recurrent (state-space) model"
HYBRID = "hybrid attention/recurrent (state-space) model"
ALIBI = "uses ALiBi position biases"

CASES = [
    # rotary positions
    Case("llama", "rotary", "LlamaForCausalLM", "LlamaConfig", DECODER),
    Case("mistral", "rotary", "MistralForCausalLM", "MistralConfig", dict(DECODER, sliding_window=None)),
    Case("qwen2", "rotary", "Qwen2ForCausalLM", "Qwen2Config", DECODER),
    Case("qwen3", "rotary, q/k norm", "Qwen3ForCausalLM", "Qwen3Config", DECODER),
    Case("gemma", "rotary", "GemmaForCausalLM", "GemmaConfig", DECODER),
    Case("gemma2", "rotary, softcapping, sliding 4096", "Gemma2ForCausalLM", "Gemma2Config", DECODER),
    Case("gemma3", "rotary, sliding 4096", "Gemma3ForCausalLM", "Gemma3TextConfig", DECODER),
    Case("phi3", "rotary", "Phi3ForCausalLM", "Phi3Config", DECODER),
    Case("olmo2", "rotary", "Olmo2ForCausalLM", "Olmo2Config", DECODER),
    Case("granite", "rotary, scaled residuals", "GraniteForCausalLM", "GraniteConfig", DECODER),
    Case("smollm3", "rotary with NoPE layers", "SmolLM3ForCausalLM", "SmolLM3Config", DECODER),
    # absolute positions (learned or sinusoidal)
    Case(
        "gpt2", "absolute", "GPT2LMHeadModel", "GPT2Config", dict(vocab_size=V, n_embd=H, n_layer=2, n_head=4)
    ),
    Case(
        "opt",
        "absolute",
        "OPTForCausalLM",
        "OPTConfig",
        dict(
            vocab_size=V,
            hidden_size=H,
            ffn_dim=2 * H,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
            word_embed_proj_dim=H,
        ),
    ),
    Case(
        "gpt_bigcode",
        "absolute, multi-query",
        "GPTBigCodeForCausalLM",
        "GPTBigCodeConfig",
        dict(vocab_size=V, n_embd=H, n_layer=2, n_head=4, n_positions=512),
    ),
    Case(
        "biogpt",
        "absolute",
        "BioGptForCausalLM",
        "BioGptConfig",
        dict(
            vocab_size=V, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=2, num_attention_heads=4
        ),
    ),
    Case(
        "xglm",
        "sinusoidal",
        "XGLMForCausalLM",
        "XGLMConfig",
        dict(vocab_size=V, d_model=H, ffn_dim=2 * H, num_layers=2, attention_heads=4),
        dtype=torch.float32,  # its sinusoid table overflows when cast to float64's min
    ),
    Case(
        "roberta",
        "absolute, encoder used as a decoder",
        "RobertaForCausalLM",
        "RobertaConfig",
        dict(
            vocab_size=V,
            hidden_size=H,
            intermediate_size=2 * H,
            num_hidden_layers=2,
            num_attention_heads=4,
            is_decoder=True,
        ),
    ),
    # ALiBi: the bias comes from a key's index in the sequence, not from position ids
    Case(
        "bloom",
        "alibi",
        "BloomForCausalLM",
        "BloomConfig",
        dict(vocab_size=V, hidden_size=H, n_layer=2, n_head=4),
        refused=ALIBI,
    ),
    Case(
        "mpt",
        "alibi",
        "MptForCausalLM",
        "MptConfig",
        dict(vocab_size=V, d_model=H, n_layers=2, n_heads=4),
        refused=ALIBI,
    ),
    Case(
        "falcon_alibi",
        "alibi",
        "FalconForCausalLM",
        "FalconConfig",
        dict(
            vocab_size=V,
            hidden_size=H,
            num_hidden_layers=2,
            num_attention_heads=4,
            alibi=True,
            parallel_attn=False,
        ),
        refused=ALIBI,
    ),
    # partial rotary
    Case(
        "phi",
        "partial rotary 0.5, parallel attention/MLP",
        "PhiForCausalLM",
        "PhiConfig",
        dict(
            vocab_size=V,
            hidden_size=H,
            intermediate_size=2 * H,
            num_hidden_layers=2,
            num_attention_heads=4,
            partial_rotary_factor=0.5,
        ),
        seed=1,
    ),
    Case(
        "stablelm",
        "partial rotary 0.25",
        "StableLmForCausalLM",
        "StableLmConfig",
        dict(
            vocab_size=V,
            hidden_size=H,
            intermediate_size=2 * H,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            partial_rotary_factor=0.25,
        ),
    ),
    Case(
        "persimmon",
        "partial rotary 0.5",
        "PersimmonForCausalLM",
        "PersimmonConfig",
        dict(
            vocab_size=V, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=2, num_attention_heads=4
        ),
    ),
    Case(
        "nemotron",
        "partial rotary 0.5",
        "NemotronForCausalLM",
        "NemotronConfig",
        dict(DECODER, partial_rotary_factor=0.5),
    ),
    # parallel attention/MLP blocks
    Case(
        "gpt_neox",
        "partial rotary 0.5, parallel residual",
        "GPTNeoXForCausalLM",
        "GPTNeoXConfig",
        dict(
            vocab_size=V,
            hidden_size=H,
            intermediate_size=2 * H,
            num_hidden_layers=2,
            num_attention_heads=4,
            rotary_pct=0.5,
            use_parallel_residual=True,
        ),
    ),
    Case(
        "gptj",
        "partial rotary (rotary_dim 4), parallel attention/MLP",
        "GPTJForCausalLM",
        "GPTJConfig",
        dict(vocab_size=V, n_embd=H, n_layer=2, n_head=4, rotary_dim=4, n_positions=512),
    ),
    Case(
        "codegen",
        "partial rotary, parallel attention/MLP",
        "CodeGenForCausalLM",
        "CodeGenConfig",
        dict(vocab_size=V, n_embd=H, n_layer=2, n_head=4, rotary_dim=4, n_positions=512, n_ctx=512),
    ),
    Case(
        "falcon",
        "rotary, parallel attention/MLP",
        "FalconForCausalLM",
        "FalconConfig",
        dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, parallel_attn=True),
    ),
    Case(
        "falcon_new_arch",
        "rotary, grouped KV, parallel attention/MLP",
        "FalconForCausalLM",
        "FalconConfig",
        dict(
            vocab_size=V,
            hidden_size=H,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_kv_heads=2,
            new_decoder_architecture=True,
        ),
    ),
    Case("cohere", "rotary, parallel attention/MLP", "CohereForCausalLM", "CohereConfig", DECODER),
    # sliding-window / chunked attention, with a window the ordinary requests fit in
    Case(
        "mistral_window",
        "sliding window",
        "MistralForCausalLM",
        "MistralConfig",
        dict(DECODER, sliding_window=128),
        window=128,
    ),
    Case(
        "qwen2_window",
        "sliding window",
        "Qwen2ForCausalLM",
        "Qwen2Config",
        dict(DECODER, use_sliding_window=True, sliding_window=128, max_window_layers=0),
        window=128,
    ),
    Case(
        "starcoder2_window",
        "sliding window",
        "Starcoder2ForCausalLM",
        "Starcoder2Config",
        dict(DECODER, sliding_window=128),
        window=128,
    ),
    Case(
        "gemma2_window",
        "alternating sliding/global",
        "Gemma2ForCausalLM",
        "Gemma2Config",
        dict(DECODER, sliding_window=128),
        window=128,
    ),
    Case(
        "cohere2_window",
        "alternating sliding/global",
        "Cohere2ForCausalLM",
        "Cohere2Config",
        dict(DECODER, sliding_window=128, layer_types=["sliding_attention", "full_attention"]),
        window=128,
    ),
    Case(
        "gpt_neo_local",
        "absolute, alternating global/local",
        "GPTNeoForCausalLM",
        "GPTNeoConfig",
        dict(
            vocab_size=V,
            hidden_size=H,
            num_layers=2,
            num_heads=4,
            attention_types=[[["global", "local"], 1]],
            window_size=128,
        ),
        window=128,
    ),
    Case(
        "llama4_chunked",
        "chunked attention, mixture of experts",
        "Llama4ForCausalLM",
        "Llama4TextConfig",
        dict(
            DECODER,
            **MOE,
            attention_chunk_size=128,
            num_local_experts=2,
            num_experts_per_tok=1,
            intermediate_size_mlp=2 * H,
            interleave_moe_layer_step=1,
        ),
        window=128,
    ),
    # mixture of experts
    Case(
        "mixtral",
        "mixture of experts",
        "MixtralForCausalLM",
        "MixtralConfig",
        dict(DECODER, **MOE, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
        seed=1,
    ),
    Case(
        "qwen2_moe",
        "mixture of experts, shared expert",
        "Qwen2MoeForCausalLM",
        "Qwen2MoeConfig",
        dict(
            DECODER,
            **MOE,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=H,
            shared_expert_intermediate_size=H,
        ),
    ),
    Case(
        "qwen3_moe",
        "mixture of experts",
        "Qwen3MoeForCausalLM",
        "Qwen3MoeConfig",
        dict(DECODER, **MOE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=H),
    ),
    Case(
        "olmoe",
        "mixture of experts",
        "OlmoeForCausalLM",
        "OlmoeConfig",
        dict(DECODER, **MOE, num_experts=4, num_experts_per_tok=2),
    ),
    Case(
        "granitemoe",
        "mixture of experts",
        "GraniteMoeForCausalLM",
        "GraniteMoeConfig",
        dict(DECODER, **MOE, num_local_experts=4, num_experts_per_tok=2),
    ),
    Case(
        "gpt_oss",
        "mixture of experts, attention sinks, alternating sliding/global",
        "GptOssForCausalLM",
        "GptOssConfig",
        dict(DECODER, **MOE, num_local_experts=4, num_experts_per_tok=2, sliding_window=128),
        window=128,
    ),
    Case(
        "deepseek_v3",
        "mixture of experts, latent attention (MLA)",
        "DeepseekV3ForCausalLM",
        "DeepseekV3Config",
        dict(
            {k: v for k, v in DECODER.items() if k != "head_dim"},
            **MOE,
            num_key_value_heads=4,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=H,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        ),
    ),
    # state-space / recurrent: refused
    Case(
        "mamba", "state space", "MambaForCausalLM", "MambaConfig", dict(SSM, state_size=4), refused=RECURRENT
    ),
    Case(
        "mamba2",
        "state space",
        "Mamba2ForCausalLM",
        "Mamba2Config",
        dict(SSM, state_size=4, num_heads=4, head_dim=16, n_groups=1),
        refused=RECURRENT,
    ),
    Case(
        "falcon_mamba",
        "state space",
        "FalconMambaForCausalLM",
        "FalconMambaConfig",
        dict(SSM, state_size=4),
        refused=RECURRENT,
    ),
    Case(
        "rwkv",
        "recurrent",
        "RwkvForCausalLM",
        "RwkvConfig",
        dict(SSM, attention_hidden_size=H, intermediate_size=2 * H),
        refused=RECURRENT,
    ),
    Case(
        "xlstm",
        "recurrent",
        "xLSTMForCausalLM",
        "xLSTMConfig",
        dict(SSM, embedding_dim=H, num_blocks=2, num_heads=2),
        refused=RECURRENT,
    ),
    Case(
        "recurrent_gemma",
        "recurrent (RG-LRU) with local attention",
        "RecurrentGemmaForCausalLM",
        "RecurrentGemmaConfig",
        dict(SSM, intermediate_size=2 * H, num_attention_heads=4, lru_width=H),
        refused=RECURRENT,  # two layers: both recurrent blocks of its recurrent/recurrent/attention pattern
    ),
    # hybrid attention + state-space / linear attention: refused
    Case(
        "jamba",
        "hybrid Mamba/attention, mixture of experts",
        "JambaForCausalLM",
        "JambaConfig",
        dict(
            DECODER,
            **MOE,
            attn_layer_period=2,
            attn_layer_offset=1,
            expert_layer_period=2,
            expert_layer_offset=1,
            num_experts=2,
            mamba_d_state=4,
        ),
        refused=HYBRID,
    ),
    Case(
        "bamba",
        "hybrid Mamba2/attention",
        "BambaForCausalLM",
        "BambaConfig",
        dict(
            DECODER,
            attn_layer_indices=[1],
            mamba_n_heads=4,
            mamba_d_head=16,
            mamba_d_state=4,
            mamba_n_groups=1,
        ),
        refused=HYBRID,
    ),
    Case(
        "zamba2",
        "hybrid Mamba2/shared attention",
        "Zamba2ForCausalLM",
        "Zamba2Config",
        dict(
            SSM,
            layers_block_type=["mamba", "hybrid"],
            hybrid_layer_ids=[1],
            num_attention_heads=4,
            mamba_d_state=4,
            mamba_headdim=16,
            n_mamba_heads=4,
            mamba_ngroups=1,
        ),
        refused=HYBRID,
    ),
    Case(
        "falcon_h1",
        "parallel hybrid Mamba2/attention",
        "FalconH1ForCausalLM",
        "FalconH1Config",
        dict(DECODER, mamba_d_ssm=2 * H, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=4, mamba_n_groups=1),
        refused=HYBRID,
    ),
    Case(
        "granitemoe_hybrid",
        "hybrid Mamba2/attention, mixture of experts",
        "GraniteMoeHybridForCausalLM",
        "GraniteMoeHybridConfig",
        dict(
            DECODER,
            **MOE,
            layer_types=["mamba", "attention"],
            mamba_n_heads=4,
            mamba_d_head=16,
            mamba_d_state=4,
            num_local_experts=2,
            num_experts_per_tok=1,
        ),
        refused=HYBRID,
    ),
    Case(
        "nemotron_h",
        "hybrid Mamba2/attention",
        "NemotronHForCausalLM",
        "NemotronHConfig",
        dict(
            DECODER,
            layers_block_type=["mamba", "attention"],
            mamba_num_heads=4,
            mamba_head_dim=16,
            ssm_state_size=4,
            n_groups=1,
        ),
        refused=HYBRID,
    ),
    Case(
        "lfm2",
        "hybrid short convolution/attention",
        "Lfm2ForCausalLM",
        "Lfm2Config",
        dict(DECODER, layer_types=["conv", "full_attention"]),
        refused=HYBRID,
    ),
    Case(
        "qwen3_next",
        "hybrid gated delta net/attention, mixture of experts",
        "Qwen3NextForCausalLM",
        "Qwen3NextConfig",
        dict(
            DECODER,
            **MOE,
            layer_types=["linear_attention", "full_attention"],
            num_experts=2,
            num_experts_per_tok=1,
            moe_intermediate_size=H,
            shared_expert_intermediate_size=H,
            linear_num_value_heads=2,
            linear_num_key_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
        ),
        refused=HYBRID,
    ),
    Case(
        "minimax",
        "hybrid lightning (linear) attention/attention, mixture of experts",
        "MiniMaxForCausalLM",
        "MiniMaxConfig",
        dict(
            DECODER,
            **MOE,
            layer_types=["linear_attention", "full_attention"],
            num_local_experts=2,
            num_experts_per_tok=1,
        ),
        refused=HYBRID,
    ),
]
BY_ID = {c.id: c for c in CASES}
EXACT = [c.id for c in CASES if not c.refused]
REFUSED = [c.id for c in CASES if c.refused]
WINDOWED = [c.id for c in CASES if c.window]


def make(case_id: str):
    """The case's model with random weights. Refused classes are never run (RecurrentGemma's own
    generate() fails in this transformers version: `get_seq_length` on its recurrent-only cache)."""
    case = BY_ID[case_id]
    config = getattr(transformers, case.config_class)(
        bos_token_id=0, eos_token_id=0, pad_token_id=0, **case.kwargs
    )
    torch.manual_seed(case.seed)
    m = getattr(transformers, case.model_class)(config).to(case.dtype).eval()
    head = m.get_output_embeddings()
    if head.weight is m.get_input_embeddings().weight:  # untie: a tied random model repeats its last token
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    with torch.no_grad():
        # Initializers give weights so small (std 0.02) that many classes decode like a bigram table (one
        # token repeated, whatever the positions): larger weights make attention, and so positions and the
        # tree mask, decide the tokens. Scaled logits keep greedy choices well separated.
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
        m.get_output_embeddings().weight.mul_(8.0)
    m.generation_config.eos_token_id = 0
    m.generation_config.pad_token_id = 0
    return m


build = functools.cache(make)


@functools.cache
def prompt() -> list[int]:
    return tiny.tokenizer()("def add(a, b):\n    return a + b\n")["input_ids"]


@functools.cache
def wrong_draft():
    """A random Llama of the same vocabulary: its chains are (nearly) all rejected."""
    return tiny.model("llama", seed=7)


@functools.cache
def reference(case_id: str) -> list[int]:
    return tiny.hf_greedy(build(case_id), prompt(), N)


@pytest.mark.slow
def test_cases_cover_every_family():
    families = " ".join(c.family for c in CASES)
    for word in (
        "rotary",
        "absolute",
        "alibi",
        "partial rotary",
        "parallel",
        "sliding",
        "experts",
        "state space",
    ):
        assert word in families
    assert {"hybrid", "recurrent"} <= {c.family.split()[0] for c in CASES}
    # every class exists in the installed transformers (one that does not is left out of CASES, not skipped)
    for case in CASES:
        assert hasattr(transformers, case.model_class)


@pytest.mark.slow
@pytest.mark.parametrize("case_id", EXACT)
def test_chain_same_model_accepts_everything(tok, case_id):
    m = build(case_id)
    out = SpecDecoder(m, tok, method="draft", draft_model=m).generate(prompt(), max_new_tokens=N)
    assert out.token_ids == reference(case_id)
    assert len(set(out.token_ids)) >= 6  # the output depends on the context: a wrong position or mask shows
    assert out.stats.draft_nodes > 0
    assert out.stats.accepted_by_depth == out.stats.proposed_by_depth  # its own argmax: every draft right


@pytest.mark.slow
@pytest.mark.parametrize("case_id", EXACT)
def test_chain_other_model_is_rejected(tok, case_id):
    out = SpecDecoder(build(case_id), tok, method="draft", draft_model=wrong_draft()).generate(
        prompt(), max_new_tokens=N
    )
    assert out.token_ids == reference(case_id)
    assert sum(out.stats.accepted_by_depth) < out.stats.draft_nodes  # some drafts rejected and rolled back


@pytest.mark.slow
@pytest.mark.parametrize("case_id", EXACT)
def test_branching_tree(tok, case_id):
    m = build(case_id)
    dec = SpecDecoder(m, tok, method="recycle", max_nodes=12)
    first = dec.generate(prompt(), max_new_tokens=N)  # fills the table
    out = dec.generate(prompt(), max_new_tokens=N)
    assert first.token_ids == out.token_ids == reference(case_id)
    s = out.stats
    # a tree with more nodes than its depth branches; sum(proposed_by_depth) is the sum of the trees' depths
    assert s.draft_nodes > sum(s.proposed_by_depth)
    assert 0 < sum(s.accepted_by_depth) < s.draft_nodes  # some branches accepted, others rejected


def assert_refused_before_output(dec, case: Case, phrase: str, max_new_tokens: int = N) -> str:
    steps = iter(dec.stream(prompt(), max_new_tokens=max_new_tokens))
    with pytest.raises(UnsupportedModelError) as err:
        next(steps)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(case.model_class + " ")
    assert phrase in message
    return message


@pytest.mark.parametrize("method", ["draft", "recycle", "pld"])
@pytest.mark.parametrize("case_id", REFUSED)
def test_refused_before_generation(tok, case_id, method):
    m = build(case_id)
    options = {"draft_model": m} if method == "draft" else {}
    assert_refused_before_output(
        SpecDecoder(m, tok, method=method, **options), BY_ID[case_id], BY_ID[case_id].refused
    )


@pytest.mark.parametrize("case_id", WINDOWED)
def test_request_longer_than_the_window_is_refused(tok, case_id):
    case = BY_ID[case_id]
    dec = SpecDecoder(build(case_id), tok, method="recycle", max_nodes=12)
    message = assert_refused_before_output(dec, case, f"attention (span {case.window})", case.window + 1)
    assert "needs" in message


@pytest.mark.parametrize("case_id", ["bloom", "mpt", "falcon_alibi"])
def test_tree_probe_alone_catches_alibi(tok, case_id, monkeypatch):
    """Without the ALiBi rule, the tree probe still refuses: Bloom and Falcon fail on a 4D mask, MPT's
    scores for a branching tree differ from causal decoding (its bias follows the storage index)."""
    monkeypatch.setattr(support, "_alibi_reason", lambda model, config: "")
    case = BY_ID[case_id]
    dec = SpecDecoder(make(case_id), tok, method="recycle")  # a fresh model: the verdict is cached per model
    message = assert_refused_before_output(dec, case, "4D attention mask")
    assert ("fails when scoring" in message) == (case_id != "mpt")


@pytest.mark.slow
@pytest.mark.parametrize("case_id", WINDOWED)
def test_request_filling_the_window_is_served_exactly(tok, case_id):
    """The window check counts the positions a request reaches, not the cache's spare slots for trees."""
    m = build(case_id)
    n = BY_ID[case_id].window - len(prompt())
    out = SpecDecoder(m, tok, method="draft", draft_model=m).generate(
        prompt(), max_new_tokens=n, ignore_eos=True
    )
    ids = torch.tensor([prompt()])
    want = m.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n
    )
    assert out.token_ids == want[0, len(prompt()) :].tolist()
