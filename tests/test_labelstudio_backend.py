"""Label Studio ML backend, unit level: configs, RLE and polygons, downloads, and every endpoint via Flask's client.

The Label Studio API the backend reads (task listing, token refresh, uploads) is played here by a small
HTTP server on 127.0.0.1 that answers in Label Studio 1.23's formats (checked against the real server;
test_labelstudio_e2e.py runs the real one). Images are real: tiles of the stardist nuclei sample.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flask")
pytest.importorskip("label_studio_sdk")

from label_studio_sdk.converter.brush import decode_rle, mask2rle  # noqa: E402

from seggpt_plugins.labelstudio.params import RequestError, check_params, parse_project_id  # noqa: E402
from seggpt_plugins.labelstudio.services import Services  # noqa: E402
from seggpt_plugins.labelstudio.labeling import (ConfigError, annotation_to_mask, mask_to_polygons,  # noqa: E402
                                          parse_label_config, prediction_to_results)
from seggpt_plugins.labelstudio.media import (LabelStudioAuth, MediaError, MediaFetcher, OutOfTime,  # noqa: E402
                                              decode_image)
from seggpt_plugins.labelstudio.server import create_app  # noqa: E402
from seggpt_plugins.labelstudio.settings import Settings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LEGACY_TOKEN = "0123456789abcdef0123456789abcdef01234567"
JWT_SECRET = "fake-label-studio-secret-of-32-bytes-or-more"

BRUSH_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Nucleus" background="#ff0000"/>
    <Label value="Debris" background="#0000ff"/>
  </BrushLabels>
</View>"""
POLYGON_CONFIG = """<View>
  <Image name="img" value="$picture"/>
  <PolygonLabels name="outline" toName="img" strokeWidth="2">
    <Label value="Nucleus"/>
  </PolygonLabels>
</View>"""
BOTH_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Nucleus"/>
    <Label value="Edge"/>
  </BrushLabels>
  <PolygonLabels name="poly" toName="image">
    <Label value="Edge"/>
    <Label value="Debris"/>
  </PolygonLabels>
  <Choices name="quality" toName="image"><Choice value="good"/></Choices>
</View>"""


# --------------------------------------------------------------------------------------------- data


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="session")
def tiles(nuclei2d):
    """16 real 128x128 tiles (8-bit, one intensity scaling for all) with their nuclei masks."""
    image, mask = nuclei2d
    low, high = float(image.min()), float(np.percentile(image, 99.8))
    image8 = np.clip((image.astype(np.float64) - low) / (high - low) * 255, 0, 255).astype(np.uint8)
    out = []
    for r in range(0, 512, 128):
        for c in range(0, 512, 128):
            gray = image8[r:r + 128, c:c + 128]
            out.append({"name": f"tile_{r}_{c}.png", "png": _png(gray), "gray": gray,
                        "labels": mask[r:r + 128, c:c + 128], "nuclei": mask[r:r + 128, c:c + 128] > 0})
    return out


def brush_region(binary: np.ndarray, label: str, from_name="tag", to_name="image") -> dict:
    h, w = binary.shape
    return {"id": "r" + label, "from_name": from_name, "to_name": to_name, "type": "brushlabels",
            "original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask2rle(binary.astype(np.uint8) * 255), "brushlabels": [label]}}


def decode_brush(region: dict) -> np.ndarray:
    h, w = region["original_height"], region["original_width"]
    return decode_rle(region["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0


def iou(a, b) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


# ---------------------------------------------------------------------------------- fake Label Studio


class FakeLabelStudio:
    """The few Label Studio endpoints the backend calls, in Label Studio 1.23's formats, on 127.0.0.1."""

    def __init__(self):
        from flask import Flask, abort, jsonify, redirect, request

        import jwt

        self.tasks: dict[int, dict] = {}
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.refreshes = 0
        self.listings = 0
        self.other_url = None
        self.slow_s = 0.0
        self.connections: dict[int, list] = {}  # project -> its model connections (Settings > Model)
        self.connections_status = 200
        app = Flask("fake_label_studio")
        self.app = app

        def authorized() -> bool:
            header = request.headers.get("Authorization", "")
            if header == f"Token {LEGACY_TOKEN}":
                return True
            if header.startswith("Bearer "):
                try:
                    claims = jwt.decode(header[7:], JWT_SECRET, algorithms=["HS256"])
                except jwt.InvalidTokenError:
                    return False
                return claims.get("token_type") == "access"
            return False

        @app.before_request
        def record():
            self.requests.append((request.full_path, request.headers.get("Authorization")))

        @app.post("/api/token/refresh/")
        def refresh():
            try:
                claims = jwt.decode((request.get_json() or {}).get("refresh", ""), JWT_SECRET, algorithms=["HS256"])
            except jwt.InvalidTokenError:
                return jsonify({"detail": "Token is invalid"}), 401
            if claims.get("token_type") != "refresh":
                return jsonify({"detail": "Token has wrong type"}), 401
            self.refreshes += 1
            access = jwt.encode({"token_type": "access", "exp": int(time.time()) + 300, "user_id": "1"}, JWT_SECRET,
                                algorithm="HS256")
            return jsonify({"access": access})

        @app.get("/api/tasks/")
        def list_tasks():
            if not authorized():
                return jsonify({"detail": "Authentication credentials were not provided."}), 401
            project = int(request.args["project"])
            query = json.loads(request.args.get("query") or "{}")
            tasks = [t for t in self.tasks.values() if t["project"] == project]
            for item in (query.get("filters") or {}).get("items", []):
                assert item["filter"] == "filter:tasks:total_annotations" and item["operator"] == "greater"
                tasks = [t for t in tasks if len(t["annotations"]) > item["value"]]
            selected = query.get("selectedItems")
            if selected and not selected.get("all"):
                tasks = [t for t in tasks if t["id"] in selected.get("included", [])]
            page, size = int(request.args.get("page", 1)), int(request.args.get("page_size", 100))
            self.listings += page == 1
            chunk = tasks[(page - 1) * size: page * size]
            if page > 1 and not chunk:
                return jsonify({"status_code": 404, "detail": "Invalid page."}), 404
            return jsonify({"total_annotations": sum(len(t["annotations"]) for t in tasks), "total_predictions": 0,
                            "total": len(tasks), "tasks": chunk})

        @app.get("/api/projects/<int:project>/model-versions/")
        def model_versions(project):  # the Prelabeling choice's list: prediction sets and connections
            if not authorized():
                return jsonify({"detail": "Authentication credentials were not provided."}), 401
            if self.connections_status != 200:
                return jsonify({"detail": "unavailable"}), self.connections_status
            live = self.connections.get(project, []) if request.args.get("include_live_models") == "true" else None
            return jsonify({"static": [], "live": live})

        @app.get("/data/upload/<path:name>")
        def upload(name):
            if not authorized():
                return jsonify({"detail": "Authentication credentials were not provided."}), 401
            if name not in self.files:
                abort(404)
            return self.files[name], 200, {"Content-Type": "image/png"}

        @app.get("/public/<path:name>")
        def public(name):  # a plain web server: no key needed (and none must be sent)
            if name not in self.files:
                abort(404)
            return self.files[name], 200, {"Content-Type": "image/png"}

        @app.get("/slow/<path:name>")
        def slow(name):  # an image server that takes its time (self.slow_s seconds per image)
            time.sleep(self.slow_s)
            return self.files[name], 200, {"Content-Type": "image/png"}

        @app.get("/data/upload/away/<path:name>")
        def away(name):  # Label Studio redirecting to another host (as presigned cloud URLs do)
            return redirect(f"{self.other_url}/public/{name}", 302)

        @app.get("/data/upload/page.html")
        def html():
            return "<html>login</html>", 200, {"Content-Type": "text/html"}

    def start(self):
        from werkzeug.serving import make_server

        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.thread.join(5)

    def add_task(self, project: int, tile: dict, key="image", annotation_result=None, task_id=None) -> dict:
        task_id = task_id or (max(self.tasks, default=0) + 1)
        self.files[f"{project}/{tile['name']}"] = tile["png"]
        task = {"id": task_id, "project": project, "data": {key: f"/data/upload/{project}/{tile['name']}"},
                "annotations": [], "predictions": [], "meta": {}, "is_labeled": False}
        self.tasks[task_id] = task
        if annotation_result is not None:
            self.annotate(task_id, annotation_result)
        return task

    def annotate(self, task_id: int, result: list, **extra) -> dict:
        annotation = {"id": 1000 + sum(len(t["annotations"]) for t in self.tasks.values()), "result": result,
                      "was_cancelled": False, "ground_truth": False, "task": task_id,
                      "project": self.tasks[task_id]["project"],
                      "created_at": f"2026-01-01T00:00:{len(self.requests) % 60:02d}Z",
                      "updated_at": f"2026-01-01T00:{len(self.requests) % 60:02d}:00Z"}
        annotation.update(extra)
        self.tasks[task_id]["annotations"].append(annotation)
        self.tasks[task_id]["is_labeled"] = True
        return annotation


def _make_pat(token_type="refresh", exp_s=3600) -> str:
    import jwt

    return jwt.encode({"token_type": token_type, "exp": int(time.time()) + exp_s, "user_id": "1"}, JWT_SECRET,
                      algorithm="HS256")


@pytest.fixture
def fake_ls():
    server = FakeLabelStudio().start()
    other = FakeLabelStudio().start()
    server.other_url = other.url
    server.other = other
    yield server
    server.stop()
    other.stop()


# ----------------------------------------------------------------------------------------- the app


@pytest.fixture
def make_client(demo_model):
    """A Flask test client around a fresh backend (fresh caches and project state) sharing the demo model."""

    def make(**overrides):
        values = dict(max_prompts=2, batch_size=4, refresh_seconds=0.0, device="cpu")
        values.update(overrides)
        settings = Settings(**values)
        settings.check()
        services = Services(settings, model=demo_model)
        app = create_app(settings, services, load_model=False)
        client = app.test_client()
        client.services = services
        return client

    return make


def predict_body(tasks, config=BRUSH_CONFIG, project="7.1700000000"):
    return {"tasks": tasks, "project": project, "label_config": config,
            "params": {"login": None, "password": None, "context": None}}


def setup_body(config=BRUSH_CONFIG, project="7.1700000000", extra_params=None):
    return {"project": project, "schema": config, "hostname": "http://localhost:8080",
            "access_token": "creator-token", "extra_params": extra_params}


