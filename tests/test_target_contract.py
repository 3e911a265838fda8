"""The target contract: every target declares its options once, and everything else agrees.

A target's ``build.py`` holds (or imports) one frozen ``Options`` dataclass whose fields are
made with :func:`common.core.options.option`. From it come the script's command line and
its values; this test checks the two copies that cannot be generated at run time: the
recipe schema (``models/schema.json``, what a recipe may set under ``targets.<target>``) and
the make variables its ``target.mk`` passes through (``<T>_OPTIONS``, turned into flags by
the Makefile's ``option_args``). A target.mk that spells a flag by hand must name a
declared one.
"""

from __future__ import annotations

import argparse
import json
import re

import pytest

from common.core.errors import EdgeforgeError
from common.core.options import (
    Choice,
    Integer,
    add_arguments,
    make_variables,
    option,
    recipe_schema,
    resolve,
    specs,
)
from tests.conftest import REPO_ROOT, import_target

TARGETS = sorted(p.parent.name for p in (REPO_ROOT / "targets").glob("*/target.mk"))
SCHEMA = json.loads((REPO_ROOT / "models" / "schema.json").read_text())


def test_the_design_card_targets_are_all_here() -> None:
    assert TARGETS == [
        "autoround", "axera-ax650", "cpu-fp32-rotated", "qnn", "sophgo-bm1684x",
    ]  # fmt: skip
    assert SCHEMA["properties"]["targets"]["propertyNames"]["enum"] == [
        "qnn", "axera-ax650", "sophgo-bm1684x", "cpu-fp32-rotated", "autoround",
    ]  # fmt: skip


def _mk_options(target: str) -> tuple[str, list[str], str]:
    """(``<T>``, the variables of ``<T>_OPTIONS``, the target.mk text)."""
    text = (REPO_ROOT / "targets" / target / "target.mk").read_text()
    found = re.findall(r"^(\w+)_OPTIONS := ((?:.*\\\n)*.*)$", text, flags=re.M)
    assert len(found) == 1, f"targets/{target}/target.mk: one <T>_OPTIONS := line expected"
    prefix, names = found[0]
    return prefix, names.replace("\\\n", " ").split(), text


@pytest.mark.parametrize("target", TARGETS)
def test_options_are_declared_once(target: str) -> None:
    options = import_target(target).Options
    declared = specs(options)
    assert declared, f"targets/{target}/build.py: Options declares no option"

    section = SCHEMA["properties"]["targets"]["properties"][target]
    assert recipe_schema(options, section["description"]) == section, (
        f"models/schema.json targets.{target} differs from targets/{target}'s Options; "
        "write recipe_schema(Options) there"
    )

    prefix, listed, text = _mk_options(target)
    assert listed == make_variables(options), f"targets/{target}/target.mk {prefix}_OPTIONS"
    assert f"$(call option_args,$({prefix}_OPTIONS))" in text
    # A flag written by hand in a recipe line must be one the script declares (or
    # qnn-sweep's list of presets, its own).
    flags = {spec.flag for spec in declared.values()}
    by_hand = set(re.findall(r"^\t.*?(--[a-z][a-z0-9-]*)", text, flags=re.M))
    assert by_hand <= flags | {"--model", "--build-dir", "--model-path", "--no-deps",
                               "--disable-pip-version-check", "--progress-bar", "--llm-convert",
                               "--python", "--presets"}, by_hand  # fmt: skip

    names = [spec.make or spec.flag for spec in declared.values()]
    assert len(names) == len(set(names)), f"{target}: two options share a name: {names}"
    keys = [spec.recipe for spec in declared.values() if spec.recipe is not None]
    assert len(keys) == len(set(keys)), f"{target}: two options share a recipe key: {keys}"


@pytest.mark.parametrize("target", TARGETS)
def test_defaults_resolve_and_every_recipe_section_is_accepted(target: str) -> None:
    """The declared defaults form valid Options, and each shipped recipe's section for this
    target resolves (the schema let it through, so the parser must too)."""
    options = import_target(target).Options
    resolve(options, {})
    for path in sorted((REPO_ROOT / "models").glob("*.json")):
        section = json.loads(path.read_text()).get("targets", {}).get(target)
        if section is not None:
            resolve(options, {}, section, where=f"{path.name}: targets.{target}")


def test_one_declaration_gives_flag_schema_and_checks() -> None:
    """The contract's own behaviour on a small declaration."""
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Demo:
        kv_len: int = option(64, Integer(2), "cache rows", make="KV_LEN")
        mode: str = option("a", Choice(("a", "b")), "mode", flag="--mode", recipe=False)

    parser = argparse.ArgumentParser()
    add_arguments(parser, Demo)
    args = parser.parse_args(["--kv-len", "80"])
    assert resolve(Demo, args, {"kv_len": 70}) == Demo(kv_len=80, mode="a")  # CLI > recipe
    assert resolve(Demo, {}, {"kv_len": 70}) == Demo(kv_len=70)
    assert make_variables(Demo) == ["KV_LEN"]
    assert recipe_schema(Demo, "d")["properties"] == {"kv_len": {"type": "integer", "minimum": 2}}
    with pytest.raises(EdgeforgeError, match=r"^KV_LEN=1: must be >= 2$"):
        resolve(Demo, parser.parse_args(["--kv-len", "1"]))
    with pytest.raises(EdgeforgeError, match=r"--mode=c: 'c' is not one of a, b"):
        resolve(Demo, parser.parse_args(["--mode", "c"]))
    with pytest.raises(EdgeforgeError, match=r"where: unknown key\(s\) mode; known: kv_len"):
        resolve(Demo, {}, {"mode": "a"}, where="where")
