"""Typed models for every input edge: the strict base model, the bounds the edges share, errors as one line.

    python -c "from python3_distillation.validation import Temperature; from pydantic import TypeAdapter; \
print(TypeAdapter(Temperature).validate_python(0.7))"

Design notes: docs/design/training.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from python3_distillation.errors import BadInput

MAX_STOP_STRINGS = 4  # OpenAI's own limit
MAX_STOP_CHARS = 256  # text held back per step is checked against every stop: keep each one short
MAX_TEMPERATURE = 100.0  # past this every distribution is flat to fp32 precision anyway
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
MAX_TOP_K = 2**31 - 1  # the model's vocabulary is the real bound, checked where the model is known
MAX_NEW_TOKENS = 2**20  # the model's context is the real bound, checked where the model is known
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes [0, 2**64)
MAX_PROMPT_CHARS = 65_536  # far past any 1024-token context; tokenizing this takes milliseconds


def valid_unicode(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, which tokenizers refuse
        raise ValueError("text holds a lone surrogate (not valid Unicode)") from None
    return s


Temperature = Annotated[float, Field(ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False)]  # 0 = greedy
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]  # 1 = off
TopK = Annotated[int, Field(ge=0, le=MAX_TOP_K)]  # 0 = off
Penalty = Annotated[float, Field(ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY, allow_inf_nan=False)]
NewTokens = Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)]
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS), AfterValidator(valid_unicode)]
StopList = Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]
Text = Annotated[str, Field(max_length=MAX_PROMPT_CHARS), AfterValidator(valid_unicode)]


def _stop_list(v: Any) -> Any:
    """OpenAI accepts one stop string or a list of them; null means none."""
    return [] if v is None else [v] if isinstance(v, str) else v


Stop = Annotated[StopList, BeforeValidator(_stop_list)]  # as request bodies and JSONL rows give it

# pydantic names union branches in an error's location ("int", "function-after[...]"): not fields.
_BRANCH = re.compile(r"^(int|float|str|bool|none|list|dict)$|[\[\-]")


def first_error(e: ValidationError, dotted: bool = False) -> tuple[str, str, str, Any]:
    """(path such as ``train.lr`` or ``student.layers[1]``, error type, message, input) of ``e``'s first error;
    ``dotted``: list items as ``stop.0`` (the API's own spelling)."""
    first = e.errors(include_url=False)[0]
    path = ""
    for part in first.get("loc", ()):
        if isinstance(part, int):
            path += f".{part}" if dotted else f"[{part}]"
        elif not _BRANCH.search(str(part)):
            path += f".{part}" if path else str(part)
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    return path, first.get("type", ""), msg[:1].lower() + msg[1:], first.get("input")


def shown(value: Any) -> str:
    """A value as quoted in a one-line message (long ones cut)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def one_line(e: ValidationError, model: type[BaseModel], error: type[BadInput] = BadInput, noun: str = "field",
             label: Callable[[str], str] = str) -> BadInput:
    """``e`` as one ``error`` naming the field at fault as ``label`` spells it (a dotted key, a flag, a variable)."""
    path, kind, msg, value = first_error(e)
    if kind == "extra_forbidden":
        for part in path.split(".")[:-1]:  # the section the unknown key is in
            model = model.model_fields[part].annotation
        return error(f"unknown {noun} {path}; expected some of: {', '.join(model.model_fields)}", param=path)
    if not path:  # a rule between fields: its message names them
        return error(msg)
    return error(f"{label(path)}: {msg}, got {shown(value)}", param=path)


class Checked(BaseModel):
    """A strict model (no unknown fields, no str → number guessing) whose errors are one ``error`` line."""

    model_config = ConfigDict(extra="forbid", strict=True)
    error: ClassVar[type[BadInput]] = BadInput
    noun: ClassVar[str] = "field"  # what an unknown key is called in messages

    def __init__(self, **data: Any):
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise self.bad_input(e) from None

    # Marked as pydantic's own __init__ (as RootModel does) so that validating a nested or parsed
    # model does not call it: there the whole ValidationError, with its field path, is wanted.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @classmethod
    def label(cls, path: str) -> str:
        """How messages name the field at ``path`` (a command's flag, say)."""
        return path

    @classmethod
    def bad_input(cls, e: ValidationError) -> BadInput:
        return one_line(e, cls, cls.error, cls.noun, cls.label)

    @classmethod
    def check(cls, data: Any, **kwargs: Any):
        """``model_validate`` raising this edge's one-line error."""
        try:
            return cls.model_validate(data, **kwargs)
        except ValidationError as e:
            raise cls.bad_input(e) from None