# ------------------------------------------------------------------------------------ labeling configs


def test_configs_are_read_into_views_with_ids_over_all_labels():
    brush = parse_label_config(BRUSH_CONFIG)
    (view,) = brush.views
    assert (view.image_name, view.value_key, view.labels) == ("image", "image", ("Nucleus", "Debris"))
    assert view.label_ids == {"Nucleus": 1, "Debris": 2}
    (polygon,) = parse_label_config(POLYGON_CONFIG).views
    assert (polygon.value_key, polygon.controls[0].kind, polygon.labels) == ("picture", "polygonlabels", ("Nucleus",))
    (both,) = parse_label_config(BOTH_CONFIG).views
    assert both.labels == ("Nucleus", "Edge", "Debris")  # Choices ignored, shared label once
    assert both.control_for("Edge").name == "tag" and both.control_for("Edge", "polygonlabels").name == "poly"
    assert both.control_for("Debris").name == "poly"
    assert parse_label_config(BRUSH_CONFIG).key != parse_label_config(BOTH_CONFIG).key


@pytest.mark.parametrize("config, message", [
    ("", "missing or empty"),
    ("<View><Image name='i' value='$i'/>", "not a valid"),
    ("<View><Text name='t' value='$t'/><Choices name='c' toName='t'><Choice value='a'/></Choices></View>",
     "no <BrushLabels> or <PolygonLabels>"),
    ("<View><Image name='i' value='$i'/><BrushLabels name='b' toName='i'></BrushLabels></View>", "no <Label>"),
    ("<View><Image name='i' value='i.png'/><BrushLabels name='b' toName='i'><Label value='x'/></BrushLabels></View>",
     "must name a task field"),
])
def test_unusable_configs_are_refused_with_the_reason(config, message):
    with pytest.raises(ConfigError, match=message):
        parse_label_config(config)


# ------------------------------------------------------------------------------- RLE and polygons


def regions_of(labels, scores, view, min_area=16, split_touching=False, **options):
    """The regions of a label map whose objects are found by the core's rule, as the backend finds them."""
    from seggpt_plugins.instances import ObjectRule

    return prediction_to_results(ObjectRule(min_area, split_touching).find(labels, scores), view, **options)


def test_brush_masks_round_trip_through_the_sdk_rle(tiles):
    (view,) = parse_label_config(BRUSH_CONFIG).views
    nuclei = tiles[5]["nuclei"]
    debris = np.zeros_like(nuclei)
    debris[100:120, 3:40] = True
    labels = np.where(nuclei, 1, 0) + np.where(debris & ~nuclei, 2, 0)
    scores = np.linspace(0.2, 1.0, labels.size, dtype=np.float32).reshape(labels.shape)
    regions = regions_of(labels.astype(np.uint8), scores, view, min_area=0)
    assert [r["value"]["brushlabels"] for r in regions] == [["Nucleus"], ["Debris"]]
    for region, expected in zip(regions, (labels == 1, labels == 2)):
        assert region["type"] == "brushlabels" and region["from_name"] == "tag" and region["to_name"] == "image"
        assert (region["original_width"], region["original_height"]) == (128, 128)
        assert np.array_equal(decode_brush(region), expected)  # exact, with the SDK's own decoder
        assert region["score"] == pytest.approx(float(scores[expected].mean()), abs=1e-4)
    # and back: an annotation with those regions is the same label mask
    assert np.array_equal(annotation_to_mask(regions, view, labels.shape), labels)


def test_objects_give_one_region_per_object():
    """extra_params.objects: one brush (or polygon) region per object; split_touching: touching objects split."""
    (view,) = parse_label_config(BRUSH_CONFIG).views
    yy, xx = np.mgrid[:80, :120]
    labels = np.zeros((80, 120), np.uint8)
    for cy, cx in [(40, 30), (40, 56), (40, 95)]:  # the first two touch
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= 14 ** 2] = 1
    scores = np.full(labels.shape, 0.5, np.float32)
    assert len(regions_of(labels, scores, view, min_area=10)) == 1
    per_object = regions_of(labels, scores, view, min_area=10, split_touching=True, objects=True)
    assert len(per_object) == 3 and all(r["value"]["brushlabels"] == ["Nucleus"] for r in per_object)
    union = np.zeros(labels.shape, bool)
    for region in per_object:
        mask = decode_brush(region)
        assert not (union & mask).any()
        union |= mask
    assert np.array_equal(union, labels > 0)
    (polygons,) = parse_label_config(POLYGON_CONFIG).views
    assert len(regions_of(labels, scores, polygons, min_area=10, split_touching=True, objects=True)) == 3
    assert check_params({"objects": True, "split_touching": True}) == {"objects": True, "split_touching": True}
    with pytest.raises(RequestError, match="objects"):
        check_params({"objects": "yes"})


def test_annotation_masks_are_resized_to_the_image_and_unknown_labels_skipped(tiles):
    (view,) = parse_label_config(BRUSH_CONFIG).views
    small = np.zeros((64, 64), bool)
    small[10:30, 20:40] = True
    regions = [brush_region(small, "Nucleus"), brush_region(~small, "NotInConfig")]
    mask = annotation_to_mask(regions, view, (128, 128))
    assert mask.shape == (128, 128) and set(np.unique(mask)) == {0, 1}
    assert np.array_equal(mask[20:60, 40:80], np.ones((40, 40), np.uint8))
    assert mask.sum() == 40 * 40


def test_polygons_round_trip_in_percent_coordinates(tiles):
    (view,) = parse_label_config(POLYGON_CONFIG).views
    nuclei = tiles[6]["nuclei"]
    scores = np.full(nuclei.shape, 0.75, np.float32)
    regions = regions_of(nuclei.astype(np.uint8), scores, view, min_area=10, tolerance=0.5)
    parts = [p for p in mask_to_polygons(nuclei, tolerance=0.5, min_area=10)]
    assert len(regions) == len(parts) > 3
    for region in regions:
        assert region["type"] == "polygonlabels" and region["value"]["polygonlabels"] == ["Nucleus"]
        points = np.asarray(region["value"]["points"])
        assert points.shape[1] == 2 and len(points) >= 3 and region["value"]["closed"] is True
        assert points.min() >= 0 and points.max() <= 100
        assert region["score"] == pytest.approx(0.75)
    back = annotation_to_mask(regions, view, nuclei.shape) > 0
    kept = np.zeros_like(nuclei)
    import cv2

    count, parts_map, stats, _ = cv2.connectedComponentsWithStats(nuclei.astype(np.uint8), connectivity=8)
    for k in range(1, count):
        if stats[k, cv2.CC_STAT_AREA] >= 10:
            kept |= parts_map == k
    assert iou(back, kept) > 0.9  # simplified outlines, holes not kept
    # a square is exact: its outline through the boundary pixel centres fills the same pixels
    square = np.zeros((50, 80), bool)
    square[10:30, 20:61] = True
    (region,) = regions_of(square.astype(np.uint8), np.ones(square.shape, np.float32), view)
    assert len(region["value"]["points"]) == 4
    assert np.array_equal(annotation_to_mask([region], view, square.shape) > 0, square)


def test_both_kinds_of_control_each_label_goes_to_one_control():
    (view,) = parse_label_config(BOTH_CONFIG).views
    labels = np.zeros((60, 60), np.uint8)
    labels[5:20, 5:20] = 1  # Nucleus: brush only
    labels[30:50, 5:20] = 2  # Edge: both; brush preferred by default
    labels[30:50, 30:50] = 3  # Debris: polygon only
    scores = np.ones(labels.shape, np.float32)
    by_type = {(r["from_name"], r["type"], r["value"][r["type"]][0]) for r in regions_of(labels, scores, view)}
    assert by_type == {("tag", "brushlabels", "Nucleus"), ("tag", "brushlabels", "Edge"),
                       ("poly", "polygonlabels", "Debris")}
    polygons = regions_of(labels, scores, view, prefer="polygonlabels")
    assert {(r["from_name"], r["value"][r["type"]][0]) for r in polygons} == {
        ("tag", "Nucleus"), ("poly", "Edge"), ("poly", "Debris")}


# ----------------------------------------------------------------------------------------- downloads


def test_urls_are_resolved_only_to_label_studio_or_the_tasks_own_host():
    fetcher = MediaFetcher("http://ls.example:8080", LEGACY_TOKEN, max_bytes=1 << 20, max_pixels=1 << 20)
    assert fetcher.resolve("/data/upload/3/a.png") == ("http://ls.example:8080/data/upload/3/a.png", True)
    assert fetcher.resolve("upload/3/a.png") == ("http://ls.example:8080/data/upload/3/a.png", True)
    assert fetcher.resolve("/data/local-files/?d=images/a.png")[1] is True
    url, keyed = fetcher.resolve("s3://bucket/dir/a.png", task_id=12)
    assert keyed and url.startswith("http://ls.example:8080/tasks/12/presign/?fileuri=")
    assert base64.urlsafe_b64decode(url.split("fileuri=")[1]).decode() == "s3://bucket/dir/a.png"
    assert fetcher.resolve("http://ls.example:8080/data/upload/3/a.png")[1] is True
    assert fetcher.resolve("http://ls.example:8080/api/users/")[1] is False  # not a media path: no key
    assert fetcher.resolve("https://ls.example:8080/data/upload/3/a.png")[1] is False  # another origin
    assert fetcher.resolve("https://images.example.org/a.png") == ("https://images.example.org/a.png", False)
    for bad in ["/etc/passwd", "file:///etc/passwd", "../../etc/passwd", "/data/upload/../../../etc/passwd",
                "/data/upload/%2e%2e/%2e%2e/etc/passwd", "/data/local-files/?d=../../etc/passwd", "//evil.org/x.png",
                "C:\\images\\a.png", "images/a.png", "data:image/png;base64,AAAA", "ftp://host/a.png", "", None, 12,
                "http://evil.org/../a.png"]:
        with pytest.raises(MediaError):
            fetcher.resolve(bad, task_id=1)
    with pytest.raises(MediaError, match="LABEL_STUDIO_URL"):
        MediaFetcher(None, None, max_bytes=1, max_pixels=1).resolve("/data/upload/1/a.png")


