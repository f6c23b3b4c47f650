"""Error types raised by clisonix-gpu before any kernel runs."""

from __future__ import annotations


class ShapeError(ValueError):
    """Array shapes that do not fit together; the message names every shape involved."""


class BackendUnavailable(RuntimeError):
    """A requested backend cannot run here; the message says what to install or change."""
