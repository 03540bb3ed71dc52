"""STYLE.md's module map, read from the sources: which of our top-level packages each file may import.

Every ``import`` counts, function bodies too: a late import hides a dependency from the interpreter, not
from the design. tools/ (maintainers' scripts, not shipped by pip) is in no file's allowance, so nothing
shipped can import it; tools/ itself may import anything.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"flowar", "heads", "vae", "train", "eval", "tools"}
# What a module may import of ours besides its own package: top-level packages or dotted modules. A dotted
# key (a module) overrides its package's entry.
ALLOWED = {
    "heads": set(),
    "vae": set(),
    "flowar": {"heads", "vae"},
    # train/ scores with eval/'s metrics (in-training FID, the demo's digit score) and times with its
    # benchmark helpers, so each measurement has one implementation.
    "train": {"flowar", "heads", "vae", "eval"},
    # eval/ reads images and MNIST through train.data, the one owner of datasets; nothing else of train/.
    "eval": {"flowar", "heads", "vae", "train.data"},
    # ... and train.data imports nothing of eval/, so the two applications form no import cycle.
    "train.data": {"flowar", "heads", "vae"},
}


def imported(source: str) -> set[str]:
    """Dotted names of ours that ``source`` imports absolutely (``from a.b import c`` gives ``a.b.c``)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:  # relative imports stay in the package
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name.split(".")[0] in OURS}


def violations(module: str, source: str) -> set[str]:
    """The imports in ``source``, the text of dotted ``module``, that STYLE.md forbids it."""
    package = module.split(".")[0]
    allowed = (ALLOWED[module] if module in ALLOWED else ALLOWED[package]) | {package}
    return {name for name in imported(source)
            if not any(name == ok or name.startswith(ok + ".") for ok in allowed)}


def test_every_shipped_package_is_checked():
    on_disk = {path.parent.name for path in ROOT.glob("*/__init__.py")}
    assert on_disk - {"tools"} == {name for name in ALLOWED if "." not in name}


def test_the_sources_follow_the_module_map():
    problems = {}
    for package in (name for name in ALLOWED if "." not in name):
        for file in sorted((ROOT / package).rglob("*.py")):
            module = ".".join(file.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            if bad := violations(module, file.read_text()):
                problems[str(file.relative_to(ROOT))] = sorted(bad)
    assert problems == {}


@pytest.mark.parametrize("module, source, expected", [
    ("heads.solvers", "import torch\nfrom . import networks\n", set()),
    ("heads.solvers", "import flowar.model\n", {"flowar.model"}),
    ("vae.msvq", "def late():\n    from heads import networks\n", {"heads.networks"}),
    ("flowar.model", "from heads.networks import Head\nfrom vae import msvq\n", set()),
    ("flowar.cli", "from train.train import main\n", {"train.train.main"}),
    ("flowar.pipeline", "import tools.parity_flowar\n", {"tools.parity_flowar"}),
    ("train.demo", "from eval.quality import DigitScorer\n", set()),
    ("train.demo", "from tools import demo_table\n", {"tools.demo_table"}),
    ("eval.quality", "from train.data import MNISTDataset\nfrom train import data\n", set()),
    ("eval.quality", "from train.loop import fit\n", {"train.loop.fit"}),
    ("train.data", "from eval.fid import compute_metrics\n", {"eval.fid.compute_metrics"}),
    ("train.database", "from eval.fid import compute_metrics\n", set()),  # a name prefix is not a module
])
def test_the_checker_catches_forbidden_imports(module, source, expected):
    assert violations(module, source) == expected
