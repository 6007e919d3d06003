"""The `rahf` command line: the front door to every job (each also reachable as a Python module)."""

from __future__ import annotations

import argparse
import logging
import sys

from .job_args import positive_int

logger = logging.getLogger("rahf")


# --------------------------------------------------------------------------------------------------------------------
# init-model


def _cmd_init_model(args: argparse.Namespace) -> int:
    from .init_model import init_model

    init_model(args.config, args.out, seed=args.seed)
    return 0


# --------------------------------------------------------------------------------------------------------------------
# predict


def _cmd_predict(args: argparse.Namespace) -> int:
    from .predictor import predict_to_folder

    summaries = predict_to_folder(
        args.model, args.image, args.prompt, args.out, args.device, args.batch_size, args.max_image_pixels
    )
    for image, summary in zip(args.image, summaries):
        scores = " ".join(f"{k}={v:.3f}" for k, v in summary["scores"].items())
        print(f"{image}: {scores} misaligned={summary['misaligned_words']}")
    return 0


# --------------------------------------------------------------------------------------------------------------------
# serve


def _cmd_serve(args: argparse.Namespace) -> int:
    from .serve import run_from_args

    return run_from_args(args)


# --------------------------------------------------------------------------------------------------------------------
# annotate


def _cmd_annotate(args: argparse.Namespace) -> int:
    from .annotate import run_from_args

    return run_from_args(args)


# --------------------------------------------------------------------------------------------------------------------
# demo


def _cmd_demo(args: argparse.Namespace) -> int:
    from rahf.improve.demo import run_demo

    run_demo(args.out, quick=args.quick)
    return 0


# --------------------------------------------------------------------------------------------------------------------


# Subcommands whose module parses its own flags (each also runs as `python -m MODULE` / `accelerate launch -m MODULE`).
DELEGATED = {
    "data": (
        "rahf.data.cli",
        "data sets: synth, convert-richhf, consolidate, stats, label-studio-config, from-label-studio",
    ),
    "train": ("rahf.train", "train RAHF or a baseline from a YAML config (accelerate launch -m rahf.train)"),
    "evaluate": ("rahf.evaluation", "the paper's Tables 1-4 on a split -> metrics.json, report.md, figures"),
    "inpaint": ("rahf.improve.inpaint", "heatmap -> mask -> K inpainted candidates -> rescored -> best"),
    "guide": ("rahf.improve.guided_sample", "sampling with classifier guidance from a RAHF score"),
    "best-of-n": ("rahf.improve.best_of_n", "generate N per prompt, keep the best above a threshold"),
    "efficacy": ("rahf.improve.efficacy", "the paper's §5 experiments in the measuring world, judged, with controls"),
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
    p.add_argument("--batch_size", type=positive_int, default=8, help="images per forward pass (default: 8)")
    p.add_argument(
        "--max_image_pixels",
        type=positive_int,
        default=None,
        help="refuse images of more pixels than this, checked before decoding (default: 40000000, or "
        "RAHF_MAX_IMAGE_PIXELS)",
    )
    p.set_defaults(func=_cmd_predict)

    from .serve import register as register_serve

    p = sub.add_parser("serve", help="an HTTP scoring server with dynamic batching (GET /health, POST /score)")
    register_serve(p)
    p.set_defaults(func=_cmd_serve)

    from .annotate import register as register_annotate

    p = sub.add_parser("annotate", help="a local web page to collect rich feedback (points, words, four scores)")
    register_annotate(p)
    p.set_defaults(func=_cmd_annotate)

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