def test_downloads_with_a_legacy_token_never_send_it_elsewhere(fake_ls, tiles):
    fake_ls.files["1/a.png"] = tiles[0]["png"]
    fake_ls.other.files["b.png"] = tiles[1]["png"]
    fake_ls.other.files["1/a.png"] = tiles[0]["png"]
    fetcher = MediaFetcher(fake_ls.url, LEGACY_TOKEN, max_bytes=1 << 20, max_pixels=1 << 20,
                           allowed_hosts=[fake_ls.other.url.split("//")[1]])  # an image server on loopback
    assert np.array_equal(fetcher.fetch_image("/data/upload/1/a.png"), tiles[0]["gray"])
    assert fake_ls.requests[-1] == ("/data/upload/1/a.png?", f"Token {LEGACY_TOKEN}")
    assert np.array_equal(fetcher.fetch_image(f"{fake_ls.other.url}/public/b.png"), tiles[1]["gray"])
    # redirected from Label Studio to another host: the key stays behind
    assert np.array_equal(fetcher.fetch_image("/data/upload/away/1/a.png"), tiles[0]["gray"])
    assert fake_ls.other.requests and all(auth is None for _, auth in fake_ls.other.requests)
    with pytest.raises(MediaError, match="text/html"):
        fetcher.fetch_image("/data/upload/page.html")
    with pytest.raises(MediaError, match="404"):
        fetcher.fetch_image("/data/upload/1/missing.png")
    with pytest.raises(MediaError, match="refused.*LABEL_STUDIO_API_KEY"):
        MediaFetcher(fake_ls.url, "wrong-token", max_bytes=1 << 20, max_pixels=1 << 20).fetch_image("/data/upload/1/a.png")
    with pytest.raises(MediaError, match="no API key"):
        MediaFetcher(fake_ls.url, None, max_bytes=1 << 20, max_pixels=1 << 20).fetch_image("/data/upload/1/a.png")


def test_personal_access_tokens_are_exchanged_for_access_tokens(fake_ls, tiles):
    fake_ls.files["1/a.png"] = tiles[0]["png"]
    pat = _make_pat()
    fetcher = MediaFetcher(fake_ls.url, pat, max_bytes=1 << 20, max_pixels=1 << 20)
    assert fetcher.auth.kind == "pat"
    for _ in range(3):
        assert np.array_equal(fetcher.fetch_image("/data/upload/1/a.png"), tiles[0]["gray"])
    assert fake_ls.refreshes == 1  # cached until it nearly expires
    sent = [auth for path, auth in fake_ls.requests if path.startswith("/data/upload")]
    assert all(a.startswith("Bearer ") and a != f"Bearer {pat}" for a in sent)
    fetcher.auth._expires = time.time()  # about to expire: refreshed before use
    fetcher.fetch_image("/data/upload/1/a.png")
    assert fake_ls.refreshes == 2
    fetcher.auth._access = _make_pat("access", exp_s=3600)[:-4] + "AAAA"  # rejected by the server: refresh, retry
    assert np.array_equal(fetcher.fetch_image("/data/upload/1/a.png"), tiles[0]["gray"])
    assert fake_ls.refreshes == 3
    assert LabelStudioAuth("http://x", LEGACY_TOKEN, None).kind == "legacy"
    with pytest.raises(MediaError, match="refused the personal access token"):
        LabelStudioAuth(fake_ls.url, _make_pat()[:-3] + "abc", fetcher._session).header()


def test_size_limits_are_enforced(fake_ls, tiles):
    fake_ls.files["1/a.png"] = tiles[0]["png"]
    with pytest.raises(MediaError, match="limit"):
        MediaFetcher(fake_ls.url, LEGACY_TOKEN, max_bytes=1000, max_pixels=1 << 20).fetch_image("/data/upload/1/a.png")
    with pytest.raises(MediaError, match="pixels is more than the limit"):
        MediaFetcher(fake_ls.url, LEGACY_TOKEN, max_bytes=1 << 20, max_pixels=100).fetch_image("/data/upload/1/a.png")
    with pytest.raises(MediaError, match="not a readable image"):
        decode_image(b"GIF89a but not really", 1 << 20)


# ------------------------------------------------------------------------------------------- endpoints


def test_health_and_metrics(make_client):
    client = make_client()
    response = client.get("/health")
    assert response.status_code == 200 and response.json["status"] == "UP"
    assert response.json["model_version"].startswith("demo-")
    metrics = client.get("/metrics").json
    assert metrics["model_status"] == "UP" and metrics["counters"]["requests_health"] == 1


def test_setup_returns_a_model_version_and_checks_extra_params(make_client, fake_ls, tiles):
    client = make_client(label_studio_url=fake_ls.url, api_key=LEGACY_TOKEN)
    response = client.post("/setup", json=setup_body(extra_params=None))
    assert response.status_code == 200, response.json
    assert response.json["model_version"].endswith("norefs")
    fake_ls.add_task(7, tiles[0], annotation_result=[brush_region(tiles[0]["nuclei"], "Nucleus")])
    with_ref = client.post("/setup", json=setup_body(extra_params=json.dumps({"max_prompts": 3}))).json["model_version"]
    assert with_ref != response.json["model_version"] and "-r1-" in with_ref
    same = client.post("/setup", json=setup_body(extra_params={"max_prompts": 3})).json["model_version"]
    assert same == with_ref  # a JSON string or an object: the same params
    other = client.post("/setup", json=setup_body(extra_params={"max_prompts": 2})).json["model_version"]
    assert other != with_ref  # other params, other predictions
    for extra, message in [('{"max_prompts": 0}', "max_prompts"), ("{nope", "not valid JSON"),
                           ({"reference_task_ids": "1,2"}, "reference_task_ids"), ({"colour": 1}, "unknown key"),
                           ([1, 2], "JSON object"), ({"seg_type": "panoptic"}, "seg_type")]:
        response = client.post("/setup", json=setup_body(extra_params=extra))
        assert response.status_code == 400 and message in response.json["error"], (extra, response.json)
    response = client.post("/setup", json=setup_body(project="../1"))
    assert response.status_code == 400 and "project" in response.json["error"]
    response = client.post("/setup", json=setup_body(config="<View><Text name='t' value='$t'/></View>"))
    assert response.status_code == 422 and "BrushLabels" in response.json["error"]


def test_a_bad_extra_param_is_logged_in_one_line_naming_the_key(make_client, caplog):
    """Label Studio shows only a generic 400 dialog for a refused /setup: the backend's log says which key."""
    client = make_client()
    caplog.set_level(logging.INFO, logger="seggpt_plugins.labelstudio")
    response = client.post("/setup", json=setup_body(extra_params=json.dumps({"max_prompt": 3})))
    assert response.status_code == 400 and "'max_prompt' (did you mean 'max_prompts'?)" in response.json["error"]
    (record,) = [r for r in caplog.records if "max_prompt" in r.getMessage()]
    line = record.getMessage()
    assert record.levelno == logging.WARNING and "\n" not in line
    assert line.startswith("project 7: POST /setup refused (HTTP 400)") and "did you mean 'max_prompts'?" in line
    assert "known keys: reference_task_ids, references, max_prompts," in line


def test_predictions_carry_the_name_of_the_projects_model_connection(make_client, fake_ls, tiles, tmp_path, caplog):
    """Issue 32, item 2: connecting makes the connection's Name the project's prelabeling choice, and Label
    Studio's Prediction score column averages only the predictions named as that choice: /setup answers the
    Name (Label Studio skips tasks with a prediction of what /setup answers) and predictions carry it."""
    caplog.set_level(logging.INFO, logger="seggpt_plugins.labelstudio")
    settings = dict(label_studio_url=fake_ls.url, api_key=LEGACY_TOKEN, state_dir=str(tmp_path / "state"))
    client = make_client(**settings)
    fake_ls.add_task(7, tiles[0], annotation_result=[brush_region(tiles[0]["nuclei"], "Nucleus")])
    target = fake_ls.add_task(7, tiles[5])
    # Label Studio's check before it saves a new connection: none is there yet, so the backend's version
    version = client.post("/setup", json=setup_body()).json["model_version"]
    assert version.startswith("seggpt-demo-") and "-r1-" in version
    # the saved connection (the test client's Host is localhost), beside another model's
    fake_ls.connections[7] = [{"title": "SAM", "url": "http://10.0.0.5:9090", "model_version": "sam-1"},
                              {"title": "SegGPT", "url": "http://localhost/", "model_version": ""}]
    assert client.post("/setup", json=setup_body()).json["model_version"] == "SegGPT"
    response = client.post("/predict", json=predict_body([target])).json
    assert response["model_version"] == "SegGPT" and response["results"][0]["model_version"] == "SegGPT"
    assert 0 < response["results"][0]["score"] <= 1
    assert client.get("/versions", json={"project": "7.1"}).json["versions"] == ["SegGPT"]
    last = client.get("/metrics").json["last_predict"]
    assert last["model_version"] == "SegGPT" and last["version"] == version  # the references' version is kept
    assert any(f"({version}, named 'SegGPT')" in r.getMessage() for r in caplog.records)
    # Label Studio cannot be asked: the name found last (another name would make every task look unpredicted)
    fake_ls.connections_status = 503
    assert client.post("/setup", json=setup_body()).json["model_version"] == "SegGPT"
    # another worker (or a restart) reads it from the state directory
    other = make_client(**settings)
    assert other.post("/predict", json=predict_body([target])).json["results"][0]["model_version"] == "SegGPT"
    # renamed (Label Studio renames the prelabeling choice with it), then removed: the backend's version again
    fake_ls.connections_status = 200
    fake_ls.connections[7][1]["title"] = "SegGPT nuclei"
    assert client.post("/setup", json=setup_body()).json["model_version"] == "SegGPT nuclei"
    fake_ls.connections[7] = fake_ls.connections[7][:1]
    assert client.post("/setup", json=setup_body()).json["model_version"] == version
    assert client.post("/predict", json=predict_body([target])).json["results"][0]["model_version"] == version


