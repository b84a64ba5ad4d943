"""The OpenAI API subset we serve: request schemas, error bodies, response and chunk shapes.

Requests are validated strictly (a string where a number belongs is an error,
not coerced) and every failure becomes an OpenAI-style error body
``{"error": {"message", "type", "param", "code"}}``. The served limits (messages per
request, stop sequences, the context length for a token-id prompt) come as the
validation context of ``parse``; sizes are checked before the items are validated.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from app.config import REQUEST_SPECULATION

Speculation = Literal[REQUEST_SPECULATION]  # type: ignore[valid-type]

# parse()'s limits when the caller gives none (AppConfig: max_messages, max_stop_sequences; the
# ingress passes max_prompt_tokens = the context length, None = unchecked here).
DEFAULT_LIMITS = {"max_messages": 2048, "max_stop_sequences": 4, "max_prompt_tokens": None}


def _limit(info: ValidationInfo, name: str):
    return (info.context or {}).get(name, DEFAULT_LIMITS[name])


class APIError(Exception):
    """An error the client gets as an OpenAI error body with this HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict:
        return {"Retry-After": str(max(1, round(self.retry_after)))} if self.retry_after is not None else {}

    @classmethod
    def from_dict(cls, d: dict) -> "APIError":
        return cls(d["status"], d["message"], d.get("type", "invalid_request_error"), d.get("param"), d.get("code"),
                   d.get("retry_after"))

    def to_dict(self) -> dict:
        return {"status": self.status, "message": self.message, "type": self.type, "param": self.param,
                "code": self.code, "retry_after": self.retry_after}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class _Common(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # extension (vLLM): -1 or 0 = off
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # torch generators take 64-bit seeds
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False  # extension (vLLM)
    speculation: Speculation = "auto"  # extension: "auto" lets the router decide
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, v):
        if v != 0:
            raise ValueError("penalties are not supported (must be 0)")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _few_stops(cls, v, info: ValidationInfo):
        limit = _limit(info, "max_stop_sequences")
        if isinstance(v, list) and len(v) > limit:
            raise ValueError(f"at most {limit} stop sequences")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    def sampling(self) -> dict:
        """Keyword arguments of engine.sampling.SamplingParams (max_tokens is settled by the server)."""
        return {
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "top_k": max(0, self.top_k or 0),
            "seed": self.seed,
            "stop": list(self.stop or []),
            "ignore_eos": self.ignore_eos,
        }


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Literal[False] | None = None

    @field_validator("messages", mode="before")
    @classmethod
    def _few_messages(cls, v, info: ValidationInfo):
        limit = _limit(info, "max_messages")
        if isinstance(v, list) and len(v) > limit:
            raise ValueError(f"at most {limit} messages per request, got {len(v)}")
        return v

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: Literal[False] = False
    suffix: None = None
    best_of: int | None = Field(None, ge=1, le=1)
    logprobs: None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_size(cls, v, info: ValidationInfo):
        if not isinstance(v, list):
            return v
        if len(v) > 1 and isinstance(v[0], (str, list)):
            raise ValueError("one prompt per request (send several requests to batch)")
        ids = v[0] if len(v) == 1 and isinstance(v[0], list) else v
        limit = _limit(info, "max_prompt_tokens")
        if limit and len(ids) >= limit and isinstance(ids[0], int):  # the server's check, before 10^6 ints parse
            raise PydanticCustomError(
                "context_length_exceeded",
                "This model's maximum context length is {limit} tokens; the prompt has {n} tokens.",
                {"limit": limit, "n": len(ids)})
        return v

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):  # one, as _prompt_size made sure
            v = v[0]
        if not v:
            raise ValueError("the prompt is empty")
        return v

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


def parse(cls: type[_Strict], raw: bytes, limits: dict | None = None) -> _Strict:
    """Raw JSON body -> a validated request, or APIError(400). limits: DEFAULT_LIMITS's keys."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"malformed JSON body: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return cls.model_validate(data, context={**DEFAULT_LIMITS, **(limits or {})})
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = list(err["loc"])
        # pydantic names the union member it tried ('str', 'list[int]'); cut there: no member fits, and the
        # first member's complaint would mislead.
        cut = next((i for i, p in enumerate(loc) if _is_union_tag(p)), len(loc))
        param = ".".join(str(p) for p in loc[:cut]) or None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "is required"
        elif cut < len(loc):
            msg = "has the wrong type or value"
        raise APIError(400, f"{param}: {msg}" if param else msg, param=param, code=err["type"]) from None


def _is_union_tag(p) -> bool:
    return isinstance(p, str) and ("[" in p or p in ("str", "int", "float", "bool", "list", "dict", "none")
                                   or p.startswith("function-") or p[:1].isupper())


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
