"""Safe loading of the Recipe1M and SEJE pickles.

``classes1M.pkl`` holds two pickles back to back; SEJE's feature pickles ({id: float[300]},
{id: [float[300], ...]}, {id: int}) and im2recipe's ``*_keys.pkl`` and LMDB values are single
pickles, often written by Python 2. All go through :class:`RestrictedUnpickler` from
``jointgen.data.images.common``, which admits plain containers, numbers, strings, bytes and numpy
arrays only, so a tampered file cannot run code.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from jointgen.data.images.common import PickleFormatError, RestrictedUnpickler, pickle_error

__all__ = [
    "PickleFormatError",
    "RecipeUnpickler",
    "load_feature_pickle",
    "restricted_load_all",
    "restricted_loads",
]


class RecipeUnpickler(RestrictedUnpickler):
    """:class:`RestrictedUnpickler` plus ``bytes``, which protocol-2 pickles written by Python 3
    use for empty byte strings (an empty numpy array's data, e.g. a recipe without
    instructions)."""

    _extra = {("__builtin__", "bytes"): bytes, ("builtins", "bytes"): bytes}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._extra:
            return self._extra[(module, name)]
        return super().find_class(module, name)


def restricted_loads(data: bytes, source: str, encoding: str = "latin1") -> Any:
    """Unpickle ``data`` (e.g. an LMDB value) through the restricted unpickler."""
    try:
        return RecipeUnpickler(io.BytesIO(data), source=source, encoding=encoding).load()
    # a damaged pickle fails in many ways; no foreign code runs here (see RestrictedUnpickler)
    except Exception as e:  # noqa: BLE001
        raise pickle_error(source, e) from None


def restricted_load_all(path: str | Path, count: int = 1, encoding: str = "latin1") -> list[Any]:
    """The first ``count`` pickles stored one after another in ``path``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        PickleFormatError: the file is truncated, holds fewer pickles, or refers to a
            global other than numpy's array constructors (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pickle file not found: {path}")
    out = []
    with open(path, "rb") as f:
        for k in range(count):
            try:
                out.append(RecipeUnpickler(f, source=path, encoding=encoding).load())
            except EOFError:
                raise PickleFormatError(
                    f"{path}: holds {k} pickle(s), expected {count} (truncated?)"
                ) from None
            except Exception as e:  # noqa: BLE001 - as in restricted_loads
                raise pickle_error(path, e) from None
    return out


def load_feature_pickle(path: str | Path) -> Any:
    """One SEJE/im2recipe pickle (Python-2 strings decoded as latin-1)."""
    return restricted_load_all(path, 1)[0]
