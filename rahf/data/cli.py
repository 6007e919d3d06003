"""`rahf data ...`: the data subcommands, each registered by its own module through `register(subparsers)`.

`python -m rahf.data <command>` and `rahf data <command>` both end here. Modules: `richhf` (convert-richhf),
`fetch_richhf` (fetch-richhf), `consolidate`, `synth`, `stats` and `label_studio` (label-studio-config,
from-label-studio); a module that does not exist (yet) is left out, any other import error is raised.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

logger = logging.getLogger(__name__)

__all__ = ["SUBCOMMAND_MODULES", "build_parser", "main"]

# Modules that define `register(subparsers)`, in the order their commands are listed in `--help`.
SUBCOMMAND_MODULES = ("synth", "richhf", "fetch_richhf", "consolidate", "stats", "label_studio")


def build_parser() -> argparse.ArgumentParser:
    """The `rahf data` parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="rahf data", description="Rich-feedback data sets: build, convert, consolidate and describe them."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        qualified = f"{__package__}.{name}"
        try:
            module = importlib.import_module(qualified)
        except ModuleNotFoundError as err:
            if err.name != qualified:
                raise  # the module exists but one of its own imports is missing: a real error
            logger.debug("rahf data: no module %s, its command is not available", qualified)
            continue
        register = getattr(module, "register", None)
        if register is None:
            raise RuntimeError(f"{qualified} must define register(subparsers) to add its `rahf data` command")
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs `rahf data` with `argv` (default: `sys.argv[1:]`); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
        )
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except ValueError as err:
        # User mistakes name the argument and the fix: one line, no traceback unless --verbose.
        if args.verbose:
            raise
        logger.error("rahf data %s: %s", args.command, err)
        return 2  # as argparse, and every other `rahf` command, for a usage mistake
