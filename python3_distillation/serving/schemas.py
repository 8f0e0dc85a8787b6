"""One typed schema per request body: ``POST /api/generate`` and ``POST /v1/completions``.

    python -c "from python3_distillation.serving.schemas import parse, CompletionRequest; \
print(parse(CompletionRequest, b'{\"prompt\": \"Hi\", \"max_tokens\": 4}'))"

Errors are :class:`SchemaError` naming the field (``param``) at fault: 400 for a body that is not JSON, 422
for JSON that breaks the schema. The bounds: README.md, "Serving" (limits); design notes: docs/design/serving.md.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, ValidationError, model_validator

from python3_distillation.errors import SchemaError
from python3_distillation.generation.sampling import SamplingParams
from python3_distillation.validation import (NewTokens, Penalty, Seed, Stop, Temperature, Text, TopK, TopP,
                                              first_error, valid_unicode)

MAX_PROMPTS = 256  # per request before the server's own (smaller, configurable) limit applies
MAX_NAME_CHARS = 256  # model names, user ids
OPENAI_DEFAULT_MAX_TOKENS = 16  # OpenAI's own default for /v1/completions
Name = Annotated[str, Field(max_length=MAX_NAME_CHARS), AfterValidator(valid_unicode)]


def _prompts(v: Any) -> Any:
    """A string or a non-empty list of strings; OpenAI's token-id prompts are refused by name."""
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not v:
        raise ValueError("must be a string or a non-empty list of strings")
    if not all(isinstance(p, str) for p in v):
        raise ValueError("every prompt must be a string (token-id prompts are not supported)")
    return v


Prompts = Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS), BeforeValidator(_prompts)]


class GenerateRequest(SamplingParams):
    """``POST /api/generate``: ``prompt`` (a string) or ``prompts`` (a list), ``model``, sampling fields."""

    stop: Stop = []
    prompt: Text | None = None
    prompts: Prompts | None = None
    model: Name | None = None

    @model_validator(mode="after")
    def _one_prompt_field(self) -> GenerateRequest:
        if (self.prompt is None) == (self.prompts is None):
            raise ValueError("give exactly one of 'prompt' (a string) or 'prompts' (a list of strings)")
        return self


class StreamOptions(BaseModel):
    model_config = SamplingParams.model_config
    include_usage: bool | None = None


def _neutral(*allowed: Any):
    """An OpenAI field this server accepts only at its neutral value."""

    def check(v: Any) -> Any:
        if v not in allowed or isinstance(v, bool) != isinstance(allowed[-1], bool):
            raise ValueError(f"not supported by this server; omit it or send {json.dumps(allowed[-1])}")
        return v

    return Annotated[Any, BeforeValidator(check)]


class CompletionRequest(BaseModel):
    """``POST /v1/completions``, OpenAI's fields (plus top_k, repetition_penalty and ignore_eos, as vLLM)."""

    model_config = SamplingParams.model_config

    prompt: Prompts
    model: Name | None = None
    max_tokens: NewTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[int, Field(ge=1, le=MAX_PROMPTS)] | None = None
    stop: Stop = []
    seed: Seed | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    echo: bool | None = None
    user: Name | None = None
    top_k: TopK | None = None
    repetition_penalty: Penalty | None = None
    ignore_eos: bool | None = None
    logprobs: _neutral(None) = None
    best_of: _neutral(None, 1) = None
    suffix: _neutral(None, "") = None
    presence_penalty: _neutral(None, 0) = None
    frequency_penalty: _neutral(None, 0) = None
    logit_bias: _neutral(None, {}) = None

    def params(self) -> SamplingParams:
        """OpenAI's names and defaults mapped onto SamplingParams (each field checked already)."""
        return SamplingParams.model_construct(
            max_new_tokens=OPENAI_DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            stop=list(self.stop), seed=self.seed, ignore_eos=bool(self.ignore_eos))


def _error(e: ValidationError) -> SchemaError:
    path, kind, msg, _ = first_error(e, dotted=True)
    field = str(e.errors()[0]["loc"][0]) if path else ""
    if kind == "json_invalid":
        return SchemaError(f"malformed JSON: {msg.removeprefix('invalid JSON: ')}", status=400)
    if not path:
        return SchemaError("the JSON body must be an object" if kind == "model_type" else msg)
    if kind == "extra_forbidden":
        return SchemaError(f"unrecognized request argument: {field[:100]}", param=field[:100])
    if kind == "missing":
        return SchemaError(f"'{field}' is required", param=field)
    return SchemaError(f"'{path}': {msg}", param=field)


def parse(schema: type[BaseModel], raw: bytes | str) -> Any:
    if not raw.strip():
        raise SchemaError("the request body is empty; send a JSON object", status=400)
    try:
        return schema.model_validate_json(raw)
    except ValidationError as e:
        raise _error(e) from None
