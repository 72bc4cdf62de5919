"""YAML loading with dotted command-line overrides, and error messages a user can act on.

    cfg = load_config("jobs/configs/finetune_smoke.yaml", TrainJobConfig, ["train.lr=2e-5"])

A typo (``train.lrr``), a wrong type (``train.lr=fast``) or a missing key is reported with the
dotted key, the file it came from, what was expected, and a close match for misspelt keys.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Sequence, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from llava_platform.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def parse_overrides(items: Sequence[str]) -> list[tuple[list[str], Any]]:
    """Parse ``key.sub=value`` strings; values are read as YAML scalars/lists (``3``, ``true``, ``[a, b]``).

    Raises:
        ConfigError: an item has no ``=`` or an empty key.
    """
    parsed = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from e
        parsed.append((key.strip().split("."), value))
    return parsed


def apply_overrides(data: dict[str, Any], items: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted overrides applied (intermediate mappings are created)."""
    out = copy.deepcopy(data)
    for path, value in parse_overrides(items):
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(
                    f"override {'.'.join(path)}: `{'.'.join(path[: i + 1])}` is a value, not a section"
                )
            node = child
        node[path[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from a file.

    Raises:
        ConfigError: the file is missing, unreadable, not YAML, or not a mapping at the top.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ConfigError(f"config file {p} does not exist") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} cannot be read: {e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys at the top, not {type(data).__name__}")
    return data


def validate(cls: type[M], data: dict[str, Any], source: str = "<config>") -> M:
    """Validate ``data`` against ``cls``, turning pydantic's errors into one readable ``ConfigError``."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(cls, e, source)) from e


def load_config(path: str | Path | None, cls: type[M], overrides: Sequence[str] = ()) -> M:
    """Load a YAML config file (or nothing, when ``path`` is None), apply overrides, validate.

    Args:
        path: YAML file; None starts from an empty mapping (all keys from overrides).
        cls: the pydantic model to validate against.
        overrides: ``key.sub=value`` strings, applied in order.

    Raises:
        ConfigError: the file, an override, or the resulting config is invalid.
    """
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    source = str(path) if path is not None else "command-line overrides"
    if overrides and path is not None:
        source += " (with --set overrides)"
    return validate(cls, data, source)


def format_validation_error(cls: type[BaseModel], err: ValidationError, source: str) -> str:
    lines = [f"invalid config in {source}:"]
    for item in err.errors():
        loc = [str(p) for p in item["loc"]]
        key = ".".join(loc) or "<top>"
        kind = item["type"]
        if kind == "extra_forbidden":
            known = _fields_at(cls, item["loc"][:-1])
            hint = difflib.get_close_matches(loc[-1], known, n=1)
            msg = f"unknown key `{key}`"
            msg += f"; did you mean `{'.'.join(loc[:-1] + [hint[0]])}`?" if hint else ""
            if known:
                msg += f" (known keys here: {', '.join(sorted(known))})"
        elif kind == "missing":
            msg = f"missing required key `{key}`"
        else:
            shown = item.get("input")
            text = item["msg"].removeprefix("Value error, ")
            msg = f"`{key}`: {text}" + (f" (got {shown!r})" if not isinstance(shown, dict) else "")
        lines.append(f"  - {msg}")
    return "\n".join(lines)


def _fields_at(cls: type[BaseModel], loc: tuple) -> list[str]:
    """Names of the fields of the (nested) model found at ``loc``; [] when it cannot be resolved."""
    model: Any = cls
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return []
        model = _model_in(model.model_fields[part].annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _model_in(annotation: Any) -> Any:
    """The BaseModel class inside ``Optional[X]`` / ``X | None``, or the annotation itself."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None:
        for arg in get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return annotation