def test_setup_while_the_model_loads_answers_the_name_kept_in_the_state(make_client, fake_ls, tiles, tmp_path):
    """Right after a restart the worker loads the model, and Label Studio gives /setup 3 s (it sends nothing
    when /setup fails): a restarted worker answers the connection's name from the state directory without
    asking Label Studio (a rename meanwhile is read at a /setup after the model has loaded)."""
    settings = dict(label_studio_url=fake_ls.url, api_key=LEGACY_TOKEN, state_dir=str(tmp_path / "state"))
    fake_ls.add_task(7, tiles[0], annotation_result=[brush_region(tiles[0]["nuclei"], "Nucleus")])
    fake_ls.connections[7] = [{"title": "SegGPT", "url": "http://localhost/", "model_version": ""}]
    assert make_client(**settings).post("/setup", json=setup_body()).json["model_version"] == "SegGPT"
    fake_ls.connections[7][0]["title"] = "SegGPT renamed"
    values = dict(max_prompts=2, batch_size=4, refresh_seconds=0.0, device="cpu", **settings)
    restarted = create_app(Settings(**values), Services(Settings(**values)), load_model=False).test_client()
    assert restarted.get("/health").json["model_status"] == "LOADING"
    assert restarted.post("/setup", json=setup_body()).json["model_version"] == "SegGPT"  # from the state
    assert make_client(**settings).post("/setup", json=setup_body()).json["model_version"] == "SegGPT renamed"


def test_the_connection_is_told_by_its_url_or_by_its_own_name_as_version():
    from seggpt_plugins.labelstudio.services import pick_connection

    ours = {"title": "SegGPT", "url": "http://host.docker.internal:9090/", "model_version": "SegGPT"}
    sam = {"title": "SAM", "url": "https://sam.example:443", "model_version": "sam-1"}
    assert pick_connection([sam, ours], host="host.docker.internal:9090") == "SegGPT"
    assert pick_connection([sam, ours], host="HOST.docker.internal:9090") == "SegGPT"
    assert pick_connection([sam, ours], host="sam.example") == "SAM"  # a default port is no port
    assert pick_connection([sam], host="host.docker.internal:9090") is None  # another model's only connection
    assert pick_connection([sam, ours]) == "SegGPT"  # `seggpt labelstudio predict`: what `serve` answered
    assert pick_connection([sam, dict(ours, model_version="")]) is None
    assert pick_connection([ours, dict(ours, title="SegGPT 2")], host="host.docker.internal:9090") is None
    assert pick_connection([{"title": None}, "junk", {}], host="x") is None


def test_an_older_state_file_gains_the_connection_name(tmp_path):
    import sqlite3

    from seggpt_plugins.labelstudio.state import SqliteState

    db = sqlite3.connect(tmp_path / "projects.sqlite3")
    db.execute("CREATE TABLE projects (id INTEGER PRIMARY KEY, params TEXT NOT NULL DEFAULT '{}', hostname TEXT, "
               "access_token TEXT, generation INTEGER NOT NULL DEFAULT 0)")
    db.execute("INSERT INTO projects (id, params, generation) VALUES (7, '{\"max_prompts\": 3}', 2)")
    db.commit()
    db.close()
    state = SqliteState(str(tmp_path))
    record = state.get(7)
    assert record.params == {"max_prompts": 3} and record.generation == 2 and record.name is None
    state.set_name(7, "SegGPT")
    assert state.get(7).name == "SegGPT" and SqliteState(str(tmp_path)).get(7).params == {"max_prompts": 3}


def test_predict_brush_from_the_projects_annotated_tasks(make_client, fake_ls, tiles):
    client = make_client(label_studio_url=fake_ls.url, api_key=LEGACY_TOKEN)
    references = [fake_ls.add_task(7, tiles[k], annotation_result=[brush_region(tiles[k]["nuclei"], "Nucleus")])
                  for k in (0, 2)]
    targets = [fake_ls.add_task(7, tiles[k]) for k in (5, 6, 9)]
    fake_ls.add_task(8, tiles[1], annotation_result=[brush_region(tiles[1]["nuclei"], "Nucleus")])  # another project
    version = client.post("/setup", json=setup_body()).json["model_version"]
    assert "-r2-" in version
    tasks = targets + references
    response = client.post("/predict", json=predict_body(tasks))
    assert response.status_code == 200, response.json
    results = response.json["results"]
    assert len(results) == len(tasks) and response.json["model_version"] == version
    assert results[3:] == [[], []]  # a reference task is never predicted (not even from the other references)
    ious = []
    for task, item, k in zip(targets, results, (5, 6, 9)):
        assert item["model_version"] == version and 0 < item["score"] <= 1
        (region,) = item["result"]  # one region: only Nucleus is in the references
        assert region["value"]["brushlabels"] == ["Nucleus"] and region["from_name"] == "tag"
        mask = decode_brush(region)
        assert mask.shape == tiles[k]["nuclei"].shape
        ious.append(iou(mask, tiles[k]["nuclei"]))
    assert np.mean(ious) > 0.35, ious  # real nuclei found, not noise (the demo model reaches about 0.5-0.7)
    # the references were listed and downloaded once for the whole batch, and cached
    stats = client.get("/metrics").json
    assert stats["image_cache"]["items"] == 2 and stats["counters"]["tasks_predicted"] == len(targets)
    assert stats["counters"]["reference_tasks_not_predicted"] == 2
    downloads = [p for p, _ in fake_ls.requests if p.startswith("/data/upload/7/tile_0_0")]
    client.post("/predict", json=predict_body(targets[:1]))
    assert [p for p, _ in fake_ls.requests if p.startswith("/data/upload/7/tile_0_0")] == downloads


def test_predict_several_labels_keep_their_names_and_the_chosen_references(make_client, fake_ls, tiles):
    client = make_client(label_studio_url=fake_ls.url, api_key=LEGACY_TOKEN, max_prompts=1)
    # "Nucleus" for nuclei, "Debris" for a fixed block: both labels in every reference
    block = np.zeros((128, 128), bool)
    block[:24, :24] = True

    def regions(k):
        return [brush_region(tiles[k]["nuclei"] & ~block, "Nucleus"), brush_region(block, "Debris")]

    for k in (0, 3, 12):
        fake_ls.add_task(7, tiles[k], annotation_result=regions(k))
    targets = [fake_ls.add_task(7, tiles[k]) for k in (5, 10)]
    client.post("/setup", json=setup_body(extra_params={"reference_task_ids": [1, 2]}))
    response = client.post("/predict", json=predict_body(targets))
    assert response.status_code == 200, response.json
    for item in response.json["results"]:
        names = {r["value"]["brushlabels"][0] for r in item["result"]}
        assert names <= {"Nucleus", "Debris"} and "Nucleus" in names
        assert all(0 <= r["score"] <= 1 for r in item["result"])
    assert "-r2-" in response.json["model_version"]  # reference_task_ids: only tasks 1 and 2


