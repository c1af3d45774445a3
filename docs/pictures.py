"""The README's two pictures, made from a real run: `python docs/pictures.py` (needs the plot extra and Chromium).

- docs/diff-plot.png: `ckpttool diff --values --plot` between the first and the last checkpoint of a Lightning run;
- docs/report.png: a screenshot of `ckpttool report --html` of that run, whose last.ckpt was cut short.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from ckpttool.synthetic.runs import lightning_run  # noqa: E402


def main():
    browser = shutil.which("chromium") or shutil.which("google-chrome")
    if browser is None:
        sys.exit("needs Chromium for the report screenshot (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        run = lightning_run(os.path.join(tmp, "lightning-run"), max_steps=8)
        subprocess.run([sys.executable, "-m", "ckpttool", "diff", "--values", "--plot",
                        os.path.join(HERE, "diff-plot.png"), os.path.join(run, "epoch=0-step=2.ckpt"),
                        os.path.join(run, "epoch=0-step=8.ckpt")], stdout=subprocess.DEVNULL)
        last = os.path.join(run, "last.ckpt")
        with open(last, "r+b") as f:
            f.truncate(os.path.getsize(last) // 2)
        page = os.path.join(tmp, "report.html")
        subprocess.run([sys.executable, "-m", "ckpttool", "report", "--html", page, run], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--screenshot={os.path.join(HERE, 'report.png')}", "--window-size=1000,980",
                        f"file://{page}"], check=True, capture_output=True)


if __name__ == "__main__":
    main()
