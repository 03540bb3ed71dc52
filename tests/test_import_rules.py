"""STYLE.md's module map: which of our top-level packages may import which."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"flowar", "vae", "heads", "train", "eval"}
ALLOWED = {
    "heads": set(),
    "vae": set(),
    "flowar": {"heads", "vae"},
    "train": {"flowar", "heads", "vae"},
    "eval": {"flowar", "heads", "vae"},
}


def imported_packages(source: str) -> set[str]:
    """Our top-level packages named by absolute imports anywhere in ``source`` (function bodies too)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


def violations() -> list[str]:
    problems = []
    for package, allowed in ALLOWED.items():
        for file in sorted((ROOT / package).rglob("*.py")):
            bad = imported_packages(file.read_text()) - allowed - {package}
            if bad:
                problems.append(f"{file.relative_to(ROOT)} imports {sorted(bad)}")
    return problems


def test_packages_import_only_what_style_md_allows():
    assert violations() == []


def test_every_package_is_checked():
    on_disk = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert on_disk == set(ALLOWED)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("import flowar.model\n", {"flowar"}),
        ("from train.loop import x\n", {"train"}),
        ("def f():\n    from eval import fid\n", {"eval"}),
        ("from . import sibling\nimport torch\n", set()),
    ],
)
def test_the_checker_sees_imports(source, expected):
    assert imported_packages(source) == expected
