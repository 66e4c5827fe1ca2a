"""pyproject.toml declares every package that pipeline/ imports (none may arrive only because another
package needs it), and requirements.lock pins every declared one."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys

import tomllib

from tests.conftest import ROOT


def canonical(name: str) -> str:
    """A distribution's name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_distributions() -> dict[str, str]:
    """Distribution -> a module of pipeline/ importing it (absolute imports, the standard library aside)."""
    owners = importlib.metadata.packages_distributions()
    found = {}
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                if top in sys.stdlib_module_names or top == "pipeline":
                    continue
                for dist in owners.get(top, [top]):
                    found.setdefault(canonical(dist), str(path.relative_to(ROOT)))
    return found


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {canonical(re.match(r"[A-Za-z0-9._-]+", spec).group()) for spec in project["dependencies"]}


def test_every_package_pipeline_imports_is_declared():
    missing = {dist: where for dist, where in imported_distributions().items() if dist not in declared()}
    assert not missing, f"imported but not in pyproject.toml's dependencies: {missing}"


def test_every_declared_package_is_pinned_in_the_lock_within_its_range():
    from packaging.requirements import Requirement

    lock = (ROOT / "requirements.lock").read_text().splitlines()
    pinned = dict(line.split("==", 1) for line in lock if "==" in line and not line.startswith("#"))
    pinned = {canonical(name): version.split(";")[0].strip() for name, version in pinned.items()}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"]:
        requirement = Requirement(spec)
        version = pinned.get(canonical(requirement.name))
        assert version is not None, f"{requirement.name} is declared but not pinned in requirements.lock"
        assert requirement.specifier.contains(version), f"requirements.lock pins {requirement.name} {version}: " \
                                                        f"outside pyproject.toml's {requirement.specifier}"
