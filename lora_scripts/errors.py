"""Errors a user can cause. The CLI prints them as one line and exits with code 2; tracebacks are for bugs."""

from __future__ import annotations


class UserError(Exception):
    """Base class for mistakes in the user's input (config, data, paths)."""

    exit_code = 2


class ConfigError(UserError):
    """The config file or a command-line override is wrong."""


class DataError(UserError):
    """The training data is missing, malformed or unreadable."""


class OutOfMemory(UserError):
    """Training ran out of (GPU) memory; the message says what to change."""

    exit_code = 3
