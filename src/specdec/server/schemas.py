"""Request bodies of the OpenAI-compatible endpoints, validated strictly.

Unknown fields are refused (as OpenAI does: "Unrecognized request argument"), so a typo such as `max_token`
is an error rather than a silently ignored setting. OpenAI fields specdec cannot honour are accepted only with
their neutral value (e.g. `presence_penalty: 0`, `logprobs: null`), because clients often send the defaults
explicitly. Extensions: `top_k` (as vLLM) and `specdec_method` (pick one of the server's loaded methods).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

import specdec.checks as checks

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
    # NaN and Infinity (which Python's json writes) are refused as such, not as "less than or equal to 2"
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)  # OpenAI's default; 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
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
    # text, json_object or json_schema (specdec.server.structured); completions take it too (an extension)
    response_format: dict | None = None

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

    @field_validator("stream_options")
    @classmethod
    def _only_streaming(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if v is not None and not info.data.get("stream", False):  # as OpenAI answers
            raise ValueError("only allowed when stream is true")
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
        if isinstance(v, list) and v and all(checks.is_integer(t) for t in v):
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


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    """One of an assistant message's `tool_calls` (earlier turns of a conversation that used tools)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None  # a string or a list of text parts; null only beside tool_calls; checked below
    name: str | None = None
    tool_call_id: str | None = None  # a tool message: the call it answers
    tool_calls: list[ToolCall] | None = None  # an assistant message: the calls it made

    @field_validator("content")
    @classmethod
    def _content(cls, v: Any) -> str | None:
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list) and all(_is_text_part(p) for p in v):
            return "\n".join(p["text"] for p in v)
        raise ValueError("content must be a string or a list of text parts (specdec serves text only)")

    @field_validator("tool_call_id")
    @classmethod
    def _tool_only(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and info.data.get("role") != "tool":
            raise ValueError("only a tool message has a tool_call_id")
        return v

    @field_validator("tool_calls")
    @classmethod
    def _assistant_only(cls, v: list[ToolCall] | None, info: ValidationInfo) -> list[ToolCall] | None:
        if v is not None and info.data.get("role") != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        return v

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        # an absent or null content once reached the template as None, which it printed: the prompt "None"
        if self.content is None and not self.tool_calls:
            what = "content or tool_calls" if self.role == "assistant" else "content"
            raise ValueError(
                f"a {self.role} message needs {what} (content: a string or a list of text parts)"
            )
        return self

    def for_template(self) -> dict:
        """The message as transformers' apply_chat_template takes it: a tool call's arguments as the object
        they encode (templates `tojson` them; vLLM passes them so too), a null content as empty."""
        message: dict[str, Any] = {"role": self.role, "content": self.content or ""}
        if self.name:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": c.type,
                    "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)},
                }
                for c in self.tool_calls
            ]
        return message


def _arguments(text: str) -> Any:
    """A tool call's arguments: the JSON object they encode; text that is not one stays text."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # None: up to the server's limit / the model's context
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None  # checked, with tool_choice, by specdec.server.structured.tool_plan
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None  # accepted: a reply makes at most one call

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | None) -> bool | None:
        return _neutral(v, (None, False), "logprobs")

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, v: int | None) -> None:
        return _neutral(v, (None,), "top_logprobs")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
