"""Plane bookkeeping of the napari widget (pure numpy: no display, no model)."""

import numpy as np
import pytest

from seggpt_plugins.napari._stack import PlaneStack, accept_indices, annotated_planes
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
