"""Flower's own app, as ``flwr new`` writes it: the templates shipped in the flwr 1.24.0 wheel (the last
release that carries them; from 1.25 ``flwr new`` downloads apps from the Flower Hub, which these
machines cannot reach). The wheel is fetched from PyPI once, checked against its SHA-256, kept beside
the data sets, and rendered with ``string.Template`` as ``flwr new`` renders it. Nothing of Flower's
code is copied into this repository.

    python tests/flower_template.py fetch      # what ``make test`` runs before the suite
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from string import Template

from byzflower.data import default_data_dir

VERSION = "1.24.0"
WHEEL = f"flwr-{VERSION}-py3-none-any.whl"
SHA256 = "6331df132d5d9b488dd5276cfff92f61e7217eea566815b3f0b16bf132dc0909"
ROOT = "flwr/cli/new/templates/app/"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch() -> Path:
    """The flwr 1.24.0 wheel (downloaded with pip on first use), verified."""
    path = default_data_dir() / "flower" / WHEEL
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", f"flwr=={VERSION}", "--no-deps", "--only-binary", ":all:"]
            done = subprocess.run([*cmd, "-d", tmp, "-q"], capture_output=True, text=True)
            got = Path(tmp) / WHEEL
            if done.returncode != 0 or not got.exists():
                raise RuntimeError(f"could not download {WHEEL} from PyPI: {done.stderr.strip()[-500:]}")
            got.replace(path)
    if (digest := _sha256(path)) != SHA256:
        path.unlink()
        raise RuntimeError(f"{WHEEL}: SHA-256 {digest} is not the expected {SHA256}; removed, fetch again")
    return path


def render(dest: Path, app_name: str = "quickstart-numpy", framework: str = "NumPy") -> str:
    """Write the app ``flwr new APP_NAME --framework FRAMEWORK`` writes into ``dest``; returns its
    import name. The same files and substitutions as flwr 1.24's ``flwr new`` (non-baseline apps)."""
    package = app_name.replace("_", "-").lower()
    module = package.replace("-", "_")
    name = framework.lower()
    context = {
        "framework_str": framework,
        "import_name": module,
        "package_name": package,
        "project_name": app_name,
        "username": "flwrlabs",
    }
    files = {
        ".gitignore": ".gitignore.tpl",
        "README.md": "README.md.tpl",
        "pyproject.toml": f"pyproject.{name}.toml.tpl",
        f"{module}/__init__.py": "code/__init__.py.tpl",
        f"{module}/server_app.py": f"code/server.{name}.py.tpl",
        f"{module}/client_app.py": f"code/client.{name}.py.tpl",
        f"{module}/task.py": f"code/task.{name}.py.tpl",
    }
    with zipfile.ZipFile(fetch()) as wheel:
        for target, template in files.items():
            text = wheel.read(ROOT + template).decode()
            if target != ".gitignore":  # written verbatim, as flwr new does
                text = Template(text).substitute(context)
            (dest / target).parent.mkdir(parents=True, exist_ok=True)
            (dest / target).write_text(text)
    return module


if __name__ == "__main__":
    if sys.argv[1:] != ["fetch"]:
        sys.exit(__doc__)
    print(fetch())
