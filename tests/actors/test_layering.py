"""Layering: what the domain may import, and what every actor must be given."""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from actors.job import JobActor
from actors.supervisor import Supervisor, open_supervisor

ACTORS = Path(__file__).resolve().parents[2] / "actors"
#: The web layer and the packages that serve it: ``web`` imports ``actors``, never the reverse.
WEB_PACKAGES = {"web", "quart", "quart_trio", "quart_cors", "hypercorn"}


def _modules(under: Path) -> list[Path]:
    modules = sorted(under.rglob("*.py"))
    assert modules, f"no modules under {under}"
    return modules


def _package(path: Path) -> str:
    """The package a module's relative imports resolve against."""
    parts = path.relative_to(ACTORS.parent).with_suffix("").parts
    return ".".join(parts[:-1])


def imports_of(source: str, *, package: str) -> Iterator[str]:
    """Every module ``source`` imports, anywhere in it (functions and ``TYPE_CHECKING`` blocks
    too), as absolute dotted names; ``from a import b`` yields ``a`` and ``a.b``."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _violations(under: Path, banned: Callable[[str], bool]) -> list[str]:
    return [
        f"{path.relative_to(ACTORS.parent)} imports {name}"
        for path in _modules(under)
        for name in imports_of(path.read_text(encoding="utf-8"), package=_package(path))
        if banned(name)
    ]


def test_the_import_walker_sees_every_form_of_import() -> None:
    source = (
        "import quart.json\n"
        "from hypercorn import trio as h\n"
        "from . import base\n"
        "from ..store import journal\n"
        "def f():\n"
        "    import web.app\n"
    )

    names = set(imports_of(source, package="actors.providers"))

    assert {
        "quart.json",
        "hypercorn",
        "actors.providers",
        "actors.providers.base",
        "actors.store",
        "actors.store.journal",
        "web.app",
    } <= names


def test_the_domain_never_imports_the_web_layer() -> None:
    def banned(name: str) -> bool:
        return name.partition(".")[0] in WEB_PACKAGES

    assert _violations(ACTORS, banned) == []


def test_providers_never_import_the_store() -> None:
    def banned(name: str) -> bool:
        return name == "actors.store" or name.startswith("actors.store.")

    assert _violations(ACTORS / "providers", banned) == []


@pytest.mark.parametrize(
    "actor", [JobActor, JobActor.restore, Supervisor, open_supervisor], ids=lambda a: a.__qualname__
)
def test_every_actor_is_given_its_store(actor: Callable[..., object]) -> None:
    store = inspect.signature(actor).parameters["store"]

    assert store.kind is inspect.Parameter.KEYWORD_ONLY
    assert store.default is inspect.Parameter.empty  # no silent in-memory fallback
