"""`rahf demo`: the whole loop on embedded data, with a visual report.

For now: initialise a tiny model and rate the bundled example image (training, evaluation and the generator
sections land with the trainer).
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def preset_path(name: str) -> Path:
    """A preset of the source checkout's `configs/` folder (where `make install` installs rahf from)."""
    path = REPO_CONFIGS / name
    if not path.is_file():
        raise ValueError(f"preset {name!r} not found under {REPO_CONFIGS}; run from a source checkout (make install)")
    return path


def run_demo(out: str | Path, quick: bool = False) -> Path:
    from .cli import EXAMPLE_IMAGE, EXAMPLE_PROMPT, init_model, predict_to_folder

    out = Path(out)
    tiny = preset_path("model/tiny.json")
    model_dir = init_model(str(tiny), out / "models" / "rahf_untrained")
    predict_to_folder(str(model_dir), [str(EXAMPLE_IMAGE)], [EXAMPLE_PROMPT], out / "predict")
    report = out / "report.md"
    report.write_text(
        "# rahf demo\n\nAn untrained tiny RAHF model rated the bundled example image:\n\n"
        "![overlay](predict/example/overlay.png)\n\nSee `predict/example/feedback.json`.\n"
    )
    logger.info("demo written to %s", out)
    return report
