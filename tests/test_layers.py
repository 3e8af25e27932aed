"""The dependency rule: strategies and clients know nothing of byzflower, and their math no Flower."""

import subprocess
import sys


def _imported_after(*modules: str) -> set[str]:
    """Every module loaded by importing ``modules`` in a fresh interpreter (one process for all)."""
    code = f"import sys, {', '.join(modules)}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_pure_layers_import_no_flower_and_no_byzflower():
    pure = ("strategies.aggregators", "strategies.step", "clients.estimators", "clients.gradients", "clients")
    mods = _imported_after(*pure)
    assert not any(m == "flwr" or m.startswith("flwr.") for m in mods), pure
    assert not any(m == "byzflower" or m.startswith("byzflower.") for m in mods), pure


def test_strategies_package_loads_the_flower_strategy_lazily():
    assert "flwr" not in _imported_after("strategies")
    import strategies

    assert strategies.RobustSGD.__name__ == "RobustSGD"


def test_the_local_engine_imports_no_flower():
    """The in-process engine (and the GPU path under it) runs where only torch is installed."""
    engine = ("byzflower.engine", "byzflower.core", "clients.graphs", "benchmarks.gpu")
    mods = _imported_after(*engine)
    assert "byzflower.engine" in mods
    assert not any(m == "flwr" or m.startswith("flwr.") or m == "ray" for m in mods), engine


def _byzflower_imports(path) -> set[str]:
    """The byzflower modules a source file imports (at any depth in the file)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("byzflower"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("byzflower"))
    return names


def test_the_subpackages_keep_their_import_rules():
    """byzflower's subpackages import only what their docstrings allow (see each __init__)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "byzflower"
    forbidden = {
        "data": (
            "byzflower.config",
            "byzflower.engine",
            "byzflower.factory",
            "byzflower.records",
            "byzflower.flower",
            "byzflower.experiments",
            "byzflower.models",
            "byzflower.cli",
        ),
        "records": (
            "byzflower.engine",
            "byzflower.factory",
            "byzflower.flower",
            "byzflower.experiments",
            "byzflower.cli",
        ),
        "experiments": ("byzflower.flower", "byzflower.cli"),
    }
    for package, bad in forbidden.items():
        for path in (root / package).glob("*.py"):
            used = _byzflower_imports(path)
            assert not [m for m in used if m.startswith(bad)], (path.name, used)
    outside = [p for p in root.rglob("*.py") if p.parent.name != "flower" and p.name != "cli.py"]
    for path in outside:
        assert not [m for m in _byzflower_imports(path) if m.startswith("byzflower.flower")], path
