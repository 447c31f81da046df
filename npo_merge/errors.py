"""One small exception hierarchy whose messages are the user-facing line the CLI prints."""

from __future__ import annotations


class NpoMergeError(Exception):
    """Base class: the message is one line that says what is wrong and what to do."""

    exit_code = 1


class InputError(NpoMergeError):
    """A file, folder or value given to us is unusable (bad header, unknown keys, wrong shape...)."""


class FormatError(InputError):
    """A file is malformed or is a format we refuse to read (unsafe pickle, corrupt safetensors)."""


class KeyMappingError(InputError):
    """A tensor name that no table maps: we never skip such a key silently."""


class CompatibilityError(InputError):
    """A delta and a target disagree (architecture, missing modules, shapes)."""


class UsageError(NpoMergeError):
    """The command line itself is wrong (conflicting or missing options)."""

    exit_code = 2
