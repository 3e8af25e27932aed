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
