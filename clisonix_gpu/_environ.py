"""Environment settings read on every call, at the cost of a dictionary lookup.

``os.environ.get`` of a name that is not set costs about 0.8 us (it raises and catches a
``KeyError``); a layer's call reads several settings, and in a model each read costs several times
that. :class:`Setting` looks the name up in the mapping behind ``os.environ`` (CPython keeps it in
``os.environ._data``, keyed by the encoded name), which every change through ``os.environ``
updates, in about 0.05 us; anywhere that mapping is not there it falls back to ``os.environ.get``.
Changes made with C's ``setenv`` behind Python's back are not seen, as with ``os.environ``.
"""

from __future__ import annotations

import os

__all__ = ["Setting"]


class Setting:
    """One environment variable and its default: :meth:`get` is ``os.environ.get(name, default)``."""

    __slots__ = ("default", "name", "_key")

    def __init__(self, name: str, default: str):
        self.name, self.default = name, default
        self._key = os.fsencode(name) if os.name == "posix" else None

    def get(self) -> str:
        data = getattr(os.environ, "_data", None)
        if self._key is None or type(data) is not dict:
            return os.environ.get(self.name, self.default)
        raw = data.get(self._key)
        return self.default if raw is None else os.fsdecode(raw)
