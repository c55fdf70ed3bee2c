"""The playground page at `/`, in a real browser: headless Chromium driven by Selenium.

Uses the system's Chromium and chromedriver (Debian: `apt-get install chromium chromium-driver`);
nothing is downloaded. Skipped, saying so, only when no Chromium is installed. Set
PLAYGROUND_SCREENSHOT=path to keep the screenshot (the README's phase5_production/playground.png).
"""

import http.client
import json
import os
import shutil
import threading

import pytest
import torch
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from phase2_architecture.src.gpt import GPT, GPTConfig
from phase3_components.src.char_tokenizer import CharTokenizer
from phase5_production.src.served_models import load_served_model
from phase5_production.src.server import make_server

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
MISSING = "no Chromium / chromedriver installed: apt-get install chromium chromium-driver (Debian)"
# CI sets PLAYGROUND_BROWSER_REQUIRED=1 (.ci/run): there a missing browser fails the test instead.
REQUIRED = os.environ.get("PLAYGROUND_BROWSER_REQUIRED") == "1"
pytestmark = pytest.mark.skipif((CHROMIUM is None or CHROMEDRIVER is None) and not REQUIRED, reason=MISSING)
WAIT_S = 30  # the longest the test waits for the page (a bound, not a speed requirement)
SETTINGS = {"max-tokens": "20", "temperature": "0.8", "top-p": "0.95", "seed": "3"}


