"""``studies`` command line: run, list, status and report studies, and profile a model (``outliers profile``).

An entry point: it sets the process's environment (thread pools,
``outliers.threads``; Ray's authentication mode for a private local
cluster) before the library runs, and the library only reads it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

CONFIGS = Path(__file__).parent / "configs"


def _resolve(config: str) -> Path:
    path = Path(config)
    if not path.exists() and (CONFIGS / f"{config}.toml").exists():
        return CONFIGS / f"{config}.toml"  # a built-in name, e.g. threshold_ablation
    return path


def _cmd_run(args) -> int:
    from .config import load_config
    from .runner import run_study

    if args.backend == "ray" and args.address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster: no token files

    path = _resolve(args.config)
    cfg = load_config(path)
    out = Path(args.out or Path("studies_out") / cfg.name)
    if args.dry_run:
        from .dryrun import dry_run

        print(dry_run(cfg, out))
        return 0
    counts = run_study(
        cfg,
        out,
        progress=not args.quiet,
        backend=args.backend,
        address=args.address,
        recompute_older=args.recompute_older,
    )
    stale = f" ({counts['stale']} of them stale: their inputs had changed)" if counts["stale"] else ""
    print(
        f"{cfg.name}: {counts['done']} cells done{stale}, {counts['failed']} failed, {counts['skipped']} already "
        f"done (results in {out / 'results.sqlite'})"
    )
    return 0 if counts["failed"] == 0 else 1


def _cmd_list(args) -> int:
    from .config import load_config

    for path in sorted(CONFIGS.glob("*.toml")):
        cfg = load_config(path)
        print(f"{path.stem:<20} {cfg.description}  [{cfg.expected_runtime}]")
    return 0


def _cmd_status(args) -> int:
    from .report import status
    from .runner import STATES

    df = status(args.dir)
    counts = df.state.value_counts()
    print(", ".join(f"{s} {counts.get(s, 0)}" for s in STATES))
    if counts.get("stale", 0):
        print(
            f"{counts['stale']} stale: computed from other inputs (corpus, weights or settings); "
            "'studies run' recomputes them"
        )
    if counts.get("older", 0):
        print(
            f"{counts['older']} computed by another commit of the code; kept, or redone with "
            "'studies run --recompute-older'"
        )
    if args.verbose:
        print(df.to_string(index=False))
    return 0


def _cmd_report(args) -> int:
    from .report import write_report

    report = write_report(args.dir)
    print(f"wrote {report} and {report.with_suffix('.html')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="studies", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run (or resume) a study")
    p.add_argument("config", help="a TOML file or a built-in name (see 'studies list')")
    p.add_argument("--out", help="output folder (default: studies_out/NAME)")
    p.add_argument(
        "--backend",
        choices=("local", "ray"),
        default="local",
        help="ray: one actor per model on a local cluster started on demand, or --address",
    )
    p.add_argument("--address", help="an existing Ray cluster (e.g. ray://host:10001 or auto)")
    p.add_argument(
        "--recompute-older",
        action="store_true",
        help="also redo cells whose inputs are unchanged but were computed by another commit",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the grid, each cell's state and estimated memory and where it fits; run nothing",
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser("list", help="the built-in study configs")
    p.set_defaults(func=_cmd_list)
    p = sub.add_parser("status", help="done / older / stale / failed / pending cells of a study folder")
    p.add_argument("dir")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_cmd_status)
    p = sub.add_parser("report", help="tables, figures, report.md and report.html for a study folder")
    p.add_argument("dir")
    p.set_defaults(func=_cmd_report)
    from .profile_cli import register

    register(sub)  # `studies profile`, the same command as `outliers profile`
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from outliers.cli import dispatch
    from outliers.threads import configure_threads

    configure_threads()  # before --backend ray starts its workers, which inherit the environment
    return dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
