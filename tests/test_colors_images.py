"""Colour codes (palette, encode/decode, snapping) and image I/O (scaling, reading, atomic writes)."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from seggpt_plugins import InputError
from seggpt_plugins.colors import MAX_CLASSES, MIN_SEPARATION, ColorCode, palette, snap
from seggpt_plugins.images import distinct_values, read_image, scale_to_uint8, to_mask, to_rgb8
from seggpt_plugins.io import write_png, write_tiff


def test_palette_separation_and_limit():
    colors = palette(MAX_CLASSES).astype(float)
    distances = np.linalg.norm(colors[:, None] - colors[None], axis=-1) + np.eye(MAX_CLASSES) * 1e9
    assert distances.min() >= MIN_SEPARATION
    assert np.linalg.norm(colors, axis=1).min() >= MIN_SEPARATION  # all far from black (background)
    assert palette(1).tolist() == [[255, 255, 255]]
    with pytest.raises(InputError, match=f"{MAX_CLASSES}"):
        palette(MAX_CLASSES + 1)


def test_fewer_classes_get_wider_separation():
    for k in (2, 3, 8, 26):
        c = palette(k).astype(float)
        d = np.linalg.norm(c[:, None] - c[None], axis=-1) + np.eye(k) * 1e9
        assert d.min() > 100


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 2**31 - 1), min_size=1, max_size=40, unique=True), st.integers(0, 2**32 - 1))
def test_label_round_trip_through_colours(ids, seed):
    rng = np.random.default_rng(seed)
    labels = rng.choice(np.array([0] + ids, dtype=np.int64), size=(16, 16))
    code = ColorCode.from_masks([labels])
    rgb = code.encode(labels)
    assert rgb.dtype == np.uint8 and rgb.shape == (16, 16, 3)
    assert np.array_equal(code.labels_of_colors(rgb), labels)
    # snapping an exact painting gives the labels back with full confidence
    index, score = snap(torch.from_numpy(rgb).permute(2, 0, 1)[None].float(),
                        torch.from_numpy(code.all_colors)[None].float())
    assert np.array_equal(code.all_ids[index[0].numpy()], labels)
    assert torch.allclose(score, torch.ones_like(score))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 400), min_size=1, max_size=40, unique=True), st.integers(0, 2**32 - 1),
       st.sampled_from([np.uint8, np.uint16, np.int32, np.int64]))
def test_small_label_ids_round_trip_through_the_lookup_table(ids, seed, dtype):
    """Label ids under 65536 are looked up in a table (a bincount and a gather, not a sort): the same answer."""
    rng = np.random.default_rng(seed)
    ids = [i for i in ids if i <= np.iinfo(dtype).max] or [1]
    labels = rng.choice(np.array([0] + ids), size=(16, 16)).astype(dtype)
    assert np.array_equal(distinct_values(labels), np.unique(labels))
    values, counts = distinct_values(labels, return_counts=True)
    assert np.array_equal(counts, np.unique(labels, return_counts=True)[1])
    code = ColorCode.from_masks([labels])
    assert code.ids.tolist() == [int(i) for i in np.unique(labels) if i]  # the ids present, sorted
    assert np.array_equal(code.labels_of_colors(code.encode(labels)), labels)


def test_distinct_values_of_any_array_are_numpys():
    for values in (np.array([True, False, True]), np.array([[3, -2, 3]]), np.array([7.5, 1.0, 7.5]), np.zeros(0, int),
                   np.array([2**40, 1], np.int64), np.array([5], np.uint64)):
        assert np.array_equal(distinct_values(values), np.unique(values))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)), min_size=1, max_size=10))
def test_rgb_prompts_label_sorted_distinct_colours(colours):
    mask = np.array(colours, dtype=np.uint8).reshape(1, -1, 3)
    code = ColorCode.from_masks([mask])
    distinct = sorted({c for c in colours if c != (0, 0, 0)})
    assert [tuple(c) for c in code.colors.tolist()] == distinct
    assert code.ids.tolist() == list(range(1, len(distinct) + 1))
    assert np.array_equal(code.encode(mask), mask)


def test_snap_score_is_margin_between_two_nearest():
    colors = torch.tensor([[[0.0, 0, 0], [255, 255, 255]]])
    painting = torch.tensor([0.0, 127.5, 255, 63.75]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    index, score = snap(painting, colors)
    assert index[0, 0].tolist() == [0, 0, 1, 0]
    assert score[0, 0].tolist() == pytest.approx([1.0, 0.0, 1.0, 0.5], abs=1e-5)


def test_a_foreground_margin_gives_a_label_only_to_pixels_that_far_from_black():
    """favour_background: with margin m a pixel takes a label only when (d_black - d_label) / (d_black + d_label)
    >= m; between labels nothing changes (a model trained with its foreground weighted up paints blends)."""
    from seggpt_plugins.colors import color_distances, decide, favour_background

    colors = torch.tensor([[[0.0, 0, 0], [255, 255, 255], [255, 0, 0]]])
    # white at 3/4 (margin 0.5 from black), white at 19/20 (margin 0.9), a pinkish white (margin 0.84)
    painting = torch.tensor([[191.25, 191.25, 191.25], [242.25, 242.25, 242.25], [255, 230, 230]]).T.reshape(1, 3, 1, 3)
    distances = color_distances(painting, colors)
    assert decide(distances)[0][0, 0].tolist() == [1, 1, 1]
    assert decide(favour_background(distances, 0.4))[0][0, 0].tolist() == [1, 1, 1]
    assert decide(favour_background(distances, 0.7))[0][0, 0].tolist() == [0, 1, 1]
    assert decide(favour_background(distances, 0.95))[0][0, 0].tolist() == [0, 0, 0]
    assert torch.equal(favour_background(distances, 0.0), distances)  # 0: the plain nearest colour
    assert decide(favour_background(distances, 0.7))[0][0, 0, 2] == decide(distances)[0][0, 0, 2]  # labels unchanged


def test_the_margin_keeps_a_blend_of_two_labels_in_the_foreground(monkeypatch):
    """With several labels, a pixel painted between two of them is as far from each as from black: measured
    against the nearest blend of its two nearest labels (MARGIN_AGAINST_BLENDS) it stays foreground, with the
    nearest label; one label, or the rule off, measures against the label's colour as before."""
    from seggpt_plugins import colors as module
    from seggpt_plugins.colors import color_distances, decide, favour_background

    colors = torch.tensor([[[0.0, 0, 0], [255, 0, 0], [0, 255, 0]]])
    # red, red-green blend (leaning green), near-black, dark red (nearest red, 0.56 from black), darker red
    painting = torch.tensor([[255.0, 0, 0], [120, 135, 0], [40, 40, 0], [200, 10, 0], [60, 0, 0]]).T.reshape(1, 3, 1, 5)
    distances = color_distances(painting, colors)
    assert decide(distances)[0][0, 0].tolist() == [1, 2, 0, 1, 0]
    monkeypatch.setattr(module, "MARGIN_AGAINST_BLENDS", True)
    assert decide(favour_background(distances, 0.7, colors))[0][0, 0].tolist() == [1, 2, 0, 1, 0]
    assert decide(favour_background(distances, 0.95, colors))[0][0, 0].tolist() == [1, 2, 0, 0, 0]
    assert decide(favour_background(distances, 0.7))[0][0, 0].tolist() == [1, 0, 0, 0, 0]  # no colours: as before
    one = distances[:, :2]  # red alone: the blend rule has no second label
    assert torch.equal(favour_background(one, 0.7, colors[:, :2]), favour_background(one, 0.7))
    monkeypatch.setattr(module, "MARGIN_AGAINST_BLENDS", False)
    assert decide(favour_background(distances, 0.7, colors))[0][0, 0].tolist() == [1, 0, 0, 0, 0]


