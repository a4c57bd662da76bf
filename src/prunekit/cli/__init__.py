"""The ``prunekit`` command: ``prune``, ``report``, ``recipes``, ``bench`` and ``demo``.

Exit codes: 0 done; 1 the job failed for a reason outside the user's input; 2 a usage error
(bad option, invalid recipe, missing file, data that does not fit the model); 130 interrupted.
Errors print as one line (``prunekit: error: ...``) unless ``--debug`` asks for the traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from typing import Iterator

from .._version import __version__
from . import bench_cmd, prune_cmd, recipes_cmd, report_cmd

USAGE_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, KeyError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunekit", description="Make PyTorch networks sparse and keep them accurate.",
        epilog="Run 'prunekit COMMAND --help' for the options of one command.")
    parser.add_argument("--version", action="version", version=f"prunekit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (prune_cmd, report_cmd, recipes_cmd, bench_cmd):
        cmd = module.add_parser(sub)
        cmd.add_argument("--quiet", action="store_true", help="no progress bars and no summary")
        cmd.add_argument("--debug", action="store_true", help="show the full traceback on errors")
        cmd.set_defaults(handler=module.run)
    sub.add_parser("demo", help="train (or load) a small MNIST CNN and prune it with every one-shot method "
                                "(options: prunekit demo --help)", add_help=False)
    return parser


def offline() -> None:
    """The command never downloads: Hugging Face offline mode, set before any of their libraries
    is imported (huggingface_hub reads it once, at import)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@contextlib.contextmanager
def quiet_libraries(active: bool = True) -> Iterator[None]:
    """Silence other libraries' progress bars and info logs while a command runs (--quiet, or not
    a terminal). Hugging Face libraries read their variables at import, which comes later; plain
    tqdm bars (such as transformers' GGUF conversion) start disabled unless the caller says otherwise."""
    if not active:
        yield
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from tqdm import std

    init = std.tqdm.__dict__["__init__"]
    std.tqdm.__init__ = functools.partialmethod(init, disable=True)
    try:
        yield
    finally:
        std.tqdm.__init__ = init


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    offline()
    if argv and argv[0] == "demo":  # the demo parses its own options
        from .demo import main as demo_main

        demo_main(argv[1:])
        return 0
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 0 for --help/--version, 2 for usage errors
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with quiet_libraries(args.quiet or not sys.stderr.isatty()):
            return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("prunekit: interrupted; nothing was written to the output directory", file=sys.stderr)
        return 130
    except USAGE_ERRORS as exc:
        if args.debug:
            raise
        print(f"prunekit: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the command line reports, the traceback is behind --debug
        if args.debug:
            raise
        print(f"prunekit: error: {type(exc).__name__}: {one_line(exc)} (run again with --debug for the traceback)",
              file=sys.stderr)
        return 1


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (KeyError quotes its message; strip that)."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(text).split()) or type(exc).__name__
