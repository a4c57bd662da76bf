"""``prunekit bench NAME``: run one of the benchmark scripts of a source checkout."""
from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path

DESCRIPTION = """\
Run one benchmark script from the benchmarks/ folder of a prunekit source checkout (the
current directory's, or the one prunekit is installed from in editable mode). Options after
NAME go to the script: prunekit bench llm --one sparsegpt 0.5.  Benchmarks are long: see
each script's --help and benchmarks/results/ for the committed results.
"""


def benchmark_dir() -> Path | None:
    """benchmarks/ of the current directory or of the source tree this package lives in."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        folder = root / "benchmarks"
        if folder.is_dir() and any(folder.glob("*.py")):
            return folder
    return None


def available() -> list[str]:
    folder = benchmark_dir()
    return sorted(p.stem for p in folder.glob("*.py")) if folder else []


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="run one benchmark (prunekit bench --list)", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help="benchmark name, e.g. oneshot, llm, minilm, training, deploy")
    p.add_argument("--list", action="store_true", help="list the benchmarks")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="options passed to the script")
    return p


def run(args: argparse.Namespace) -> int:
    names = available()
    if args.list or not args.name:
        if not names:
            raise FileNotFoundError("no benchmarks/ folder found; run prunekit bench from a prunekit source checkout")
        print("\n".join(names))
        return 0
    if args.name not in names:
        raise ValueError(f"unknown benchmark {args.name!r}; choose one of {names}" if names else
                         "no benchmarks/ folder found; run prunekit bench from a prunekit source checkout")
    script = benchmark_dir() / f"{args.name}.py"
    saved = sys.argv
    sys.argv = [str(script), *args.script_args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    finally:
        sys.argv = saved
    return 0
