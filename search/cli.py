"""The ``edgeslim`` command line. Each command lives in a module of its own that registers its
arguments (``register(subparsers)``); this module builds the parser and maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main", "COMMAND_MODULES"]

# modules whose register() adds commands, in the order --help lists them
COMMAND_MODULES = ("edgeslim.search._cli_study", "edgeslim.search._cli_devices", "edgeslim.search._cli_ship")


def _build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="edgeslim",
        description="Search channel sparsity x low rank x bit-width for an edge device; "
                    "get a Pareto front of accuracy against size, latency and energy.")
    parser.add_argument("--debug", action="store_true",
                        help="after an error's one line, print the traceback of its cause (e.g. your factory's frames)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edgeslim`` console script; returns the exit code.

    Usage errors (bad options, bad spec, impossible space) exit 2; other edgeslim errors 1.

    Example:
        >>> main(["--help"])  # doctest: +SKIP
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if not getattr(args, "command", None):
        parser.print_usage(sys.stderr)
        print("edgeslim: error: choose a command, e.g. `edgeslim search`", file=sys.stderr)
        return 2
    for key in ("trials", "threads", "samples", "finetune_steps", "steps", "jobs", "torch_threads"):
        value = getattr(args, key, None)
        if value is not None and value < 1:
            parser.print_usage(sys.stderr)
            print(f"edgeslim: error: --{key} must be >= 1, got {value}", file=sys.stderr)
            return 2
    from edgeslim.spaces import EdgeslimError, SpaceError, SpecError

    try:
        return args.func(args)
    except (SpecError, SpaceError) as e:
        parser.print_usage(sys.stderr)
        print(f"edgeslim: error: {e}", file=sys.stderr)
        _debug(args, e)
        return 2
    except EdgeslimError as e:
        print(f"edgeslim: error: {e}", file=sys.stderr)
        _debug(args, e)
        return 1
    except KeyboardInterrupt:
        print("\nedgeslim: interrupted; finished trials are stored, re-run the same command to resume",
              file=sys.stderr)
        return 130


def _debug(args: argparse.Namespace, e: BaseException) -> None:
    if getattr(args, "debug", False):
        import traceback

        print("edgeslim: --debug: the traceback behind the error above:", file=sys.stderr)
        traceback.print_exception(e.__cause__ or e.__context__ or e, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
