"""``config.model_overrides``: every field of a task's model ``Config``, settable by name.

The set of fields is derived from the dataclasses themselves (``dataclasses.fields`` and their
type hints), not kept by hand: ``decoder_lm.Config`` and ``encoder_decoder.Config`` (with
``core.ModelConfig``'s fields), and nested dataclasses such as ``position``
(``PositionConfig``) as dotted paths::

    attnzoo-train --config attnzoo:lm_tiny --workdir runs/lm \\
        --config.model_overrides.position.kind=rope \\
        --config.model_overrides.scan_layers=true --config.model_overrides.sliding_window=64

``template`` builds the ``model_overrides`` ConfigDict every experiment starts from: each field
a typed ``None`` placeholder (``None`` = the preset's value), so that ml_collections'
``config_flags`` accepts ``--config.model_overrides.<field>=<value>`` and parses the value by
the field's type. ``check_flags`` checks those flags before they are parsed (an unknown field
gets a did-you-mean naming the valid ones; a value of the wrong type names the type), and
``changes`` turns the overrides into the keyword arguments of the preset's ``replace``.

Types: ``int``, ``float``, ``bool``, ``str``, ``X | None`` (as ``X``: the placeholder already
means "keep the preset's value"), ``Literal[...]`` (its choices are checked), ``tuple[...]``
and nested dataclasses (``D | None`` too: a preset's ``None`` becomes ``D()`` with the fields
set). Other annotations are taken as Python literals (``object``).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, Union

import ml_collections
from absl import flags

__all__ = ["Field", "changes", "check_flags", "check_value", "fields", "template"]

PREFIX = "config.model_overrides."  # how a field is named on the command line (after "--")
_FLAG = re.compile(r"^--?(no)?config\.model_overrides\.([^=]*)(?:=(.*))?$", re.DOTALL)
_PARSERS: dict[type, flags.ArgumentParser] = {
    int: flags.IntegerParser(),
    float: flags.FloatParser(),
    bool: flags.BooleanParser(),
}
# Model fields that are not set through model_overrides, and why.
DERIVED = {
    "vocab_size": "the model's vocabulary is the tokenizer's; set --config.vocab_size "
    "(sentencepiece) or --config.tokenizer instead",
}
_TYPE_WORDS = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    tuple: "a tuple, e.g. '(1, 2)'",
    object: "a Python literal",
}


@dataclasses.dataclass(frozen=True)
class Field:
    """One settable model field.

    Attributes:
      path: dotted name under ``model_overrides`` (``"d_model"``, ``"position.kind"``).
      kind: the value's type: ``int``, ``float``, ``bool``, ``str``, ``tuple`` or ``object``.
      optional: whether the dataclass allows ``None`` (the preset may leave it unset).
      choices: a ``Literal``'s allowed values, else ``None``.
      group: the nested dataclass type when ``path`` names one (``position``), else ``None``.
    """

    path: str
    kind: type
    optional: bool = False
    choices: tuple[Any, ...] | None = None
    group: type | None = None

    def describe(self) -> str:
        """What a value of this field must be, e.g. ``"an integer"``, ``"one of 'a', 'b'"``."""
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        return _TYPE_WORDS[self.kind]


def _resolve(hint: Any) -> tuple[type, bool, tuple[Any, ...] | None, type | None]:
    """(kind, optional, choices, group) of a type hint."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            kind, _, choices, group = _resolve(args[0])
            return kind, True, choices, group
        return object, type(None) in typing.get_args(hint), None, None
    if origin is Literal:
        choices = typing.get_args(hint)
        kinds = {type(c) for c in choices}
        return (kinds.pop() if len(kinds) == 1 else object), False, choices, None
    if hint in (tuple, list) or origin in (tuple, list, Sequence):
        return tuple, False, None, None
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return object, False, None, hint
    if hint in (int, float, bool, str):
        return hint, False, None, None
    return object, False, None, None


def _walk(cls: type, prefix: str = "") -> Iterable[Field]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, optional, choices, group = _resolve(hints[f.name])
        path = prefix + f.name
        yield Field(path, kind, optional, choices, group)
        if group is not None:
            yield from _walk(group, path + ".")


def fields(classes: Iterable[type]) -> dict[str, Field]:
    """Every settable field of the dataclasses ``classes`` (their union), by dotted path.

    A nested dataclass appears as a group (``Field.group`` set) followed by its own fields.
    A path the classes type differently keeps the first class's type.
    """
    out: dict[str, Field] = {}
    for cls in classes:
        for field in _walk(cls):
            if field.path not in DERIVED:
                out.setdefault(field.path, field)
    return out


def template(classes: Iterable[type]) -> ml_collections.ConfigDict:
    """``model_overrides`` for ``classes``: a ConfigDict with a typed ``None`` placeholder
    (``ml_collections.FieldReference``) for every field and a nested ConfigDict per group."""
    root = ml_collections.ConfigDict()
    for path, field in fields(classes).items():
        *parents, name = path.split(".")
        node: Any = root  # a ConfigDict; its item types are dynamic
        for parent in parents:
            node = node[parent]
        if field.group is not None:
            node[name] = ml_collections.ConfigDict()
        else:
            node[name] = ml_collections.FieldReference(None, field_type=field.kind)
    return root


