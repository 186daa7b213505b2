"""`bdh explore` in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by selenium.

The command runs as a user would start it, on a free localhost port with a tiny checkpoint made here;
the test types a prompt, waits for the per-position view and a generated continuation, clicks a
neuron, checks what the page shows against the model, and saves a screenshot. CI installs the
browser (.ci/run); elsewhere the test is skipped when the browser is missing, and fails under CI.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

from bdh.checkpoint import load_model
from bdh.generate import generate
from tests.explore.helpers import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
PROMPT = "The king and the queen."
NEW_TOKENS = 24


def need_browser():
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing = "selenium"
    else:
        missing = None if CHROMIUM and DRIVER else "chromium and chromium-driver (Debian packages)"
    if missing:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"the browser test needs {missing}")


@pytest.fixture
def server(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "bdh", "explore", "--ckpt", str(ckpt), "--port", "0",
                             "--no-browser", "--device", "cpu"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert found, line + proc.stdout.read() if proc.poll() is not None else line
        yield found.group(0), ckpt
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def browser():
    need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_read_click_a_neuron_and_generate_in_a_browser(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, ckpt = server
    wait = WebDriverWait(browser, 60)
    browser.get(url)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    box = browser.find_element(By.ID, "text")
    box.clear()
    box.send_keys(PROMPT)
    browser.find_element(By.ID, "read-btn").click()

    # the per-position view: one span per byte, the last position chosen, its candidates and counts
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#col-0 .top-neurons button"))
    tokens = browser.find_elements(By.CSS_SELECTOR, "#col-0 .tokens .tok")
    assert len(tokens) == len(PROMPT.encode())
    assert tokens[1].text == "h" and tokens[3].text == "␣"
    last = len(tokens) - 1
    assert browser.find_element(By.CSS_SELECTOR, "#col-0 .pos-title").text.startswith(f"{last}:")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#col-0 .cands tr")) == 1 + 5
    position = post(url + "api/position", {"text": PROMPT, "position": last})
    counts = browser.find_elements(By.CSS_SELECTOR, "#col-0 .counts tr")[1].find_elements(By.TAG_NAME, "td")
    assert [c.text for c in counts[1:]] == [f"{x} / {y}" for x, y in zip(position["x_active"][0],
                                                                          position["y_active"][0])]

    # click a neuron: the page names it, says where it fires most and lists its edges
    button = browser.find_elements(By.CSS_SELECTOR, "#col-0 .top-neurons button")[0]
    layer, head, neuron = (int(button.get_attribute(f"data-{k}")) for k in ("layer", "head", "neuron"))
    assert (layer, head, neuron) == tuple(position["top_y"][0][k] for k in ("layer", "head", "neuron"))
    button.click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#col-0 .strongest li"))
    expected = post(url + "api/neuron", {"text": PROMPT, "layer": layer, "head": head, "neuron": neuron})
    title = browser.find_element(By.CSS_SELECTOR, "#col-0 .neuron-title").text
    assert f"#{neuron} of head {head}" in title and f"in layer {layer}" in title
    assert f"fires at {expected['fires']} of {len(tokens)} positions" in title
    shown = [int(li.get_attribute("data-t")) for li in browser.find_elements(By.CSS_SELECTOR, "#col-0 .strongest li")]
    assert shown == [s["position"] for s in expected["strongest"]]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#col-0 .out-edges tr")) == 1 + len(expected["out_edges"])
    fires = browser.find_elements(By.CSS_SELECTOR, "#col-0 .tokens .tok.fires")
    assert len(fires) == expected["fires"]

    # generate greedily: the page shows the continuation the model gives from the prompt's state
    for field, value in (("max-new", NEW_TOKENS), ("temperature", 0)):
        entry = browser.find_element(By.ID, field)
        entry.clear()
        entry.send_keys(str(value))
    browser.find_element(By.ID, "gen-btn").click()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#col-0 .gen-out").get_attribute("data-done") == "1")
    model = load_model(ckpt)
    ids = list(PROMPT.encode())
    new = generate(model, torch.tensor([ids]), NEW_TOKENS, temperature=0)[0, len(ids):].tolist()
    continuation = bytes(new).decode("utf-8", errors="replace")
    shown = browser.find_element(By.CSS_SELECTOR, "#col-0 .gen-out .gen").get_attribute("textContent")
    assert shown == continuation
    assert browser.find_element(By.CSS_SELECTOR, "#col-0 .gen-stats").text.startswith(f"{NEW_TOKENS} tokens")
    assert browser.find_element(By.ID, "message").text == ""

    shot = tmp_path / "explore.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