def serve(served_or_model, **kwargs):
    server = make_server(served_or_model, port=0, **kwargs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    return server, thread, f"http://{host}:{port}"


def stop(server, thread):
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def api(server, body: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.request(
        "POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    response = conn.getresponse()
    if not body.get("stream") or response.status != 200:
        return response.status, json.loads(response.read())
    lines = [line[6:] for line in response.read().split(b"\n") if line.startswith(b"data: ")]
    return response.status, [json.loads(line) for line in lines[:-1]]  # the chunks, without [DONE]


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM is not None and CHROMEDRIVER is not None, MISSING
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,780"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, read by get_log
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def severe_console_entries(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def fill_in(driver, prompt: str, settings: dict) -> None:
    driver.find_element(By.ID, "prompt").clear()
    driver.find_element(By.ID, "prompt").send_keys(prompt)
    for field, value in settings.items():
        driver.find_element(By.ID, field).clear()
        driver.find_element(By.ID, field).send_keys(value)
    driver.find_element(By.ID, "generate").click()


def text_of(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def wait_until_done(driver) -> None:
    WebDriverWait(driver, WAIT_S).until(lambda d: text_of(d, "status").startswith("done"))


def expected_counts(entries: list, n_layer: int, n_expert: int) -> list[list[int]]:
    counts = [[0] * n_expert for _ in range(n_layer)]
    for entry in entries:
        for layer, experts in enumerate(entry["experts"]):
            for expert in experts:
                counts[layer][expert] += 1
    return counts


def test_the_page_streams_a_story_with_its_experts(browser, tiny_moe_run, tmp_path):
    served = load_served_model(tiny_moe_run)
    # few connections (the page and its files share them) and a short prompt limit (checked below)
    server, thread, url = serve(served, max_connections=4, limits={"max_prompt_chars": 60})
    try:
        browser.get(url + "/")
        WebDriverWait(browser, WAIT_S).until(lambda d: "experts" in text_of(d, "model-info"))
        fill_in(browser, "Once upon a time", SETTINGS)
        WebDriverWait(browser, WAIT_S).until(lambda d: int(text_of(d, "generated-count")) > 0)  # streaming
        wait_until_done(browser)

        # the same request to the API: the page shows its token counts and tokens; the routing is
        # compared exactly with the same request streamed (the page's own computation, bit for bit)
        body = {"model": served.name, "prompt": "Once upon a time", "max_tokens": 20, "temperature": 0.8}
        body.update(top_p=0.95, seed=3, return_routing=True)
        status, answer = api(server, body)
        assert status == 200
        status, chunks = api(server, {**body, "stream": True})
        assert status == 200
        usage, entries = answer["usage"], [entry for chunk in chunks for entry in chunk["routing"]]
        assert [e["token"] for e in entries] == [e["token"] for e in answer["routing"]]
        assert int(text_of(browser, "prompt-count")) == usage["prompt_tokens"]
        assert int(text_of(browser, "generated-count")) == usage["completion_tokens"] > 0
        tokens = browser.find_elements(By.CSS_SELECTOR, "#tokens .token")
        assert [t.find_element(By.CLASS_NAME, "text").get_attribute("textContent") for t in tokens] == [
            e["text"] for e in entries
        ]

        # the heatmap: layers x experts cells, each layer's total = routed tokens x top_k, and the
        # counts are those of the API's routing
        config = served.model.config
        cells = browser.find_elements(By.CSS_SELECTOR, "#heatmap-table td.cell")
        assert len(cells) == config.n_layer * config.n_expert
        counts = [int(c.get_attribute("data-count")) for c in cells]
        rows = [counts[i : i + config.n_expert] for i in range(0, len(counts), config.n_expert)]
        assert rows == expected_counts(entries, config.n_layer, config.n_expert)
        assert int(text_of(browser, "routed-count")) == usage["total_tokens"] == len(entries)
        totals = browser.find_elements(By.CSS_SELECTOR, "#heatmap-table td.total")
        assert [int(t.get_attribute("data-total")) for t in totals] == [
            usage["total_tokens"] * config.top_k
        ] * len(totals)

        # hovering a generated token shows its layer x expert grid of router weights
        position = usage["prompt_tokens"] + 2
        ActionChains(browser).move_to_element(tokens[position]).perform()
        WebDriverWait(browser, WAIT_S).until(lambda d: f"token {position}:" in text_of(d, "grid-token"))
        weights = [
            float(c.get_attribute("data-weight"))
            for c in browser.find_elements(By.CSS_SELECTOR, "#token-table td.cell")
        ]
        grid = torch.tensor(weights).view(config.n_layer, config.n_expert)
        expected = torch.zeros(config.n_layer, config.n_expert, dtype=torch.float64)
        for layer, (experts, layer_weights) in enumerate(
            zip(entries[position]["experts"], entries[position]["weights"])
        ):
            expected[layer, experts] = torch.tensor(layer_weights, dtype=torch.float64)
        assert torch.equal(grid.double(), expected)
        assert ((grid > 0).sum(dim=1) == config.top_k).all()

        assert severe_console_entries(browser) == []
        browser.save_screenshot(str(tmp_path / "playground.png"))
        if os.environ.get("PLAYGROUND_SCREENSHOT"):
            browser.save_screenshot(os.environ["PLAYGROUND_SCREENSHOT"])
        assert (tmp_path / "playground.png").read_bytes().startswith(b"\x89PNG")

        # an invalid temperature, a prompt over the server's limit: the page shows the API's own words
        for prompt, temperature in [("Once upon a time", "5"), ("Once upon a time " * 4, "0.8")]:  # 68 > 60
            request = {**body, "prompt": prompt, "temperature": json.loads(temperature), "stream": True}
            status, error = api(server, request)
            assert status == 400
            fill_in(browser, prompt, {**SETTINGS, "temperature": temperature})  # hides the last error
            WebDriverWait(browser, WAIT_S).until(lambda d: d.find_element(By.ID, "error").is_displayed())
            assert text_of(browser, "error") == error["error"]["message"]
        # the browser reports the 400 response itself; nothing else may be logged as an error
        errors = severe_console_entries(browser)
        assert errors and all(e["source"] == "network" and "400" in e["message"] for e in errors)
    finally:
        stop(server, thread)


def test_a_gpt_without_experts_still_streams_and_says_there_is_no_routing(browser):
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz .")
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, d_model=16))
    server, thread, url = serve(gpt.eval(), tokenizer=tokenizer, name="gpt")
    try:
        browser.get_log("browser")  # what an earlier page logged is not this page's
        browser.get(url + "/")
        WebDriverWait(browser, WAIT_S).until(lambda d: d.find_element(By.ID, "no-routing").is_displayed())
        assert "has no experts" in text_of(browser, "no-routing")
        assert not browser.find_element(By.ID, "heatmap-panel").is_displayed()
        fill_in(
            browser, "once upon a time", {"max-tokens": "12", "temperature": "0", "top-p": "", "seed": ""}
        )
        wait_until_done(browser)
        status, answer = api(
            server, {"model": "gpt", "prompt": "once upon a time", "max_tokens": 12, "temperature": 0}
        )
        assert status == 200
        pieces = browser.find_elements(By.CSS_SELECTOR, "#tokens .token")
        assert "".join(p.get_attribute("textContent") for p in pieces) == answer["choices"][0]["text"]
        assert severe_console_entries(browser) == []
    finally:
        stop(server, thread)
