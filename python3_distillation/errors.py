"""The errors a user can fix, in one light module: every command reports them in one line, exit status 2.

    python -c "from python3_distillation.errors import BadInput, EXIT_BAD_INPUT; print(EXIT_BAD_INPUT)"

Kept free of torch and transformers so a command can catch them (and answer ``--help`` or a typo in
a config key) without first loading the heavy libraries.
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2  # the exit status of every command for input the user can fix


class BadInput(ValueError):
    """Input the user can fix; the message is the whole one-line report."""


class ConfigError(BadInput):
    """A configuration value is unknown, of the wrong type or out of range."""


class DataError(BadInput):
    """A data source is missing, empty, unreadable or not what it claims to be."""


class ModelError(BadInput):
    """A model folder is missing or incompatible with the tokenizer / the other model."""


class AssetError(BadInput):
    """An asset (tokenizer, corpus) could not be obtained or failed its check (message says which and why)."""


class CheckpointError(BadInput):
    """A checkpoint folder is incomplete, corrupt or not what its manifest says."""


class DiskFullError(BadInput):
    """A write ran out of disk space (the message says what, where, about how much it needs, and
    what is still intact); nothing already published was harmed."""
