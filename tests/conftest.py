import os

# Tests never touch a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class InstalledWheel:
    """rahf built as a wheel from this checkout and installed into a folder of its own, outside the repository."""

    def __init__(self, wheel: Path, site: Path):
        self.wheel, self.site = wheel, site

    def env(self) -> dict[str, str]:
        # The wheel's folder first on the path: it wins over the checkout's editable install.
        return {**os.environ, "PYTHONPATH": str(self.site), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def run(self, *args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
        """`python -m rahf ARGS` (or `python -c CODE` when the first argument is "-c") from the installed wheel."""
        command = [sys.executable, *args] if args and args[0] == "-c" else [sys.executable, "-m", "rahf", *args]
        return subprocess.run(command, cwd=cwd, env=self.env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory) -> InstalledWheel:
    root = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", str(root)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    [wheel] = root.glob("rahf-*.whl")
    site = root / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    return InstalledWheel(wheel, site)
