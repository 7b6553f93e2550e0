"""Plane bookkeeping of the napari widget (pure numpy: no display, no model)."""

import numpy as np
import pytest

from seggpt_plugins.napari._export import plane_names
from seggpt_plugins.napari._stack import PlaneStack, accept_indices, annotated_planes, worst_first
from seggpt_plugins.prompts import nearest, spread


def test_plane_stack_reads_one_plane_along_the_chosen_axis():
    data = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)  # T Z Y X
    along_z = PlaneStack(data, leading=2, axis=1, position=(1, 0))
    assert len(along_z) == 3
    np.testing.assert_array_equal(along_z[2], data[1, 2])
    assert along_z.key(2) == (1, 2) and along_z.key(-1) == (1, 2)
    along_t = PlaneStack(data, leading=2, axis=0, position=(0, 2))
    assert len(along_t) == 2
    np.testing.assert_array_equal(along_t[1], data[1, 2])
    with pytest.raises(IndexError):
        along_t[2]
    flat = PlaneStack(data[0, 0], leading=0, axis=None, position=())
    assert len(flat) == 1 and flat.key(0) == ()
    np.testing.assert_array_equal(flat[0], data[0, 0])


def test_plane_stack_keeps_the_rgb_axis():
    data = np.zeros((3, 4, 5, 3), np.uint8)
    data[1, ..., 2] = 7
    stack = PlaneStack(data, leading=1, axis=0, position=(0,))
    assert stack[1].shape == (4, 5, 3) and stack[1][..., 2].min() == 7


def test_annotated_planes_numpy_and_lazy_agree():
    labels = np.zeros((2, 6, 4, 4), np.uint16)
    labels[1, 2, 0, 0] = 3
    labels[1, 5, 3, 3] = 1
    labels[0, 4, 1, 1] = 9  # another time point: not on this line
    stack = PlaneStack(labels, leading=2, axis=1, position=(1, 0))
    assert annotated_planes(stack) == [2, 5]

    class Lazy:  # an array-like that is not numpy (as dask or zarr)
        shape, dtype, ndim = labels.shape, labels.dtype, labels.ndim

        def __getitem__(self, key):
            return labels[key]

    assert annotated_planes(PlaneStack(Lazy(), 2, 1, (1, 0))) == [2, 5]
    assert annotated_planes(PlaneStack(labels, 2, 0, (0, 4))) == [0]


def test_prompt_choice_helpers():
    assert spread([1, 5, 9, 20, 30], 3) == [1, 9, 30]
    assert spread([4, 2], 5) == [2, 4]
    assert nearest([0, 10, 14, 30], 12, 2) == [10, 14]
    assert nearest([10, 14], 12, 1) == [10]  # tie: the lower


def test_accept_fills_only_empty_planes():
    dest = np.zeros((4, 3, 3), np.uint8)
    dest[1, 0, 0] = 5  # an annotated slice (only one pixel labelled)
    result = np.zeros_like(dest)
    result[0] = 2
    result[1] = 7  # a result on the annotated slice: must not be written
    result[3, 1, 1] = 4
    indices, values, planes = accept_indices(result, dest)
    out = dest.copy()
    out[indices] = values
    assert planes == 2
    np.testing.assert_array_equal(out[0], 2)
    np.testing.assert_array_equal(out[1], dest[1])
    assert out[3, 1, 1] == 4 and out[2].max() == 0


def test_accept_2d_and_shape_check():
    result = np.ones((3, 3), np.uint8)
    assert accept_indices(result, np.zeros((3, 3), np.uint8))[2] == 1
    annotated = np.zeros((3, 3), np.uint8)
    annotated[0, 0] = 1
    assert accept_indices(result, annotated)[2] == 0
    with pytest.raises(ValueError, match="differs"):
        accept_indices(result, np.zeros((3, 4), np.uint8))


def test_accept_only_the_run_planes():
    dest = np.zeros((4, 3, 3), np.uint8)
    result = np.ones_like(dest)
    indices, values, planes = accept_indices(result, dest, keys=[(0,), (2,)])
    out = dest.copy()
    out[indices] = values
    assert planes == 2 and np.any(out, axis=(1, 2)).tolist() == [True, False, True, False]
    assert accept_indices(np.ones((3, 3), np.uint8), np.zeros((3, 3), np.uint8), keys=[()])[2] == 1
    assert accept_indices(result, dest, keys=[])[2] == 0


def test_review_order_is_worst_first():
    assert worst_first([("a", 0.9), ("b", 0.2), ("c", 0.5), ("d", 0.2)]) == [
        ("b", 0.2), ("d", 0.2), ("c", 0.5), ("a", 0.9)]


def test_plane_names():
    assert plane_names("cells.tif", (8, 8)) == ["cells.tif"]
    assert plane_names("stack", (2, 8, 8), ("z", "y", "x")) == ["stack#z0", "stack#z1"]
    assert plane_names("movie", (1, 2, 8, 8), ("t", "z", "y", "x")) == ["movie#t0_z0", "movie#t0_z1"]
    assert plane_names("s", (2, 8, 8), ("0", "1", "2")) == ["s#0", "s#1"]


def test_export_label_tiffs_and_coco(tmp_path):
    """Label TIFFs as they are, and COCO that pycocotools reads: objects (each id one object of class
    'object') or classes (each id a class, its connected parts the objects)."""
    tifffile = pytest.importorskip("tifffile")
    coco_api = pytest.importorskip("pycocotools.coco")
    import json

    from seggpt_plugins.errors import InputError
    from seggpt_plugins.napari._export import LabelSet, export

    stack = np.zeros((2, 16, 16), np.uint16)
    stack[0, 1:4, 1:4] = 5
    stack[0, 8:12, 8:12] = 5  # class 5 twice: two objects
    stack[1, 2:6, 2:6] = 300
    sets = [LabelSet(stack, ["s#z0", "s#z1"], ["s.tif"])]
    paths = export(sets, tmp_path / "classes", objects=False)
    assert sorted(p.name for p in paths) == ["coco.json", "s.tif"]
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "classes" / "s.tif"), stack)
    coco = coco_api.COCO(str(tmp_path / "classes" / "coco.json"))
    assert sorted(c["id"] for c in coco.loadCats(coco.getCatIds())) == [5, 300]
    assert [len(coco.getAnnIds(imgIds=[i])) for i in coco.getImgIds()] == [2, 1]
    ann = coco.loadAnns(coco.getAnnIds(imgIds=[2]))[0]
    np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), stack[1] == 300)

    export([LabelSet(stack[0], ["a.png"], ["a_labels.tif"])], tmp_path / "objects", objects=True)
    data = json.loads((tmp_path / "objects" / "coco.json").read_text())
    assert [c["name"] for c in data["categories"]] == ["object"]
    assert [a["category_id"] for a in data["annotations"]] == [1]  # one id, one object
    with pytest.raises(InputError, match="exists"):
        export([LabelSet(stack[0], ["a.png"], ["a_labels.tif"])], tmp_path / "objects", objects=True)


def test_read_series(tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    from seggpt_plugins.errors import InputError
    from seggpt_plugins.napari._series import read_series

    for k, size in enumerate([(8, 6), (8, 6), (5, 5)]):
        Image.fromarray(np.full(size, k, np.uint8)).save(tmp_path / f"im{k}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    series = read_series(tmp_path)
    assert series.names == ["im0.png", "im1.png", "im2.png"] and not series.stackable
    (tmp_path / "im2.png").unlink()
    assert read_series(tmp_path).stackable
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        read_series(tmp_path / "empty")
