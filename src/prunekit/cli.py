"""The ``prunekit`` command. For now: ``prunekit demo`` (the same job as ``make demo``)."""
from __future__ import annotations

import argparse
import sys

from . import __version__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "demo":  # the demo parses its own options
        from .demo import main as demo_main

        demo_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="prunekit", description="Make PyTorch networks sparse and keep them accurate.")
    parser.add_argument("--version", action="version", version=f"prunekit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("demo", help="train (or load) a small MNIST CNN and prune it with every one-shot method "
                                "(options: prunekit demo --help)")
    parser.parse_args(argv)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
