"""The C engine of the transaction pooler (`_pooler`), behind the interface of `engine.PythonEngine`."""

from __future__ import annotations

try:
    from argon.proxy import _pooler
except ImportError:
    _pooler = None

AVAILABLE = False  # not built yet