def _unknown(path: str, known: Mapping[str, Field], where: str) -> ValueError:
    """The did-you-mean error for a field ``path`` that ``known`` does not have."""
    parent = path.rpartition(".")[0]
    siblings = [p for p in known if p.rpartition(".")[0] == parent]
    close = difflib.get_close_matches(path, siblings or list(known), n=3, cutoff=0.6)
    hint = f' Did you mean "{close[0]}"?' if close else ""
    return ValueError(
        f'unknown model field "{path}" in {where}.{hint} Valid fields: '
        f"{', '.join(p for p, f in known.items() if f.group is None)}"
    )


def check_value(field: Field, value: Any, where: str) -> Any:
    """``value`` (a command-line string, or a Python value from an experiment file) as the
    field's type; a ``ValueError`` naming ``where``, the field and what it must be otherwise."""
    bad = ValueError(f"{where}: {field.path} must be {field.describe()}, got {value!r}")
    if isinstance(value, str) and field.kind in _PARSERS:
        try:
            value = _PARSERS[field.kind].parse(value)
        except ValueError:
            raise bad from None
    if field.kind is bool and not isinstance(value, bool):
        raise bad
    if field.kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise bad
    if field.kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        value = float(value)
    if field.kind is str and not isinstance(value, str):
        raise bad
    if field.choices is not None and value not in field.choices:
        raise bad
    return value


def check_flags(argv: Sequence[str], classes: Iterable[type]) -> None:
    """Checks every ``--config.model_overrides.<path>[=<value>]`` in ``argv`` before absl and
    ml_collections parse them: the path must be a field of ``classes`` (else a did-you-mean
    listing the valid ones), not a group, and the value must parse as the field's type.

    Raises:
      ValueError: the first bad flag, in one line that names it and the fix.
    """
    known = fields(classes)
    argv = list(argv)
    for i, arg in enumerate(argv):
        match = _FLAG.match(arg)
        if match is None:
            continue
        negated, path, value = match.groups()
        flag = arg.split("=", 1)[0]
        if path in DERIVED:
            raise ValueError(f"{flag}: {DERIVED[path]}")
        if path not in known:
            raise _unknown(path, known, flag)
        field = known[path]
        if field.group is not None:
            inner = [p for p in known if p.startswith(path + ".")]
            raise ValueError(
                f"{flag} names a group of fields ({field.group.__name__}); set them one by one, "
                f"e.g. --{PREFIX}{inner[0]}=... (fields: {', '.join(inner)})"
            )
        if field.kind is bool and value is None:
            continue  # --config.model_overrides.remat / --noconfig.model_overrides.remat
        if negated:
            raise ValueError(f"{flag}: only true/false fields take the --no prefix")
        if value is None:  # "--flag value"
            value = argv[i + 1] if i + 1 < len(argv) else ""
        if field.kind in (tuple, object):
            continue  # ml_collections parses literals; the model Config validates them
        check_value(field, value, f"--{PREFIX}{path}={value}")


def _plain(overrides: Any) -> dict[str, Any]:
    if overrides is None:
        return {}
    return overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides)


def changes(
    base: Any, overrides: Any, classes: Iterable[type] | None = None, *, where: str = ""
) -> dict[str, Any]:
    """The ``dataclasses.replace`` keywords that apply ``overrides`` to the config ``base``.

    ``overrides`` is ``model_overrides`` (a ConfigDict or a dict): ``None`` values keep
    ``base``'s; a group (``position``) given as a mapping changes only the fields it sets, of
    ``base``'s value (``D()`` where that is ``None``); a dataclass instance replaces it whole.
    Tuples may come as lists (JSON). ``classes`` default to ``type(base)``; ``where`` names the
    overrides in errors (default ``config.model_overrides``).

    Raises:
      ValueError: an unknown field (did-you-mean and the valid fields) or a mistyped value.
    """
    where = where or PREFIX.rstrip(".")
    known = fields([type(base)] if classes is None else classes)
    own = {f.name for f in dataclasses.fields(base)}
    out: dict[str, Any] = {}
    for name, value in _plain(overrides).items():
        if value is None:
            continue
        if name in DERIVED:
            raise ValueError(f"{where}.{name}: {DERIVED[name]}")
        if name not in own:
            raise _unknown(name, {p: f for p, f in known.items() if "." not in p}, where)
        field = known[name]
        if field.group is not None and isinstance(value, Mapping):
            current = getattr(base, name)
            current = field.group() if current is None else current
            nested = changes(current, value, [field.group], where=f"{where}.{name}")
            if nested:
                out[name] = dataclasses.replace(current, **nested)
        elif field.group is not None and not isinstance(value, field.group):
            raise ValueError(
                f"{where}.{name} must be a mapping of {field.group.__name__} fields, got {value!r}"
            )
        elif field.kind is tuple and isinstance(value, list):
            out[name] = tuple(value)
        elif field.kind in (tuple, object) or field.group is not None:
            out[name] = value
        else:
            out[name] = check_value(field, value, f"{where}.{name}")
    return out
