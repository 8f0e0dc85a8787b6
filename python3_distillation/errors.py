"""The one family of errors a user can fix: one line each, exit status 2, or an HTTP 4xx with a JSON reason.

    python -c "from python3_distillation.errors import BadInput; e = BadInput('top_p: too big', param='top_p'); print(e.status, e.exit_status)"

Design notes (who catches it, where): docs/design/training.md.
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2  # the exit status of every command for input the user can fix


class BadInput(ValueError):
    """Input the user can fix; the message is the whole one-line report, ``param`` the field at fault (the API's)."""

    status = 422  # what a server answers: 422 for a value that breaks a rule, 400 for a body that is not even JSON
    exit_status = EXIT_BAD_INPUT

    def __init__(self, message: str, *, param: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message, self.param = message, param
        if status is not None:
            self.status = status


class ConfigError(BadInput):
    """A configuration value or setting is unknown, of the wrong type or out of range."""


class GenerationError(BadInput):
    """Bad sampling parameters or prompt for the model at hand."""


class SchemaError(BadInput):
    """A request body or input line that breaks its schema."""


class DataError(BadInput):
    """A data source is missing, empty, unreadable or not what it claims to be."""


class ModelError(BadInput):
    """A model folder is missing or incompatible with the tokenizer / the other model."""


class AssetError(BadInput):
    """An asset (tokenizer, corpus) could not be obtained or failed its check (message says which and why)."""


class CheckpointError(BadInput):
    """A checkpoint folder is incomplete, corrupt or not what its manifest says."""


class DiskFullError(BadInput):
    """Out of disk space (the message says what, where, the space needed, what is intact); nothing published harmed."""
