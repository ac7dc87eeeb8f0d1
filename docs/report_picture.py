"""The picture of the demo's report at the top of README.md: docs/demo-report.png.

Opens RUN/report.html (``make demo`` writes runs/demo/report.html; this script runs the demo
first where there is none) in headless Chromium through Selenium and saves the first screen.
Refresh it after a change to the report: ``make pictures``.

    python docs/report_picture.py [--run runs/demo] [--out docs/demo-report.png] [--size 1100x1000]

Needs Chromium and its driver (Debian: ``apt-get install chromium chromium-driver``) and
selenium (installed with ``.[test]``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def chromium(width: int, height: int, profile: str):
    """A headless Chromium driven by Selenium, without Selenium Manager (no network)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
    for path in (binary, driver):
        if not Path(path).is_file():
            sys.exit(f"error: {path} not found: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo", help="the demo's run directory (default runs/demo)")
    parser.add_argument("--out", default=str(HERE / "demo-report.png"))
    parser.add_argument("--size", default="1100x1000", help="the browser window, WIDTHxHEIGHT")
    args = parser.parse_args()
    report = Path(args.run, "report.html").resolve()
    if not report.is_file():
        subprocess.run([sys.executable, "-m", "imgrec", "demo", "--out", args.run], check=True)
    width, height = (int(n) for n in args.size.split("x"))
    profile = tempfile.mkdtemp(prefix="imgrec-picture-")
    browser = chromium(width, height, profile)
    try:
        browser.get(report.as_uri())
        browser.save_screenshot(args.out)
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)
    print(f"wrote {args.out} ({width}x{height}) from {report}")


if __name__ == "__main__":
    main()
