"""One typed schema per input: ``POST /api/generate``, ``POST /v1/completions`` and the CLI's JSONL lines.

    python -c "from python3_distillation.serving.schemas import parse, CompletionRequest; \
print(parse(CompletionRequest, b'{\"prompt\": \"Hi\", \"max_tokens\": 4}'))"

Every field has a bound (string lengths, counts, finite numbers in a range); strings must be valid
Unicode (no lone surrogates, which tokenizers refuse). Bodies are parsed and validated in one pass
(pydantic's JSON parser: nesting deeper than its recursion limit and integers of any length are
errors, not crashes). Model-dependent bounds (the context, ``top_k`` ≤ the vocabulary, prompts per
request) are checked where the model is known. Errors become :class:`SchemaError` with the field
(``param``) at fault: 400 for a body that is not JSON, 422 for JSON that breaks the schema.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from python3_distillation.generation.sampling import (
    MAX_NEW_TOKENS,
    MAX_REPETITION_PENALTY,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    MIN_REPETITION_PENALTY,
    SEED_LIMIT,
    SamplingParams,
)

MAX_PROMPT_CHARS = 65_536  # far past any 1024-token context; tokenizing this takes milliseconds
MAX_PROMPTS = 256  # per request before the server's own (smaller, configurable) limit applies
MAX_NAME_CHARS = 256  # model names, user ids
OPENAI_DEFAULT_MAX_TOKENS = 16  # OpenAI's own default for /v1/completions


class SchemaError(ValueError):
    """Input that breaks a schema; ``status`` 400 (not JSON) or 422, ``param`` the field at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 422):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def _unicode(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text holds a lone surrogate (not valid Unicode)") from None
    return s


def _stop_list(v: Any) -> Any:
    """OpenAI accepts one stop string or a list of them; null means none."""
    if v is None:
        return []
    return [v] if isinstance(v, str) else v


Text = Annotated[str, Field(max_length=MAX_PROMPT_CHARS), AfterValidator(_unicode)]
Name = Annotated[str, Field(max_length=MAX_NAME_CHARS), AfterValidator(_unicode)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS), AfterValidator(_unicode)]
Stop = Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS), BeforeValidator(_stop_list)]
Temperature = Annotated[float, Field(ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY, allow_inf_nan=False)]
TopK = Annotated[int, Field(ge=0, le=MAX_TOP_K)]
NewTokens = Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)]
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT)]

STRICT = ConfigDict(extra="forbid", strict=True)


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


class SamplingFields(BaseModel):
    """The sampling fields of the native API and of the CLI's JSONL lines (SamplingParams' names)."""

    model_config = STRICT

    max_new_tokens: NewTokens = 64
    temperature: Temperature = 1.0
    top_k: TopK = 0
    top_p: TopP = 1.0
    repetition_penalty: Penalty = 1.0
    stop: Stop = []
    seed: Seed | None = None
    ignore_eos: bool = False

    def params(self) -> SamplingParams:
        fields = self.model_dump(include=set(SamplingFields.model_fields))
        return SamplingParams(**fields).validate()


class GenerateRequest(SamplingFields):
    """``POST /api/generate``: ``prompt`` (a string) or ``prompts`` (a list), ``model``, sampling fields."""

    prompt: Text | None = None
    prompts: Prompts | None = None
    model: Name | None = None

    @model_validator(mode="after")
    def _one_prompt_field(self) -> GenerateRequest:
        if (self.prompt is None) == (self.prompts is None):
            raise ValueError("give exactly one of 'prompt' (a string) or 'prompts' (a list of strings)")
        return self

    def prompt_list(self) -> list[str]:
        return [self.prompt] if self.prompt is not None else list(self.prompts or [])


class PromptLine(SamplingFields):
    """One line of the CLI's ``--prompts-file`` JSONL: a prompt and any sampling field."""

    prompt: Text


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool | None = None


def _neutral(*allowed: Any):
    """An OpenAI field this server accepts only at its neutral value."""

    def check(v: Any) -> Any:
        if v not in allowed or isinstance(v, bool) != isinstance(allowed[-1], bool):
            raise ValueError(f"not supported by this server; omit it or send {_json(allowed[-1])}")
        return v

    return Annotated[Any, BeforeValidator(check)]


def _json(v: Any) -> str:
    return json.dumps(v)


class CompletionRequest(BaseModel):
    """``POST /v1/completions``, OpenAI's fields (plus top_k, repetition_penalty and ignore_eos, as vLLM)."""

    model_config = STRICT

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
        return SamplingParams(
            max_new_tokens=OPENAI_DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            stop=list(self.stop), seed=self.seed, ignore_eos=bool(self.ignore_eos)).validate()


# pydantic names union branches in an error's location ("int", "function-after[...]"): not fields.
_BRANCH = re.compile(r"^(int|float|str|bool|none|list|dict)$|[\[\-]")


def _error(e: ValidationError) -> SchemaError:
    first = e.errors(include_url=False, include_input=False)[0]
    loc = [str(x) for x in first.get("loc", ())]
    kind = first.get("type", "")
    msg = first.get("msg", "invalid value")
    msg = msg.removeprefix("Value error, ")
    msg = msg[:1].lower() + msg[1:]
    if kind == "json_invalid":
        return SchemaError(f"malformed JSON: {msg.removeprefix('invalid JSON: ')}", None, 400)
    if not loc:
        if kind == "model_type":
            return SchemaError("the JSON body must be an object")
        return SchemaError(msg)
    field = loc[0]
    path = ".".join(x for x in loc if not _BRANCH.search(x))
    if kind == "extra_forbidden":
        return SchemaError(f"unrecognized request argument: {field[:100]}", field[:100])
    if kind == "missing":
        return SchemaError(f"'{field}' is required", field)
    return SchemaError(f"'{path}': {msg}", field)


def parse(schema: type[BaseModel], raw: bytes | str) -> Any:
    """Validate a JSON body against ``schema`` (raises :class:`SchemaError`)."""
    if not raw.strip():
        raise SchemaError("the request body is empty; send a JSON object", None, 400)
    try:
        return schema.model_validate_json(raw)
    except ValidationError as e:
        raise _error(e) from None


def validate(schema: type[BaseModel], obj: Any) -> Any:
    """Validate already-parsed JSON (e.g. a JSONL line read with ``json.loads``)."""
    try:
        return schema.model_validate(obj)
    except ValidationError as e:
        raise _error(e) from None
