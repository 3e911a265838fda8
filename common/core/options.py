"""A target's options, declared once: make variable, CLI flag, recipe key, default, help.

Every target declares its options as one frozen dataclass whose fields are made with
:func:`option`. From that one declaration come

* the command line (:func:`add_arguments`: ``--<make-variable-in-lower-case>``),
* the values (:func:`resolve`: command line over the recipe's ``targets.<target>`` object
  over the field default, each parsed and checked by the field's :class:`Kind`),
* the recipe schema fragment (:func:`recipe_schema`; ``models/schema.json`` must equal it,
  tests/test_target_contract.py checks), and
* the make variables ``target.mk`` passes through (:func:`make_variables`; the same test
  reads ``<T>_OPTIONS`` from each ``target.mk``).

So ``KV_LEN`` is spelled once, in the dataclass, and a typo in a recipe or on the command
line fails with the variable named before any slow step. Checks between fields live in the
dataclass's ``__post_init__`` (it raises :class:`EdgeforgeError`).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from common.core.errors import EdgeforgeError
from common.core.recipes import Recipe

T = TypeVar("T")


class Kind:
    """How one option's value is written (JSON schema) and read (from text or JSON).

    ``parse`` receives a string from the command line or a JSON value from a recipe (which
    the schema has already checked) and returns the typed value or raises ``ValueError``
    with a short reason; :func:`resolve` turns that into an error naming the option.
    """

    @property
    def schema(self) -> dict[str, Any]:
        """The JSON schema of the value in a recipe."""
        return {}

    def parse(self, value: Any) -> Any:
        return value


@dataclass(frozen=True)
class Integer(Kind):
    minimum: int | None = None

    @property
    def schema(self) -> dict[str, Any]:
        return {"type": "integer"} | ({} if self.minimum is None else {"minimum": self.minimum})

    def parse(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError("expected an integer")
        try:
            number = int(str(value).strip())
        except ValueError:
            raise ValueError("expected an integer") from None
        if self.minimum is not None and number < self.minimum:
            raise ValueError(f"must be >= {self.minimum}")
        return number


@dataclass(frozen=True)
class Number(Kind):
    """A real number above ``above`` (exclusive)."""

    above: float | None = None

    @property
    def schema(self) -> dict[str, Any]:
        bound = {} if self.above is None else {"exclusiveMinimum": self.above}
        return {"type": "number"} | bound

    def parse(self, value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        try:
            number = float(str(value).strip()) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise ValueError("expected a number") from None
        if self.above is not None and not number > self.above:
            raise ValueError(f"must be > {self.above:g}")
        return number


def _pick(value: Any, values: tuple[Any, ...], fold_case: bool) -> Any:
    """The entry of ``values`` that ``value`` names (text as written, or case-folded)."""
    for choice in values:
        text = str(value).strip() if isinstance(value, str) else None
        if value == choice or text == str(choice):
            return choice
        if fold_case and text is not None and text.lower() == str(choice).lower():
            return choice
    raise ValueError(f"{value!r} is not one of {', '.join(map(str, values))}")


@dataclass(frozen=True)
class Choice(Kind):
    """One of ``values`` (strings or integers; command-line text matches the written value,
    ignoring case with ``fold_case``)."""

    values: tuple[Any, ...]
    fold_case: bool = False

    @property
    def schema(self) -> dict[str, Any]:
        return {"enum": list(self.values)}

    def parse(self, value: Any) -> Any:
        return _pick(value, self.values, self.fold_case)


@dataclass(frozen=True)
class Boolean(Kind):
    """``1/0/true/false/yes/no/on/off`` (make variables are text) or a JSON boolean."""

    @property
    def schema(self) -> dict[str, Any]:
        return {"type": "boolean"}

    def parse(self, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected 1 or 0 (true/false)")


@dataclass(frozen=True)
class ChoiceList(Kind):
    """A comma-separated list (or a JSON list) of ``values``, order kept, duplicates dropped."""

    values: tuple[str, ...]
    fold_case: bool = False
    #: Whether a recipe may also write the list as one comma-separated string.
    text_in_recipe: bool = True

    @property
    def schema(self) -> dict[str, Any]:
        items = {"type": "array", "minItems": 1, "items": {"enum": list(self.values)}}
        return {"anyOf": [{"type": "string"}, items]} if self.text_in_recipe else items

    def parse(self, value: Any) -> tuple[str, ...]:
        items = value if isinstance(value, list | tuple) else str(value).split(",")
        named = [str(item).strip() for item in items if str(item).strip()]
        if not named:
            raise ValueError(f"is empty; name one or more of {', '.join(self.values)}")
        return tuple(dict.fromkeys(_pick(item, self.values, self.fold_case) for item in named))


@dataclass(frozen=True)
class Text(Kind):
    """Free text (a prompt)."""

    @property
    def schema(self) -> dict[str, Any]:
        return {"type": "string"}

    def parse(self, value: Any) -> str:
        return str(value)


@dataclass(frozen=True)
class FilePath(Kind):
    """A path given on the command line (not a recipe key: recipes are shared, paths local)."""

    def parse(self, value: Any) -> Path:
        return Path(str(value))


@dataclass(frozen=True)
class ByteSize(Kind):
    """A memory size, ``16GB`` / ``512MB`` / bytes (command line only: machines differ)."""

    def parse(self, value: Any) -> int:
        from common.core.memory import parse_size

        try:
            return parse_size(str(value))
        except EdgeforgeError:
            raise ValueError("expected a size such as 16GB or 512MB") from None


@dataclass(frozen=True)
class Spec:
    """One option's declaration (a dataclass field's ``metadata["option"]``)."""

    kind: Kind
    help: str
    #: ``--kv-len`` for ``KV_LEN``: the command line spells the make variable.
    flag: str
    #: The make variable (``None``: a command-line-only option of the script).
    make: str | None
    #: The key in the recipe's ``targets.<target>`` object (``None``: not settable there;
    #: ``True`` until :func:`specs` names it after the field).
    recipe: str | bool | None

    @property
    def label(self) -> str:
        """How errors name the option: its make variable, else its flag."""
        return self.make or self.flag


def option(
    default: Any,
    kind: Kind,
    help: str,
    *,
    make: str | None = None,
    flag: str | None = None,
    recipe: str | bool = True,
    record: bool = True,
) -> Any:
    """A dataclass field declaring one option: a make variable, or (``flag``) a
    command-line-only option of the script. ``recipe=True`` makes the field name the recipe
    key, ``False`` keeps the option off recipes, a string names the key. ``record=False``
    keeps a property of the machine (a memory cap) out of :func:`describe`, so manifests
    of the same build agree across machines."""
    if (make is None) == (flag is None):
        raise TypeError("an option has either a make variable or a command-line flag")
    spec = Spec(
        kind=kind,
        help=help,
        flag=flag or "--" + str(make).lower().replace("_", "-"),
        make=make,
        recipe=None if recipe is False else recipe,
    )
    return dataclasses.field(default=default, metadata={"option": spec, "record": record})


def specs(cls: type) -> dict[str, Spec]:
    """Field name → spec of every option of ``cls``, in declaration order."""
    out = {}
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("option")
        if spec is not None:
            out[f.name] = dataclasses.replace(spec, recipe=f.name) if spec.recipe is True else spec
    return out


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag VALUE`` per option (a boolean flag alone means true); every default is
    None so :func:`resolve` can tell "not given" from a value."""
    for name, spec in specs(cls).items():
        flag_only = {"nargs": "?", "const": "1"} if isinstance(spec.kind, Boolean) else {}
        parser.add_argument(spec.flag, dest=name, default=None, help=spec.help, **flag_only)


