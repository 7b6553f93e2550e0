"""Make docs/labelstudio_sorted.png: the real Label Studio's Data Manager ordered by Prediction score.

Starts Label Studio 1.23.2 and `seggpt labelstudio serve` (the demo model) on 127.0.0.1, each with its own
data folder under /tmp/seggpt-labelstudio-docs (replaced on each run: nothing of yours is touched), and sets
up a project as docs/labelstudio.md says: 16 tiles of the shipped stardist nuclei image, two annotated
with their true nuclei, the backend connected as "SegGPT", Actions > Retrieve Predictions (through the
API). It checks through the API that every predicted task has its prediction's score in the Prediction
score column, then, in a headless Chromium, logs in, opens the Data Manager, shows the Prediction score
column (Columns), orders by it (Order by) and checks the rows on the page: scores ascending, the annotated
tasks (no prediction) last. Saves the screenshot; exits non-zero, naming the step, if Label Studio does
not do what is expected (docs/labelstudio_failed_step.png then shows the page).

Needs Chromium and its driver (Debian) and selenium, in the environment that has the `labelstudio` extra,
and Label Studio 1.23.2 (tests/test_labelstudio_e2e.py installs it into .cache/label-studio-venv; or pass
--label-studio):

    apt-get install -y chromium chromium-driver
    pip install selenium
    python docs/make_labelstudio_screenshot.py            # --help for the options

Not part of the test suite (tests/test_labelstudio_e2e.py checks the same column through the API).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _browser import Step, browser, click, save, wait_for  # docs/_browser.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "seggpt_plugins" / "demo" / "samples"
TILE = 128
REFERENCE_TILES = (0, 5)
USER, PASSWORD, TOKEN = "admin@example.com", "docs-password-1", "d0c5d0c5d0c5d0c5d0c5d0c5d0c5d0c5d0c5d0c5"
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Nucleus" background="#e6194b"/>
  </BrushLabels>
</View>"""


# ------------------------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list, log: Path, env: dict, cwd: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)  # the session we started: the server and its workers
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def wait_up(url: str, process: subprocess.Popen, what: str, log: Path, timeout: float, **kwargs) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise Step(f"{what} exited with code {process.returncode} (see {log})")
        try:
            if requests.get(url, timeout=3, **kwargs).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise Step(f"{what} did not answer at {url} within {timeout:.0f} s (see {log})")


def tiles() -> dict:
    """16 tiles of the stardist nuclei image as 8-bit PNGs, with their nuclei masks."""
    import numpy as np
    import tifffile
    from PIL import Image

    image = tifffile.imread(SAMPLES / "nuclei2d.tif").astype(np.float32)
    mask = tifffile.imread(SAMPLES / "nuclei2d_mask.tif")
    lo, hi = np.percentile(image, (0.5, 99.8))
    image8 = np.clip((image - lo) / (hi - lo) * 255 + 0.5, 0, 255).astype(np.uint8)
    out = {}
    for y in range(0, 512, TILE):
        for x in range(0, 512, TILE):
            png = io.BytesIO()
            Image.fromarray(image8[y:y + TILE, x:x + TILE]).save(png, format="PNG")
            out[f"tile_{y:03d}_{x:03d}.png"] = {"png": png.getvalue(), "nuclei": mask[y:y + TILE, x:x + TILE] > 0}
    return out


def set_up_project(url: str, backend_url: str) -> tuple[int, set]:
    """The project of docs/labelstudio.md: tiles imported, two annotated, the backend connected, Retrieve
    Predictions. Returns (project id, the annotated task ids)."""
    import numpy as np
    import requests
    from label_studio_sdk import LabelStudio
    from label_studio_sdk.converter.brush import mask2rle

    ls = LabelStudio(base_url=url, api_key=TOKEN, timeout=300)
    project = ls.projects.create(title="SegGPT nuclei", label_config=CONFIG)
    pictures = tiles()
    files = {f"file{k}": (name, tile["png"], "image/png") for k, (name, tile) in enumerate(pictures.items())}
    response = requests.post(f"{url}/api/projects/{project.id}/import", files=files,
                             headers={"Authorization": f"Token {TOKEN}"}, timeout=120)
    if response.status_code != 201:
        raise Step(f"importing the tiles failed: HTTP {response.status_code} {response.text[:200]}")
    tasks = sorted(ls.tasks.list(project=project.id), key=lambda t: t.id)
    annotated = set()
    for k in REFERENCE_TILES:
        task = tasks[k]
        nuclei = next(t["nuclei"] for n, t in pictures.items() if task.data["image"].endswith(n))
        rle = mask2rle(nuclei.astype(np.uint8) * 255)
        region = {"from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": TILE,
                  "original_height": TILE, "image_rotation": 0,
                  "value": {"format": "rle", "rle": rle, "brushlabels": ["Nucleus"]}}
        ls.annotations.create(id=task.id, result=[region])
        annotated.add(task.id)
    ls.ml.create(project=project.id, url=backend_url, title="SegGPT")
    ls.actions.create(id="retrieve_tasks_predictions", project=project.id, selected_items={"all": True, "excluded": []})
    return project.id, annotated