def test_predict_with_spatial_ensemble_and_tiles(make_client, fake_ls, tiles, monkeypatch):
    """extra_params ensemble, tile and halo (issue 14) reach prepare_prompts and segment."""
    from seggpt_plugins.engine import SegGPT
    from seggpt_plugins.runner import Runner

    calls = []
    for owner, name in ((SegGPT, "prepare_prompts"), (Runner, "__init__")):
        original = getattr(owner, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            calls.append((_name, {k: kwargs[k] for k in ("ensemble", "tile", "halo") if k in kwargs}))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(owner, name, spy)
    client = make_client(label_studio_url=fake_ls.url, api_key=LEGACY_TOKEN, max_prompts=2)
    for k in (0, 3):
        fake_ls.add_task(7, tiles[k], annotation_result=[brush_region(tiles[k]["nuclei"], "Nucleus")])
    target = fake_ls.add_task(7, tiles[5])
    plain = client.post("/setup", json=setup_body()).json["model_version"]
    setup = client.post("/setup", json=setup_body(extra_params={"ensemble": "spatial", "tile": 64, "halo": 8}))
    assert setup.status_code == 200 and setup.json["model_version"] != plain
    response = client.post("/predict", json=predict_body([target]))
    assert response.status_code == 200, response.json
    assert ("prepare_prompts", {"ensemble": "spatial", "tile": (64, 64)}) in calls  # examples cut as targets are
    assert ("__init__", {"ensemble": "spatial", "tile": 64, "halo": 8}) in calls
    (item,) = response.json["results"]
    view = parse_label_config(BRUSH_CONFIG).views[0]
    mask = annotation_to_mask(item["result"], view, (128, 128))
    assert mask.shape == (128, 128) and iou(mask > 0, tiles[5]["nuclei"]) > 0.2  # small tiles: rougher

    calls.clear()
    client.post("/setup", json=setup_body(extra_params={"ensemble": "both", "tile": "auto"}))
    response = client.post("/predict", json=predict_body([target]))
    assert response.status_code == 200 and response.json["results"][0]["result"]
    assert ("prepare_prompts", {"ensemble": "both", "tile": "auto"}) in calls
    assert ("__init__", {"ensemble": "both", "tile": "auto", "halo": 32}) in calls
    bad = client.post("/setup", json=setup_body(extra_params={"tile": 40, "halo": 20}))
    assert bad.status_code == 400 and "halo" in bad.json["error"]


@pytest.mark.parametrize("extra, message", [
    ({"ensemble": "mean"}, "extra_params.ensemble must be one of 'feature', 'spatial', 'both'"),
    ({"tile": "big"}, "extra_params.tile must be 'auto' or a number of pixels"),
    ({"tile": 1}, "extra_params.tile must be 'auto' or a number of pixels"),
    ({"tile": True}, "extra_params.tile must be"),
    ({"tile": [64, 64]}, "extra_params.tile must be"),
    ({"halo": -1}, "extra_params.halo must be an integer >= 0"),
    ({"halo": 2.5}, "extra_params.halo must be"),
    ({"tile": 48}, "extra_params.tile/halo: a 48x48 tile with a halo of 32 leaves no core"),
    ({"tile": 64, "halo": 40}, "leaves no core"),
])
def test_ensemble_and_tile_params_are_checked(extra, message):
    with pytest.raises(RequestError, match=message) as caught:
        check_params(extra)
    assert "\n" not in str(caught.value)


def test_ensemble_and_tile_defaults_from_the_environment(monkeypatch):
    assert (Settings().ensemble, Settings().tile, Settings().halo) == ("feature", None, 32)
    monkeypatch.setenv("SEGGPT_ENSEMBLE", "spatial")
    monkeypatch.setenv("SEGGPT_TILE", "auto")
    monkeypatch.setenv("SEGGPT_HALO", "8")
    settings = Settings.from_env()
    assert (settings.ensemble, settings.tile, settings.halo) == ("spatial", "auto", 8)
    monkeypatch.setenv("SEGGPT_TILE", "0")
    assert Settings.from_env().tile is None
    monkeypatch.setenv("SEGGPT_TILE", "12")
    with pytest.raises(ValueError, match="SEGGPT_TILE/SEGGPT_HALO: a 12x12 tile with a halo of 8 leaves no core"):
        Settings.from_env()
    monkeypatch.setenv("SEGGPT_TILE", "512")
    monkeypatch.setenv("SEGGPT_ENSEMBLE", "mean")
    with pytest.raises(ValueError, match="ensemble must be one of"):
        Settings.from_env()


def test_quality_full_scores_the_predictions_with_the_mirrored_image_too(make_client, fake_ls, tiles, monkeypatch):
    assert Settings().quality == "fast"
    monkeypatch.setenv("SEGGPT_QUALITY", "full")
    assert Settings.from_env().quality == "full"
    monkeypatch.setenv("SEGGPT_QUALITY", "best")
    with pytest.raises(ValueError, match="SEGGPT_QUALITY must be fast or full, got 'best'"):
        Settings.from_env()
    for k in (0, 2):
        fake_ls.add_task(7, tiles[k], annotation_result=[brush_region(tiles[k]["nuclei"], "Nucleus")])
    targets = [fake_ls.add_task(7, tiles[k]) for k in (5, 6, 9)]
    scores = {}
    for quality in ("fast", "full"):
        client = make_client(label_studio_url=fake_ls.url, api_key=LEGACY_TOKEN, quality=quality)
        response = client.post("/predict", json=predict_body(targets))
        assert response.status_code == 200, response.json
        scores[quality] = [item["score"] for item in response.json["results"]]
        assert all(0 < score < 1 for score in scores[quality]), scores
    assert scores["full"] != scores["fast"]  # another estimate: the full one reads the mirrored image's agreement


def test_ensemble_and_tile_params_accepted():
    assert check_params({"ensemble": "spatial", "tile": 256, "halo": 16}) == {"ensemble": "spatial", "tile": 256,
                                                                             "halo": 16}
    assert check_params({"tile": "auto"}) == {"tile": "auto"} and check_params({"ensemble": "both"}) == {
        "ensemble": "both"}
    assert check_params({"halo": 0}) == {"halo": 0}


def test_predict_polygons_and_both_controls(make_client, fake_ls, tiles):
    client = make_client(label_studio_url=fake_ls.url, api_key=LEGACY_TOKEN)
    outline = [{"from_name": "outline", "to_name": "img", "type": "polygonlabels", "original_width": 128,
                "original_height": 128, "image_rotation": 0, "value": r["value"]}
               for r in regions_of(tiles[0]["nuclei"].astype(np.uint8), np.ones((128, 128), np.float32),
                                              parse_label_config(POLYGON_CONFIG).views[0])]
    fake_ls.add_task(7, tiles[0], key="picture", annotation_result=outline)
    target = fake_ls.add_task(7, tiles[5], key="picture")
    response = client.post("/predict", json=predict_body([target], POLYGON_CONFIG))
    assert response.status_code == 200, response.json
    (item,) = response.json["results"]
    assert len(item["result"]) > 3
    view = parse_label_config(POLYGON_CONFIG).views[0]
    assert all(r["type"] == "polygonlabels" and r["value"]["polygonlabels"] == ["Nucleus"] for r in item["result"])
    assert iou(annotation_to_mask(item["result"], view, (128, 128)) > 0, tiles[5]["nuclei"]) > 0.3

    both = make_client(label_studio_url=fake_ls.url, api_key=LEGACY_TOKEN)
    ref = fake_ls.add_task(9, tiles[0], annotation_result=[brush_region(tiles[0]["nuclei"], "Edge")])
    target = fake_ls.add_task(9, tiles[5])
    both.post("/setup", json=setup_body(BOTH_CONFIG, project="9.1"))
    (item, own) = both.post("/predict", json=predict_body([target, ref], BOTH_CONFIG, project="9.1")).json["results"]
    assert {r["from_name"] for r in item["result"]} == {"tag"} and own == []  # a reference: no prediction
    both.post("/setup", json=setup_body(BOTH_CONFIG, project="9.1", extra_params={"prefer": "polygon"}))
    (item, _) = both.post("/predict", json=predict_body([target, ref], BOTH_CONFIG, project="9.1")).json["results"]
    assert {r["from_name"] for r in item["result"]} == {"poly"}


def test_no_annotated_task_gives_no_prediction_and_says_why(make_client, fake_ls, tiles, caplog):
    """Nothing to predict from: no prediction at all (Label Studio asks again for a task without one), not an
    empty one that would keep the task from ever being predicted."""
    client = make_client(label_studio_url=fake_ls.url, api_key=LEGACY_TOKEN)
    tasks = [fake_ls.add_task(7, tiles[k]) for k in (1, 2)]
    caplog.set_level(logging.INFO, logger="seggpt_plugins.labelstudio")
    response = client.post("/predict", json=predict_body(tasks))
    assert response.status_code == 200
    assert response.json["results"] == [[], []]
    assert "no annotated task yet" in caplog.text and "Annotate at least one task" in caplog.text
    # references none of whose regions is on a label of the config: nothing to predict from either
    fake_ls.add_task(7, tiles[0], annotation_result=[brush_region(tiles[0]["nuclei"], "Unknown")])
    client.post("/setup", json=setup_body())
    response = client.post("/predict", json=predict_body(tasks))
    assert response.status_code == 200 and "-r1-" in response.json["model_version"]
    assert response.json["results"] == [[], []]


def test_webhooks_keep_the_references_up_to_date(make_client, tiles):
    """Without API access the references are what webhooks brought; images from the task's own host."""
    other = FakeLabelStudio().start()
    try:
        for k in (0, 2, 5):
            other.files[tiles[k]["name"]] = tiles[k]["png"]
        client = make_client(allowed_hosts=(other.url.split("//")[1],))  # an image server on loopback
        task = lambda i, k: {"id": i, "project": 7, "data": {"image": f"{other.url}/public/{tiles[k]['name']}"}}  # noqa
        target = task(3, 5)
        first = client.post("/predict", json=predict_body([target])).json
        assert first["results"] == [[]]
        annotation = {"id": 50, "task": 1, "project": 7, "result": [brush_region(tiles[0]["nuclei"], "Nucleus")],
                      "was_cancelled": False, "ground_truth": False, "updated_at": "2026-01-01T00:00:00Z"}
        payload = {"action": "ANNOTATION_CREATED", "annotation": annotation, "task": task(1, 0),
                   "project": {"id": 7, "label_config": BRUSH_CONFIG}}
        response = client.post("/webhook", json=payload)
        assert response.status_code == 201 and "1 reference" in response.json["references"]
        second = client.post("/predict", json=predict_body([target])).json
        assert second["model_version"] != first["model_version"] and "-r1-" in second["model_version"]
        (region,) = second["results"][0]["result"]
        assert iou(decode_brush(region), tiles[5]["nuclei"]) > 0.3
        updated = dict(annotation, updated_at="2026-01-02T00:00:00Z",
                       result=[brush_region(tiles[0]["nuclei"][::-1], "Nucleus")])
        client.post("/webhook", json=dict(payload, action="ANNOTATION_UPDATED", annotation=updated))
        third = client.post("/predict", json=predict_body([target])).json
        assert third["model_version"] not in (first["model_version"], second["model_version"])
        response = client.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 50}],
                                                 "project": {"id": 7}})
        assert response.status_code == 201 and "1 reference(s) removed" in response.json["references"]
        assert client.post("/predict", json=predict_body([target])).json["model_version"] == first["model_version"]
        assert client.post("/webhook", json={"action": "TASKS_CREATED", "tasks": []}).status_code == 200
        for bad in [{"annotation": {}}, {"action": ""}, {"action": "ANNOTATION_CREATED", "annotation": {}}]:
            response = client.post("/webhook", json=bad)
            assert response.status_code == 400 and response.json["error"]
        # the task's own host never saw a key
        assert all(auth is None for _, auth in other.requests)
    finally:
        other.stop()


@pytest.mark.parametrize("body, status, message", [
    (None, 400, "must be JSON"),
    ([1, 2], 400, "JSON object"),
    ({"tasks": [], "project": "7.1", "label_config": BRUSH_CONFIG}, 400, "non-empty list"),
    ({"tasks": {"id": 1}, "project": "7.1", "label_config": BRUSH_CONFIG}, 400, "non-empty list"),
    ({"tasks": [1, 2], "project": "7.1", "label_config": BRUSH_CONFIG}, 400, "task object"),
    ({"tasks": [{"id": 1, "data": {}}], "project": "7.1"}, 400, "label_config"),
    ({"tasks": [{"id": 1, "data": {}}], "project": "seven", "label_config": BRUSH_CONFIG}, 400, "project"),
    ({"tasks": [{"id": 1, "data": {}}], "project": "7.1", "label_config": "<View>"}, 422, "not a valid"),
    ({"tasks": [{"id": 1, "data": {}}], "project": "7.1",
      "label_config": "<View><Image name='i' value='$i'/><Choices name='c' toName='i'><Choice value='a'/></Choices>"
                      "</View>"}, 422, "BrushLabels"),
])
def test_bad_predict_requests_get_4xx_with_a_message(make_client, body, status, message):
    client = make_client()
    if body is None:
        response = client.post("/predict", data="tasks=1", content_type="application/x-www-form-urlencoded")
    else:
        response = client.post("/predict", json=body)
    assert response.status_code == status and message in response.json["error"], response.json


def test_unknown_routes_and_methods_answer_json(make_client):
    client = make_client()
    assert client.get("/nope").status_code == 404 and client.get("/nope").json["error"]
    assert client.get("/predict").status_code == 405 and client.get("/predict").json["error"]


