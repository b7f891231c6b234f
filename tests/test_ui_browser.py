"""`lorakit ui` in a real headless browser (the system's Chromium, driven by Playwright): open the app, load the demo
dataset and see its buckets, queue a tiny run from an imported sd-scripts command, watch the step counter and the
loss chart move, press Stop, see the run saved with its resume command, press Resume, see it finish, open the
sample gallery. A screenshot of each page goes to the test's output folder."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time

import pytest

pytest.importorskip("starlette")
playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine: the browser tests need "
                                 "Debian's chromium package (apt-get install chromium); .ci/run installs it")]

from lorakit.testing.datasets import write_dataset_toml, write_image_folder  # noqa: E402
from lorakit.ui.app import create_app  # noqa: E402

WAIT_MS = 240_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def served(tmp_path, tiny_single_file, monkeypatch):
    """The app over a demo-like project (the tiny model, nine images in three aspect ratios, a dataset TOML,
    one sample prompt), served by uvicorn on a free port."""
    import uvicorn

    root = tmp_path / "project"
    write_image_folder(root / "images", count=9)  # as `lorakit demo` makes them
    write_dataset_toml(root / "dataset.toml", root / "images", resolution=96)
    (root / "prompts.txt").write_text("lkt style, a red circle --w 64 --h 64 --s 4 --d 5\n")
    os.symlink(tiny_single_file, root / "tiny-sdxl.safetensors")
    monkeypatch.chdir(root)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(root), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", root
    server.should_exit = True
    thread.join(timeout=10)


def test_prepare_queue_watch_stop_resume_and_gallery_in_a_browser(served, tmp_path):
    base, root = served
    shots = tmp_path / "screenshots"
    shots.mkdir()
    command = ("accelerate launch --num_cpu_threads_per_process 1 sdxl_train_network.py "
               "--pretrained_model_name_or_path=tiny-sdxl.safetensors --dataset_config=dataset.toml "
               "--output_dir=output --output_name=demo_lora --network_dim=4 --network_alpha=2 "
               "--learning_rate=1e-3 --max_train_steps=80 --cache_latents --cache_text_encoder_outputs "
               "--sample_prompts=prompts.txt --sample_every_n_steps=20 --max_data_loader_n_workers=0 --seed=42")
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(WAIT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))

        page.goto(base + "/")
        page.screenshot(path=shots / "1-queue-empty.png", full_page=True)

        # The demo dataset: its TOML, saved and previewed with its buckets and images.
        page.click("text=Datasets")
        page.select_option("select[name=path]", "dataset.toml")
        page.wait_for_url("**/datasets?path=dataset.toml")
        assert "[[datasets.subsets]]" in page.input_value("textarea[name=text]")
        page.click("text=Save and preview")
        page.wait_for_selector(".bucket")
        buckets = page.locator(".bucket h3").all_inner_texts()
        assert len(buckets) == 3 and any(text.startswith("96x96") for text in buckets), buckets
        assert page.locator(".thumbs img").count() == 9
        page.screenshot(path=shots / "2-dataset-buckets.png", full_page=True)

        # The run form: an sd-scripts command imported, checked live, queued.
        page.click("text=New run")
        page.fill("textarea[name=import_text]", command)
        page.click("button[value=import_command]")
        assert "imported" in page.inner_text(".notice")
        assert page.input_value("input[name=max_train_steps]") == "80"
        page.wait_for_function("document.getElementById('export-command').textContent.includes('--max_train_steps')")
        page.screenshot(path=shots / "3-run-form.png", full_page=True)
        page.click("button[value=queue]")
        page.wait_for_url("**/runs/1")

        # The live view: the step counter and the loss chart move.
        page.wait_for_function("/step [1-9]\\d* \\//.test(document.getElementById('steps').textContent)")
        first_steps = page.inner_text("#steps")
        page.wait_for_selector("#chart-loss canvas")
        chart_before = page.locator("#chart-loss").screenshot()
        page.wait_for_function(f"document.getElementById('steps').textContent !== {first_steps!r}")
        page.wait_for_timeout(800)
        assert page.locator("#chart-loss").screenshot() != chart_before
        page.screenshot(path=shots / "4-run-live.png", full_page=True)

        # Stop: the run saves a LoRA and a state, and says how to resume.
        page.click("#stop")
        page.wait_for_function("document.getElementById('status').textContent === 'stopped'")
        assert "resume with:" in page.inner_text("#message")
        assert page.locator("#saves li").count() >= 1
        page.screenshot(path=shots / "5-run-stopped.png", full_page=True)

        # Resume: a second run continues from the state and finishes; its gallery has the samples.
        page.click("#resume")
        page.wait_for_url("**/runs/2")
        page.wait_for_function("document.getElementById('status').textContent === 'finished'")
        assert page.inner_text("#steps") == "step 80 / 80"
        page.wait_for_selector("#gallery img")
        assert "a red circle" in page.inner_text("#gallery")
        page.screenshot(path=shots / "6-run-resumed-finished.png", full_page=True)
        page.click("#gallery a >> nth=0")
        page.goto(base + "/")
        assert page.locator("#queue tbody tr").count() == 2
        page.screenshot(path=shots / "7-queue-after.png", full_page=True)
        browser.close()
    assert not errors, errors
    assert (root / "output" / "demo_lora.safetensors").is_file()
    print(f"screenshots: {shots}")
