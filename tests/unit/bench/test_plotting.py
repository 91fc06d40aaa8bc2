"""matplotlib is the optional ``plots`` extra: nothing but a plot needs it."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[3]

# Runs in a child so that the import blocker cannot leak into other tests.
_WITHOUT_MATPLOTLIB = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("blocked: " + name)
        return None

sys.meta_path.insert(0, Block())
import harli.cli.main, harli.daemon.server, harli.bench.bench, harli.bench.profile
from harli.bench import plotting
try:
    plotting.pyplot()
except plotting.PlotsUnavailable as e:
    print("unavailable:", e)
assert not any(m.startswith("matplotlib") for m in sys.modules)
"""


def test_everything_imports_without_matplotlib_and_a_plot_says_how_to_get_it() -> None:
    out = subprocess.run([sys.executable, "-c", _WITHOUT_MATPLOTLIB], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "unavailable: plots need matplotlib" in out.stdout
    assert "harli[plots]" in out.stdout


def test_dependencies_declare_what_is_imported_and_bound_the_training_stack() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {Requirement(d).name: Requirement(d) for d in project["dependencies"]}
    assert "matplotlib" not in deps
    assert "matplotlib" in project["optional-dependencies"]["plots"]
    assert "setproctitle" in deps
    for name in ("transformers", "peft"):
        spec = deps[name].specifier
        assert any(s.operator == "<" for s in spec), f"{name} has no upper bound"
        assert any(s.operator == ">=" for s in spec), f"{name} has no lower bound"
