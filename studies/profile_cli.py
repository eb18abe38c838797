"""``outliers profile`` (and ``studies profile``): one self-contained HTML page of a model's outliers.

The ``outliers`` command line never imports ``studies`` (pyproject.toml's import contracts): it finds this
command through the ``outliers.commands`` entry-point group (setup.cfg), which names ``register``; the
``studies`` command line adds the same subcommand directly.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

__all__ = ["register", "add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .profile import SECTIONS

    p.add_argument("--model", required=True, help="a built-in name, a model folder, a .gguf file or a hub id")
    p.add_argument("--corpus", default="builtin", help="'builtin' (default), a text file or a hub dataset spec")
    p.add_argument("--out", metavar="DIR", help="write DIR/index.html and its store here (default: profiles/NAME)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a lower-fidelity page in a few minutes: fewer windows (rough intervals) and three Table-1 rows",
    )
    p.add_argument(
        "--bos",
        choices=("corpus", "window"),
        default="corpus",
        help="window: every window starts with the BOS token (Gemma); corpus (default): the text as it is",
    )
    p.add_argument(
        "--sections",
        metavar="A,B",
        help=f"only these sections (the model's facts always): {', '.join(s.key for s in SECTIONS)}",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars; the sections' costs are still printed")
    p.set_defaults(func=run)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``profile`` to a command line's subcommands (the ``outliers.commands`` entry point)."""
    p = sub.add_parser(
        "profile",
        help="one self-contained HTML page of a model's outliers, resumable (index.html)",
        description=__doc__.splitlines()[0],
    )
    add_arguments(p)


def run(args: argparse.Namespace) -> int:
    from outliers.data.corpus import load_corpus
    from outliers.models.source import resolve

    from .profile import chosen_sections, default_out, profile_config, run_profile

    resolve(args.model)  # an unknown model or corpus stops here, in one line, not once per section
    load_corpus(args.corpus)
    names = [n.strip() for n in args.sections.split(",") if n.strip()] if args.sections else None
    sections = chosen_sections(names)
    settings = {"bos": args.bos} if args.bos != "corpus" else None
    cfg = profile_config(args.model, args.corpus, quick=args.quick, sections=names, settings=settings)
    out = Path(args.out) if args.out else default_out(args.model, args.quick)
    argv = ["outliers", "profile", "--model", args.model]
    argv += ["--corpus", args.corpus] if args.corpus != "builtin" else []
    argv += ["--out", str(args.out)] if args.out else []
    argv += ["--quick"] if args.quick else []
    argv += ["--bos", args.bos] if args.bos != "corpus" else []
    argv += ["--sections", args.sections] if args.sections else []
    command = " ".join(shlex.quote(a) for a in argv)
    quick = "quick: " if args.quick else ""
    print(f"outliers profile: {args.model} on {args.corpus} ({quick}{len(sections)} sections) -> {out}", flush=True)
    try:
        page, costs = run_profile(cfg, out, sections=sections, progress=not args.quiet, command=command)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: every finished cell is kept in {out / 'results.sqlite'}; run the same command to resume",
            file=sys.stderr,
        )
        return 130
    wall = sum(c.wall_s for c in costs)
    failed = [c.title for c in costs if c.failed]
    print(f"wrote {page} and {page.parent / 'profile.json'} ({wall:.0f} s)")
    if failed:
        print(f"note: the analysis of {', '.join(failed)} could not run on this model; the page says why")
    return 0
