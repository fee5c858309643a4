"""Errors that are the user's to fix.

Anything raised as a ``QConvertError`` is printed by the CLI as one line
``error: <message>`` and exits with status 1; everything else is a bug and
keeps its traceback.  Messages name the file, tensor or key at fault and say
what to do about it.
"""


class QConvertError(Exception):
    """A problem with the user's input, options or environment."""


class CheckpointError(QConvertError):
    """A source checkpoint is malformed, unsafe or not what we expect."""


class QuantizationError(QConvertError):
    """A tensor cannot be encoded (NaN/Inf, wrong shape for the type, ...)."""