def test_bad_task_images_do_not_sink_the_batch(make_client, fake_ls, tiles, caplog):
    client = make_client(label_studio_url=fake_ls.url, api_key=LEGACY_TOKEN)
    fake_ls.add_task(7, tiles[0], annotation_result=[brush_region(tiles[0]["nuclei"], "Nucleus")])
    good = fake_ls.add_task(7, tiles[5])
    caplog.set_level(logging.WARNING, logger="seggpt_plugins.labelstudio")
    tasks = [{"id": 90, "data": {"image": "/etc/passwd"}}, good, {"id": 91, "data": {"picture": "x"}},
             {"id": 92, "data": {"image": "/data/upload/7/missing.png"}}]
    results = client.post("/predict", json=predict_body(tasks)).json["results"]
    assert len(results) == 4 and results[0] == [] and results[2] == [] and results[3] == []
    assert results[1]["result"] and results[1]["result"][0]["value"]["brushlabels"] == ["Nucleus"]
    assert "task 90 gets no prediction" in caplog.text and "no 'image' field" in caplog.text


def test_a_call_stays_inside_its_time_budget(make_client, fake_ls, tiles, caplog):
    client = make_client(label_studio_url=fake_ls.url, api_key=LEGACY_TOKEN, batch_size=1, predict_timeout=3.0,
                         refresh_seconds=1e6)
    fake_ls.add_task(7, tiles[0], annotation_result=[brush_region(tiles[0]["nuclei"], "Nucleus")])
    tasks = [fake_ls.add_task(7, tiles[k % 16]) for k in range(1, 80)]
    assert client.post("/predict", json=predict_body(tasks[:1])).status_code == 200  # references listed and cached
    caplog.set_level(logging.WARNING, logger="seggpt_plugins.labelstudio")
    started = time.monotonic()
    results = client.post("/predict", json=predict_body(tasks)).json["results"]
    assert time.monotonic() - started < 10  # the budget plus at most about one batch
    done = [r for r in results if isinstance(r, dict)]
    assert len(results) == len(tasks) and 0 < len(done) < len(tasks)
    assert all(r == [] for r in results[len(done):])  # the rest: no prediction now, done by the next retrieval
    assert "Retrieve predictions" in caplog.text and "ML_TIMEOUT_PREDICT" in caplog.text


def test_basic_auth(make_client):
    client = make_client(basic_auth_user="ls", basic_auth_pass="s3cret")
    response = client.get("/health")
    assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Basic")
    assert "basic auth" in response.json["error"]
    good = {"Authorization": "Basic " + base64.b64encode(b"ls:s3cret").decode()}
    bad = {"Authorization": "Basic " + base64.b64encode(b"ls:wrong").decode()}
    assert client.get("/health", headers=good).status_code == 200
    assert client.get("/health", headers=bad).status_code == 401
    assert client.post("/predict", json={}, headers={"Authorization": "Basic !!"}).status_code == 401


def test_train_and_versions_endpoints(make_client):
    client = make_client()
    assert client.post("/train", json={"project": "7.1"}).status_code == 201
    assert client.get("/versions", json={"project": "7.1"}).json["versions"][0].endswith("norefs")


def test_model_loading_is_reported_by_health(demo_model):
    settings = Settings(model="no/such-model-anywhere", device="cpu")
    services = Services(settings)
    client = create_app(settings, services, load_model=True).test_client()
    deadline = time.monotonic() + 60
    while client.get("/health").json["model_status"] == "LOADING" and time.monotonic() < deadline:
        time.sleep(0.1)
    response = client.get("/health")
    assert response.status_code == 500 and response.json["status"] == "ERROR" and response.json["error"]
    response = client.post("/predict", json=predict_body([{"id": 1, "data": {"image": "/data/upload/1/a.png"}}]))
    assert response.status_code == 503 and "failed to load" in response.json["error"]


def test_params_and_project_ids():
    assert parse_project_id("12.1700000000") == 12 and parse_project_id(5) == 5
    for bad in ("", "x", None, True, "1;2"):
        with pytest.raises(RequestError):
            parse_project_id(bad)
    assert check_params('{"reference_task_ids": [3, 1, 3], "max_prompts": 2}') == {"reference_task_ids": [1, 3],
                                                                                  "max_prompts": 2}
    assert check_params(None) == {} and check_params("") == {}


