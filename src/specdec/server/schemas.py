"""Request bodies of the OpenAI-compatible endpoints, validated strictly.

Unknown fields are refused (as OpenAI does: "Unrecognized request argument"), so a typo such as `max_token`
is an error rather than a silently ignored setting. OpenAI fields specdec cannot honour are accepted only with
their neutral value (e.g. `presence_penalty: 0`, `logprobs: null`), because clients often send the defaults
explicitly. Extensions: `top_k` (as vLLM) and `specdec_method` (pick one of the server's loaded methods).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOPS = 16
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


def _neutral(value: Any, allowed: tuple, what: str) -> Any:
    if value not in allowed:
        raise ValueError(
            f"{what} is not supported by specdec (send {json.dumps(allowed[0])} or leave it out)"
        )
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None  # accepted and ignored: the server's model is fixed at start
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default; 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # extension; 0 = off
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Any = None  # a string or a list of strings; checked below (a union would garble error messages)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    specdec_method: str | None = None  # extension: one of the methods the server loaded

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """OpenAI's parameters are nullable ("temperature": null = the default); clients do send nulls."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported (one completion per request)")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Any) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a list of strings")
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float) -> float:
        return _neutral(v, (0, 0.0), "a presence/frequency penalty")

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: dict | None) -> dict | None:
        return _neutral(v, (None, {}), "logit_bias")


class CompletionRequest(_Common):
    prompt: Any  # a string or a list of token ids (or a batch of exactly one of those); checked below
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> str | list[int]:
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str | list):
            v = v[0]  # a batch of one prompt
        if isinstance(v, str):
            return v
        if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            return v
        if isinstance(v, list) and len(v) > 1 and all(isinstance(p, str | list) for p in v):
            raise ValueError("batched prompts are not supported (send one prompt per request)")
        raise ValueError("prompt must be a string or a non-empty list of token ids")

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        return _neutral(v, (False,), "echo")

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v: int | None) -> int | None:
        return _neutral(v, (None, 1), "best_of")

    @field_validator("suffix", "logprobs")
    @classmethod
    def _none_only(cls, v: Any) -> None:
        return _neutral(v, (None,), "suffix/logprobs")


def _is_text_part(part: Any) -> bool:
    """{"type": "text", "text": "..."}"""
    return (
        isinstance(part, dict)
        and set(part) == {"type", "text"}
        and part["type"] == "text"
        and isinstance(part["text"], str)
    )


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None  # a string, a list of text parts, or null; checked below
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v: Any) -> str:
        if v is None or isinstance(v, str):
            return v or ""
        if isinstance(v, list) and all(_is_text_part(p) for p in v):
            return "\n".join(p["text"] for p in v)
        raise ValueError("content must be a string or a list of text parts (specdec serves text only)")


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # None: up to the server's limit / the model's context
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: str | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | None) -> bool | None:
        return _neutral(v, (None, False), "logprobs")

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, v: int | None) -> None:
        return _neutral(v, (None,), "top_logprobs")

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v: list | None) -> list | None:
        return _neutral(v, (None, []), "tool calling")

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, v: str | None) -> str | None:
        return _neutral(v, (None, "none"), "tool_choice")

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v: dict | None) -> dict | None:
        return _neutral(v, (None, {"type": "text"}), "response_format")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
