"""Make the FiftyOne screenshots of docs/fiftyone.md: the real App, driven by a headless Chromium.

Builds the sample nuclei dataset (16 tiles of the shipped stardist image, two of them labelled in
`labels` and tagged `prompt`, a ground truth `gt` on all), starts the App on 127.0.0.1 with its own
database and plugins folder (in /tmp/seggpt-fiftyone-docs, replaced on each run: nothing of yours is
touched), then, as a curator would: opens the operator browser, runs "Propagate labels with SegGPT"
from its form (the defaults, plus Advanced settings -> Ground truth field = gt), waits for the masks,
sorts the grid by the confidence field, schedules a second run and reopens the form (which lists it),
and opens the Model Evaluation panel; it saves a screenshot at each step (docs/fiftyone_*.png). Exits
non-zero, naming the step, if the App does not do what is expected.

Needs Chromium and its driver (Debian) and selenium, in the environment that has the `fiftyone` extra:

    apt-get install -y chromium chromium-driver
    pip install selenium
    python docs/make_fiftyone_screenshots.py            # --help for the options

Not part of the test suite (tests/test_fiftyone_operator.py checks the same behaviours through
FiftyOne's operator API).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _browser import Step, browser, click, save, wait_for  # docs/_browser.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "seggpt_plugins" / "demo" / "samples"
TILE = 128
PROMPT_TILES = (0, 5)
OUTPUT = "labels_seggpt"  # the form's default output field for the label field `labels`


# ------------------------------------------------------------------------------------------- set-up


def private_fiftyone(root: Path) -> None:
    """A database and plugins folder of our own (before fiftyone is imported), the plugin installed."""
    os.environ.update({"FIFTYONE_DATABASE_DIR": str(root / "db"), "FIFTYONE_PLUGINS_DIR": str(root / "plugins"),
                       "FIFTYONE_DO_NOT_TRACK": "true", "FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS": "true",
                       "FIFTYONE_SHOW_PROGRESS_BARS": "false", "HF_HUB_OFFLINE": "1"})
    seggpt = Path(sys.executable).with_name("seggpt")
    subprocess.run([str(seggpt), "fiftyone", "install", "--plugins-dir", str(root / "plugins")], check=True)


def nuclei_dataset(folder: Path, name: str):
    """16 tiles of the stardist nuclei image; tiles 0 and 5 labelled in `labels` and tagged `prompt`."""
    import fiftyone as fo
    import numpy as np
    import tifffile
    from PIL import Image

    image = tifffile.imread(SAMPLES / "nuclei2d.tif").astype(np.float32)
    mask = tifffile.imread(SAMPLES / "nuclei2d_mask.tif")
    lo, hi = np.percentile(image, (0.5, 99.8))
    image8 = np.clip((image - lo) / (hi - lo) * 255 + 0.5, 0, 255).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for k, (y, x) in enumerate((y, x) for y in range(0, 512, TILE) for x in range(0, 512, TILE)):
        path = folder / f"tile_{y:03d}_{x:03d}.png"
        Image.fromarray(image8[y:y + TILE, x:x + TILE]).save(path)
        truth = (mask[y:y + TILE, x:x + TILE] > 0).astype(np.uint8)
        sample = fo.Sample(filepath=str(path), gt=fo.Segmentation(mask=truth))
        if k in PROMPT_TILES:
            sample.tags.append("prompt")
            sample["labels"] = fo.Segmentation(mask=truth)
        samples.append(sample)
    if fo.dataset_exists(name):
        fo.delete_dataset(name)
    dataset = fo.Dataset(name)
    dataset.add_samples(samples, progress=False)
    dataset.mask_targets = {"gt": {0: "background", 1: "nucleus"}, "labels": {0: "background", 1: "nucleus"}}
    dataset.save()
    return dataset


# ------------------------------------------------------------------------------------------ browser


def text_of(driver) -> str:
    return driver.execute_script("return document.body.innerText")


def xpath(driver, path: str, what: str, timeout: float = 30.0):
    from selenium.webdriver.common.by import By

    return wait_for(driver, what, lambda d: d.find_elements(By.XPATH, path), timeout)[-1]


# ------------------------------------------------------------------------------------------ the walk


def open_form(driver) -> None:
    """The operator browser (the ` key), the operator by its name, its form."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    for dismiss in driver.find_elements("xpath", "//*[text()='Dismiss']"):  # the Enterprise banner
        dismiss.click()
    ActionChains(driver).send_keys("`").perform()
    search = wait_for(driver, "the operator browser", lambda d: d.find_elements(
        "css selector", "[data-cy='operators-browser-search'] input, input[placeholder^='Search operations']"))[0]
    search.send_keys("Propagate labels")
    xpath(driver, "//*[normalize-space(text())='Propagate labels with SegGPT']", "the operator in the browser")
    search.send_keys(Keys.ENTER)
    wait_for(driver, "the operator's form with its plan",
             lambda d: "Label field" in text_of(d) and "target sample" in text_of(d))


def choose(driver, field_label: str, value: str) -> None:
    """Pick `value` in the form's dropdown labelled `field_label`."""
    box = xpath(driver, f"//p[text()='{field_label}']/ancestor::div[.//*[@role='combobox']][1]//*[@role='combobox']",
                f"the {field_label} dropdown")
    click(driver, box)
    option = xpath(driver, f"//li[@role='option' and normalize-space()='{value}']", f"'{value}' in {field_label}")
    click(driver, option)
    wait_for(driver, f"{field_label} = {value}", lambda d: value in box.text)


def run_from_form(driver, out: Path) -> float:
    """Run the operator from its form (defaults, plus the ground truth `gt`); returns the seconds it took."""
    open_form(driver)
    save(driver, out / "fiftyone_form.png")
    click(driver, xpath(driver, "//*[text()='Advanced settings']/ancestor::label[1]//span[contains(@class, "
                                "'MuiSwitch-root')]", "the Advanced settings switch"))
    choose(driver, "Ground truth field", "gt")
    started = time.monotonic()
    click(driver, xpath(driver, "//button[normalize-space()='Execute']", "the Execute button"))
    wait_for(driver, "the run's success notification",
             lambda d: f"samples written to '{OUTPUT}'" in text_of(d) or "SegGPT stopped" in text_of(d), 900, 1.0)
    if "SegGPT stopped" in text_of(driver):
        raise Step(f"the run failed: {text_of(driver)[-600:]}")
    seconds = time.monotonic() - started
    checkbox = xpath(driver, f"//*[@data-cy='checkbox-{OUTPUT}']//input", f"the sidebar entry of {OUTPUT}")
    if not checkbox.is_selected():
        raise Step(f"the new field {OUTPUT} was not switched on in the sidebar")
    time.sleep(2)  # the masks are drawn
    save(driver, out / "fiftyone_result.png")
    for done in driver.find_elements("xpath", "//button[normalize-space()='Done']"):
        click(driver, done)
    time.sleep(2)  # the dialog closes
    return seconds


def sort_by_confidence(driver, out: Path) -> None:
    """One click in the grid's Sort by (which lists indexed fields): lowest predicted IoU first."""
    field = f"{OUTPUT}_confidence"
    shown = (f"//*[normalize-space(text())='{field}' and not(ancestor-or-self::*[@data-cy='sidebar' or "
             "starts-with(@data-cy, 'selector-result')])]")
    for _ in range(3):  # the menu sometimes closes under a click that comes too early
        click(driver, xpath(driver, "//input[@placeholder='Sort by']", "the grid's Sort by"))
        click(driver, xpath(driver, f"//*[@data-cy='selector-result-{field}']", f"{field} in Sort by (an index)"))
        try:
            wait_for(driver, "the sort field above the grid", lambda d: d.find_elements("xpath", shown), 10)
            break
        except Step:
            continue
    else:
        raise Step(f"sorting by {field} from the grid's Sort by did not take")
    time.sleep(3)
    save(driver, out / "fiftyone_sorted.png")


def schedule_from_form(driver, out: Path) -> None:
    """Schedule a second run (another output field): the form then lists it with its id and state."""
    from selenium.webdriver.common.keys import Keys

    open_form(driver)
    output = xpath(driver, "//p[text()='Output field']/ancestor::div[.//input][1]//input", "the Output field")
    output.send_keys(Keys.CONTROL, "a")
    output.send_keys("second_run")
    wait_for(driver, "the plan of the second run", lambda d: "-> 14 target samples" in text_of(d))
    time.sleep(2)  # the form settles
    menu_item = "//*[normalize-space(text())='Run this operation in the background']"
    for _ in range(5):  # the Execute / Schedule menu (the arrow beside Execute)
        execute = xpath(driver, "//button[normalize-space()='Execute']", "the Execute button")
        click(driver, execute.find_element("xpath", "following-sibling::*[1]"))
        time.sleep(1)
        if driver.find_elements("xpath", menu_item):
            break
    click(driver, xpath(driver, menu_item, "Schedule in the Execute menu", 5))
    click(driver, xpath(driver, "//button[normalize-space()='Schedule']", "the Schedule button"))
    wait_for(driver, "the App's 'scheduled' notification", lambda d: "successfully scheduled" in text_of(d))
    time.sleep(2)
    open_form(driver)
    wait_for(driver, "the scheduled run in the form", lambda d: "-> second_run (" in text_of(d))
    notice = xpath(driver, "//*[contains(text(), 'Scheduled runs on this dataset')]", "the run list")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", notice)
    time.sleep(1)
    save(driver, out / "fiftyone_scheduled.png")
    click(driver, xpath(driver, "//button[normalize-space()='Cancel']", "the form's Cancel button"))


def evaluation_panel(driver, out: Path) -> None:
    """The Model Evaluation panel of the run's evaluation: mIoU (background counted) and IoU per class."""
    click(driver, xpath(driver, "//*[@title='New panel']", "the New panel button"))
    click(driver, xpath(driver, "//*[normalize-space(text())='Model Evaluation']", "Model Evaluation"))
    click(driver, xpath(driver, f"//*[normalize-space(text())='{OUTPUT}_eval']", "the run's evaluation", 60))
    wait_for(driver, "the mIoU in the panel", lambda d: "mIoU (background counted)" in text_of(d), 60)
    time.sleep(2)
    save(driver, out / "fiftyone_evaluation.png")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="folder for the PNGs (docs/)")
    parser.add_argument("--port", type=int, default=5153)
    parser.add_argument("--size", default="1500x950", help="browser window, WIDTHxHEIGHT")
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir(), "seggpt-fiftyone-docs"),
                        help="private database, plugins folder and tiles (replaced on each run)")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))

    import shutil

    shutil.rmtree(args.root, ignore_errors=True)  # (its database stops only after this process has exited)
    args.root.mkdir(parents=True)
    private_fiftyone(args.root)
    import fiftyone as fo

    dataset = nuclei_dataset(args.root / "tiles", "seggpt-nuclei")
    session = fo.launch_app(dataset, port=args.port, address="127.0.0.1", auto=False)
    driver = browser(width, height)
    try:
        driver.get(f"http://127.0.0.1:{args.port}/datasets/{dataset.name}")
        wait_for(driver, "the App's grid", lambda d: "16 samples" in text_of(d), 120)
        args.out.mkdir(parents=True, exist_ok=True)
        seconds = run_from_form(driver, args.out)
        print(f"immediate run from the form: {seconds:.1f} s for 14 tiles")
        sort_by_confidence(driver, args.out)
        schedule_from_form(driver, args.out)
        evaluation_panel(driver, args.out)
    except Step as exc:
        save(driver, args.out / "fiftyone_failed_step.png")
        print(f"the App did not get through: {exc} (see {args.out / 'fiftyone_failed_step.png'})", file=sys.stderr)
        return 1
    finally:
        driver.quit()
        session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
