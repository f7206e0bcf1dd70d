"""The app in a real browser: headless Chromium (Debian's chromium + chromedriver, driven by Selenium) against
tools/app.py in its own process. A bad upload shows the CLI's message, a real one tunes a few steps on the
embedded base (the world model when it ships, else the tiny one), an edit with two prompts shows both videos, and
the mp4 behind a download link is a video with the tuned frame count. A second user sees their place in the queue
while a long tune runs, until Cancel stops it."""
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tav import world_demo
from tav.evaluation import read_frames
from tav.tiny import make_demo_clip
from tests.helpers import REPO_ROOT

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FRAMES, STEPS = 4, 3  # few frames and steps: the whole test is a couple of minutes on two CPU cores
# With TAV_UI_SCREENSHOTS (the README's pictures) the clip is tuned and edited with the world config's steps, so
# the pictures show real edits of the world model; the checks are the same.
TUNE_STEPS, EDIT_STEPS = (60, 25) if os.environ.get("TAV_UI_SCREENSHOTS") else (STEPS, STEPS)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work_dir, port = tmp_path_factory.mktemp("app-work"), free_port()
    log = open(work_dir / "server.log", "w")
    env = dict(os.environ, OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False")
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "tools" / "app.py"), "--work_dir", str(work_dir),
                                "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            assert process.poll() is None, (work_dir / "server.log").read_text()
            assert time.time() < deadline, "the app did not serve within 180 s"
            time.sleep(1)
    yield url, work_dir
    process.terminate()
    process.wait(30)
    log.close()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def field(driver, elem_id, tag="input"):
    return driver.find_element(By.CSS_SELECTOR, f"#{elem_id} {tag}")


def type_into(driver, elem_id, value, tag="input"):
    element = field(driver, elem_id, tag)
    element.clear()
    element.send_keys(str(value))
    element.send_keys("\t")  # blur: Gradio reads the value on change


def wait_for(driver, condition, seconds, what):
    return WebDriverWait(driver, seconds, poll_frequency=1).until(lambda d: condition(d), message=what)


def upload(driver, path):
    field(driver, "tune_upload", "input[type=file]").send_keys(str(path))
    shown = f"#tune_upload td.filename[aria-label='{os.path.basename(path)}']"
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, shown), 60, f"the upload of {path} to show")


def clear_upload(driver):
    driver.find_element(By.CSS_SELECTOR, "#tune_upload button[aria-label='Clear']").click()
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#tune_upload input[type=file]"), 30,
             "the upload box to be empty")


def status(driver, elem_id):
    element = driver.find_element(By.ID, elem_id)
    boxes = element.find_elements(By.TAG_NAME, "textarea")
    return boxes[0].get_attribute("value") if boxes else element.text


def open_tab(driver, name):
    next(b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text.strip() == name).click()


def screenshot(driver, name):
    """docs/app-<name>.png style: a small palette PNG of the window, when TAV_UI_SCREENSHOTS names a folder."""
    folder = os.environ.get("TAV_UI_SCREENSHOTS")
    if not folder:
        return
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.LANCZOS).quantize(64)
    image.save(os.path.join(folder, f"app-{name}.png"), optimize=True)


def test_tune_then_edit_in_the_browser(server, browser, tmp_path):
    url, work_dir = server
    browser.get(url)
    wait_for(browser, lambda d: d.find_elements(By.ID, "tune_button"), 60, "the page to load")

    short = make_demo_clip(tmp_path / "three-frames.mp4", n_frames=3, height=64, width=64)
    upload(browser, short)
    type_into(browser, "tune_frames", FRAMES)
    browser.find_element(By.ID, "tune_button").click()
    wait_for(browser, lambda d: "error:" in status(d, "tune_status"), 60, "the bad upload's error")
    message = status(browser, "tune_status")
    assert "three-frames.mp4 has 3 frames" in message and "frames=4 requested (too few frames)" in message
    assert not (work_dir / "models").exists()  # refused before anything was tuned

    clear_upload(browser)
    # the world demo's clip: a red square on white, the form's default caption
    clip = world_demo.write_clip(world_demo.demo_clip(n_frames=8), str(tmp_path / "clip.mp4"))
    upload(browser, clip)
    type_into(browser, "tune_steps", TUNE_STEPS)
    browser.find_element(By.ID, "tune_button").click()
    wait_for(browser, lambda d: status(d, "tune_status").startswith("done"), 600, "tuning to finish")
    assert f"step {TUNE_STEPS}/{TUNE_STEPS}" in status(browser, "tune_status")
    assert "unet_delta.safetensors" in browser.find_element(By.ID, "tune_models").text
    screenshot(browser, "tune")

    open_tab(browser, "Edit")
    type_into(browser, "edit_steps", EDIT_STEPS)
    browser.find_element(By.ID, "edit_button").click()
    wait_for(browser, lambda d: "done" in status(d, "edit_status"), 600, "the edit to finish")
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#edit_videos video")) >= 2, 60,
             "both edited videos to show")
    screenshot(browser, "edit")

    links = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "#edit_downloads a[href]")]
    mp4 = next(link for link in links if link.split("?")[0].endswith(".mp4"))
    downloaded = tmp_path / "downloaded.mp4"
    downloaded.write_bytes(urllib.request.urlopen(mp4, timeout=30).read())
    assert read_frames(downloaded).shape[0] == FRAMES

    # A second user waits in the one job queue while a long tune runs; Cancel stops the tune and frees it.
    open_tab(browser, "Tune")
    type_into(browser, "tune_steps", 500)
    browser.find_element(By.ID, "tune_button").click()
    wait_for(browser, lambda d: status(d, "tune_status").startswith("tuning: step"), 120, "the long tune to start")
    first = browser.current_window_handle
    browser.switch_to.new_window("tab")
    browser.get(url)
    wait_for(browser, lambda d: d.find_elements(By.ID, "edit_button"), 60, "the second page to load")
    open_tab(browser, "Edit")
    type_into(browser, "edit_steps", STEPS)
    browser.find_element(By.ID, "edit_button").click()
    # Gradio's own place-in-queue text, on the waiting event's outputs (textContent: the empty box has no size)
    wait_for(browser, lambda d: "queue: 1/" in d.find_element(By.ID, "edit_videos").get_attribute("textContent"), 60,
             "the second user's place in the queue")
    second = browser.current_window_handle
    browser.switch_to.window(first)
    browser.find_element(By.ID, "tune_cancel").click()
    wait_for(browser, lambda d: status(d, "tune_status").startswith("cancelled"), 120, "the tune to cancel")
    assert len(list((work_dir / "models").iterdir())) == 1  # the cancelled run left nothing behind
    browser.switch_to.window(second)
    wait_for(browser, lambda d: "done" in status(d, "edit_status"), 600, "the queued edit to run once freed")