def check_api(url: str, project_id: int, annotated: set) -> list:
    """Every predicted task shows its prediction's score; returns the ids ordered by Prediction score."""
    import requests

    def listing(ordering=None):
        query = json.dumps({"ordering": [ordering]} if ordering else {})
        response = requests.get(f"{url}/api/tasks", params={"project": project_id, "fields": "all", "query": query},
                                headers={"Authorization": f"Token {TOKEN}"}, timeout=120)
        response.raise_for_status()
        return response.json()["tasks"]

    for task in listing():
        if task["id"] in annotated:
            continue
        if len(task["predictions"]) != 1:
            raise Step(f"task {task['id']} has {len(task['predictions'])} predictions, not one")
        score = task["predictions"][0]["score"]
        if task["predictions_score"] is None or abs(task["predictions_score"] - score) > 1e-6:
            raise Step(f"task {task['id']}: Prediction score {task['predictions_score']}, its prediction's score "
                       f"{score} (model_version {task['predictions'][0]['model_version']!r})")
    ordered = listing("tasks:predictions_score")
    print("API: Prediction score of every predicted task, ascending:",
          ", ".join(f"{t['id']}: {t['predictions_score']}" for t in ordered))
    return [t["id"] for t in ordered]


# ------------------------------------------------------------------------------------------ browser


def xpath(driver, path: str, what: str, timeout: float = 30.0):
    return wait_for(driver, what, lambda d: [e for e in d.find_elements("xpath", path) if e.is_displayed()],
                    timeout)[-1]


def table(driver) -> dict:
    """The Data Manager's grid as shown: its column titles and each row's cell texts."""
    return json.loads(driver.execute_script(
        "const cells = (row) => [...row.querySelectorAll('.lsf-table__cell')].map(c => c.innerText.trim());"
        "return JSON.stringify({heads: cells(document.querySelector('.lsf-table-head')),"
        "rows: [...document.querySelectorAll('.lsf-table-row')].map(cells)});"))


