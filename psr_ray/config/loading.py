"""Building a `PSRConfig` from YAML files and dotted `key=value` overrides, with exact type checks.

`load()` merges YAML files and overrides (``rollout.num_candidates=4``) onto the defaults with OmegaConf and
converts the result into the dataclasses of `sections.py`; an unknown key or a wrong type is a ValueError that
names the field. It does not validate ranges or paths (`validation.validate` does).
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from pathlib import Path
from typing import Any

from psr_ray.config.sections import PSRConfig


def from_dict(raw: dict[str, Any], cls: type = PSRConfig, where: str = "") -> Any:
    """Builds `cls` from a plain dict, rejecting unknown keys and wrong types with the field's path."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(
            f"unknown config key '{where}{unknown[0]}'; valid keys of {where.rstrip('.') or 'the root'}: "
            f"{', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in raw.items():
        path = f"{where}{name}"
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ValueError(f"{path} must be a mapping of its fields, got {value!r}")
            kwargs[name] = from_dict(value, hint, f"{path}.")
        else:
            kwargs[name] = _coerce(value, hint, path)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _coerce(value, inner, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]  # a scalar override for a one-entry list
        (item,) = typing.get_args(hint)[:1]
        return tuple(_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        choices = [m.value for m in hint]
        if value not in choices:
            raise ValueError(f"{path} must be one of {', '.join(choices)}, got {value!r}")
        return hint(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)  # YAML writes 1e3 as a float
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ValueError(f"{path} must be of type {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def load(paths: list[str] | tuple[str, ...] = (), overrides: list[str] | tuple[str, ...] = ()) -> PSRConfig:
    """Defaults <- each YAML in `paths` <- dotted `key=value` overrides; then type-checked (not validated)."""
    from omegaconf import OmegaConf  # only the CLI and the driver need it

    # Plain dicts, not OmegaConf structured mode, which would coerce types silently behind our checks.
    merged = OmegaConf.create(PSRConfig().to_dict())
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"config file {path!r} does not exist")
        merged = _merge(merged, OmegaConf.load(path), path)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value, e.g. rollout.num_candidates=4")
        merged = _merge(merged, OmegaConf.from_dotlist([item]), f"override {item!r}")
    raw = OmegaConf.to_container(merged, resolve=True)
    assert isinstance(raw, dict)  # merged onto the defaults' mapping
    return from_dict({str(k): v for k, v in raw.items()})


def _merge(base: Any, update: Any, origin: str) -> Any:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    # Not struct mode: unknown keys pass the merge and `from_dict` names them with the valid ones.
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as err:
        raise ValueError(f"{origin}: {err}") from None
