"""docs/api.md is true: every name it lists exists, with the parameters and defaults it shows."""

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

API = Path(__file__).resolve().parent.parent / "docs" / "api.md"
MODULE = re.compile(r"^## `(tlopt\.\w+)`", re.MULTILINE)
# What the page lists: a bullet's first name ("- `name`"), and every signature ("`name(params)`").
NAME = re.compile(r"^- `([A-Za-z_][\w.]*)`", re.MULTILINE)
SIGNATURE = re.compile(r"`([A-Za-z_][\w.]*)(\([^`]*?\))`")


def documented() -> list[tuple[str, str, str | None]]:
    """(module, dotted name, "(parameters)" or None) of every name docs/api.md lists."""
    text = API.read_text()
    sections = MODULE.split(text)[1:]
    entries = []
    for module, body in zip(sections[::2], sections[1::2]):
        entries += [(module, name, None) for name in NAME.findall(body)]
        entries += [(module, name, params) for name, params in SIGNATURE.findall(body)]
    return list(dict.fromkeys(entries))


def _resolve(module: str, dotted: str):
    value = importlib.import_module(module)
    for part in dotted.split("."):
        value = inspect.getattr_static(value, part) if inspect.isclass(value) else getattr(value, part)
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    return value


def _parameters(signature: str) -> list[tuple[str, object]]:
    """Names and default values of a documented "(a, b=1, *, c=None)"."""
    arguments = ast.parse(f"def f{signature}: pass").body[0].args
    positional = arguments.posonlyargs + arguments.args
    defaults = [None] * (len(positional) - len(arguments.defaults)) + arguments.defaults
    found = [(a.arg, _value(d)) for a, d in zip(positional, defaults)]
    if arguments.vararg:
        found.append(("*" + arguments.vararg.arg, inspect.Parameter.empty))
    found += [(a.arg, _value(d)) for a, d in zip(arguments.kwonlyargs, arguments.kw_defaults)]
    if arguments.kwarg:
        found.append(("**" + arguments.kwarg.arg, inspect.Parameter.empty))
    return found


def _value(node):
    """A documented default's value; `...` stands for a default the page does not spell out (a factory)."""
    return inspect.Parameter.empty if node is None else eval(compile(ast.Expression(node), "api.md", "eval"))


def _same(documented: list[tuple[str, object]], actual: list[tuple[str, object]]) -> bool:
    return [name for name, _ in documented] == [name for name, _ in actual] and all(
        (shown is ... and default is not inspect.Parameter.empty) or shown == default
        for (_, shown), (_, default) in zip(documented, actual))


def _actual(value) -> list[tuple[str, object]]:
    parameters = inspect.signature(value).parameters.values()
    prefix = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return [(prefix.get(p.kind, "") + p.name, p.default) for p in parameters if p.name not in ("self", "cls")]


ENTRIES = documented()


def test_the_page_documents_every_module_of_the_library():
    modules = {module for module, _, _ in ENTRIES}
    library = {f"tlopt.{path.stem}" for path in (API.parent.parent / "lib" / "tlopt").glob("*.py")
               if path.stem != "__init__"}
    assert modules == library, f"undocumented: {sorted(library - modules)}; gone: {sorted(modules - library)}"
    assert len(ENTRIES) > 200


@pytest.mark.parametrize(("module", "name", "params"), ENTRIES, ids=[f"{m}.{n}" for m, n, _ in ENTRIES])
def test_each_documented_name_exists_with_its_documented_parameters(module, name, params):
    value = _resolve(module, name)
    if params is not None:
        assert callable(value), f"{module}.{name} is documented with parameters but is not callable"
        assert _same(_parameters(params), _actual(value)), \
            f"{module}.{name}{params} differs from the code: {_actual(value)}"
