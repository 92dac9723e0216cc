"""Optional extras (``[deploy]``, ``[eval]``): imported only when a feature needs them, with one error
that names the extra and the install line when they are missing."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError, ValueError):
    """An optional extra is not installed (a ValueError too: the CLI reports it as bad input, exit 2)."""


def install_line(extra: str) -> str:
    return f"pip install -e '.[{extra}]' (or pip install 'dpruner-lightning[{extra}]')"


def require(extra: str, purpose: str, *modules: str) -> ModuleType:
    """Import ``modules`` (the first is returned) or raise :class:`MissingExtraError` saying that
    ``purpose`` needs the extra ``extra`` and how to install it."""
    try:
        loaded = [importlib.import_module(m) for m in modules]
    except ImportError as err:
        raise MissingExtraError(f"{purpose} needs the optional extra [{extra}], which is not installed here ({err}): "
                                f"{install_line(extra)}") from err
    return loaded[0]
