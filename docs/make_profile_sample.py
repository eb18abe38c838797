"""Make the worked example of the docs: one model's `outliers profile` page, its top as a screenshot, and a page
that links both with what made them. Run by hand (CI does not rebuild it) and commit what it writes.

    python docs/make_profile_sample.py                          # SmolLM2-135M, --quick
    python docs/make_profile_sample.py --model qwen2.5-coder-0.5b --default

Writes ``docs/samples/profile-<model>-<quick|default>.html`` (the page as `outliers profile` wrote it),
``docs/samples/profile-<model>-<quick|default>-top.png`` (its first screen at a laptop's width, taken in headless
Chromium where Selenium and chromium-driver are installed) and ``docs/profile_sample_<model>.md`` (the quick page)
or ``docs/profile_sample_<model>_default.md`` (the default one, so one run never replaces the other): the header
(commit, machine, date, the command and its wall time), the page's summary sentences, the screenshot and a link.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent


def _cpu() -> str:
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    shown = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_int8") if f in flags]
    try:
        load = ", ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "unknown"
    return f"{name}; {', '.join(shown) or 'no AVX2'}; load average {load}"


def _commit() -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True)
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _screenshot(page: Path, png: Path, width: int = 1280, height: int = 900) -> bool:
    """The page's first screen, as a reader opening it on a laptop sees it; False where no browser is installed."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return False
    if not Path("/usr/bin/chromedriver").exists():
        return False
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={width},{height}")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary:
        options.binary_location = binary
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(page.resolve().as_uri())
        driver.save_screenshot(str(png))
    finally:
        driver.quit()
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--default", action="store_true", help="the default page, not --quick")
    args = p.parse_args(argv)
    kind = "default" if args.default else "quick"
    samples = DOCS / "samples"
    samples.mkdir(exist_ok=True)
    name = f"profile-{args.model}-{kind}"
    commit = _commit()  # before this script writes its own files into the tree
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["outliers", "profile", "--model", args.model, "--out", tmp, *([] if args.default else ["--quick"])]
        started = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - started
        shutil.copyfile(Path(tmp) / "index.html", samples / f"{name}.html")
        summary = json.loads((Path(tmp) / "profile.json").read_text())["summary"]
    shot = _screenshot(samples / f"{name}.html", samples / f"{name}-top.png")
    shown = " ".join(a if a != tmp else "DIR" for a in cmd)
    lines = [
        f"# Worked example: the profile of {args.model} ({kind})",
        "",
        f"Written by `{' '.join(['python docs/make_profile_sample.py', *(argv or sys.argv[1:])])}` "
        f"at commit {commit} on {date.today().isoformat()}, on {_cpu()} "
        f"(machines of one kind differ; timings on a shared machine swing 2-5x). The command was `{shown}`; "
        f"it took {wall:.0f} s of wall time, cold, from the command line. The packaged weights are 4-bit GGUFs "
        "dequantized to float32, so weight statistics carry that rounding. CI does not rebuild this page.",
        "",
        f"[Open the page]({'samples/' + name + '.html'}) (one self-contained file, "
        f"{(samples / f'{name}.html').stat().st_size / 1e6:.1f} MB, readable offline). Its summary:",
        "",
        *[f"- {s}" for s in summary],
        "",
    ]
    if shot:
        lines += [f"![The top of the page at 1280 px]({'samples/' + name + '-top.png'})", ""]
    md = f"profile_sample_{args.model}{'_default' if args.default else ''}.md"
    (DOCS / md).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