def test_unknown_ids_and_mixed_kinds_are_refused():
    code = ColorCode.for_ids([1, 2])
    for unknown in (3, -1, 70_000, 2**40):  # (the lookup table's ids, negative ones, beyond the table)
        with pytest.raises(InputError, match="not in this prompt set"):
            code.encode(np.array([[1, unknown]]))
    with pytest.raises(InputError, match="mix"):
        ColorCode.from_masks([np.zeros((2, 2), np.uint8), np.zeros((2, 2, 3), np.uint8)])
    with pytest.raises(InputError, match="more than"):
        ColorCode.from_masks([np.arange(MAX_CLASSES + 2).reshape(1, -1)])


# --------------------------------------------------------------------------------------- images


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32, np.float64])
def test_non_8bit_images_scale_by_robust_percentiles(dtype):
    arr = np.linspace(0, 4000, 64 * 64).reshape(64, 64).astype(dtype)
    arr[0, 0] = 1e6 if dtype != np.uint16 else 65535  # an outlier does not squash the range
    rgb = to_rgb8(arr)
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    assert rgb[..., 0].max() == 255 and rgb[..., 0].min() == 0
    assert 100 < np.median(rgb) < 155


def test_intensity_range_is_used_as_given():
    ct = np.array([[-1000.0, 0.0], [40.0, 400.0]])  # Hounsfield units with a soft-tissue window
    out = scale_to_uint8(ct, (-160.0, 240.0))
    assert out.tolist() == [[0, 102], [128, 255]]


