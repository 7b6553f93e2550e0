"""The Label Studio backend adapts to a project's annotations (issue 31, item 3; labelstudio_backend/adapting.py).

Against the fake Label Studio of test_labelstudio_backend.py, with the core's adaptation replaced by a
stand-in whose result is known (the real one runs against a real Label Studio in test_labelstudio_e2e.py).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tests import test_labelstudio_backend as backend_tests
from tests.test_labelstudio_backend import LEGACY_TOKEN, brush_region, predict_body, setup_body

fake_ls, make_client, tiles = backend_tests.fake_ls, backend_tests.make_client, backend_tests.tiles  # its fixtures


@pytest.fixture
def stand_in(demo_model, monkeypatch):
    """`demo_model.adapt` replaced: waits for `release` (set by default), records its calls, and returns a
    copy of the model with other weights (a new fingerprint), `improved` as `result["improved"]` says."""
    import torch

    from seggpt_plugins.engine import SegGPT
    from seggpt_plugins.loading import weights_fingerprint

    calls, release, result = [], threading.Event(), {"improved": True}
    release.set()

    def adapt(images, masks, **kwargs):
        calls.append({"images": len(images), "masks": [np.unique(m).tolist() for m in masks], **kwargs})
        release.wait(60)
        adapted = SegGPT.from_pretrained("demo", device="cpu", dtype=demo_model.dtype)
        with torch.no_grad():
            next(adapted.net.parameters()).add_(0.01 * len(calls))
        adapted.fingerprint = weights_fingerprint(adapted.net)
        adapted.adaptation = {"improved": result["improved"], "held_out_iou_before": 0.5, "held_out_iou_best": 0.6,
                              "seconds": 1.0, "steps": 3, "best_step": 2}
        return adapted

    monkeypatch.setattr(demo_model, "adapt", adapt, raising=False)
    return calls, release, result


def _wait(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def _project(fake_ls, tiles, client):
    references = [fake_ls.add_task(7, tiles[0], annotation_result=[brush_region(tiles[0]["nuclei"], "Nucleus")])]
    targets = [fake_ls.add_task(7, tiles[k]) for k in (5, 6)]
    assert client.post("/setup", json=setup_body()).status_code == 200
    return references, targets


def _version(client, targets):
    response = client.post("/predict", json=predict_body(targets))
    assert response.status_code == 200, response.json
    assert all(item and item["result"] for item in response.json["results"])
    return client.get("/metrics").json["last_predict"]["version"]


def test_an_annotation_adapts_the_model_in_the_background_and_the_next_predictions_use_it(
        make_client, fake_ls, tiles, stand_in, tmp_path):
    calls, release, _ = stand_in
    client = make_client(label_studio_url=fake_ls.url, api_key=LEGACY_TOKEN, adapt_seconds=30,
                         state_dir=str(tmp_path))
    references, targets = _project(fake_ls, tiles, client)
    before = _version(client, targets)
    assert "-adapted-" not in before

    release.clear()  # the adaptation holds until released: the webhook and /predict must not wait for it
    hook = {"action": "ANNOTATION_CREATED", "project": {"id": 7}, "task": references[0],
            "annotation": references[0]["annotations"][0]}
    response = client.post("/webhook", json=hook)
    assert response.status_code == 201 and "adaptation queued" in response.json["adaptation"]
    assert _wait(lambda: client.services.adaptations.running == 7)
    assert _version(client, targets) == before  # predicted while the adaptation runs, with the model it had
    client.post("/webhook", json=dict(hook, action="ANNOTATION_UPDATED"))  # one more run asked for during it
    release.set()
    assert _wait(lambda: len(calls) == 2 and client.services.adaptations.running is None)
    assert calls[0]["images"] == 1 and calls[0]["masks"] == [[0, 1]] and calls[0]["time_limit"] == 30
    assert calls[0]["example_ids"] == "classes"  # the project's labels, as /predict reads them
    after = _version(client, targets)
    assert "-adapted-" in after and after != before
    metrics = client.get("/metrics").json
    assert metrics["counters"]["adaptations_kept"] == 2 and "Adapted to 1 reference(s)" in metrics["adaptation"]["last"]["7"]
    assert (tmp_path / "adapted" / "project-7" / "adaptation.json").is_file()

    # another worker process (or a restart) on the same state directory predicts with the saved model
    other = make_client(label_studio_url=fake_ls.url, api_key=LEGACY_TOKEN, adapt_seconds=30, state_dir=str(tmp_path))
    assert _version(other, targets) == after
    # another project keeps the served model
    assert other.services.adaptations.model_for(8, "served") == "served"


def test_an_adaptation_that_does_not_beat_the_model_changes_nothing(make_client, fake_ls, tiles, stand_in, tmp_path):
    calls, _, result = stand_in
    result["improved"] = False
    client = make_client(label_studio_url=fake_ls.url, api_key=LEGACY_TOKEN, adapt_seconds=30,
                         state_dir=str(tmp_path))
    references, targets = _project(fake_ls, tiles, client)
    before = _version(client, targets)
    response = client.post("/train", json={"project": 7})  # Label Studio's Start Training
    assert response.status_code == 201 and "adaptation queued" in response.json["detail"]
    assert _wait(lambda: len(calls) == 1 and client.services.adaptations.running is None)
    assert _version(client, targets) == before and not (tmp_path / "adapted" / "project-7").exists()
    assert "did not beat the model" in client.get("/metrics").json["adaptation"]["last"]["7"]


def test_no_adaptation_unless_asked_for(make_client, fake_ls, tiles, stand_in):
    calls, _, _ = stand_in
    client = make_client(label_studio_url=fake_ls.url, api_key=LEGACY_TOKEN)
    references, targets = _project(fake_ls, tiles, client)
    hook = {"action": "ANNOTATION_CREATED", "project": {"id": 7}, "task": references[0],
            "annotation": references[0]["annotations"][0]}
    response = client.post("/webhook", json=hook)
    assert response.status_code == 201 and "adaptation" not in response.json
    assert "adaptation" not in client.get("/metrics").json and not calls
    assert "nothing to train" in client.post("/train", json={"project": 7}).json["detail"]


def test_adapt_seconds_is_checked():
    from seggpt_plugins.labelstudio.settings import Settings

    with pytest.raises(ValueError, match="adapt_seconds must be >= 0"):
        Settings.from_env(adapt_seconds=-1)
