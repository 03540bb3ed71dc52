"""The maintainer tools (tools/) stay out of the package: pip ships neither them nor the published results
(that nothing shipped imports them is tests/test_import_rules.py's), and the GPU check script calls entry
points that exist."""

import re
import subprocess
from pathlib import Path

import pytest

from tools import bench_reference

ROOT = Path(__file__).resolve().parents[1]


def test_pip_ships_no_tools_and_no_result_files():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = setuptools["packages"]
    assert not [p for p in packages if p.split(".")[0] == "tools"]
    # An explicit list ships no subpackage it leaves out: every package folder below a shipped one is listed.
    below = {".".join(init.parent.relative_to(ROOT).parts) for top in packages if "." not in top
             for init in (ROOT / top).rglob("__init__.py")}
    assert below == set(packages), sorted(below ^ set(packages))
    for package in packages:  # results and figures live in docs/
        found = [f for pattern in ("*.csv", "*.png", "*.sh") for f in (ROOT / package.replace(".", "/")).rglob(pattern)]
        assert not found, found


def test_gpu_check_script_parses_and_names_real_entry_points():
    script = ROOT / "tools" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert 'cd "$(dirname "$0")/.."' in text  # runs from any directory
    paths = re.findall(r"pytest ((?:tests)/\w+\.py)", text)
    modules = re.findall(r"python -m ([a-z_]+\.[a-z_]+)", text)
    assert paths == ["tests/test_cuda.py"]
    assert set(modules) == {"tools.parity_flowar", "eval.bench_sample", "train.bench", "tools.bench_reference"}
    for path in [*paths, *(module.replace(".", "/") + ".py" for module in modules)]:
        assert (ROOT / path).is_file(), path
    assert "bench_reference sample --reference" in text and "bench_reference train --reference" in text
    assert text.count("--compile off,on") == 2 and "--batch 1,64" in text


@pytest.mark.parametrize("argv", [[], ["bench"], ["--reference", "."]])
def test_bench_reference_needs_a_command(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_reference.main(argv)
    assert exit_info.value.code == 2 and "command" in capsys.readouterr().err


def test_fastest_in_turn_takes_turns_each_round_and_keeps_each_calls_fastest_run():
    import time

    from eval.machine import fastest_in_turn

    order = []

    def call(name, slow_round):
        def run(round_):
            order.append((round_, name))
            if round_ == slow_round:
                time.sleep(0.05)
        return run

    best = fastest_in_turn([call("a", 0), call("b", 1)], 3)
    assert order == [(0, "a"), (0, "b"), (1, "a"), (1, "b"), (2, "a"), (2, "b")]
    assert len(best) == 2 and all(0 <= seconds < 0.04 for seconds in best)  # the slept rounds do not count