def test_settings_read_the_environment(monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://ls:8080")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "abc")
    monkeypatch.setenv("SEGGPT_MODEL", "some/model")
    monkeypatch.setenv("BASIC_AUTH_USER", "u")
    monkeypatch.setenv("BASIC_AUTH_PASS", "p")
    settings = Settings.from_env(model="flag/model")
    assert (settings.label_studio_url, settings.api_key, settings.model) == ("http://ls:8080", "abc", "flag/model")
    assert settings.public()["api_key"] == "***" and "abc" not in repr(settings)
    monkeypatch.setenv("BASIC_AUTH_PASS", "")
    with pytest.raises(ValueError, match="both a user and a password"):
        Settings.from_env()
    monkeypatch.setenv("LABEL_STUDIO_URL", "ls:8080")
    with pytest.raises(ValueError, match="http"):
        Settings.from_env(basic_auth_pass="p")
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://ls:8080")
    monkeypatch.setenv("SEGGPT_QUANTIZE", "int8")
    assert Settings.from_env(basic_auth_pass="p").quantize == "int8"
    monkeypatch.setenv("SEGGPT_QUANTIZE", "int4")
    with pytest.raises(ValueError, match="SEGGPT_QUANTIZE must be int8 \\(or unset\\), got 'int4'"):
        Settings.from_env(basic_auth_pass="p")
    monkeypatch.setenv("SEGGPT_QUANTIZE", "int8")
    monkeypatch.setenv("SEGGPT_ADAPT_STEPS", "20")
    assert Settings.from_env(basic_auth_pass="p").adapt_steps == 20
    assert Settings.from_env(basic_auth_pass="p", adapt_steps=5).adapt_steps == 5  # the flag wins
    with pytest.raises(ValueError, match="adapt_steps must be >= 1, got 0"):
        Settings.from_env(basic_auth_pass="p", adapt_steps=0)
    monkeypatch.delenv("SEGGPT_QUANTIZE")
    with pytest.raises(ValueError, match="SEGGPT_DTYPE must be float32, bfloat16 or float16, got 'int8'"):
        Settings.from_env(basic_auth_pass="p", dtype="int8")


def test_cli_is_light_and_registered():
    code = ("import sys, argparse, seggpt_plugins.labelstudio.cli as c; "
            "p = argparse.ArgumentParser(); c.register(p.add_subparsers(dest='command')); "
            "a = p.parse_args(['labelstudio', 'serve', '--port', '9191']); "
            "heavy = [m for m in ('flask', 'torch', 'label_studio_sdk', 'gunicorn') if m in sys.modules]; "
            "print(a.port, a.host, a.workers, a.handler.__name__, heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["9191", "127.0.0.1", "1", "cmd_serve", "[]"]
    seggpt = Path(sys.executable).with_name("seggpt")
    if seggpt.exists():
        started = time.monotonic()
        out = subprocess.run([str(seggpt), "labelstudio", "serve", "--help"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "--label-studio-url" in out.stdout and "LABEL_STUDIO_API_KEY" in out.stdout
        assert time.monotonic() - started < 10


def test_workers_share_project_settings_and_webhook_generations(make_client, fake_ls, tiles, tmp_path):
    """Two workers (two apps on one state directory): /setup and /webhook reach one, /predict the other."""
    a = make_client(label_studio_url=fake_ls.url, api_key=LEGACY_TOKEN, state_dir=str(tmp_path),
                    refresh_seconds=1e6)
    b = make_client(label_studio_url=fake_ls.url, api_key=LEGACY_TOKEN, state_dir=str(tmp_path),
                    refresh_seconds=1e6)
    for k in (0, 2):
        fake_ls.add_task(7, tiles[k], annotation_result=[brush_region(tiles[k]["nuclei"], "Nucleus")])
    target = fake_ls.add_task(7, tiles[5])
    assert a.post("/setup", json=setup_body(extra_params={"reference_task_ids": [1]})).status_code == 200
    first = b.post("/predict", json=predict_body([target])).json
    assert "-r1-" in first["model_version"]  # B uses the reference_task_ids that A's /setup stored
    listings = fake_ls.listings
    assert b.post("/predict", json=predict_body([target])).json["model_version"] == first["model_version"]
    assert fake_ls.listings == listings  # a fresh listing is reused
    a.post("/setup", json=setup_body(extra_params=None))
    fake_ls.annotate(3, [brush_region(tiles[5]["nuclei"], "Nucleus")])
    hook = {"action": "ANNOTATION_CREATED", "project": {"id": 7}, "task": fake_ls.tasks[3],
            "annotation": fake_ls.tasks[3]["annotations"][0]}
    assert a.post("/webhook", json=hook).status_code == 201
    second = b.post("/predict", json=predict_body([target])).json
    assert fake_ls.listings > listings and "-r3-" in second["model_version"]
    assert second["results"] == [[]]  # task 3 is a reference now: a reference is never predicted


def test_unauthenticated_webhooks_only_trigger_a_new_listing(make_client, fake_ls, tiles):
    client = make_client(label_studio_url=fake_ls.url, api_key=LEGACY_TOKEN, basic_auth_user="u",
                         basic_auth_pass="p", refresh_seconds=1e6)
    auth = {"Authorization": "Basic " + base64.b64encode(b"u:p").decode()}
    target = fake_ls.add_task(7, tiles[5])
    fake_ls.add_task(7, tiles[0], annotation_result=[brush_region(tiles[0]["nuclei"], "Nucleus")])
    before = client.post("/predict", json=predict_body([target]), headers=auth).json["model_version"]
    forged = {"action": "ANNOTATION_CREATED", "project": {"id": 7},
              "task": {"id": 99, "data": {"image": "http://127.0.0.1:9/x.png"}},
              "annotation": {"id": 5, "task": 99, "result": [brush_region(tiles[1]["nuclei"], "Nucleus")]}}
    response = client.post("/webhook", json=forged)  # as Label Studio's own ML webhook: no credentials
    assert response.status_code == 201 and "payload not used" in response.json["references"]
    listings = fake_ls.listings
    after = client.post("/predict", json=predict_body([target]), headers=auth).json["model_version"]
    assert fake_ls.listings == listings + 1 and after == before  # listed again; the forged task is not a reference
    response = client.post("/webhook", json=forged, headers=auth)
    assert response.status_code == 201 and "1 reference" in response.json["references"]


def test_model_version_names_the_model_and_changes_with_it(demo_model, model64):
    demo = Services(Settings(model="demo"), model=demo_model).model_tag
    other = Services(Settings(model="demo"), model=model64).model_tag
    assert demo.startswith("demo-") and other != demo
    assert Services(Settings(model="demo"), model=demo_model).model_tag == demo  # stable for the same weights


def test_oversized_requests_are_refused(make_client):
    client = make_client(max_request_mb=0.01)
    response = client.post("/predict", data=json.dumps({"tasks": ["x" * 20000]}), content_type="application/json")
    assert response.status_code == 413 and "SEGGPT_MAX_REQUEST_MB" in response.json["error"]


# ------------------------------------------------------------------------- issue 12: secrets and SSRF


def _serve(*args, env=None, timeout=60):
    """`seggpt labelstudio serve ...` as a subprocess that is expected to refuse to start."""
    import os

    seggpt = Path(sys.executable).with_name("seggpt")
    command = [str(seggpt)] if seggpt.exists() else [sys.executable, "-m", "seggpt_plugins.cli"]
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_"))}
    environment.update(env or {})
    return subprocess.run(command + ["labelstudio", "serve", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=environment)


def test_the_configured_key_never_goes_to_a_host_the_operator_did_not_name(make_client, fake_ls, tiles):
    with pytest.raises(ValueError, match="LABEL_STUDIO_URL"):
        Settings(api_key=LEGACY_TOKEN).check()
    refused = _serve("--port", "9", env={"LABEL_STUDIO_API_KEY": LEGACY_TOKEN})
    assert refused.returncode == 2 and refused.stdout == ""
    assert len(refused.stderr.strip().splitlines()) == 1 and "LABEL_STUDIO_URL" in refused.stderr
    # configured URL and key: a /setup that names another host and token changes nothing about where they go
    fake_ls.add_task(7, tiles[0], annotation_result=[brush_region(tiles[0]["nuclei"], "Nucleus")])
    client = make_client(label_studio_url=fake_ls.url, api_key=LEGACY_TOKEN)
    body = dict(setup_body(), hostname=fake_ls.other.url, access_token="attacker-token")
    assert "-r1-" in client.post("/setup", json=body).json["model_version"]
    assert fake_ls.other.requests == [] and all(auth == f"Token {LEGACY_TOKEN}" for _, auth in fake_ls.requests)
    # no configured key: the caller's own token goes to the caller's URL only if it is a public or allowed host
    fake_ls.requests.clear()
    client = make_client()
    body = dict(setup_body(), hostname=fake_ls.url, access_token=LEGACY_TOKEN)
    assert client.post("/setup", json=body).json["model_version"].endswith("norefs")
    assert fake_ls.requests == []  # 127.0.0.1 is loopback: not reached
    client = make_client(allowed_hosts=(fake_ls.url.split("//")[1],))
    assert "-r1-" in client.post("/setup", json=body).json["model_version"]
    assert fake_ls.requests and all(auth == f"Token {LEGACY_TOKEN}" for _, auth in fake_ls.requests)


def test_task_images_never_reach_private_addresses_unless_allowed(fake_ls, tiles, monkeypatch):
    fake_ls.files["1/a.png"] = tiles[0]["png"]
    fake_ls.other.files["b.png"] = fake_ls.other.files["1/a.png"] = tiles[1]["png"]
    fetcher = MediaFetcher(fake_ls.url, LEGACY_TOKEN, max_bytes=1 << 20, max_pixels=1 << 20)
    assert np.array_equal(fetcher.fetch_image("/data/upload/1/a.png"), tiles[0]["gray"])  # Label Studio: allowed
    for url in [f"{fake_ls.other.url}/public/b.png", "http://169.254.169.254/latest/meta-data/x.png",
                "http://10.0.0.1/x.png", "http://[::1]:9/x.png", "http://0.0.0.0:9/x.png", "http://localhost:9/x.png",
                "http://[::ffff:127.0.0.1]:9/x.png", "http://100.64.0.1/x.png"]:
        with pytest.raises(MediaError, match="private, loopback or link-local|resolves to"):
            fetcher.fetch_image(url)
    with pytest.raises(MediaError, match="private, loopback or link-local"):  # a redirect to a private host
        fetcher.fetch_image("/data/upload/away/1/a.png")
    assert fake_ls.other.requests == []
    # the check is made again on the address connected to (a name that resolves differently the second time)
    monkeypatch.setattr(fetcher.policy, "check_url", lambda url: None)
    with pytest.raises(MediaError, match="download failed"):
        fetcher.fetch_image(f"{fake_ls.other.url}/public/b.png")
    assert fake_ls.other.requests == []
    # the allow-list: by host:port, by address, by network; from the environment and the flags
    other = fake_ls.other.url.split("//")[1]
    for allowed in ([other], ["127.0.0.1"], ["127.0.0.0/8"]):
        fetcher = MediaFetcher(fake_ls.url, LEGACY_TOKEN, max_bytes=1 << 20, max_pixels=1 << 20, allowed_hosts=allowed)
        assert np.array_equal(fetcher.fetch_image(f"{fake_ls.other.url}/public/b.png"), tiles[1]["gray"])
    assert all(auth is None for _, auth in fake_ls.other.requests)
    monkeypatch.setenv("SEGGPT_ALLOWED_HOSTS", f"{other}, images.internal")
    assert Settings.from_env(allowed_hosts=["10.0.0.0/8"]).allowed_hosts == (other, "images.internal", "10.0.0.0/8")


# -------------------------------------------------------------------------------- issue 12: memory


def test_request_bodies_are_bounded_per_route_before_parsing_or_auth(make_client, monkeypatch):
    client = make_client(max_request_mb=1.0, basic_auth_user="u", basic_auth_pass="p")
    parsed = []
    monkeypatch.setattr("flask.Request.get_json", lambda self, *a, **k: parsed.append(1))
    big = b"{" + b" " * (600 << 10) + b"}"  # 600 KB: under /predict's 1 MB, over /webhook's 256 KB
    for path, size in (("/webhook", len(big)), ("/setup", 2 << 20), ("/predict", 2 << 20), ("/train", 100 << 10)):
        response = client.post(path, data=b"{" + b" " * (size - 2) + b"}", content_type="application/json")
        assert response.status_code == 413 and "SEGGPT_MAX_REQUEST_MB" in response.json["error"], path
    assert parsed == []  # refused on Content-Length alone: nothing read, nothing parsed, no 401 first
    response = client.post("/predict", data=big, content_type="application/json")
    assert response.status_code == 401  # small enough: then credentials are asked for

    monkeypatch.undo()
    auth = {"Authorization": "Basic " + base64.b64encode(b"u:p").decode()}
    chunked = io.BytesIO(b"{" + b" " * (3 << 20) + b"}")  # no Content-Length (as chunked transfer encoding)
    response = client.post("/webhook", input_stream=chunked, content_type="application/json", headers=auth,
                           environ_overrides={"wsgi.input_terminated": True})
    assert response.status_code == 413 and "limit" in response.json["error"]


def test_decoded_pixels_are_bounded_per_request(make_client, fake_ls, tiles, caplog):
    # 128x128 tiles: the reference and 2 targets of a batch fit 3 x 16384 pixels; a batch of 4 does not
    client = make_client(label_studio_url=fake_ls.url, api_key=LEGACY_TOKEN, batch_size=4,
                         max_request_pixels=3 * 128 * 128)
    fake_ls.add_task(7, tiles[0], annotation_result=[brush_region(tiles[0]["nuclei"], "Nucleus")])
    tasks = [fake_ls.add_task(7, tiles[k]) for k in (5, 6, 9, 10)]
    caplog.set_level(logging.WARNING, logger="seggpt_plugins.labelstudio")
    results = client.post("/predict", json=predict_body(tasks)).json["results"]
    assert sum(isinstance(r, dict) and bool(r["result"]) for r in results) == 2 and results.count([]) == 2
    assert "SEGGPT_MAX_REQUEST_PIXELS" in caplog.text
    # batches of 2: the images of one batch are let go before the next is decoded
    client = make_client(label_studio_url=fake_ls.url, api_key=LEGACY_TOKEN, batch_size=2,
                         max_request_pixels=3 * 128 * 128)
    assert all(r["result"] for r in client.post("/predict", json=predict_body(tasks)).json["results"])


# --------------------------------------------------------------------- issue 12: unauthenticated control


def test_serving_beyond_loopback_needs_basic_auth_or_insecure():
    refused = _serve("--host", "192.0.2.1", "--port", "9")  # TEST-NET: never bound here, even if refusal broke
    assert refused.returncode == 2 and refused.stdout == ""
    assert len(refused.stderr.strip().splitlines()) == 1 and "BASIC_AUTH_USER" in refused.stderr
    assert "--insecure" in refused.stderr


def test_the_host_header_must_name_this_server(make_client):
    client = make_client(bind_host="127.0.0.1", server_names=("backend.lan",))
    for host in ("127.0.0.1:9090", "localhost:9090", "[::1]:9090", "backend.lan:9090", "backend.lan"):
        assert client.get("/health", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example:9090", "evil.example", "127.0.0.1.nip.io:9090"):  # DNS rebinding
        response = client.post("/setup", json=setup_body(), headers={"Host": host})
        assert response.status_code == 421 and "--server-name" in response.json["error"], host
    wildcard = make_client(bind_host="0.0.0.0", basic_auth_user="u", basic_auth_pass="p")
    assert wildcard.get("/health", headers={"Host": "any.name:9090"}).status_code == 401  # then auth decides


def test_webhook_payloads_are_not_prompts_unless_the_sender_is_authenticated(make_client, fake_ls, tiles):
    client = make_client(label_studio_url=fake_ls.url, api_key=LEGACY_TOKEN, refresh_seconds=1e6)
    target = fake_ls.add_task(7, tiles[5])
    fake_ls.add_task(7, tiles[0], annotation_result=[brush_region(tiles[0]["nuclei"], "Nucleus")])
    before = client.post("/predict", json=predict_body([target])).json["model_version"]
    forged = {"action": "ANNOTATION_CREATED", "project": {"id": 7},
              "task": {"id": 99, "data": {"image": "http://127.0.0.1:9/x.png"}},
              "annotation": {"id": 5, "task": 99, "result": [brush_region(tiles[1]["nuclei"], "Nucleus")]}}
    response = client.post("/webhook", json=forged)  # no basic auth configured: still not trusted
    assert response.status_code == 201 and "payload not used" in response.json["references"]
    listings = fake_ls.listings
    assert client.post("/predict", json=predict_body([target])).json["model_version"] == before
    assert fake_ls.listings == listings + 1  # what Label Studio says, not what the body said
    # exposed (--insecure on another address) and no Label Studio access: the payload is not used either
    exposed = make_client(bind_host="0.0.0.0")
    response = exposed.post("/webhook", json=forged, headers={"Host": "10.0.0.5:9090"})
    assert response.status_code == 201 and "payload not used" in response.json["references"]


# ---------------------------------------------------------------------------------- issue 12: time


class DrippingServer:
    """A raw HTTP server that sends one byte every `pause` seconds: its headers too (`part="headers"`) or
    only its body (a socket timeout restarts with every byte, so neither ever times out)."""

    def __init__(self, part: str, pause: float = 0.2):
        import socket

        self.part, self.pause = part, pause
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/image.png"
        self.closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        conn, _ = self.listener.accept()
        head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
        try:
            conn.recv(65536)
            if self.part == "body":
                conn.sendall(head)
            for byte in (head if self.part == "headers" else b"\x89" * 100000):
                conn.sendall(bytes([byte]))
                time.sleep(self.pause)
        except OSError:
            self.closed.set()  # the client hung up
        finally:
            conn.close()
            self.listener.close()


@pytest.mark.parametrize("part", ["headers", "body"])
def test_a_server_sending_one_byte_at_a_time_cannot_hold_a_download_past_its_deadline(part):
    """Issue 29, item 5: the deadline counts for the whole download, however the bytes come."""
    server = DrippingServer(part)
    fetcher = MediaFetcher(None, None, max_bytes=1 << 20, max_pixels=1 << 20, allowed_hosts=["127.0.0.1"])
    started = time.monotonic()
    with pytest.raises(OutOfTime, match="did not finish within the request's time budget"):
        fetcher.fetch_bytes(server.url, deadline=started + 1.0)
    assert time.monotonic() - started < 10.0  # (without the watchdog: 20 s for the headers, hours for the body)
    assert server.closed.wait(5.0)  # the connection is dropped, not left to drip on


def test_the_predict_deadline_covers_downloads_and_waiting_for_the_model(make_client, fake_ls, tiles):
    client = make_client(label_studio_url=fake_ls.url, api_key=LEGACY_TOKEN, predict_timeout=2.0,
                         refresh_seconds=1e6)
    fake_ls.add_task(7, tiles[0], annotation_result=[brush_region(tiles[0]["nuclei"], "Nucleus")])
    quick = [fake_ls.add_task(7, tiles[k]) for k in (5, 6)]
    assert all(r["result"] for r in client.post("/predict", json=predict_body(quick)).json["results"])
    # downloads that would take 20 s each: the call answers near its 2 s (bounded at 8 s: a loaded machine's
    # overhead, far from the 20 s it would take without the deadline)
    slow = [dict(t, data={"image": f"{fake_ls.url}/slow/{t['data']['image'].split('/data/upload/')[1]}"})
            for t in quick]
    fake_ls.slow_s = 20.0
    started = time.monotonic()
    response = client.post("/predict", json=predict_body(slow))
    assert response.status_code == 200 and response.json["results"] == [[], []]
    assert time.monotonic() - started < 8.0
    fake_ls.slow_s = 0.0
    # the model busy with other requests (for as long as the test holds it): the wait for it counts too
    lock = client.services.inference_lock
    lock.acquire()
    try:
        started = time.monotonic()
        response = client.post("/predict", json=predict_body(quick))
        assert response.status_code == 200 and response.json["results"] == [[], []]
        assert time.monotonic() - started < 8.0
    finally:
        lock.release()


# ---------------------------------------------------------------------------------- issue 12: state


def test_params_and_webhook_references_survive_a_restart(make_client, tiles, tmp_path):
    import os
    import stat

    other = FakeLabelStudio().start()
    try:
        for k in (0, 5):
            other.files[tiles[k]["name"]] = tiles[k]["png"]
        state = tmp_path / "state"
        allowed = (other.url.split("//")[1],)
        first = make_client(state_dir=str(state), allowed_hosts=allowed)
        task = lambda i, k: {"id": i, "project": 7, "data": {"image": f"{other.url}/public/{tiles[k]['name']}"}}  # noqa
        assert first.post("/setup", json=dict(setup_body(extra_params={"max_prompts": 1}), hostname=None,
                                              access_token="creator-token")).status_code == 200
        annotation = {"id": 50, "task": 1, "project": 7, "result": [brush_region(tiles[0]["nuclei"], "Nucleus")],
                      "was_cancelled": False, "ground_truth": False, "updated_at": "2026-01-01T00:00:00Z"}
        hook = {"action": "ANNOTATION_CREATED", "annotation": annotation, "task": task(1, 0), "project": {"id": 7}}
        assert "1 reference" in first.post("/webhook", json=hook).json["references"]
        before = first.post("/predict", json=predict_body([task(3, 5)])).json
        # the process is gone; a new one on the same state directory
        second = make_client(state_dir=str(state), allowed_hosts=allowed)
        after = second.post("/predict", json=predict_body([task(3, 5)])).json
        assert after["model_version"] == before["model_version"] and "-r1-" in after["model_version"]
        assert after["results"][0]["result"]
        record = second.services.state.get(7)
        assert record.params == {"max_prompts": 1} and record.access_token == "creator-token"
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(state / "projects.sqlite3").st_mode) == 0o600
    finally:
        other.stop()


def test_serve_keeps_health_fast_drains_on_sigterm_and_keeps_its_state(tiles, tmp_path):
    """The real `serve` (gunicorn): /health answers at once while every request thread waits on slow
    downloads; SIGTERM lets the in-flight /predict calls finish; the state directory stays."""
    import os
    import signal
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import requests

    images = FakeLabelStudio().start()
    images.slow_s = 4.0
    for k in (0, 5):
        images.files[tiles[k]["name"]] = tiles[k]["png"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state, log = tmp_path / "state", tmp_path / "serve.log"
    seggpt = Path(sys.executable).with_name("seggpt")
    command = [str(seggpt)] if seggpt.exists() else [sys.executable, "-m", "seggpt_plugins.cli"]
    command += ["labelstudio", "serve", "--port", str(port), "--threads", "2", "--model", "demo", "--device", "cpu",
                "--state-dir", str(state), "--allow-host", images.url.split("//")[1], "--predict-timeout", "20"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_"))}
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()[-3000:]
            try:  # the model loaded: its load (6.5 s on a loaded 2-core machine) is no part of what is timed here
                health = requests.get(f"{url}/health", timeout=2)
                if health.status_code == 200 and health.json()["model_status"] == "UP":
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        annotation = {"id": 50, "task": 1, "project": 7, "result": [brush_region(tiles[0]["nuclei"], "Nucleus")],
                      "was_cancelled": False, "ground_truth": False, "updated_at": "2026-01-01T00:00:00Z"}
        task = lambda i, k: {"id": i, "project": 7, "data": {"image": f"{images.url}/slow/{tiles[k]['name']}"}}  # noqa
        hook = {"action": "ANNOTATION_CREATED", "annotation": annotation, "task": task(1, 0), "project": {"id": 7}}
        assert requests.post(f"{url}/webhook", json=hook, timeout=10).status_code == 201
        with ThreadPoolExecutor(3) as pool:  # more slow calls than the worker has request threads
            calls = [pool.submit(requests.post, f"{url}/predict", json=predict_body([task(3 + k, 5)]), timeout=60)
                     for k in range(3)]
            time.sleep(1.0)
            worst = 0.0
            for _ in range(10):
                started = time.monotonic()
                assert requests.get(f"{url}/health", timeout=5).status_code == 200
                worst = max(worst, time.monotonic() - started)
            assert worst < 0.5, worst
            os.kill(process.pid, signal.SIGTERM)  # the gunicorn master: the workers drain
            answers = [c.result() for c in calls[:2]]
        assert all(a.status_code == 200 and a.json()["results"][0]["result"] for a in answers)
        assert process.wait(60) == 0
        text = log.read_text()
        assert "draining" in text and "stopped" in text
        assert (state / "projects.sqlite3").exists()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        images.stop()


# ---------------------------------------------------------------------------------- issue 12: minor


def test_odd_ids_are_4xx_or_one_failed_task_and_500s_say_nothing_internal(make_client, fake_ls, tiles, monkeypatch,
                                                                          caplog):
    client = make_client(label_studio_url=fake_ls.url, api_key=LEGACY_TOKEN)
    for project in ("9" * 30, "9" * 5000, 2 ** 70, "99999999999999999999.1"):
        with pytest.raises(RequestError):
            parse_project_id(project)
        assert client.post("/setup", json=setup_body(project=project)).status_code == 400
        assert client.post("/predict", json=predict_body([{"id": 1, "data": {}}], project=project)).status_code == 400
        response = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": project}})
        assert response.status_code == 400
    fake_ls.add_task(7, tiles[0], annotation_result=[brush_region(tiles[0]["nuclei"], "Nucleus")])
    good = fake_ls.add_task(7, tiles[5])
    odd = [{"id": [1, 2], "data": {"image": "s3://bucket/a.png"}}, {"id": {"x": 1}, "data": {"image": "gs://b/a.png"}},
           {"id": 10 ** 30, "data": {"image": "s3://bucket/a.png"}}]
    results = client.post("/predict", json=predict_body(odd + [good])).json["results"]
    assert results[:3] == [[], [], []] and results[3]["result"]
    hook = {"action": "ANNOTATIONS_DELETED", "project": {"id": 7}, "annotations": [{"id": [1]}, {"id": {"a": 1}}]}
    assert client.post("/webhook", json=hook).status_code == 201

    def broken(*args, **kwargs):
        raise RuntimeError("secret detail at /srv/internal/path")

    monkeypatch.setattr("seggpt_plugins.labelstudio.backend.SegGPTBackend.predict", broken)
    caplog.set_level(logging.ERROR, logger="seggpt_plugins.labelstudio")
    response = client.post("/predict", json=predict_body([good]))
    assert response.status_code == 500 and "secret" not in response.text and "RuntimeError" not in response.text
    assert "secret detail" in caplog.text  # the detail is logged
    response = client.post("/predict", json=predict_body([good], config="<View><Image name='i' value='$i'/>"))
    assert response.status_code == 422 and "not a valid" in response.json["error"] and "line" not in response.text
