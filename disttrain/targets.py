"""Import targets: the user's own model, data, collate and loss named in YAML as ``package.module:attribute``.

A target resolves with the directories of ``run.import_path`` first (``config.load`` puts the
config file's directory and the current directory there), then installed packages, like
``python -m`` from the config's folder would. Every rank (and ``disttrain run`` itself, at
load time) imports the same way, so a target that does not import is reported once, before
any rank starts:

    run.yaml: model.target: cannot import 'mymodels:biuld' (AttributeError: module 'mymodels' has no attribute 'biuld')
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable
from typing import Any

from .errors import DisttrainError


class UserCodeError(DisttrainError):
    """The user's model, data or step function gave something the trainer cannot use. ``str()`` says
    what was expected; workers print it without a traceback."""


class TargetError(UserCodeError):
    """A target that does not import, or is not callable. ``str()`` is the user-facing reason."""


def add_import_path(paths: Iterable[str]) -> None:
    """Put ``paths`` at the front of ``sys.path`` (first one first), each once."""
    for p in reversed(list(paths)):
        if p in sys.path:
            sys.path.remove(p)
        sys.path.insert(0, p)


def import_target(spec: str, paths: Iterable[str] = ()) -> Callable[..., Any]:
    """The callable named by ``spec`` ('package.module:attribute[.attribute]'). Raises TargetError."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise TargetError(f"cannot import {spec!r} (expected 'package.module:attribute', e.g. 'mymodels:build')")
    add_import_path(paths)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may fail in any way while it imports
        raise TargetError(f"cannot import {spec!r} ({type(exc).__name__}: {exc})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise TargetError(f"cannot import {spec!r} (AttributeError: {exc})") from None
    if not callable(obj):
        raise TargetError(f"cannot import {spec!r} (it is a {type(obj).__name__}, not a callable)")
    return obj


def call_target(key: str, spec: str, paths: Iterable[str], *args: Any, **kwargs: Any) -> Any:
    """Import ``spec`` and call it; an exception inside names the key and the target (traceback kept)."""
    fn = import_target(spec, paths)
    try:
        return fn(*args, **kwargs)
    except TypeError as exc:
        raise TargetError(f"{key}: calling {spec!r} failed: {exc}\nHINT: check {key.rsplit('.', 1)[0]}.kwargs") from exc
