import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPACES = ROOT / "search_spaces"
SHIPPED_SPACES = ("mnasnet", "mobilenetv2", "resnet", "tiny")


def run_script(name: str, *args: str, cwd: Path | None = None, timeout: float = 600):
    """Run scripts/<name> as a user would; returns the CompletedProcess."""
    import subprocess

    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def spaces():
    from nas.space import load_space

    return {name: load_space(SPACES / f"{name}.yaml") for name in SHIPPED_SPACES}