def make_variables(cls: type) -> list[str]:
    """The make variables of ``cls``'s options, in declaration order."""
    return [spec.make for spec in specs(cls).values() if spec.make is not None]


def recipe_schema(cls: type, description: str) -> dict[str, Any]:
    """The JSON schema of the recipe's ``targets.<target>`` object for ``cls``."""
    properties = {
        spec.recipe: spec.kind.schema for spec in specs(cls).values() if spec.recipe is not None
    }
    return {
        "description": description,
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
    }


def given_options(cls: type, args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """The options given on the command line (not None), by field name."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return {name: values[name] for name in specs(cls) if values.get(name) is not None}


def resolve(
    cls: type[T],
    args: argparse.Namespace | Mapping[str, Any],
    recipe_section: Mapping[str, Any] | None = None,
    *,
    where: str = "recipe",
) -> T:
    """``cls`` from the command line over ``recipe_section`` over the field defaults.

    Each given value is parsed by its kind; a bad one raises :class:`EdgeforgeError`
    naming the make variable (command line) or ``<where>.<key>`` (recipe).
    """
    declared = specs(cls)
    section = dict(recipe_section or {})
    by_key = {spec.recipe: name for name, spec in declared.items() if spec.recipe is not None}
    unknown = sorted(set(section) - set(by_key))
    if unknown:
        raise EdgeforgeError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(by_key)}"
        )
    values: dict[str, Any] = {}
    for key, raw in section.items():
        name = by_key[key]
        values[name] = _parse(declared[name], raw, f"{where}.{key}")
    for name, raw in given_options(cls, args).items():
        values[name] = _parse(declared[name], raw, declared[name].label)
    return cls(**values)


def resolve_target(cls: type[T], args: argparse.Namespace, recipe: Recipe, target: str) -> T:
    """:func:`resolve` over ``recipe``'s ``targets.<target>`` object, its errors naming the
    recipe file: what every target script does with its options."""
    section = recipe.target_section(target)
    return resolve(cls, args, section, where=f"{recipe.path}: targets.{target}")


def _parse(spec: Spec, raw: Any, label: str) -> Any:
    try:
        return spec.kind.parse(raw)
    except ValueError as exc:
        raise EdgeforgeError(f"{label}={raw}: {exc}") from None


def describe(options: Any) -> dict[str, Any]:
    """JSON-friendly record of resolved options (paths as text, tuples as lists), without
    those declared ``record=False``."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        return value

    return {
        f.name: plain(getattr(options, f.name))
        for f in dataclasses.fields(options)
        if f.metadata.get("record", True)
    }


def target_parser(prog: str, description: str, cls: type) -> argparse.ArgumentParser:
    """A target script's command line: the Makefile's ``MODEL_ARGS`` (``--model``,
    ``--build-dir``, ``--model-path``) and one flag per option of ``cls``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--model", required=True, help="recipe name (models/<name>.json)")
    parser.add_argument("--build-dir", type=Path, default=None, help="default build/")
    parser.add_argument("--model-path", type=Path, default=None, help="local HF checkpoint dir")
    add_arguments(parser, cls)
    return parser
