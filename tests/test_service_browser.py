"""The web console in real headless Chromium, driven as a user would: sign in, create a dataset, upload images,
auto-label, edit a caption, check the data, fill the job form (inline validation), submit, watch the job finish,
download the LoRA. Screenshots go to $LORA_SCRIPTS_SCREENSHOT_DIR when set (docs/ holds the README's), else to the
test's temporary folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from .helpers import assert_same_tensors
from .service_helpers import TOKEN, ServerProcess

pytest.importorskip("fastapi")
playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                "(apt-get install chromium; .ci/run installs it)")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_console_upload_label_submit_watch_download(tmp_path, tiny_sd, image_data):
    from playwright.sync_api import expect, sync_playwright

    home = tmp_path / "home"
    home.mkdir()
    server = ServerProcess(home, extra=["--model-root", str(tiny_sd.parent)])
    docs = Path(os.environ.get("LORA_SCRIPTS_SCREENSHOT_DIR") or tmp_path / "screenshots")
    docs.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            page.set_default_timeout(60_000)
            expect.set_options(timeout=60_000)

            page.goto(server.url + "/")  # every page asks to sign in first; the form POSTs the token
            page.fill("input[name=token]", TOKEN)
            page.click("button")
            assert TOKEN not in page.url
            expect(page.locator(".signed")).to_have_text("signed in")

            page.fill("#new-dataset input[name=name]", "shapes")
            page.click("#new-dataset button")
            page.wait_for_url(re.compile(r"/datasets/\w+$"))
            dataset_id = page.url.rsplit("/", 1)[1]

            page.set_input_files("#files", sorted(str(p) for p in image_data.glob("*.png")))
            page.click("#upload button")
            expect(page.locator("#status")).to_have_text("uploaded 6 files")
            expect(page.locator("#images figure")).to_have_count(6)

            page.select_option("#label select[name=backend]", "filename")
            page.fill("#label input[name=trigger]", "sks")
            page.click("#label button")
            expect(page.locator("#status")).to_contain_text("labelled")
            expect(page.locator('textarea[data-name="img_000.png"]')).to_have_value("sks, img")

            page.fill('textarea[data-name="img_000.png"]', "sks, a red circle")
            page.click("#save-captions")
            expect(page.locator("#status")).to_have_text("captions saved")
            metadata = (home / "datasets" / dataset_id / "metadata.csv").read_text()
            assert "img_000.png,\"sks, a red circle\"" in metadata

            page.fill("#check input[name=resolution]", "32")
            page.click("#check button")
            expect(page.locator("#status")).to_contain_text("data check: ok, 6 samples, 0 errors")
            page.screenshot(path=str(docs / "console-dataset.png"), full_page=True)

            page.click("text=Train on this dataset")
            page.wait_for_url(re.compile(r"/jobs/new\?dataset="))
            form = {"name": "browser job", "base_model": str(tiny_sd), "resolution": "32", "lora_rank": "0",
                    "batch_size": "2", "max_train_steps": "4", "save_steps": "2",
                    "sample_prompts": "a red circle in the style of lora"}
            for key, value in form.items():
                page.fill(f"#job-form [name={key}]", value)
            page.fill("#job-form textarea[name=config_yaml]", "logging: {tensorboard: false}\n"
                      "output_name: browser_lora\nsample_every_n_steps: 2\n")
            # inline validation: the bad rank is marked next to its field, before anything is submitted
            expect(page.locator('[data-error="config.lora_rank"]')).to_contain_text("greater than or equal to 1")
            page.fill("#job-form [name=lora_rank]", "4")
            expect(page.locator("#valid")).to_have_text("config is valid")
            page.click("#submit")
            page.wait_for_url(re.compile(r"/jobs/\w+$"))
            job_id = page.url.rsplit("/", 1)[1]

            expect(page.locator("#state")).to_have_text("succeeded", timeout=400_000)
            expect(page.locator("#progress-text")).to_contain_text("step 4 of 4")
            link = page.locator("#downloads a", has_text="browser_lora.safetensors")
            expect(link).to_have_count(1)
            expect(page.locator("#samples img").first).to_be_visible()
            expect(page.locator("#log")).to_contain_text("finished: 4 steps")
            expect(page.locator("#resume")).to_be_disabled()
            page.screenshot(path=str(docs / "console.png"), full_page=True)
            with page.expect_download() as info:
                link.click()
            downloaded = tmp_path / "downloaded.safetensors"
            info.value.save_as(downloaded)
            browser.close()
        assert_same_tensors(downloaded, home / "jobs" / job_id / "output" / "browser_lora.safetensors")
    finally:
        server.stop()


def test_console_text_job_from_the_form(tmp_path):
    """serve --demo: pick the text task in the job form (it shows the text fields, hides the dataset, fills in the
    demo's tiny LLaMA and instruction set), submit, watch it finish, see the adapter in the downloads."""
    from playwright.sync_api import expect, sync_playwright

    home = tmp_path / "home"
    home.mkdir()
    server = ServerProcess(home, extra=["--demo"])
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(60_000)
            expect.set_options(timeout=60_000)
            page.goto(server.url + "/login")
            page.fill("input[name=token]", TOKEN)
            page.click("button")
            expect(page.locator(".signed")).to_have_text("signed in")
            page.goto(server.url + "/jobs/new")
            expect(page.locator("#job-form [name=dataset_id]")).to_have_value("demo-shapes")  # the form's own
            page.select_option("#job-form [name=task]", "text")
            expect(page.locator("#job-form [name=dataset_id]")).to_be_hidden()
            expect(page.locator("#job-form [name=resolution]")).to_be_hidden()
            expect(page.locator("#job-form [name=base_model]")).to_have_value("models/tiny-llama")
            expect(page.locator("#job-form [name=metadata_path]")).to_have_value("datasets/demo-text/instructions.jsonl")
            page.fill("#job-form [name=max_train_steps]", "4")
            page.fill("#job-form [name=save_steps]", "2")
            page.fill("#job-form [name=name]", "browser text job")
            expect(page.locator("#valid")).to_have_text("config is valid")
            page.click("#submit")
            page.wait_for_url(re.compile(r"/jobs/[0-9a-f]{12}$"))  # not /jobs/new, where it is now
            job_id = page.url.rsplit("/", 1)[1]
            expect(page.locator("#state")).to_have_text("succeeded", timeout=400_000)
            expect(page.locator("#progress-text")).to_contain_text("step 4 of 4")
            expect(page.locator("#downloads a", has_text="adapter/adapter_model.safetensors")).to_have_count(1)
            browser.close()
        job = server.client.get(f"/api/jobs/{job_id}").json()
        assert job["state"] == "succeeded" and "task: text" in server.client.get(f"/api/jobs/{job_id}/config").text
    finally:
        server.stop()
