"""`DllmDecoder`: the API of a block-diffusion model, shaped like `SpecDecoder` (generate, stream, encode).

NOT lossless: the output depends on the policy (and on the block and cache settings); `one` is the quality
reference, the others commit several tokens per forward and may write what `one` would not.
"""

from __future__ import annotations

from specdec.api import Stream, encode_prompt, sampling_params
from specdec.dllm.engine import DllmEngine, DllmSettings
from specdec.dllm.policies import Policy, make_policy
from specdec.engine import Generation
from specdec.errors import InputError

DEFAULT_POLICY = "threshold"


class DllmDecoder:
    """Parallel decoding of a block-diffusion LM.

    >>> dec = DllmDecoder.from_pretrained("default-dllm", policy="threshold", threshold=0.9)
    >>> out = dec.generate("def fibonacci(n):", max_new_tokens=64)
    >>> out.text, out.stats.mean_accepted_tokens  # tokens per forward
    """

    def __init__(
        self,
        model,
        tokenizer,
        policy: str | Policy = DEFAULT_POLICY,
        block_size: int | None = None,
        sub_block: int | None = 8,
        cache: str = "dual",
        floor: str = "left",
        name: str = "model",
        **policy_options,
    ) -> None:
        if tokenizer is None:
            raise InputError("a tokenizer is required (the model directory has none)")
        chosen = policy if isinstance(policy, Policy) else make_policy(policy, **policy_options)
        settings = DllmSettings(block_size=block_size, sub_block=sub_block, cache=cache, floor=floor)
        self.model, self.tokenizer, self.policy = model, tokenizer, chosen
        self.engine = DllmEngine(model, tokenizer, chosen, settings, name=name)

    @classmethod
    def from_pretrained(
        cls, model: str = "default-dllm", policy: str = DEFAULT_POLICY, dtype: str = "float32", **kw
    ):
        from specdec.models.loading import load_causal_lm

        if policy is not None and not isinstance(policy, Policy):
            make_policy(policy, **{k: v for k, v in kw.items() if k not in _ENGINE_KEYS})  # bad options first
        target, tokenizer = load_causal_lm(model, "target", dtype)
        return cls(target, tokenizer, policy, name=model, **kw)

    def encode(self, prompt) -> list[int]:
        return encode_prompt(self.model, self.tokenizer, prompt)

    def stream(self, prompt, **params) -> Stream:
        return Stream(self.engine.run(self.encode(prompt), sampling_params(**params)))

    def generate(self, prompt, **params) -> Generation:
        stream = self.stream(prompt, **params)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result


_ENGINE_KEYS = {"block_size", "sub_block", "cache", "floor", "name"}
