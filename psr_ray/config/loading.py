"""Building a `PSRConfig` from YAML files and dotted `key=value` overrides, with exact type checks.

`load()` merges YAML files and overrides (``rollout.num_candidates=4``) onto the defaults with OmegaConf and
converts the result into the dataclasses of `sections.py`; an unknown key or a wrong type is a UserError that
names the field. It does not validate ranges or paths (`validation.validate` does).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from pathlib import Path
from typing import Any

from psr_ray.config.errors import UserError
from psr_ray.config.sections import PSRConfig


def from_dict(raw: dict[str, Any], cls: type = PSRConfig, where: str = "") -> Any:
    """Builds `cls` from a plain dict, rejecting unknown keys and wrong types with the field's path."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(
            f"unknown config key '{where}{unknown[0]}'; valid keys of {where.rstrip('.') or 'the root'}: "
            f"{', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in raw.items():
        path = f"{where}{name}"
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise UserError(f"{path} must be a mapping of its fields, got {value!r}")
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
            raise UserError(f"{path} must be one of {', '.join(choices)}, got {value!r}")
        return hint(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{path} must be a finite number, got {value}")
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)  # YAML writes 1e3 as a float
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise UserError(f"{path} must be of type {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def load(
    paths: list[str] | tuple[str, ...] = (),
    overrides: list[str] | tuple[str, ...] = (),
    *,
    base: dict[str, Any] | None = None,
) -> PSRConfig:
    """Defaults (or `base`, a config's `to_dict()`) <- each YAML in `paths` <- dotted `key=value` overrides;
    then type-checked (not validated). Every mistake is a one-line UserError naming the file, override or
    field."""
    from omegaconf import OmegaConf  # only the CLI and the driver need it
    from omegaconf.errors import OmegaConfBaseException

    # Plain dicts, not OmegaConf structured mode, which would coerce types silently behind our checks.
    merged = OmegaConf.create(PSRConfig().to_dict() if base is None else base)
    for path in paths:
        merged = _merge(merged, _read_yaml(path), f"config file {path}")
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like section.key=value, e.g. rollout.num_candidates=4")
        key, _, value = item.partition("=")
        try:
            update = OmegaConf.from_dotlist([item])
        except Exception as err:  # yaml's and OmegaConf's parse errors
            reason = getattr(err, "problem", None) or _first_line(err)
            raise UserError(f"override {item!r}: {value!r} is not a valid YAML value for {key} ({reason})") from None
        merged = _merge(merged, update, f"override {item!r}")
    try:
        raw = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        raise UserError(f"{key}: cannot resolve its ${{...}} interpolation ({_first_line(err)})") from None
    assert isinstance(raw, dict)  # merged onto the defaults' mapping
    return from_dict({str(k): v for k, v in raw.items()})


def section_sources(paths: list[str] | tuple[str, ...], overrides: list[str] | tuple[str, ...] = (),
                    *, preset: str | None = None) -> str:  # fmt: skip
    """One line saying where each section of `load(paths, overrides)` came from: the files that set it, or the
    built-in (paper-sized) defaults; then the overridden keys. A `--config` file replaces the `preset` rather
    than layering on it, which this line makes visible (`validate` and `run` print it)."""
    sections = [f.name for f in dataclasses.fields(PSRConfig)]
    origins: dict[str, list[str]] = {name: [] for name in sections}
    for path in paths:
        for key in _read_yaml(path):
            origins[str(key)].append(str(path))
    groups: dict[str, list[str]] = {}
    for name in sections:
        groups.setdefault(" + ".join(origins[name]) or "the built-in defaults (paper-sized)", []).append(name)
    line = "config sections: " + "; ".join(f"{', '.join(names)} from {where}" for where, names in groups.items())
    given = {Path(path).expanduser().resolve() for path in paths}
    if preset is not None and Path(preset).resolve() not in given and not all(origins.values()):
        line += f" (the preset {preset} is not used: list it first, --config {preset} --config FILE, to layer on it)"
    keys = [item.partition("=")[0] for item in overrides]
    return line + (f"; overridden: {', '.join(keys)}" if keys else "")


def _read_yaml(path: str) -> Any:
    """One config file as an OmegaConf mapping; a file that is missing, unreadable, not YAML or not a mapping
    of sections is a UserError naming it (with the line, for YAML errors)."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf._yaml import get_yaml_loader  # OmegaConf's own loader: it refuses duplicate keys

    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"config file {path!r} is a folder, not a YAML file" if file.is_dir()
                        else f"config file {path!r} does not exist")  # fmt: skip
    try:
        raw = yaml.load(file.read_text(encoding="utf-8"), Loader=get_yaml_loader())
    except OSError as err:
        raise UserError(f"config file {path}: cannot read it ({err.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text; is it a YAML file?") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or _first_line(err)
        raise UserError(f"config file {path}: invalid YAML{where}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must be a mapping of sections (model:, data:, rollout:, ...), "
                        f"got a {type(raw).__name__}")  # fmt: skip
    sections = [f.name for f in dataclasses.fields(PSRConfig)]
    if raw and not any(str(key) in sections for key in raw):
        # Another tool's YAML (a Ray cluster launcher's, say): said before its ${...} would be resolved.
        keys = [str(key) for key in raw]
        shown = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
        raise UserError(f"config file {path} is not a psr_ray config: its top-level keys ({shown}) are not "
                        f"sections ({', '.join(sections)})")  # fmt: skip
    for section, value in raw.items():
        default = getattr(PSRConfig(), str(section), None)
        if dataclasses.is_dataclass(default) and not isinstance(value, dict):
            raise UserError(f"config file {path}: {section} must be a mapping of its fields, got {value!r}")
    try:
        return OmegaConf.create(raw)
    except Exception as err:  # a broken ${...} interpolation, OmegaConf's limits (too many YAML aliases)
        key = getattr(err, "full_key", None)
        raise UserError(f"config file {path}: {key + ': ' if key else ''}{_first_line(err)}") from None


def _merge(base: Any, update: Any, origin: str) -> Any:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    # Not struct mode: unknown keys pass the merge and `from_dict` names them with the valid ones.
    try:
        return OmegaConf.merge(base, update)
    except (OmegaConfBaseException, TypeError) as err:  # TypeError: a list or value where a mapping belongs
        key = getattr(err, "full_key", None)
        if key is None and isinstance(err, TypeError):
            key = next((k for k in update if not OmegaConf.is_dict(update[k]) and OmegaConf.is_dict(base.get(k))),
                       None)  # fmt: skip
            if key is not None:
                raise UserError(f"{origin}: {key} must be a mapping of its fields, got {update[key]!r}") from None
        raise UserError(f"{origin}: {key + ': ' if key else ''}{_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
