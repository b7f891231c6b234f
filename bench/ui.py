"""Page weight, time to first render and live-update rate of `lorakit ui`'s run page, in the system's Chromium.

A tiny project (random tiny SDXL, nine images, one sample prompt) is served by the real app; a run of `--steps`
steps is queued; the run page is opened `--loads` times with a cold cache while it trains. Printed: the bytes the
page transfers (compressed, as sent) and their uncompressed size, the median time to first contentful paint and to
the load event, and how many server-sent updates per second the page received and drew while the run trained (the
count `lorakit.updates` keeps), beside the run's own steps per second. Screenshots of every page go to `--screenshots`.

    PYTHONPATH=src python bench/ui.py [--steps 300] [--loads 5] [--screenshots build/ui-screenshots]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--watch-seconds", type=float, default=10.0)
    parser.add_argument("--screenshots", default="build/ui-screenshots")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import uvicorn
    from playwright.sync_api import sync_playwright

    from lorakit.testing.datasets import write_dataset_toml, write_image_folder
    from lorakit.testing.random_models import write_random_single_file
    from lorakit.ui.app import create_app

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("no chromium: apt-get install chromium", file=sys.stderr)
        return 1
    shots = Path(args.screenshots).absolute()
    shots.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_random_single_file(root / "tiny.safetensors", "tiny", 0, torch.float32)
        write_image_folder(root / "images", count=9)
        write_dataset_toml(root / "dataset.toml", root / "images", resolution=96)
        (root / "prompts.txt").write_text("lkt style, a red circle --w 64 --h 64 --s 4 --d 5\n")
        os.chdir(root)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(root), host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        with sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(300_000)
            page.goto(base + "/new")
            page.screenshot(path=shots / "form.png", full_page=True)
            page.evaluate("document.querySelectorAll('details.section').forEach(d => d.open = true)")
            for name, value in (("pretrained_model_name_or_path", "tiny.safetensors"),
                                ("dataset_config", "dataset.toml"), ("output_dir", "output"),
                                ("max_train_steps", str(args.steps)), ("sample_prompts", "prompts.txt"),
                                ("sample_every_n_steps", "50"), ("max_data_loader_n_workers", "0")):
                page.fill(f"input[name={name}]", value)
            page.check("input[name=cache_latents]")
            page.check("input[name=cache_text_encoder_outputs]")
            page.click("button[value=queue]")
            page.wait_for_url("**/runs/1")
            page.wait_for_function("/step [1-9]\\d* \\//.test(document.getElementById('steps').textContent)")

            weights, paints, loads = [], [], []
            for _ in range(args.loads):
                context = browser.new_context(viewport={"width": 1280, "height": 900})  # a cold cache
                fresh = context.new_page()
                fresh.goto(base + "/runs/1")
                fresh.wait_for_load_state("load")
                paint, load, sent, body = fresh.evaluate("""() => {
                    const paint = performance.getEntriesByName('first-contentful-paint')[0];
                    const nav = performance.getEntriesByType('navigation')[0];
                    const entries = [nav, ...performance.getEntriesByType('resource')
                                     .filter(entry => !entry.name.includes('/stream'))];
                    return [paint ? paint.startTime : null, nav.loadEventEnd,
                            entries.reduce((sum, entry) => sum + entry.encodedBodySize, 0),
                            entries.reduce((sum, entry) => sum + entry.decodedBodySize, 0)];
                }""")
                context.close()
                weights.append({"sent": sent, "body": body})
                paints.append(paint)
                loads.append(load)
            page.wait_for_function("lorakit.updates > 0")
            before_updates, before_step = page.evaluate("lorakit.updates"), _step(page)
            started = time.perf_counter()
            page.wait_for_timeout(args.watch_seconds * 1000)
            seconds = time.perf_counter() - started
            updates = page.evaluate("lorakit.updates") - before_updates
            steps = _step(page) - before_step
            page.screenshot(path=shots / "run-live.png", full_page=True)
            page.goto(base + "/")
            page.screenshot(path=shots / "queue.png", full_page=True)
            page.goto(base + "/runs/1")
            page.click("#stop")
            page.wait_for_function("document.getElementById('status').textContent === 'stopped'")
            page.screenshot(path=shots / "run-stopped.png", full_page=True)
            browser.close()
        server.should_exit = True
    print(f"CPU {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"run page weight (cold cache, event stream excluded): {weights[-1]['sent'] / 1024:.1f} KB sent, "
          f"{weights[-1]['body'] / 1024:.1f} KB uncompressed")
    print(f"run page: first contentful paint median {statistics.median(p for p in paints if p):.0f} ms, "
          f"load event median {statistics.median(loads):.0f} ms ({args.loads} loads while the run trained)")
    print(f"live view: {updates / seconds:.1f} updates/s drawn while the run made {steps / seconds:.1f} steps/s "
          f"({seconds:.0f} s)")
    print(f"screenshots: {shots}")
    return 0


def _step(page) -> int:
    text = page.inner_text("#steps")
    return int(text.split()[1]) if text.startswith("step ") else 0


if __name__ == "__main__":
    raise SystemExit(main())
