"""The dependency rule: strategies and clients know nothing of byzflower, and their math no Flower."""

import subprocess
import sys


def _imported_after(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_pure_layers_import_no_flower_and_no_byzflower():
    for module in ("strategies.aggregators", "clients.estimators", "clients.gradients", "clients"):
        mods = _imported_after(module)
        assert not any(m == "flwr" or m.startswith("flwr.") for m in mods), module
        assert not any(m == "byzflower" or m.startswith("byzflower.") for m in mods), module


def test_strategies_package_loads_the_flower_strategy_lazily():
    assert "flwr" not in _imported_after("strategies")
    import strategies

    assert strategies.RobustSGD.__name__ == "RobustSGD"


def test_the_local_engine_imports_no_flower():
    """The in-process engine (and the GPU path under it) runs where only torch is installed."""
    for module in ("byzflower.engine", "byzflower.core", "clients.graphs", "strategies.step"):
        mods = _imported_after(module)
        assert not any(m == "flwr" or m.startswith("flwr.") or m == "ray" for m in mods), module
