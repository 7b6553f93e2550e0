"""`seggpt labelstudio predict` against the REAL Label Studio 1.23.2 (the e2e module's server fixtures).

A project of 52 real 64x64 tiles of stardist's nuclei (uploaded, so Label Studio serves them), two of them
annotated; the command runs as a subprocess with the demo model, the local engine, and posts predictions.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_labelstudio_e2e import (  # noqa: F401 (the server fixtures)
    CONFIG, REPO, TOKEN, _brush, _data_manager_tasks, _decode, label_studio, label_studio_bin)

requests = pytest.importorskip("requests")

pytestmark = pytest.mark.slow

TILE = 64
TASKS = 52


def _predict(url: str, work: Path, *extra: str, key: str = TOKEN) -> tuple[list, dict]:
    seggpt = Path(sys.executable).with_name("seggpt")
    command = [str(seggpt)] if seggpt.exists() else [sys.executable, "-m", "seggpt_plugins.cli"]
    env = dict(os.environ, LABEL_STUDIO_URL=url, LABEL_STUDIO_API_KEY=key, HF_HUB_OFFLINE="1", SEGGPT_DEVICE="cpu",
               SEGGPT_STATE_DIR=str(work / "state"), PYTHONUNBUFFERED="1")
    return command + ["labelstudio", "predict", "--quiet", *extra], env


def _command(url: str, work: Path, *extra: str, key: str = TOKEN) -> subprocess.CompletedProcess:
    command, env = _predict(url, work, *extra, key=key)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def bulk_project(label_studio, nuclei2d):
    """52 tiles uploaded into a BrushLabels project; the first two annotated with their true nuclei."""
    from label_studio_sdk import LabelStudio
    from PIL import Image

    image, mask = nuclei2d
    low, high = float(image.min()), float(np.percentile(image, 99.8))
    image8 = np.clip((image.astype(np.float64) - low) / (high - low) * 255, 0, 255).astype(np.uint8)
    corners = [(r, c) for r in range(0, image8.shape[0] - TILE + 1, TILE)
               for c in range(0, image8.shape[1] - TILE + 1, TILE)][:TASKS]
    assert len(corners) == TASKS
    tiles = {}
    for r, c in corners:
        png = io.BytesIO()
        Image.fromarray(image8[r:r + TILE, c:c + TILE]).save(png, format="PNG")
        tiles[f"bulk_{r}_{c}.png"] = {"png": png.getvalue(), "nuclei": mask[r:r + TILE, c:c + TILE] > 0}
    ls = LabelStudio(base_url=label_studio["url"], api_key=TOKEN)
    created = ls.projects.create(title="SegGPT bulk", label_config=CONFIG)
    files = {f"file{k}": (name, tile["png"], "image/png") for k, (name, tile) in enumerate(tiles.items())}
    response = requests.post(f"{label_studio['url']}/api/projects/{created.id}/import", files=files,
                             headers={"Authorization": f"Token {TOKEN}"}, timeout=120)
    assert response.status_code == 201, response.text
    tasks = list(ls.tasks.list(project=created.id))
    assert len(tasks) == TASKS
    names = {t.id: next(n for n in tiles if t.data["image"].endswith(n)) for t in tasks}
    # the two annotated tasks: the tiles with the most nuclei (good examples)
    annotated = sorted(names, key=lambda t: -tiles[names[t]]["nuclei"].sum())[:2]
    for task_id in annotated:
        ls.annotations.create(id=task_id, result=[_brush(tiles[names[task_id]]["nuclei"], "Nucleus")])
    return {"ls": ls, "id": created.id, "names": names, "tiles": tiles, "annotated": set(annotated)}


def _by_task(ls, project_id: int) -> dict:
    out: dict = {}
    for prediction in ls.predictions.list(project=project_id):
        out.setdefault(prediction.task, []).append(prediction)
    return out


def test_predict_a_whole_project_then_rerun_posts_nothing(label_studio, bulk_project, tmp_path):
    ls, project_id, names = bulk_project["ls"], bulk_project["id"], bulk_project["names"]
    unlabelled = TASKS - 2
    # a first run SIGKILLed once a few images are segmented (their records written): the next run resumes
    command, env = _predict(label_studio["url"], tmp_path, "--project", str(project_id), "--model", "demo",
                            "--work", str(tmp_path / "work"), "--batch-size", "8")
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while first.poll() is None and time.monotonic() < deadline:
        if len(list((tmp_path / "work").glob("*/view-*/out-*/.seggpt-run/records/**/*.json"))) >= 8:
            first.kill()
            break
        time.sleep(0.1)
    first.wait(60)
    killed = first.returncode == -signal.SIGKILL
    if killed:
        assert not _by_task(ls, project_id), "a killed run posted predictions before it finished segmenting"
    done = _command(label_studio["url"], tmp_path, "--project", str(project_id), "--model", "demo",
                    "--work", str(tmp_path / "work"), "--batch-size", "8")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert f"{TASKS} tasks seen, {unlabelled} predicted now, 0 skipped" in summary and "0 failed" in summary, summary
    segmented = int(re.search(r"(\d+) image\(s\) segmented by this run", summary).group(1))
    assert segmented <= unlabelled - 8 if killed else segmented == unlabelled, summary
    print(f"first run killed: {killed}; the resumed run segmented {segmented} of {unlabelled}")

    predictions = _by_task(ls, project_id)
    assert not set(predictions) & bulk_project["annotated"]  # the annotated tasks get none
    assert set(predictions) == set(names) - bulk_project["annotated"]
    versions = {p.model_version for ps in predictions.values() for p in ps}
    assert len(versions) == 1 and all(len(ps) == 1 for ps in predictions.values()), predictions
    (version,) = versions
    assert version.startswith("seggpt-demo-") and "-r2-" in version and version in summary  # the backend's naming
    ious = []
    for task_id, (prediction,) in predictions.items():
        assert prediction.score is not None and 0 <= prediction.score <= 1
        truth = bulk_project["tiles"][names[task_id]]["nuclei"]
        for region in prediction.result:
            assert region["type"] == "brushlabels" and region["from_name"] == "tag" and region["to_name"] == "image"
            assert region["value"]["brushlabels"] == ["Nucleus"]
        if prediction.result and truth.sum() > 50:
            ious.append(float(np.logical_and(_decode(prediction.result[0]), truth).sum()
                              / np.logical_or(_decode(prediction.result[0]), truth).sum()))
    assert sum(bool(p[0].result) for p in predictions.values()) >= unlabelled // 2
    assert ious and np.mean(ious) > 0.2, f"mean IoU {np.mean(ious):.3f} against the true nuclei"
    # the working folder holds the downloaded images, the manifest and the pipeline's outputs
    run_folder = next((tmp_path / "work").iterdir())
    assert run_folder.name == version
    assert len(list(run_folder.glob("view-*/images/*.png"))) == unlabelled
    assert list(run_folder.glob("view-*/out-*/review.parquet"))

    again = _command(label_studio["url"], tmp_path, "--project", str(project_id), "--model", "demo",
                     "--work", str(tmp_path / "work"))
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"0 predicted now, {unlabelled} skipped" in again.stdout, again.stdout
    after = _by_task(ls, project_id)
    assert {t: [p.id for p in ps] for t, ps in after.items()} == {t: [p.id for p in ps] for t, ps in predictions.items()}

    # no model is connected, so the project has no prelabeling choice and the Prediction score column is empty
    # until the version is selected in Settings > Annotation > Prelabeling (as docs/labelstudio.md says)
    assert not ls.projects.get(id=project_id).model_version
    assert all(t["predictions_score"] is None for t in _data_manager_tasks(label_studio, project_id))
    ls.projects.update(id=project_id, model_version=version)
    ordered = _data_manager_tasks(label_studio, project_id, "tasks:predictions_score")
    scores = [t["predictions_score"] for t in ordered if t["id"] not in bulk_project["annotated"]]
    assert scores == sorted(s for _, (p,) in predictions.items() for s in [p.score]), scores


def test_bad_inputs_are_one_line_errors(label_studio, bulk_project, tmp_path):
    url = label_studio["url"]
    missing = _command(url, tmp_path, "--project", "999999", "--model", "demo")
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0, missing.stderr
    assert "project 999999 does not exist" in missing.stderr

    bad_key = _command(url, tmp_path, "--project", str(bulk_project["id"]), key="0" * 40)
    assert bad_key.returncode == 2 and "refused the API key" in bad_key.stderr, bad_key.stderr

    ls = bulk_project["ls"]
    empty = ls.projects.create(title="nothing annotated", label_config=CONFIG)
    requests.post(f"{url}/api/projects/{empty.id}/import", json=[{"image": "https://example.org/a.png"}],
                  headers={"Authorization": f"Token {TOKEN}"}, timeout=30).raise_for_status()
    none = _command(url, tmp_path, "--project", str(empty.id))
    assert none.returncode == 2 and "has no annotated task" in none.stderr, none.stderr

    choices = ls.projects.create(title="classification", label_config="""<View><Image name="image" value="$image"/>
      <Choices name="c" toName="image"><Choice value="A"/></Choices></View>""")
    wrong = _command(url, tmp_path, "--project", str(choices.id))
    assert wrong.returncode == 2 and "no <BrushLabels> or <PolygonLabels>" in wrong.stderr, wrong.stderr

    typo = _command(url, tmp_path, "--project", str(bulk_project["id"]), "--extra-params", '{"max_prompt": 3}')
    assert typo.returncode == 2 and "'max_prompt' (did you mean 'max_prompts'?)" in typo.stderr, typo.stderr

    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = _command(f"http://127.0.0.1:{port}", tmp_path, "--project", "1")
    assert down.returncode == 2 and "cannot reach Label Studio" in down.stderr, down.stderr
    for result in (missing, bad_key, none, wrong, typo, down):
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def _small_project(label_studio, bulk_project, title: str, count: int = 8, annotated: int = 2) -> dict:
    """`count` of the bulk tiles in a project of their own, the `annotated` with the most nuclei annotated."""
    tiles = bulk_project["tiles"]
    chosen = sorted(tiles, key=lambda n: -tiles[n]["nuclei"].sum())[:count]
    ls = bulk_project["ls"]
    created = ls.projects.create(title=title, label_config=CONFIG)
    files = {f"file{k}": (name, tiles[name]["png"], "image/png") for k, name in enumerate(chosen)}
    response = requests.post(f"{label_studio['url']}/api/projects/{created.id}/import", files=files,
                             headers={"Authorization": f"Token {TOKEN}"}, timeout=120)
    assert response.status_code == 201, response.text
    names = {t.id: next(n for n in chosen if t.data["image"].endswith(n)) for t in ls.tasks.list(project=created.id)}
    references = sorted(names, key=lambda t: chosen.index(names[t]))[:annotated]
    for task_id in references:
        ls.annotations.create(id=task_id, result=[_brush(tiles[names[task_id]]["nuclei"], "Nucleus")])
    return {"ls": ls, "id": created.id, "names": names, "annotated": set(references)}


def test_per_object_scores_progress_and_no_pile_up_of_old_versions(label_studio, bulk_project, tmp_path):
    """Issue 32, items 5 and 6: bulk regions carry their objects' own confidences (the core's Result.instances,
    as /predict), not the task's score copied; listing, downloads and posting report progress; a new
    version's prediction replaces this backend's older ones (--keep-old-predictions keeps them), never
    another model's."""
    project = _small_project(label_studio, bulk_project, "SegGPT bulk versions")
    ls, project_id = project["ls"], project["id"]
    targets = set(project["names"]) - project["annotated"]
    base = ("--project", str(project_id), "--model", "demo", "--work", str(tmp_path / "work"))

    command, env = _predict(label_studio["url"], tmp_path, *base, "--extra-params", '{"objects": true}')
    command.remove("--quiet")
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    for stage in ("listing tasks", "downloading references", "downloading images", "segmenting",
                  "posting predictions"):
        assert stage in first.stderr, (stage, first.stderr[-2000:])
    assert f'project {project_id}: extra params {{"objects": true}} (--extra-params)' in first.stderr, first.stderr
    predictions = _by_task(ls, project_id)
    assert set(predictions) == targets and all(len(p) == 1 for p in predictions.values())
    (first_version,) = {p.model_version for ps in predictions.values() for p in ps}
    regions = [(p.score, r["score"]) for (p,) in predictions.values() for r in p.result]
    assert len(regions) > 2 * len(targets), "objects: true gives one brush region per object"
    assert any(abs(task - region) > 1e-3 for task, region in regions), "every region carries the task's score"
    for (prediction,) in predictions.values():  # each object's own confidence: they differ within a task
        if len(prediction.result) >= 3:
            assert len({r["score"] for r in prediction.result}) > 1, prediction.result

    kept = _command(label_studio["url"], tmp_path, *base, "--extra-params", '{"objects": true, "min_area": 20}',
                    "--keep-old-predictions")
    assert kept.returncode == 0 and "removed" not in kept.stdout, kept.stdout + kept.stderr
    predictions = _by_task(ls, project_id)
    (second_version,) = {p.model_version for ps in predictions.values() for p in ps} - {first_version}
    assert all(sorted(p.model_version for p in ps) == sorted([first_version, second_version])
               for ps in predictions.values()), predictions

    other = min(targets)  # another model's prediction: never ours to remove
    ls.predictions.create(task=other, model_version="another-model", score=0.5, result=[])
    third = _command(label_studio["url"], tmp_path, *base, "--extra-params", '{"objects": true, "min_area": 24}')
    assert third.returncode == 0, third.stdout + third.stderr
    assert f"{2 * len(targets)} older prediction(s) of this backend removed" in third.stdout, third.stdout
    after = _by_task(ls, project_id)
    (third_version,) = {p.model_version for ps in after.values() for p in ps} - {"another-model"}
    assert third_version not in (first_version, second_version)
    assert {t: sorted(p.model_version for p in ps) for t, ps in after.items()} == {
        t: sorted([third_version] + (["another-model"] if t == other else [])) for t in targets}
