"""Headless Chromium for the screenshot scripts (make_fiftyone_screenshots.py, make_labelstudio_screenshot.py):
the browser, waiting for the page, real pointer clicks and small PNGs. Selenium is imported here only."""

from __future__ import annotations

import time
from pathlib import Path


class Step(Exception):
    """A step of a walk-through that the app did not complete."""


def browser(width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.binary_location = "/usr/bin/chromium"
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def wait_for(driver, what: str, test, timeout: float = 60.0, poll: float = 0.5):
    """Poll test(driver) until it returns something truthy; Step naming `what` after timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            found = test(driver)
            if found:
                return found
        except Exception as exc:  # the page is still changing
            last = exc
        time.sleep(poll)
    raise Step(f"timed out waiting for {what}" + (f" ({type(last).__name__}: {last})" if last else ""))


def click(driver, element) -> None:
    """A real pointer click (React's MUI switches and menus ignore a scripted element.click())."""
    from selenium.webdriver.common.action_chains import ActionChains

    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    ActionChains(driver).move_to_element(element).click().perform()


def save(driver, path: Path) -> None:
    """The browser's viewport as a small PNG (128 colours)."""
    from PIL import Image

    driver.save_screenshot(str(path))
    image = Image.open(path).convert("RGB")
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    print(f"saved {path}")
