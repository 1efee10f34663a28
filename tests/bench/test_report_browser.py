"""The HTML reports as a browser shows them: headless Chromium driven through Selenium.

`test_report.py` parses the reports; this checks that a real browser draws them: every plot
lays out at a readable size in page order under its title, paints each run's line in its
own colour, and the page loads without a single console message. Chromium and its driver
come from `make setup` (apt-get, where it can); without them the tests skip, naming why.
"""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest

from pdserve.bench.report import write_goodput_html, write_html
from tests.bench.report_builders import (
    RUN_PLOT_TITLES,
    two_goodput_searches,
    two_runs,
    two_runs_probes,
)

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# matplotlib's first two cycle colours: the first and second run of every plot.
FIRST_RUN_RGB, SECOND_RUN_RGB = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)

# Each plot's title, size and colours, in page order (one object per <svg>).
PLOTS_JS = """
return Array.from(document.querySelectorAll('svg')).map(svg => {
    const box = svg.getBoundingClientRect();
    const title = svg.querySelector('title');
    return {title: title ? title.textContent : null, width: box.width, height: box.height,
            top: box.top + window.scrollY};
});
"""


@pytest.fixture(scope="module")
def browser():
    binary = next(filter(None, map(shutil.which, BROWSERS)), None)
    driver_binary = shutil.which("chromedriver")
    if binary is None or driver_binary is None:
        pytest.skip("Chromium or chromedriver is not installed (make setup installs both "
                    "where apt-get can)")  # fmt: skip
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--force-device-scale-factor=1"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium then never looks for one on the network.
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver_binary))
    try:
        yield driver
    finally:
        driver.quit()


def load(browser, path) -> list[dict]:
    browser.get(path.as_uri())
    assert browser.execute_script("return document.readyState") == "complete"
    plots = browser.execute_script(PLOTS_JS)
    assert browser.get_log("browser") == []  # no error, warning or message at all
    return plots


def painted_colours(browser, index: int) -> dict[str, float]:
    """Share of the plot's pixels that are in each run's colour, and that are not white."""
    from PIL import Image

    svg = browser.find_elements("css selector", "svg")[index]
    browser.execute_script("arguments[0].scrollIntoView()", svg)
    image = Image.open(io.BytesIO(svg.screenshot_as_png)).convert("RGB")
    pixels = np.asarray(image, dtype=np.int16).reshape(-1, 3)

    def near(rgb) -> float:
        return float((np.abs(pixels - np.array(rgb)).max(axis=1) <= 12).mean())

    return {
        "first": near(FIRST_RUN_RGB),
        "second": near(SECOND_RUN_RGB),
        "ink": float((pixels.min(axis=1) < 200).mean()),
    }


def assert_laid_out(plots: list[dict], titles: list[str]) -> None:
    assert [p["title"] for p in plots] == titles
    for plot in plots:
        assert 300 <= plot["width"] <= 1280 and 150 <= plot["height"] <= 800, plot
    tops = [p["top"] for p in plots]
    assert tops == sorted(tops)


def test_full_report_draws_every_plot(browser, tmp_path):
    path = write_html(
        tmp_path / "report.html", two_runs(), two_runs_probes(), attainment_target=0.9
    )
    plots = load(browser, path)
    assert_laid_out(plots, [*RUN_PLOT_TITLES, "Ratios to agg"])
    for index, plot in enumerate(plots):
        colours = painted_colours(browser, index)
        assert colours["ink"] > 0.01, (plot["title"], colours)  # axes, ticks, labels
        if plot["title"] != "Ratios to agg":  # one series per run: both runs are drawn
            assert colours["first"] > 0.0005 and colours["second"] > 0.0005, (plot, colours)


def test_goodput_report_draws_every_plot(browser, tmp_path):
    path = write_goodput_html(tmp_path / "g.html", two_goodput_searches())
    plots = load(browser, path)
    assert_laid_out(plots, RUN_PLOT_TITLES)
    # Both searches' probes are on the rate plots; only "a" found a rate, so one run
    # (one colour) on the latency plots.
    for index in (5, 6):
        colours = painted_colours(browser, index)
        assert colours["first"] > 0.0005 and colours["second"] > 0.0005, colours
    colours = painted_colours(browser, 0)
    assert colours["first"] > 0.0005 and colours["second"] == 0, colours
