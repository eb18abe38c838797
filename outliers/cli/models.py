"""``outliers models``: the built-in models and whether each is installed."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the built-in models and whether each is installed")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from outliers.models.builtin import list_models

    rows = list_models()
    w = max(len(r["name"]) for r in rows)
    for r in rows:
        state = "installed" if r["installed"] else f"missing: {r['install']}"
        print(f"{r['name']:<{w}}  {r['kind']:<7}  {state}\n{'':<{w}}  {r['description']}")
    return 0
