"""One way to build any frozen config dataclass from a dict (a JSON object, CLI overrides).

`build_config(cls, values, base=...)` reads the field types from the dataclass annotations:
nested dataclasses come from nested dicts (merged onto the base's value, or the field's
default), lists become tuples, a union of tagged configs (`kind` field, e.g. the methods of
`sparge_jax.method_config`) picks its class by the dict's "kind", and every other value is
type-checked (`type_ok`). A class may define `upgrade_fields(values) -> values` to accept an
older spelling of its dict (`sparge_jax.config.SparseConfig` does). Errors are ValueErrors
that start with `config <dotted.key>` and say what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # booleans are not ints


def _arms(annotation) -> tuple:
    """The members of a union annotation (the annotation itself when it is none)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


def _config_arms(annotation) -> tuple[type, ...]:
    """The config classes among a field's types: dataclasses, and registries of tagged
    dataclasses (a base class with a `KINDS` dict, like `sparge_jax.method_config.Method`)."""
    return tuple(arm for arm in _arms(annotation) if isinstance(arm, type)
                 and (dataclasses.is_dataclass(arm) or isinstance(getattr(arm, "KINDS", None), dict)))


def _kind_of(cls: type) -> str | None:
    field = next((f for f in dataclasses.fields(cls) if f.name == "kind"), None)
    return None if field is None else field.default


def _kinds(arms: tuple[type, ...]) -> dict[str, type]:
    """kind tag -> class, over the tagged dataclasses and registries among `arms`."""
    kinds = {}
    for arm in arms:
        registry = getattr(arm, "KINDS", None)
        if isinstance(registry, dict):
            kinds.update({kind: cls for kind, cls in registry.items() if issubclass(cls, arm)})
        elif _kind_of(arm) is not None:
            kinds[_kind_of(arm)] = arm
    return kinds


def type_ok(value, annotation) -> bool:
    """Whether `value` fits a field annotation: int (not bool), float (int or finite float, not
    bool), bool, str, dict, dataclasses, tuple[T, ...] / tuple[A, B], and unions (with None)."""
    if len(_arms(annotation)) > 1:
        return any(type_ok(value, arm) for arm in _arms(annotation))
    if annotation is type(None):
        return value is None
    if annotation is int:
        return _is_int(value)
    if annotation is float:
        return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(type_ok(v, args[0]) for v in value)
        return len(value) == len(args) and all(type_ok(v, a) for v, a in zip(value, args))
    return isinstance(value, typing.get_origin(annotation) or annotation)


def type_name(annotation) -> str:
    """What `annotation` allows, in words ("an int", "a list of ints", "a finite number or null")."""
    names = {int: "an int", float: "a finite number", bool: "true or false", str: "a string", dict: "a dict",
             type(None): "null"}
    if len(_arms(annotation)) > 1:
        return " or ".join(type_name(arm) for arm in _arms(annotation))
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {type_name(args[0]).split(' ', 1)[1]}s"
        return f"a list of {len(args)} ({', '.join(type_name(a) for a in args)})"
    if isinstance(getattr(annotation, "KINDS", None), dict):
        return f"a {annotation.__name__} (a dict with kind, one of {sorted(_kinds((annotation,)))})"
    if dataclasses.is_dataclass(annotation):
        return f"a {annotation.__name__} (a dict of its fields)"
    return names.get(annotation, str(annotation))


def _pick_class(target, values: dict, base, where: str) -> type:
    """The dataclass of `target` (a dataclass or a union of tagged ones) that `values` builds."""
    arms = _config_arms(target)
    kinds = _kinds(arms)
    if not kinds and len(arms) == 1:
        return arms[0]
    if "kind" in values:
        if values["kind"] not in kinds:
            raise ValueError(f"config {where or 'top level'}: kind must be one of {sorted(kinds)}; "
                             f"got kind {values['kind']!r}")
        return kinds[values["kind"]]
    if base is not None and type(base) in kinds.values():
        return type(base)
    raise ValueError(f"config {where or 'top level'}: a section must carry kind, one of {sorted(kinds)}")


def _convert(value, annotation, current, path: str):
    """`value` of field `path` as its annotation says: sections built, lists made tuples."""
    arms = _config_arms(annotation)
    if arms and isinstance(value, dict):
        return build_config(annotation, value, base=current if isinstance(current, arms) else None,
                            where=path + ".")
    if typing.get_origin(annotation) is tuple and isinstance(value, (list, tuple)):
        args = typing.get_args(annotation)
        each = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(each) == len(value):
            return tuple(_convert(v, a, None, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, each)))
        return tuple(value)
    for arm in _arms(annotation):  # e.g. PerHead = float | tuple[float, ...]
        if typing.get_origin(arm) is tuple and isinstance(value, list):
            return _convert(value, arm, current, path)
    return value


def build_config(target, values: dict, *, base: Any = None, where: str = ""):
    """The config `target` (a frozen dataclass, or a union of tagged ones) that `values` describes.

    values: field name -> value (JSON types); nested sections are dicts. base: a config whose
    fields stand for those `values` leaves out (else the dataclass defaults); a nested section
    is merged onto the base's (or the default's) value of that field unless it names another
    kind. where: dotted prefix of `values` for error messages ("model.overrides.").
    """
    label = where.rstrip(".") or "top level"
    if not isinstance(values, dict):
        raise ValueError(f"config {label}={values!r}: expected a section (a dict of settings)")
    cls = _pick_class(target, values, base, where.rstrip("."))
    if base is not None and not isinstance(base, cls):
        base = None
    if _kind_of(cls) is not None:  # the tag picked the class; it is no init argument
        values = {name: value for name, value in values.items() if name != "kind"}
    upgrade = getattr(cls, "upgrade_fields", None)
    if upgrade is not None:
        values = upgrade(values)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"config {label}: unknown {cls.__name__} field(s) {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        path = f"{where}{name}"
        field = fields[name]
        if base is not None:
            current = getattr(base, name)
        elif field.default is not dataclasses.MISSING:
            current = field.default
        else:
            current = None
        if dataclasses.is_dataclass(hints[name]) and not isinstance(value, (dict, hints[name])):
            raise ValueError(f"config {path}={value!r}: expected a section (a dict of settings)")
        value = _convert(value, hints[name], current, path)
        if not type_ok(value, hints[name]):
            raise ValueError(f"config {path}={value!r}: expected {type_name(hints[name])}")
        kwargs[name] = value
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


class StoredConfig:
    """`to_dict` / `from_dict` of a frozen config dataclass that a converted checkpoint stores as
    its config.json (`WanConfig`, `WanVAEConfig`, `UMT5Config`)."""

    def to_dict(self) -> dict:
        """JSON-ready dict (nested configs as dicts)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict):
        """Inverse of `to_dict` (`build_config`; `upgrade_fields` of nested configs applies);
        unknown keys or wrong types raise ValueError."""
        return build_config(cls, fields)
