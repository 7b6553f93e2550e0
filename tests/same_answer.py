"""The body of test_fiftyone_operator.py's same-answer test (it needs that module's FiftyOne database).

One pipeline (issue 28): the same example and targets give the same objects, per-object scores and per-image
confidence in every host: the CLI (COCO and the review table), the FiftyOne operator (Detections on a real
MongoDB) and the Label Studio backend (/predict, one brush region per object).

The example is instance-labelled (every nucleus its own id 1..N). Each host is given it in its own terms: a
mask file, Detections (one per nucleus, in id order), and a Label Studio annotation with one label per
nucleus (label k of the config is id k), so that each host shows the model the same colours.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


TILE = 128
EXAMPLE, TARGETS = (0, 0), [(128, 128), (256, 0), (384, 256)]  # tile corners in stardist's 512x512 field
BATCH = 8  # every host runs the three targets as one batch


def make_case(nuclei2d, fo_env):
    """Files of the example (image, instance mask with ids 1..N) and the three targets."""
    image, mask = nuclei2d
    low, high = float(image.min()), float(np.percentile(image, 99.8))
    image8 = np.clip((image.astype(np.float64) - low) / (high - low) * 255, 0, 255).astype(np.uint8)
    folder = fo_env / "same_answer"
    folder.mkdir()

    def tile(corner):
        r, c = corner
        return image8[r:r + TILE, c:c + TILE], mask[r:r + TILE, c:c + TILE]

    example, instances = tile(EXAMPLE)
    ids = [i for i in np.unique(instances) if i]
    relabelled = np.zeros(instances.shape, np.uint8)
    for k, i in enumerate(ids, 1):
        relabelled[instances == i] = k
    paths = {"example": folder / "example.png", "mask": folder / "example_mask.png"}
    Image.fromarray(example).save(paths["example"])
    Image.fromarray(relabelled).save(paths["mask"])
    targets = []
    for k, corner in enumerate(TARGETS):
        path = folder / f"target_{k}.png"
        Image.fromarray(tile(corner)[0]).save(path)
        targets.append(path)
    return {"paths": paths, "targets": targets, "mask": relabelled, "example": example,
            "gray": [np.asarray(Image.open(p)) for p in targets]}


def _key(binary: np.ndarray) -> bytes:
    return np.packbits(binary.astype(bool)).tobytes()


def from_cli(case, tmp_path) -> list[dict]:
    """{object mask key: (class id, score)} and confidence per target, from `seggpt segment`'s files."""
    from pycocotools import mask as mask_utils

    out = tmp_path / "cli"
    command = [sys.executable, "-m", "seggpt_plugins.cli", "segment", *map(str, case["targets"]),
               "--prompt", str(case["paths"]["example"]), str(case["paths"]["mask"]), "--out", str(out),
               "--model", "demo", "--device", "cpu", "--batch-size", str(BATCH), "--output", "instances",
               "--format", "coco", "--review",
               "--example-ids", "classes"]  # every id its own colour, as the other hosts' label maps make it
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    coco = json.loads((out / "coco.json").read_text())
    review = {row["path"]: row for row in map(json.loads, (out / "review.jsonl").read_text().splitlines())}
    answers = []
    for path in case["targets"]:
        (image,) = [i for i in coco["images"] if i["file_name"].endswith(path.name)]
        objects = {_key(mask_utils.decode(a["segmentation"])): (a["category_id"], a["score"])
                   for a in coco["annotations"] if a["image_id"] == image["id"]}
        (row,) = [r for p, r in review.items() if p.endswith(path.name)]
        answers.append({"objects": objects, "confidence": row["confidence"]})
    return answers


