"""Look at a run in TensorBoard through a real browser: the scalars overlay every job, and the
HParams dashboard lists every job with its hyper-parameters and metrics.

Starts ``tensorboard`` on 127.0.0.1 over the run's TensorBoard dir and checks its HTTP API (an
HParams session per job), then opens headless Chromium on the scalars dashboard (tag filter
``loss``: the run selector must name every job, and the ``train/loss`` chart draw a line of its
own colour per job) and on the HParams dashboard (its table must hold a row per job, with the
first hyper-parameter and metric columns), and saves a screenshot of each. Exits 1, naming what
is missing, if anything is.

    python scripts/tensorboard_browser_check.py                    # a tiny run made here
    python scripts/tensorboard_browser_check.py out/quickstart     # a run dir (or its tensorboard/)
    python scripts/tensorboard_browser_check.py --images docs/images   # the docs' screenshots

Without a run dir, it trains four small jobs (different ranks, learning rates and data) on the
tests' tiny random LLaMA in a temporary dir, in seconds. Screenshots go to ``--images``
(default: ``mlora-tensorboard-check/`` in the system's temporary dir).

Needs Chromium and its driver, and Selenium (not a dependency of mlora, nor of its tests)::

    apt-get install -y chromium chromium-driver    # Debian: /usr/bin/chromium, /usr/bin/chromedriver
    pip install selenium

Chromium runs headless, without sandbox or GPU, with a fresh profile and none of its own
network traffic (no QUIC, updates, sync or background requests): it talks to the loopback
TensorBoard only.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]
from conftest import ALL_PROJECTIONS, alpaca_records, build_tiny_llama, job, write_jsonl  # noqa: E402

from mlora_core.config.schema import load_config  # noqa: E402
from mlora_core.plugin_api.host import create_plugin_manager  # noqa: E402
from mlora_core.training.engine import run  # noqa: E402
from mlora_tensorboard.monitor import RUN_DIR  # noqa: E402
from mlora_tensorboard.server import get, hparams_experiment, hparams_sessions, tensorboard, wait_for  # noqa: E402

CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
]
#: Every text under the elements named ``arguments[0]``, shadow roots included (TensorBoard's
#: dashboards are web components, and one page holds every dashboard visited).
DEEP_TEXT = """
const root = arguments[0];
const parts = [];
const walk = (node, inside) => {
  if (node.shadowRoot) walk(node.shadowRoot, inside);
  for (const child of node.childNodes) {
    if (child.nodeType === Node.TEXT_NODE && inside) parts.push(child.textContent);
    if (child.nodeType !== Node.ELEMENT_NODE || ["STYLE", "SCRIPT"].includes(child.tagName)) continue;
    walk(child, inside || child.tagName.toLowerCase() === root);
  }
};
walk(document.body, false);
return parts.join(" ");
"""
#: Per chart of the scalars dashboard: its tag and the colours of the lines it draws (one
#: colour per run; with smoothing, a faint raw line beside each smoothed one).
CHART_COLOURS = """
const deep = (node, visit) => {
  if (node.shadowRoot) deep(node.shadowRoot, visit);
  for (const child of node.children || []) { visit(child); deep(child, visit); }
};
const charts = [];
deep(document.body, (el) => {
  if (el.tagName.toLowerCase() !== "tf-scalar-card") return;
  const colours = new Set();
  deep(el, (p) => {
    if (p.matches("path.line") && (p.getAttribute("d") || "").length > 1) colours.add(p.getAttribute("stroke"));
  });
  charts.push([el.tag, colours.size]);
});
return charts;
"""
#: TensorBoard's run colours repeat after this many runs.
PALETTE = 8


def tiny_run(work: Path) -> Path:
    """Train four small jobs on the tests' tiny LLaMA; returns the run's output dir."""
    model = build_tiny_llama(work / "model", initializer_range=0.5)  # a frozen head that can be steered
    reverse = write_jsonl(work / "reverse.jsonl", alpaca_records(400, 0))
    upper = write_jsonl(work / "upper.jsonl", alpaca_records(400, 1, kind="upper"))
    every = {"max_steps": 40, "eval_every": 8, "micro_batch_size": 4, "data_opts": {"val_set_size": 16}}
    narrow = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ALL_PROJECTIONS}
    wide = {**narrow, "r": 16, "alpha": 32}
    jobs = [
        job("reverse_r4", reverse, lr=3e-2, adapter=narrow, **every),
        job("reverse_r16", reverse, lr=3e-2, adapter=wide, **every),
        job("reverse_r4_slow", reverse, lr=3e-3, adapter=narrow, **every),
        job("upper_r4", upper, lr=3e-2, adapter=narrow, **every),
    ]
    config = {
        "base_model": {"backend": "llama", "path": str(model), "dtype": "fp32"},
        "scheduler": {"type": "optimal_fit"},
        "monitor": {"console": None, "tensorboard": {}},
        "output_dir": str(work / "out"),
        "jobs": jobs,
    }
    path = work / "tiny.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    summary = run(load_config(path), create_plugin_manager(autoload=False))
    print("trained:", ", ".join(f"{j['name']} ({j['status']}, {j['steps']} steps)" for j in summary["jobs"]))
    return work / "out"


def log_dir_of(path: Path) -> Path:
    """A run's TensorBoard dir: ``path/tensorboard`` if there is one, else ``path`` itself."""
    return path / "tensorboard" if (path / "tensorboard").is_dir() else path


