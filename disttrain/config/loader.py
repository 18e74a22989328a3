"""Reading a config: a YAML file or keyword settings, ``key.path=value`` overrides, validation.

``load(path, overrides)`` and ``from_settings(settings, overrides)`` return an
:class:`ExperimentConfig` or raise :class:`ConfigError` whose lines read
``SOURCE: key.path: got X, expected Y`` (plus a HINT where one helps).
"""

from __future__ import annotations

import copy
import difflib
import errno
import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import ConfigError
from .data import DATA_KINDS
from .experiment import ExperimentConfig
from .model import MODEL_KINDS

_EXPECTED = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "tuple_type": "a list",
}


def _describe(err: dict) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind in _EXPECTED:
        return _EXPECTED[kind]
    if kind == "literal_error":
        return "one of " + str(ctx.get("expected", ""))
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        sym = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()), "")
        return f"a value {sym} {bound}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        kinds = _BUILTIN_KINDS.get(str(err["loc"][0]), ())
        return f"a kind ({', '.join(repr(k) for k in kinds)}) or a target 'package.module:factory'"
    if kind == "string_pattern_mismatch":
        return "an import target 'package.module:attribute'"
    return err["msg"][0].lower() + err["msg"][1:]


# The tagged sections: tag -> class (what _format strips from error locations and lists keys of).
_TAGGED: dict[str, dict[str, type[BaseModel]]] = {"model": dict(MODEL_KINDS), "data": dict(DATA_KINDS)}
_BUILTIN_KINDS = {sec: [t for t in tags if t != "import"] for sec, tags in _TAGGED.items()}


def _known_keys(loc: tuple, tagged: type | None = None) -> list[str]:
    model: Any = ExperimentConfig
    if tagged is not None:
        model, loc = tagged, loc[1:]
    for part in loc[:-1]:
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return []
        ann = fields[part].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _format(source: str, exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        loc, tagged = tuple(err["loc"]), None
        if len(loc) > 1 and loc[1] in _TAGGED.get(str(loc[0]), {}):
            tagged = _TAGGED[str(loc[0])][str(loc[1])]
            loc = loc[:1] + loc[2:]
        path = ".".join(str(p) for p in loc) or "<top>"
        if err["type"] == "value_error":  # a validator's own sentence (it may carry a HINT line)
            where = f"{path}: " if loc else ""
            lines.append(f"{source}: {where}{str(err['msg']).removeprefix('Value error, ')}")
            continue
        if err["type"] == "extra_forbidden":
            known = _known_keys(loc, tagged)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"{source}: {path}: unknown key{hint}; expected one of: {', '.join(known)}")
            continue
        got = err.get("input")
        got_s = "nothing" if err["type"] == "missing" else repr(got)
        lines.append(f"{source}: {path}: got {got_s}, expected {_describe(err)}")
    return lines


def _apply_override(data: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError([f"override {item!r}: expected key.path=value, e.g. train.steps=100"])
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        raise ConfigError([f"override {item!r}: value is not valid YAML ({exc})"]) from None
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError([f"override {item!r}: {part} is not a section"])
        node = nxt
    node[parts[-1]] = value


def load(
    path: str,
    overrides: Sequence[str] = (),
    import_targets: bool = True,
    sha256: str | None = None,
) -> ExperimentConfig:
    """Read, override and validate an experiment file. Raises ConfigError with user-facing lines.

    The config file's directory and the current directory are appended to ``run.import_path``;
    with ``import_targets`` every import target is imported now, so a bad one is reported as
    ``FILE: model.target: cannot import 'x:y' (ModuleNotFoundError: ...)`` before any rank starts.
    With ``sha256`` (a resolved config that ``save`` wrote, handed to a worker) the bytes must have
    that digest before anything of them is used, and no directory is added: the resolved
    ``run.import_path`` is complete, and the run directory is never put on the import path."""
    try:
        nofollow = os.O_NOFOLLOW if sha256 is not None else 0  # a user's own config may be a link
        fd = os.open(path, os.O_RDONLY | nofollow | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            raw = f.read(64 << 20)
        if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
            raise ConfigError(
                [
                    f"{path}: its SHA-256 is not the one of the config the job was started with; it changed after "
                    "the launch and was not used\nHINT: someone else may be able to write the run directory "
                    "(see SECURITY.md)"
                ]
            )
        data = yaml.safe_load(raw)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError([f"{path}: is a symbolic link; a resolved config is never read through one"]) from None
        if not isinstance(exc, FileNotFoundError):
            raise ConfigError([f"{path}: cannot read ({exc.strerror})"]) from None
        raise ConfigError([f"{path}: no such file"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError([f"{path}{where}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: got {type(data).__name__}, expected a mapping of sections"])
    here = None if sha256 is not None else os.path.dirname(os.path.abspath(path))
    return _build(data, path, overrides, here, import_targets)


def from_settings(
    settings: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    base: str | None = None,
    import_targets: bool = True,
) -> ExperimentConfig:
    """A config from keyword settings, without a YAML file: ``{"train": {"steps": 100}, "launch":
    {"backend": "shm"}}`` (one mapping per section, as in the YAML), over the file ``base`` when
    given. Raises ConfigError whose lines name ``<settings>`` (or the base file) and the key path."""
    if base is not None:
        cfg = load(base, import_targets=False)
        data, source, here = (
            cfg.model_dump(mode="json"),
            f"{base} (with settings)",
            os.path.dirname(os.path.abspath(base)),
        )
    else:
        data, source, here = {}, "<settings>", os.getcwd()
    for section, value in (settings or {}).items():
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        if isinstance(value, Mapping) and isinstance(data.get(section), dict):
            data[section] = _merged(data[section], value)
        else:
            data[section] = copy.deepcopy(value)
    return _build(data, source, overrides, here, import_targets)


def _merged(old: dict, new: Mapping) -> dict:
    out = dict(old)
    for key, value in new.items():
        both = isinstance(value, Mapping) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else copy.deepcopy(value)
    return out


def _build(
    data: dict, source: str, overrides: Sequence[str], here: str | None, import_targets: bool
) -> ExperimentConfig:
    for item in overrides:
        _apply_override(data, item)
    if overrides:
        source += " (with overrides)"
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format(source, exc)) from None
    if here is not None:  # None: a resolved config handed to a worker, whose import path is complete
        cfg.run.import_path = list(dict.fromkeys([*cfg.run.import_path, here, os.getcwd()]))
    if import_targets:
        from ..targets import TargetError, import_target

        lines = []
        for key, spec in cfg.targets().items():
            try:
                import_target(spec, cfg.run.import_path)
            except TargetError as exc:
                lines.append(f"{source}: {key}: {exc}")
        if lines:
            raise ConfigError(lines)
    return cfg


def dump(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save(cfg: ExperimentConfig, path: str) -> str:
    """Write the resolved config (a fresh temporary renamed over ``path``; a planted symlink is
    replaced, not followed). Returns its SHA-256, which workers check before using it."""
    from ..rundir import write_atomic

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    data = dump(cfg).encode()
    write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()
