"""The README's screenshots of `bdh explore`, taken with headless Chromium (Debian's chromium and
chromium-driver) driven by selenium:

    bdh explore --ckpt RUN --no-browser --port 8933 &
    python docs/figures/explore_screenshots.py http://127.0.0.1:8933/ docs/figures/explore_read.png one 2600
    bdh explore --ckpt RUN --ckpt UNTRAINED --no-browser --port 8932 &
    python docs/figures/explore_screenshots.py http://127.0.0.1:8932/ docs/figures/explore_side_by_side.png two 2400

MODE "one": read the prompt, click the "H" of "Henry", its most active y neuron and the strongest
synapse, generate 200 tokens; "two": read and generate 160 tokens in every column. The last
argument is the window height. The shots were then cropped to the page and reduced to 128 colours.
"""
import sys, time
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

url, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
PROMPT = ("KING RICHARD II:\nOld John of Gaunt, time-honour'd Lancaster,\n"
          "Hast thou, according to thy oath and band,\nBrought hither Henry Hereford thy bold son,")
o = Options()
for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
          "--force-device-scale-factor=1", f"--window-size=1400,{sys.argv[4] if len(sys.argv) > 4 else 1700}"):
    o.add_argument(a)
o.binary_location = "/usr/bin/chromium"
d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=o)
w = WebDriverWait(d, 600)
try:
    d.get(url)
    w.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    t = d.find_element(By.ID, "text"); t.clear(); t.send_keys(PROMPT)
    d.find_element(By.ID, "read-btn").click()
    w.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#col-0 .top-neurons button"))
    if mode == "one":
        # the 'H' of "Henry" : a capital after a space
        pos = PROMPT.index("Henry")
        d.find_elements(By.CSS_SELECTOR, "#col-0 .tokens .tok")[pos].click()
        w.until(lambda d: d.find_element(By.CSS_SELECTOR, "#col-0 .pos-title").text.startswith(f"{pos}:"))
        w.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#col-0 .top-neurons button"))
        time.sleep(1)
        d.find_elements(By.CSS_SELECTOR, "#col-0 .top-neurons button")[0].click()
        w.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#col-0 .strongest li"))
        time.sleep(1)
        rows = d.find_elements(By.CSS_SELECTOR, "#col-0 .syn-table tr")
        if len(rows) > 1:
            rows[1].click(); time.sleep(3)
        for f, v in (("max-new", 200), ("temperature", 0.8)):
            e = d.find_element(By.ID, f); e.clear(); e.send_keys(str(v))
    else:
        for f, v in (("max-new", 160), ("temperature", 0.8)):
            e = d.find_element(By.ID, f); e.clear(); e.send_keys(str(v))
    d.find_element(By.ID, "gen-btn").click()
    w.until(lambda d: all(g.get_attribute("data-done") == "1" for g in d.find_elements(By.CSS_SELECTOR, ".gen-out")))
    time.sleep(1)
    print("message:", d.find_element(By.ID, "message").text)
    for el in d.find_elements(By.CSS_SELECTOR, ".summary, .gen-stats, .neuron-title, .pos-title, .syn-caption"):
        print(el.text)
    d.save_screenshot(out)
finally:
    d.quit()