def sort_in_the_browser(driver, url: str, project_id: int, annotated: set, expected: list, out: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    driver.get(f"{url}/user/login/")
    wait_for(driver, "the login form", lambda d: d.find_elements("id", "email"))[0].send_keys(USER)
    driver.find_element("id", "password").send_keys(PASSWORD)
    click(driver, driver.find_element("css selector", "button[type=submit]"))
    wait_for(driver, "the login", lambda d: "/user/login" not in d.current_url)
    driver.get(f"{url}/projects/{project_id}/data")
    wait_for(driver, "the Data Manager's rows", lambda d: len(table(d)["rows"]) == len(expected), 120)

    click(driver, xpath(driver, "//button[normalize-space()='Columns']", "the Columns button"))
    label = xpath(driver, "//label[.//span[normalize-space(text())='Prediction score']]", "Prediction score in Columns")
    if not label.find_element("xpath", ".//input").is_selected():
        click(driver, label)
    ActionChains(driver).send_keys(Keys.ESCAPE).perform()
    wait_for(driver, "the Prediction score column", lambda d: "Prediction score" in table(d)["heads"])

    click(driver, xpath(driver, "//button[normalize-space()='Order by']", "the Order by button"))
    option = "//div[contains(@class, 'lsf-space-dm')]/span[normalize-space(text())='Prediction score']"
    click(driver, xpath(driver, option, "Prediction score in Order by"))
    tab = xpath(driver, "//*[normalize-space(text())='Default']", "the Data Manager's tab")
    ActionChains(driver).move_to_element_with_offset(tab, 600, 0).click().perform()  # the menu closes
    wait_for(driver, "the Order by menu to close", lambda d: not [e for e in d.find_elements("xpath", option)
                                                                 if e.is_displayed()])

    def ordered(d):
        grid = table(d)
        ids, scores = grid["heads"].index("ID"), grid["heads"].index("Prediction score")
        rows = [(int(r[ids]), r[scores]) for r in grid["rows"]]
        return rows if [i for i, _ in rows] == expected else None

    rows = wait_for(driver, f"the rows in the order of the API's listing {expected}", ordered, 60)
    shown = [float(s) for i, s in rows if i not in annotated]
    if shown != sorted(shown) or any(s for i, s in rows if i in annotated):
        raise Step(f"the page's Prediction score column is not ascending with the annotated tasks blank: {rows}")
    if {i for i, _ in rows[-len(annotated):]} != annotated:
        raise Step(f"the annotated tasks {sorted(annotated)} are not last: {rows}")
    print("page: ID, Prediction score:", ", ".join(f"{i}: {s or '-'}" for i, s in rows))
    time.sleep(1)
    save(driver, out / "labelstudio_sorted.png")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="folder for the PNG (docs/)")
    parser.add_argument("--label-studio", default=None, help="the label-studio command (default: the one in "
                        ".cache/label-studio-venv, else label-studio on PATH)")
    parser.add_argument("--size", default="1500x950", help="browser window, WIDTHxHEIGHT")
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir(), "seggpt-labelstudio-docs"),
                        help="Label Studio's data and the backend's state (replaced on each run)")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    command = args.label_studio or shutil.which("label-studio", path=str(ROOT / ".cache/label-studio-venv/bin")) \
        or shutil.which("label-studio")
    if not command:
        print("no label-studio command: pip install -c tests/label-studio-constraints.txt label-studio==1.23.2"
              " (in its own venv) or pass --label-studio", file=sys.stderr)
        return 2

    shutil.rmtree(args.root, ignore_errors=True)
    (args.root / "ls").mkdir(parents=True)
    args.out.mkdir(parents=True, exist_ok=True)
    ls_port, backend_port = free_port(), free_port()
    url, backend_url = f"http://127.0.0.1:{ls_port}", f"http://127.0.0.1:{backend_port}"
    env = dict(os.environ, SSRF_PROTECTION_ENABLED="false", ML_BLOCK_LOCAL_IP="false", LATEST_VERSION_CHECK="false",
               COLLECT_ANALYTICS="false", LABEL_STUDIO_BASE_DATA_DIR=str(args.root / "ls"), PYTHONUNBUFFERED="1")
    label_studio = start([command, "start", "--no-browser", "--internal-host", "127.0.0.1", "-p", str(ls_port),
                          "--data-dir", str(args.root / "ls"), "--username", USER, "--password", PASSWORD,
                          "--user-token", TOKEN, "--enable-legacy-api-token"], args.root / "label-studio.log", env,
                         args.root / "ls")
    seggpt = Path(sys.executable).with_name("seggpt")
    backend = start([str(seggpt), "labelstudio", "serve", "--host", "127.0.0.1", "--port", str(backend_port),
                     "--model", "demo", "--device", "cpu"], args.root / "backend.log",
                    dict(os.environ, LABEL_STUDIO_URL=url, LABEL_STUDIO_API_KEY=TOKEN, HF_HUB_OFFLINE="1",
                         SEGGPT_STATE_DIR=str(args.root / "state"), PYTHONUNBUFFERED="1"), ROOT)
    driver = None
    try:
        wait_up(f"{url}/health", label_studio, "Label Studio", args.root / "label-studio.log", 420)
        wait_up(f"{url}/api/projects/", label_studio, "Label Studio's API", args.root / "label-studio.log", 60,
                headers={"Authorization": f"Token {TOKEN}"})
        wait_up(f"{backend_url}/health", backend, "the SegGPT backend", args.root / "backend.log", 240)
        project_id, annotated = set_up_project(url, backend_url)
        expected = check_api(url, project_id, annotated)
        driver = browser(width, height)
        sort_in_the_browser(driver, url, project_id, annotated, expected, args.out)
    except Step as exc:
        if driver is not None:
            save(driver, args.out / "labelstudio_failed_step.png")
        print(f"Label Studio did not get through: {exc}", file=sys.stderr)
        return 1
    finally:
        if driver is not None:
            driver.quit()
        stop(backend)
        stop(label_studio)
    return 0


if __name__ == "__main__":
    sys.exit(main())
