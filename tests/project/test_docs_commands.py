"""Every command the README and the documentation show still parses, and the cheap ones run."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def commands() -> list[tuple[str, str]]:
    """``(page, line)`` for each ``outliers ...`` / ``studies ...`` line of a bash block."""
    out = []
    for page in PAGES:
        for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", page.read_text(), re.S):
            for line in block.splitlines():
                line = line.split(" #")[0].strip().removeprefix("$ ")
                for part in re.split(r"\s*(?:&&|;)\s*", line):
                    part = part.removeprefix(".venv/bin/")
                    if re.match(r"(outliers|studies)\s", part + " "):
                        out.append((str(page.relative_to(ROOT)), part))
    return out


COMMANDS = commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) > 30 and any(page == "README.md" for page, _ in COMMANDS)


@pytest.mark.parametrize("page, line", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_a_docs_command_parses(page, line):
    from outliers.cli import build_parser as outliers_parser
    from studies.cli import build_parser as studies_parser

    prog, *argv = shlex.split(line)
    parser = {"outliers": outliers_parser, "studies": studies_parser}[prog]()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{page}: `{line}` no longer parses (exit {e.code})")
    assert callable(getattr(args, "func", None)) or hasattr(args, "command")


@pytest.mark.parametrize("line", ["outliers models", "studies list", "outliers --version"])
def test_the_cheap_docs_commands_run(line, capsys):
    """The commands that need no model run here as the docs show them (the rest load models: the CLI tests
    run each command on tiny models)."""
    from outliers.cli import main as outliers_main
    from studies.cli import main as studies_main

    assert any(c == line for _, c in COMMANDS) or line == "outliers --version"
    prog, *argv = shlex.split(line)
    try:
        code = {"outliers": outliers_main, "studies": studies_main}[prog](argv)
    except SystemExit as e:  # --version exits after printing
        code = e.code
    assert code == 0 and capsys.readouterr().out.strip()
