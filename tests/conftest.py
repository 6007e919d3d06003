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


def _build_wheel(root: Path) -> Path:
    """Builds rahf's wheel into `root` once per test run, however many xdist workers ask.

    `pip wheel` builds in the checkout's own `build/` folder; two workers building at once empty each other's copy and
    one of them gets a wheel without the package. So the first worker builds under a lock and the others reuse its
    wheel (the folder is named by the run's id, so a later run never reuses it).
    """
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        wheels = list(root.glob("rahf-*.whl"))
        if not wheels:
            build = subprocess.run(
                [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w",
                 str(root / "partial")],
                capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            assert build.returncode == 0, build.stderr[-3000:]
            [built] = (root / "partial").glob("rahf-*.whl")
            wheels = [built.rename(root / built.name)]
        [wheel] = wheels
    return wheel


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory) -> InstalledWheel:
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    shared = tmp_path_factory.getbasetemp().parent / f"rahf-wheel-{run_id}" if run_id else None
    root = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(shared or root / "dist")
    site = root / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    return InstalledWheel(wheel, site)
