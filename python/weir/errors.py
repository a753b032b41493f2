"""Exceptions raised by Weir.

Every error the engine reports reaches Python as a subclass of :class:`WeirError`. The Rust
error chain (the step, then each cause) is kept: ``str(err)`` is the whole chain on one line,
``err.chain`` lists it cause by cause, and ``err.__cause__`` holds an :class:`EngineCause`
per level, so a traceback shows where in the engine it went wrong.

:class:`Retryable` is the other way round: a user function raises it (or a subclass) to say
that the failure may pass, and Weir retries the call with backoff before dead-lettering.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # the annotations are strings; see weir/__init__.py
    from typing import List, Optional

__all__ = [
    "WeirError",
    "ConfigError",
    "DataError",
    "ExternalError",
    "InternalError",
    "FunctionError",
    "EngineCause",
    "Retryable",
]


class WeirError(Exception):
    """Base class of every error Weir raises."""

    #: The failing step's id, when the engine named one.
    step: Optional[str]
    #: The error chain, outermost first.
    chain: List[str]

    def __init__(self, message: str, step: Optional[str] = None, chain: Optional[List[str]] = None):
        super().__init__(message)
        self.step = step
        self.chain = list(chain or [message])


class ConfigError(WeirError, ValueError):
    """The pipeline or its settings are wrong: an unknown key, a missing column, a bad
    expression. Fix the pipeline."""


class DataError(WeirError):
    """The input could not be processed in a way that stops the job (rather than
    dead-lettering one record)."""


class ExternalError(WeirError):
    """A server or the file system failed, after any retries."""


class InternalError(WeirError):
    """A bug in Weir. Please report it with the message."""


class FunctionError(WeirError):
    """A Python function of the pipeline failed in a way that stops the job (a function whose
    ``on_error`` is ``"fail"``, or one that returned the wrong shape)."""


class EngineCause(Exception):
    """One level of the engine's error chain, attached as ``__cause__``."""


class Retryable(Exception):
    """Raise this (or subclass it) from a function when the failure may pass, such as a
    lookup that timed out. Weir retries with exponential backoff and jitter, up to the step's
    ``retry`` settings, then dead-letters the rows. Other exceptions are not retried."""
