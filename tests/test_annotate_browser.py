"""The annotation page in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium): points,
words and scores by click and key, submit, skip, reload and server restart resume; then the JSONL is consolidated and
trained on for a few steps.

The browser is installed here when missing (`apt-get install chromium chromium-driver`, as root); the test is skipped,
saying why, only where it cannot be. `RAHF_SCREENSHOT=path.png` also saves the page's screenshot there (the README's).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from rahf.annotate import create_annotate_app, load_tasks
from rahf.predictor import EXAMPLE_IMAGE, EXAMPLE_PROMPT
from rahf.serve import BackgroundServer

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _install_browser() -> str | None:
    """Installs Debian's chromium and chromium-driver if they are missing; returns why not, or None."""
    if Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists():
        return None
    if shutil.which("apt-get") is None:
        return "no chromium and no apt-get to install it (install chromium and chromium-driver)"
    if os.geteuid() != 0:
        return "no chromium, and installing it needs root: apt-get install chromium chromium-driver"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"]):
        done = subprocess.run(["nice", "-n", "19", *command], env=env, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            return f"could not install chromium: {' '.join(command)} failed: {done.stderr[-500:]}"
    return None if Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists() else "chromium installed but not found"


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is in the test extra: pip install -e .[test]"
    )
    reason = _install_browser()
    if reason:
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(condition, timeout=30.0, what="the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except Exception:  # noqa: BLE001 - an element not there yet
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(EXAMPLE_IMAGE, folder / "img0.png")  # the example that ships with rahf, for the README's screenshot
    (folder / "img0.txt").write_text(EXAMPLE_PROMPT)
    rng = np.random.default_rng(0)
    for i, prompt in [(1, "two cats on a wooden table"), (2, "a green star at night")]:
        image = Image.fromarray(rng.integers(60, 200, (240, 320, 3), dtype=np.uint8))
        ImageDraw.Draw(image).ellipse((40 + 30 * i, 40, 140 + 30 * i, 140), fill=(220, 30, 30))
        image.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(prompt)
    return folder


def test_annotate_in_chromium_then_consolidate_and_train(browser, images, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    out = tmp_path / "annotations.jsonl"
    tasks = load_tasks(images)
    driver = browser

    def text(element_id):
        return driver.find_element(By.ID, element_id).text

    def press(*keys):
        ActionChains(driver).send_keys(*keys).perform()

    def loaded(index):
        def check():
            img = driver.find_element(By.ID, "image")
            ok = driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
            return (
                ok
                and img.get_attribute("src").endswith(f"/image/{index}")
                and f"image {index + 1} of 3" in text("progress")
            )

        wait_for(check, what=f"image {index + 1}")

    with BackgroundServer(create_annotate_app(tasks, images, out)) as server:
        driver.get(server.url + "/?annotator=ann")
        loaded(0)
        assert "0 of 3 done" in text("progress")
        image = driver.find_element(By.ID, "image")
        shown_w, shown_h = image.size["width"], image.size["height"]
        # Selenium's offsets are from the element's centre: an implausible point on the smeared corner of the square,
        # a misaligned one on the circle, and a third one, removed below.
        offsets = [(int(0.18 * shown_w), int(0.33 * shown_h)), (0, -int(0.25 * shown_h)), (-int(0.3 * shown_w), 0)]
        ActionChains(driver).move_to_element_with_offset(image, *offsets[0]).click().perform()
        press("m")
        for dx, dy in offsets[1:]:
            ActionChains(driver).move_to_element_with_offset(image, dx, dy).click().perform()
        assert len(driver.find_elements(By.CSS_SELECTOR, "#points .point")) == 3
        driver.find_elements(By.CSS_SELECTOR, "#points .point")[2].click()  # a click on a point removes it
        points = driver.find_elements(By.CSS_SELECTOR, "#points .point")
        assert [p.get_attribute("class") for p in points] == ["point implausibility", "point misalignment"]
        # "a red circle above a blue square on a wooden table": "red" and "wooden"
        driver.find_element(By.CSS_SELECTOR, "#prompt .word[data-index='1']").click()
        driver.find_element(By.CSS_SELECTOR, "#prompt .word[data-index='9']").click()
        driver.find_element(By.CSS_SELECTOR, "#score-plausibility .rate[data-value='4']").click()
        press("2", "3", "1")  # alignment, aesthetics, overall: the active row moves on after each
        assert driver.find_element(By.CSS_SELECTOR, "#score-overall .rate.selected").text == "1"
        shot = Path(os.environ.get("RAHF_SCREENSHOT") or tmp_path / "annotate.png")
        driver.save_screenshot(str(shot))
        press(Keys.ENTER)
        loaded(1)
        assert "saved image 1" in text("message") and "1 of 3 done" in text("progress")
        [line] = [json.loads(x) for x in out.read_text().splitlines()]
        assert (line["uid"], line["annotator"], line["image"], line["split"]) == ("img0", "ann", "img0.png", "train")
        assert line["misaligned_word_indices"] == [1, 9]
        assert line["scores"] == {"plausibility": 4, "alignment": 2, "aesthetics": 3, "overall": 1}
        (p, q) = line["points"]
        assert (p["kind"], q["kind"]) == ("implausibility", "misalignment")
        scale = tasks[0].width / shown_w  # shown size -> the image's own pixels
        for point, (dx, dy) in zip((p, q), offsets):
            assert (
                abs(point["x"] - (shown_w / 2 + dx) * scale) < 3 and abs(point["y"] - (shown_h / 2 + dy) * scale) < 3
            )

        press("s")  # skip image 2
        loaded(2)
        press(Keys.ENTER)  # no scores yet: refused by the page, nothing written
        wait_for(lambda: "rate plausibility" in text("message"), what="the missing-score message")
        assert len(out.read_text().splitlines()) == 1
        driver.refresh()  # a reload resumes where the annotator stopped: image 1 done, image 2 skipped
        loaded(2)

    # The server killed and restarted on the same file: the annotator resumes, and can go back to edit.
    with BackgroundServer(create_annotate_app(load_tasks(images), images, out)) as server:
        driver.get(server.url + "/?annotator=ann")
        loaded(2)
        image = driver.find_element(By.ID, "image")
        ActionChains(driver).move_to_element_with_offset(image, 10, 10).click().perform()
        for name, value in [("plausibility", 2), ("alignment", 5), ("aesthetics", 4), ("overall", 3)]:
            driver.find_element(By.CSS_SELECTOR, f"#score-{name} .rate[data-value='{value}']").click()
        driver.find_element(By.CSS_SELECTOR, "#prompt .word[data-index='2']").click()  # "star"
        driver.find_element(By.ID, "submit").click()
        wait_for(lambda: "all 3 images are done" in text("message"), what="the done message")
        press(Keys.ARROW_LEFT)
        loaded(1)
        press(Keys.ARROW_LEFT)
        loaded(0)
        assert "annotated this image before" in text("message")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#points .point")) == 2
        assert len(driver.find_elements(By.CSS_SELECTOR, "#prompt .word.misaligned")) == 2
    assert Image.open(shot).size[0] > 0

    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["uid"], r["annotator"]) for r in lines] == [("img0", "ann"), ("img2", "ann")]

    # The loop closes: consolidate the page's output and train on it for a few steps.
    from accelerate.state import AcceleratorState, GradientState
    from train_utils import write_tiny_model_config

    from rahf.data.consolidate import consolidate
    from rahf.train import train
    from rahf.training_args import parse_training_args

    report = consolidate(out, images, tmp_path / "data")
    assert report["invalid"] == [] and report["images"] == 2
    config = write_tiny_model_config(tmp_path / "tiny.json")
    argv = ["--data_dir", str(tmp_path / "data"), "--model_config", str(config), "--output_dir", str(tmp_path / "run"),
            "--max_train_steps", "3", "--train_batch_size", "2", "--validation_split", "none", "--logging_steps", "1"]  # fmt: skip
    try:
        summary = train(parse_training_args(argv))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert summary["global_step"] == 3
