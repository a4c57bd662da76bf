"""``prunekit recipes``: list the shipped recipes, or print one to start your own from."""
from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("recipes", help="list the shipped recipes, or print one",
                       description="List the recipes shipped with prunekit, or print one (to copy and edit).")
    p.add_argument("name", nargs="?", help="print this recipe")
    return p


def run(args: argparse.Namespace) -> int:
    from ..jobs.recipe import list_recipes, recipe_path

    if args.name:
        with open(recipe_path(args.name)) as f:
            print(f.read(), end="")
    else:
        for name in list_recipes():
            print(name)
    return 0