def from_fiftyone(case) -> list[dict]:
    import fiftyone as fo

    from .test_fiftyone_operator import run

    dataset = fo.Dataset()
    try:
        example = fo.Sample(filepath=str(case["paths"]["example"]), tags=["prompt"])
        example["instances"] = fo.Detections(detections=[
            fo.Detection.from_mask(case["mask"] == k, label="nucleus") for k in range(1, int(case["mask"].max()) + 1)])
        dataset.add_samples([example] + [fo.Sample(filepath=str(p)) for p in case["targets"]], progress=False)
        result = run(dataset.view(), dict(label_field="instances", output_field="pred", prompt_tag="prompt",
                                          model="demo", device="cpu", batch_size=BATCH, max_prompts=4))
        assert result.error is None, result.error
        answers = []
        for path in case["targets"]:
            sample = dataset.match(fo.ViewField("filepath") == str(path)).first()
            objects = {}
            for det in sample["pred"].detections:
                binary = det.to_segmentation(frame_size=(TILE, TILE), target=1).mask.astype(bool)
                objects[_key(binary)] = (det.label, det.confidence)
            answers.append({"objects": objects, "confidence": sample["pred_confidence"]})
        return answers
    finally:
        dataset.delete()


def from_labelstudio(case, demo_model) -> list[dict]:
    from seggpt_plugins.labelstudio.server import create_app
    from seggpt_plugins.labelstudio.services import Services
    from seggpt_plugins.labelstudio.settings import Settings

    from .test_labelstudio_backend import (LEGACY_TOKEN, FakeLabelStudio, _png, brush_region, decode_brush,
                                           predict_body, setup_body)

    fake_ls = FakeLabelStudio().start()
    try:
        settings = Settings(max_prompts=4, batch_size=BATCH, refresh_seconds=0.0, device="cpu",
                            label_studio_url=fake_ls.url, api_key=LEGACY_TOKEN)
        settings.check()
        client = create_app(settings, Services(settings, model=demo_model), load_model=False).test_client()
        return _predict_in_label_studio(case, fake_ls, client, _png, brush_region, decode_brush, predict_body,
                                        setup_body)
    finally:
        fake_ls.stop()


def _predict_in_label_studio(case, fake_ls, client, _png, brush_region, decode_brush, predict_body,
                             setup_body) -> list[dict]:
    count = int(case["mask"].max())
    labels = "".join(f'<Label value="n{k}"/>' for k in range(1, count + 1))
    config = f'<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">{labels}' \
             f'</BrushLabels></View>'
    example = {"name": "example.png", "png": _png(case["example"])}
    fake_ls.add_task(7, example, annotation_result=[brush_region(case["mask"] == k, f"n{k}")
                                                    for k in range(1, count + 1)])
    tasks = [fake_ls.add_task(7, {"name": p.name, "png": _png(gray)}) for p, gray in zip(case["targets"], case["gray"])]
    assert client.post("/setup", json=setup_body(config, extra_params={"objects": True})).status_code == 200
    response = client.post("/predict", json=predict_body(tasks, config))
    assert response.status_code == 200, response.json
    answers = []
    for item in response.json["results"]:
        objects = {_key(decode_brush(r)): (int(r["value"]["brushlabels"][0][1:]), r["score"]) for r in item["result"]}
        answers.append({"objects": objects, "confidence": item["score"]})
    return answers


def check_same_answer(nuclei2d, fo_env, tmp_path, demo_model) -> None:
    """CLI, FiftyOne and Label Studio: the same objects, per-object scores and per-image confidence."""
    case = make_case(nuclei2d, fo_env)
    cli = from_cli(case, tmp_path)
    fiftyone = from_fiftyone(case)
    labelstudio = from_labelstudio(case, demo_model)
    for k, (a, b, c) in enumerate(zip(cli, fiftyone, labelstudio)):
        assert len(a["objects"]) >= 5, f"target {k}: too few objects to compare"
        assert set(a["objects"]) == set(b["objects"]) == set(c["objects"]), f"target {k}: the objects differ"
        for key, (class_id, score) in a["objects"].items():
            assert b["objects"][key][0] == "nucleus" and c["objects"][key][0] == class_id
            assert b["objects"][key][1] == pytest.approx(score, abs=1e-3)
            assert c["objects"][key][1] == pytest.approx(score, abs=1e-3)
        assert b["confidence"] == pytest.approx(a["confidence"], abs=1e-3)
        assert c["confidence"] == pytest.approx(a["confidence"], abs=1e-3)