def browser(profile: Path, args: argparse.Namespace) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = args.chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(args.chromedriver))


def until(check: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


class Page:
    """One headless Chromium on TensorBoard's pages."""

    def __init__(self, driver: Any, args: argparse.Namespace) -> None:
        self.driver, self.args = driver, args

    def look(self, url: str, within: str, wanted: list[str], image: Path, width: int, lines: int = 0) -> list[str]:
        """Open ``url`` in a ``width`` px wide window, wait until every string of ``wanted``
        shows in the element ``within`` (and, with ``lines``, until the ``train/loss`` chart
        draws that many lines), screenshot it; returns what never showed."""
        self.driver.set_window_size(width, self.args.height)
        self.driver.get(url)
        until(lambda: not self.missing(within, wanted, lines), self.args.timeout)
        time.sleep(self.args.settle)  # charts animate in
        image.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(image))
        absent = self.missing(within, wanted, lines)
        print(f"{image}: {'ok' if not absent else 'MISSING ' + ', '.join(absent)}")
        return absent

    def missing(self, within: str, wanted: list[str], lines: int) -> list[str]:
        text = self.driver.execute_script(DEEP_TEXT, within)
        absent = [w for w in wanted if w not in text]
        drawn = max((n for tag, n in self.driver.execute_script(CHART_COLOURS) if tag == "train/loss"), default=0)
        if drawn < min(lines, PALETTE):
            absent.append(f"{lines} lines in the train/loss chart (drew {drawn})")
        return absent


def check(log_dir: Path, args: argparse.Namespace) -> list[str]:
    """Everything that is missing: from TensorBoard's API, then from the two dashboards."""
    jobs = sorted(p.name for p in log_dir.iterdir() if p.is_dir() and p.name != RUN_DIR)
    if not jobs:
        return [f"job runs under {log_dir}"]
    with tensorboard(log_dir) as url, tempfile.TemporaryDirectory() as profile:
        print(f"tensorboard at {url}: runs {get(url, '/data/runs')}")
        try:
            wait_for(lambda: set(jobs) <= set(hparams_sessions(url)), args.timeout)
        except TimeoutError:
            pass
        sessions = hparams_sessions(url)
        missing = [f"{name}'s HParams session" for name in jobs if name not in sessions]
        for name, session in sorted(sessions.items()):
            evals = ", ".join(f"{k}={v:.4g}" for k, v in sorted(session["metrics"].items()) if k.startswith("eval/"))
            print(f"  {name}: {session['status']}, {len(session['hparams'])} hparams, {evals}")
        driver = browser(Path(profile), args)
        try:
            page = Page(driver, args)
            # the run selector names every job; the train/loss chart draws a line per job
            missing += page.look(
                f"{url}/#scalars&tagFilter={args.tag_filter}",
                "tf-multi-checkbox",  # the run selector
                jobs,
                args.images / "tensorboard_scalars.png",
                args.scalars_width,
                lines=len(jobs),
            )
            # a row per job, with its hyper-parameters and metrics (the first column of each
            # shows: hyper-parameters that differ between jobs come first)
            experiment = hparams_experiment(url)
            columns = [experiment["hparamInfos"][0]["name"], experiment["metricInfos"][0]["name"]["tag"]]
            missing += page.look(
                f"{url}/#hparams",
                "tf-hparams-table-view",
                [*jobs, *columns],
                args.images / "tensorboard_hparams.png",
                args.hparams_width,
            )
        finally:
            driver.quit()
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "run_dir", nargs="?", type=Path, help="a run's output dir or TensorBoard dir (default: a tiny run)"
    )
    parser.add_argument("--images", type=Path, default=Path(tempfile.gettempdir()) / "mlora-tensorboard-check")
    parser.add_argument("--tag-filter", default="loss", help="the scalars dashboard's tag filter (a regex)")
    parser.add_argument("--scalars-width", type=int, default=1280, help="window width for the scalars (px)")
    parser.add_argument(
        "--hparams-width", type=int, default=2160, help="... for the HParams table: five hparams, four metrics"
    )
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each dashboard")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to let charts draw before a screenshot")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mlora-tb-") as tmp:
        work = Path(tmp)
        log_dir = log_dir_of(args.run_dir if args.run_dir else tiny_run(work))
        missing = check(log_dir, args)
    if missing:
        print(f"FAILED: not shown: {', '.join(missing)}", file=sys.stderr)
        return 1
    print("every job shows on the scalars and HParams dashboards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
