"""`/dashboard` as a person sees it: headless Chromium on a live `pdserve serve` under
load draws every worker, live charts with numbers, and a role switch as it happens."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.serving.faults import admin, prompts, run_streams
from tests.serving.server import ServerProcess
from tests.serving.test_fault_tolerance import COMMON

BROWSERS = ("chromium", "chromium-browser", "google-chrome")

ROWS_JS = """
return Array.from(document.querySelectorAll('#workers tbody tr')).map(
    tr => Array.from(tr.children).map(td => td.textContent));
"""
POINTS_JS = """
const path = document.querySelector('#c-tput path');
return path ? Number(path.dataset.points) : 0;
"""


@pytest.fixture(scope="module")
def browser():
    binary = next(filter(None, map(shutil.which, BROWSERS)), None)
    driver_binary = shutil.which("chromedriver")
    if binary is None or driver_binary is None:
        pytest.skip(
            "Chromium or chromedriver is not installed (make test installs both where apt-get can)"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver_binary))
    try:
        yield driver
    finally:
        driver.quit()


def until(browser, script: str, condition, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        value = browser.execute_script(script)
        if condition(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; last value {value!r}")
        time.sleep(0.2)


def test_dashboard_shows_live_numbers_and_a_role_switch(builtin_model_dir, browser):
    layout = ["--mode", "disaggregated", "--prefill-workers", "1", "--decode-workers", "1"]
    server = ServerProcess(*layout, *COMMON)
    try:
        browser.get(server.url + "/dashboard")
        rows = until(browser, ROWS_JS, lambda rows: len(rows) == 2)
        assert {(r[0], r[1], r[2]) for r in rows} == {
            ("prefill-0", "prefill", "serving"),
            ("decode-0", "decode", "serving"),
        }
        streams, threads = run_streams(server.url, prompts(6, words=30), 48)
        assert len(streams) == 6
        # Two samples of live traffic: a throughput line with points and a number over it.
        until(browser, POINTS_JS, lambda n: n >= 2)
        tput = browser.find_element("id", "v-tput").text
        assert tput.endswith("tok/s") and float(tput.split()[0]) >= 0
        ttft = until(browser, "return document.getElementById('v-ttft').textContent",
                     lambda text: text.endswith("ms"))  # fmt: skip
        assert float(ttft.split()[0]) > 0
        for t in threads:
            t.join(120)
        r = admin(server, "POST", "/admin/workers/decode-0/role", json={"role": "mixed"})
        assert r.status_code == 200, r.text
        until(
            browser, ROWS_JS, lambda rows: ["decode-0", "mixed", "serving"] in [r[:3] for r in rows]
        )
        switches = browser.find_element("id", "switches").text
        assert "decode-0: decode → mixed (admin" in switches
        (switch,) = admin(server, "GET", "/dashboard/data").json()["role_switches"]
        # The streams had ended: nothing ran on the worker to finish or to move.
        assert (switch["from"], switch["num_finished"], switch["num_migrated"]) == ("decode", 0, 0)
        assert browser.get_log("browser") == []  # no error, warning or message
    finally:
        assert server.stop() == 0
