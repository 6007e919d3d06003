"""The `rahf` command line: the front door to every job (each also reachable as a Python module)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger("rahf")

EXAMPLE_IMAGE = Path(__file__).parent / "assets" / "example.png"
EXAMPLE_PROMPT = "a red circle above a blue square on a wooden table"


# --------------------------------------------------------------------------------------------------------------------
# init-model


def init_model(config_path: str, out: str, seed: int = 0) -> Path:
    """Writes an untrained model + processor from a `configs/model/*.json` preset (pretrained towers if it names
    them)."""
    import torch

    from .configuration_rahf import RAHFConfig
    from .modeling_rahf import RAHFModel
    from .processing_rahf import RAHFProcessor

    config = _read_model_preset(config_path, RAHFConfig)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"`--out` {out!r} is a file; pass a folder to write the model into")
    torch.manual_seed(seed)
    if config.vision_model_name_or_path or config.text_model_name_or_path:
        model = RAHFModel.from_pretrained_towers(config)
    else:
        model = RAHFModel(config)
    processor = RAHFProcessor.from_config(model.config)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    logger.info("wrote an untrained %s RAHF model to %s", config.variant, out_dir)
    return out_dir


def _read_model_preset(config_path: str, config_class: type) -> Any:
    """The RAHF config of a JSON preset; a missing, unreadable or invalid one is a ValueError naming the file."""
    path = Path(config_path)
    if not path.is_file():
        raise ValueError(f"`--config` {config_path!r} is not a file; pass a configs/model/*.json preset")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"`--config` {config_path!r} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"`--config` {config_path!r} must hold a JSON object, got a {type(data).__name__}")
    found = data.get("model_type", config_class.model_type)
    if found != config_class.model_type:
        raise ValueError(
            f"`--config` {config_path!r} is a {found!r} preset; rahf init-model builds {config_class.model_type!r} "
            "models (baselines are built by `rahf train --model_type ...`)"
        )
    try:
        return config_class.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_path}: {err}") from None


def _cmd_init_model(args: argparse.Namespace) -> int:
    init_model(args.config, args.out, seed=args.seed)
    return 0


# --------------------------------------------------------------------------------------------------------------------
# predict


def predict_to_folder(
    model: str,
    images: list[str],
    prompts: list[str],
    out: str,
    device: str | None = None,
    batch_size: int = 8,
    max_image_pixels: int | None = None,
) -> list[dict]:
    """Runs the predictor and writes, per image, `feedback.json`, the two heatmap PNGs and `overlay.png`.

    Every argument is checked before the model loads; images above `max_image_pixels` pixels (default: 40 MP, or
    `RAHF_MAX_IMAGE_PIXELS`) are refused from their header, before they are decoded.
    """
    from .image_io import ImageTooLargeError
    from .image_io import max_image_pixels as resolve_max_image_pixels
    from .predictor import RichFeedbackPredictor, check_batch_size
    from .pretrained_paths import resolve_pretrained_path
    from .processing_rahf import check_prompts, load_image
    from .viz import heatmap_to_image, overlay_heatmaps

    check_batch_size(batch_size, "--batch_size")
    cap = resolve_max_image_pixels(max_image_pixels)
    folder = resolve_pretrained_path(model, "--model", what="a saved model folder", allow_hub=False)
    if not images:
        raise ValueError("no --image given: pass at least one image file")
    if len(prompts) not in (1, len(images)):
        raise ValueError(
            f"got {len(images)} images and {len(prompts)} --prompt values: give one prompt for all images, or one "
            "per image"
        )
    try:
        check_prompts(prompts)
    except ValueError as err:
        raise ValueError(f"--prompt: {err}") from None
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"`--out` {out!r} is a file; pass a folder (each image gets OUT/<stem>/)")
    stems = [Path(p).stem for p in images]
    if len(set(stems)) != len(stems):
        raise ValueError(f"--image names must have distinct stems (each gets a folder OUT/<stem>/), got {stems}")
    try:
        loaded = [load_image(p, max_pixels=cap) for p in images]  # fails early, naming the file that is not an image
    except ImageTooLargeError as err:
        raise ImageTooLargeError(f"{err} (here: --max_image_pixels N)") from None
    predictor = RichFeedbackPredictor.from_pretrained(
        folder, device=device, batch_size=batch_size, max_image_pixels=cap
    )
    feedbacks = predictor(loaded, prompts, show_progress=len(images) > batch_size)
    summaries = []
    for stem, image, feedback in zip(stems, loaded, feedbacks):
        folder = Path(out) / stem
        folder.mkdir(parents=True, exist_ok=True)
        summary = feedback.to_dict()
        (folder / "feedback.json").write_text(json.dumps(summary, indent=2) + "\n")
        for name, heat in feedback.heatmaps.items():
            heatmap_to_image(heat).save(folder / f"{name}.png")
        overlay_heatmaps(image, feedback.heatmaps).save(folder / "overlay.png")
        summaries.append(summary)
    logger.info("wrote feedback on %d image(s) to %s", len(images), out)
    return summaries


def _cmd_predict(args: argparse.Namespace) -> int:
    summaries = predict_to_folder(
        args.model, args.image, args.prompt, args.out, args.device, args.batch_size, args.max_image_pixels
    )
    for image, summary in zip(args.image, summaries):
        scores = " ".join(f"{k}={v:.3f}" for k, v in summary["scores"].items())
        print(f"{image}: {scores} misaligned={summary['misaligned_words']}")
    return 0


# --------------------------------------------------------------------------------------------------------------------
# demo


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick)
    return 0


# --------------------------------------------------------------------------------------------------------------------


# Subcommands whose module parses its own flags (each also runs as `python -m MODULE` / `accelerate launch -m MODULE`).
DELEGATED = {
    "data": ("rahf.data.cli", "data sets: synth, convert-richhf, consolidate, stats"),
    "train": ("rahf.train", "train RAHF or a baseline from a YAML config (accelerate launch -m rahf.train)"),
    "evaluate": ("rahf.evaluation", "the paper's Tables 1-4 on a split -> metrics.json, report.md, figures"),
    "inpaint": ("rahf.pipelines.inpaint_cli", "heatmap -> mask -> K inpainted candidates -> rescored -> best"),
    "guide": ("rahf.improve.guided_sample", "sampling with classifier guidance from a RAHF score"),
    "best-of-n": ("rahf.improve.best_of_n", "generate N per prompt, keep the best above a threshold"),
}


def _delegate(command: str, argv: list[str], verbose: bool) -> int:
    import importlib

    module = importlib.import_module(DELEGATED[command][0])
    if verbose and command == "data":  # `rahf data` has its own -v (tracebacks); the job parsers do not
        argv = ["--verbose", *argv]
    try:
        code = module.main(argv)
    except ValueError as err:
        if verbose:
            raise
        print(f"rahf {command}: error: {err}", file=sys.stderr)
        return 2
    return int(code or 0)


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1 (argparse names the flag in its message and exits 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value}; pass a positive one")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rahf", description="Rich Automatic Human Feedback for text-to-image generation"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("init-model", help="write an untrained model + processor from a config preset")
    p.add_argument("--config", required=True, help="a configs/model/*.json preset")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_init_model)

    p = sub.add_parser("predict", help="scores, heatmaps and misaligned words for images")
    p.add_argument("--model", required=True, help="folder written by save_pretrained (model + processor)")
    p.add_argument("--image", required=True, nargs="+", help="image file(s)")
    p.add_argument(
        "--prompt", required=True, action="append", help="the prompt; once for all images or once per image"
    )
    p.add_argument("--out", required=True, help="output folder: one OUT/<image stem>/ per image")
    p.add_argument("--device", default=None, help="e.g. cuda, cpu (default: cpu)")
    p.add_argument("--batch_size", type=_positive_int, default=8, help="images per forward pass (default: 8)")
    p.add_argument(
        "--max_image_pixels",
        type=_positive_int,
        default=None,
        help="refuse images of more pixels than this, checked before decoding (default: 40000000, or "
        "RAHF_MAX_IMAGE_PIXELS)",
    )
    p.set_defaults(func=_cmd_predict)

    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)

    p = sub.add_parser("demo", help="the whole loop on the embedded synthetic set, with a visual report")
    p.add_argument("--out", default="demo-output")
    p.add_argument("--quick", action="store_true", help="a smaller budget (for smoke tests)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rest = [a for a in argv if a not in ("-v", "--verbose")]
    if rest and rest[0] in DELEGATED:
        return _delegate(rest[0], rest[1:], verbose)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except ValueError as err:
        # User mistakes: one clear line, no traceback (use -v for the traceback).
        if verbose:
            raise
        print(f"rahf {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
