"""Error types raised by clisonix-gpu before any kernel runs."""

from __future__ import annotations


class ShapeError(ValueError):
    """Array shapes that do not fit together; the message names every shape involved.

    Example:

    >>> cg.transform_matrix(np.ones((2, 3)), np.ones((4, 5)))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    clisonix_gpu.errors.ShapeError: ...
    """


class BackendUnavailable(RuntimeError):
    """A requested backend cannot run here; the message says what to install or change.

    Example:

    >>> with cg.use_backend("cupy"):  # CuPy kernels take CuPy arrays only
    ...     cg.pack_bits(np.ones(3))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    clisonix_gpu.errors.BackendUnavailable: backend 'cupy' ...
    """