def test_gray_rgba_bool_and_nan_images():
    assert to_rgb8(np.zeros((5, 6), np.uint8)).shape == (5, 6, 3)
    rgba = np.zeros((5, 6, 4), np.uint8)
    rgba[..., 0] = 200
    assert to_rgb8(rgba)[0, 0].tolist() == [200, 0, 0]
    assert to_rgb8(np.ones((4, 4), bool))[0, 0].tolist() == [255, 255, 255]
    with_nan = np.arange(16, dtype=float).reshape(4, 4)
    with_nan[0, 0] = np.nan
    assert to_rgb8(with_nan).dtype == np.uint8
    with pytest.raises(InputError, match="shape"):
        to_rgb8(np.zeros((2, 3, 4, 5)))


def test_reading_files(tmp_path):
    Image.fromarray(np.full((8, 9), 7, np.uint16)).save(tmp_path / "a16.png")
    assert read_image(tmp_path / "a16.png").dtype in (np.uint16, np.int32)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="notes.txt: not a readable image"):
        read_image(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="no such file"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(InputError, match="bad.tif: not a readable TIFF"):
        read_image(tmp_path / "bad.tif")


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    import seggpt_plugins.images as images

    Image.fromarray(np.zeros((300, 300), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(InputError, match="decompression bomb"):
            images.read_image(tmp_path / "big.png")
        with pytest.raises(InputError, match="decompression bomb"):
            images.to_rgb8(np.zeros((300, 300), np.uint8))


def test_masks_labels_and_colours(tmp_path):
    labels = np.array([[0, 3], [7, 7]], np.uint16)
    Image.fromarray(labels.astype(np.uint8), mode="L").save(tmp_path / "l.png")
    assert to_mask(tmp_path / "l.png").tolist() == [[0, 3], [7, 7]]
    palette_png = Image.fromarray(labels.astype(np.uint8), mode="P")
    palette_png.putpalette([0, 0, 0, 255, 0, 0] * 128)
    palette_png.save(tmp_path / "p.png")
    assert to_mask(tmp_path / "p.png").tolist() == [[0, 3], [7, 7]]  # palette indices are the labels
    assert to_mask(np.zeros((2, 2, 3), np.uint8)).shape == (2, 2, 3)
    with pytest.raises(InputError, match=">= 0"):
        to_mask(np.array([[-1, 0]]))
    with pytest.raises(InputError, match="whole numbers"):
        to_mask(np.array([[0.5, 0]]))


def test_atomic_writes_refuse_overwrite_and_leave_no_partial(tmp_path):
    path = write_png(tmp_path / "out" / "x.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(InputError, match="exists"):
        write_png(path, np.ones((4, 4), np.uint8))
    write_png(path, np.ones((4, 4), np.uint8), overwrite=True)
    assert np.asarray(Image.open(path)).max() == 1
    write_png(tmp_path / "wide.png", np.full((2, 2), 300, np.int64))  # > 255: written as 16-bit
    assert np.asarray(Image.open(tmp_path / "wide.png")).max() == 300

    class Boom(Exception):
        pass

    def explode(_):
        raise Boom

    from seggpt_plugins.io import atomic_write as _atomic_write

    with pytest.raises(Boom):
        _atomic_write(tmp_path / "y.tif", explode, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "wide.png"]
    write_tiff(tmp_path / "z.tif", np.zeros((2, 3, 3), np.uint16))
    assert read_image(tmp_path / "z.tif").shape == (2, 3, 3)


def test_boundary_blends_do_not_snap_to_a_third_colour():
    """A blend of A and B at their boundary may lie nearest C; it must come out as A or B, not a C fringe."""
    from seggpt_plugins.colors import color_distances, decide, restrict_to_neighbours

    a, b, c = [255.0, 0, 0], [0, 0, 255.0], [60.0, 120, 60]  # C: a little nearer the A/B blend than A or B
    colors = torch.tensor([[[0.0, 0, 0], a, b, c]])
    row = [a] * 4 + [[(x + y) / 2 for x, y in zip(a, b)]] + [b] * 4  # the model's blend in the middle
    painting = torch.tensor(row).T.reshape(1, 3, 1, 9).expand(1, 3, 5, 9).contiguous()
    plain, _ = decide(color_distances(painting, colors))
    assert plain[0, 2, 4] == 3  # nearest colour alone picks the absent third label (with a small margin)
    fixed, _ = decide(restrict_to_neighbours(color_distances(painting, colors)))
    assert fixed[0, 2, 4] in (1, 2) and (fixed[0, :, :4] == 1).all() and (fixed[0, :, 5:] == 2).all()
    # a confidently painted C elsewhere is still C
    painting[:, :, :, 0] = torch.tensor(c).view(1, 3, 1)
    assert decide(restrict_to_neighbours(color_distances(painting, colors)))[0][0, 2, 0] == 3
