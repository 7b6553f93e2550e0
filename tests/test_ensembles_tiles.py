"""Context ensembles and tiles (issue 14): the spatial canvas, the K = 1 identity, tiling and stitching."""

import numpy as np
import pytest

from seggpt_plugins.ensembles import (Stitcher, best_window, cells, grid_side, groups, object_diameter, object_tile,
                                     stitch_examples, tile_grid)
from seggpt_plugins.errors import InputError
from seggpt_plugins.instances import find_instances


def test_spatial_canvas_puts_each_example_in_its_cell_with_exact_colours(rng):
    size = (64, 64)
    images = [np.full((40, 50, 3), 10 * (k + 1), np.uint8) for k in range(5)]
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    masks = []
    for colour in colours:
        mask = np.zeros((40, 50, 3), np.uint8)
        mask[10:30, 10:40] = colour
        masks.append(mask)
    image_canvas, mask_canvas = stitch_examples(images, masks, size)
    assert grid_side(5) == 3
    grid = cells(size, 3)
    for k, (r0, r1, c0, c1) in enumerate(grid):
        cell_image, cell_mask = image_canvas[r0:r1, c0:c1], mask_canvas[r0:r1, c0:c1]
        if k < 5:
            assert np.all(cell_image == 10 * (k + 1))  # example k, and nothing else, in cell k
            found = {tuple(c) for c in cell_mask.reshape(-1, 3)}
            assert found == {(0, 0, 0), colours[k]}  # nearest resize: no blended colours
        else:
            assert not cell_image.any() and not cell_mask.any()  # cells past K are empty background
    assert sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in grid) == 64 * 64


def test_groups_of_each_ensemble():
    assert groups(16, "feature") == [[k] for k in range(16)]
    assert groups(16, "spatial") == [list(range(16))]
    assert groups(16, "both") == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert groups(1, "spatial") == groups(1, "both") == [[0]]
    with pytest.raises(InputError, match="ensemble"):
        groups(3, "mosaic")


def test_one_example_is_the_same_forward_whatever_the_ensemble(model64, rng):
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 10:30] = 2
    targets = [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8) for _ in range(3)]
    feature = model64.segment(targets, image, mask, with_painting=True)
    for ensemble in ("spatial", "both"):
        other = model64.segment(targets, image, mask, ensemble=ensemble, with_painting=True)
        for a, b in zip(feature, other):
            assert np.array_equal(a.painting, b.painting) and np.array_equal(a.labels, b.labels)


def test_spatial_prompts_are_batch_invariant(model64, rng):
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(4)]
    masks = [(rng.random((64, 64)) > 0.6).astype(np.uint8) for _ in range(4)]
    targets = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(5)]
    prompts = model64.prepare_prompts(images, masks, ensemble="spatial")
    assert len(prompts) == 1  # four examples, one prompt canvas
    together = model64.segment(targets, prompts, batch_size=5, with_painting=True)
    alone = [model64.segment(t, prompts, with_painting=True)[0] for t in targets]
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a.painting.astype(int), b.painting.astype(int), atol=1)
    assert len(model64.prepare_prompts(images * 4, masks * 4, ensemble="both")) == 4


def test_tile_grid_cores_cover_the_image_once():
    for shape in [(64, 64), (100, 300), (513, 257)]:
        grid = tile_grid(shape, (64, 80), 8)
        count = np.zeros(shape, int)
        for tile in grid:
            r0, r1, c0, c1 = tile.box
            a, b, c, d = tile.core
            assert r0 <= a < b <= r1 and c0 <= c < d <= c1
            assert r1 - r0 == min(64, shape[0]) and c1 - c0 == min(80, shape[1])  # every window the same size
            count[a:b, c:d] += 1
        assert np.all(count == 1)
    with pytest.raises(InputError, match="halo"):
        tile_grid((100, 100), (16, 16), 8)


def test_tiled_image_of_known_tiles_gives_each_tile_alone_away_from_borders(model64, rng):
    """A 128x128 mosaic of four 64x64 images, tiled at 64 with a halo: where a window is exactly one
    image of the mosaic, the labels equal that image segmented alone."""
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = (rng.random((64, 64)) > 0.5).astype(np.uint8) * 3
    parts = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(4)]
    mosaic = np.concatenate([np.concatenate(parts[:2], 1), np.concatenate(parts[2:], 1)], 0)
    tiled = model64.segment(mosaic, image, mask, tile=64, halo=8, batch_size=3)[0]
    alone = model64.segment(parts, image, mask)
    assert tiled.labels.shape == (128, 128) and tiled.scores.shape == (128, 128)
    grid = tile_grid((128, 128), (64, 64), 8)
    for tile in grid:
        r0, r1, c0, c1 = tile.box
        if r0 % 64 or c0 % 64:
            continue  # a window across images: compared nowhere
        a, b, c, d = tile.core
        part = alone[(r0 // 64) * 2 + c0 // 64]
        assert np.array_equal(tiled.labels[a:b, c:d], part.labels[a - r0:b - r0, c - c0:d - c0])
    assert 0 <= tiled.scores.min() and tiled.scores.max() <= 1


def test_an_object_across_a_tile_border_is_one_object():
    stitch = Stitcher((60, 120), np.uint8)
    yy, xx = np.mgrid[:60, :120]
    disc = ((yy - 30) ** 2 + (xx - 60) ** 2) <= 15 ** 2  # centred on the border between the two cores
    for tile in tile_grid((60, 120), (60, 72), 6):
        r0, r1, c0, c1 = tile.box
        stitch.add(tile, disc[r0:r1, c0:c1].astype(np.uint8), np.ones((r1 - r0, c1 - c0), np.float32))
    labels, scores = stitch.result()
    assert np.array_equal(labels > 0, disc) and np.allclose(scores, 1)
    assert len(find_instances(labels)) == 1


def test_memory_is_bounded_by_the_batch_not_the_image(model64, rng, monkeypatch):
    """A large target goes through the model batch_size tiles at a time."""
    seen = []
    original = model64.encode_images

    def spy(rgbs, nearest=False):
        if not nearest:
            seen.append(len(rgbs))
        return original(rgbs, nearest)

    monkeypatch.setattr(model64, "encode_images", spy)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = (rng.random((64, 64)) > 0.5).astype(np.uint8)
    big = rng.integers(0, 256, (600, 700, 3), dtype=np.uint8)
    pred = model64.segment(big, image, mask, tile=64, halo=8, batch_size=4)[0]
    assert pred.labels.shape == (600, 700)
    assert max(seen[1:]) <= 4 and sum(seen[1:]) == len(tile_grid((600, 700), (64, 64), 8))


def _discs(shape, centres, radius, ids=None):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    mask = np.zeros(shape, np.uint16)
    for k, (y, x) in enumerate(centres):
        mask[(yy - y) ** 2 + (xx - x) ** 2 <= radius ** 2] = ids[k] if ids else 1
    return mask


def test_object_diameter_counts_parts_of_one_label_and_touching_instances_apart():
    area = int(((np.mgrid[-6:7, -6:7] ** 2).sum(0) <= 36).sum())  # a disc of radius 6
    semantic = _discs((100, 100), [(20, 20), (20, 60), (70, 40)], 6)
    assert object_diameter([semantic]) == pytest.approx(np.sqrt(area))
    touching = _discs((60, 60), [(30, 20), (30, 30)], 6, ids=[1, 2])  # two instances, one connected part
    assert object_diameter([touching]) < np.sqrt(area)  # each counted alone, the second covers part of the first
    colours = np.zeros((100, 100, 3), np.uint8)
    colours[semantic > 0] = (255, 0, 0)
    assert object_diameter([colours]) == object_diameter([semantic])
    assert object_diameter([np.zeros((50, 50), np.uint8)]) is None and object_tile([np.zeros((9, 9))]) is None
    assert object_tile([semantic], per_tile=6) == (64, 64)  # 6 x 10.6 px, up to a multiple of 8
    assert object_tile([semantic], per_tile=6, at_least=(128, 96)) == (128, 96)  # never below the canvas


def test_best_window_is_where_most_labels_are():
    mask = np.zeros((300, 200), np.uint8)
    mask[10:20, 10:20] = 1
    mask[200:280, 120:190] = 2
    rows, cols = best_window(mask, (100, 100))
    assert (rows.stop - rows.start, cols.stop - cols.start) == (100, 100)
    assert mask[rows, cols].astype(bool).sum() == 80 * 70
    assert best_window(mask, (400, 400)) == (slice(0, 300), slice(0, 200))  # the whole mask when it fits


def test_large_examples_are_cut_to_the_tile_and_auto_tiles_at_a_few_object_diameters(model64, rng):
    """Examples larger than the tile are shown as their most labelled window (the same prompt as that
    window given directly); "auto" tiles examples and target alike, at object_tile of the examples."""
    example = rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)
    mask = _discs((300, 260), [(y, x) for y in range(160, 290, 25) for x in range(20, 250, 25)], 7)
    prepared = model64.prepare_prompts(example, mask, tile=96)
    rows, cols = best_window(mask, (96, 96))
    direct = model64.prepare_prompts(example[rows, cols], mask[rows, cols])
    assert prepared.sizes == ((96, 96),)
    assert torch_equal(prepared.images, direct.images) and torch_equal(prepared.masks, direct.masks)
    assert model64.prepare_prompts(example, mask, tile=400).sizes == ((300, 260),)  # fits: kept whole

    target = rng.integers(0, 256, (250, 330, 3), dtype=np.uint8)
    tile = object_tile([mask])
    auto = model64.segment(target, example, mask, tile="auto", halo=8)[0]
    explicit = model64.segment(target, model64.prepare_prompts(example, mask, tile=tile), tile=tile, halo=8)[0]
    assert tile[0] < 260 and np.array_equal(auto.labels, explicit.labels)
    whole = model64.segment(target, example, mask, tile=tile, halo=8, batch_size=4)[0]
    assert np.array_equal(whole.labels, explicit.labels)  # raw prompts are windowed like prepared ones


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_auto_never_tiles_below_the_canvas_and_keeps_a_core(model64, rng):
    """Small objects: the auto tile is the model's canvas (64 here), and a halo too large for it shrinks
    to a quarter tile instead of failing; a target no larger than the canvas is not tiled."""
    from seggpt_plugins.ensembles import auto_halo

    example = rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)
    mask = _discs((200, 200), [(y, x) for y in range(10, 200, 20) for x in range(10, 200, 20)], 3)
    assert object_tile([mask])[0] < 64 and auto_halo((64, 64), 32) == 16
    prepared = model64.prepare_prompts(example, mask, tile="auto")
    assert prepared.sizes == ((64, 64),)
    small = rng.integers(0, 256, (60, 50, 3), dtype=np.uint8)
    assert np.array_equal(model64.segment(small, prepared, tile="auto", halo=32)[0].labels,
                          model64.segment(small, prepared)[0].labels)
    big = model64.segment(rng.integers(0, 256, (150, 170, 3), dtype=np.uint8), prepared, tile="auto", halo=32)[0]
    assert big.labels.shape == (150, 170)


def test_bad_tile_settings_are_refused(model64, rng):
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.ones((64, 64), np.uint8)
    for tile, halo, words in [((64,), 8, "tile must be"), (64, 40, "no core"), ("big", 8, "tile must be"),
                              (64, -1, "halo")]:
        with pytest.raises(InputError, match=words):
            model64.segment(image, image, mask, tile=tile, halo=halo)


def test_cli_tile_0_is_no_tiling_as_in_every_host():
    """--tile 0 is off, as 0 is in napari's Tile, SEGGPT_TILE and FiftyOne's tile (was 'a 0x0 tile ... leaves
    no core'); 0 beside a size is refused, saying so."""
    from argparse import Namespace

    from seggpt_plugins.cli.options import tile_option

    assert tile_option(Namespace(tile=["0"], halo=32)) is None
    assert tile_option(Namespace(tile=["0", "0"], halo=32)) is None
    assert tile_option(Namespace(tile=["256"], halo=32)) == (256, 256)
    with pytest.raises(InputError, match="0 is not a size; --tile 0 alone turns tiling off"):
        tile_option(Namespace(tile=["0", "256"], halo=32))


def test_cli_tiles_a_large_image_at_the_examples_scale(tmp_path, nuclei2d):
    """The full 512x512 nuclei image with a 128x128 example: tiled (--tile auto) it is segmented at the
    example's scale; downscaled to the demo model's 128x128 canvas, the nuclei vanish."""
    import subprocess
    import sys

    import tifffile
    from PIL import Image

    image, truth = nuclei2d
    tifffile.imwrite(tmp_path / "field.tif", image)
    tifffile.imwrite(tmp_path / "example.tif", image[:128, :128])
    Image.fromarray((truth[:128, :128] > 0).astype(np.uint8)).save(tmp_path / "example_mask.png")
    ious = {}
    for name, extra in {"tiled": ["--tile", "auto", "--halo", "16"], "downscaled": []}.items():
        result = subprocess.run([sys.executable, "-m", "seggpt_plugins.cli", "segment", "--model", "demo",
                                 "--prompt", str(tmp_path / "example.tif"), str(tmp_path / "example_mask.png"),
                                 str(tmp_path / "field.tif"), "--out", str(tmp_path / name), *extra],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        labels = np.asarray(Image.open(tmp_path / name / "field_labels.png")) > 0
        assert labels.shape == (512, 512)
        ious[name] = (labels & (truth > 0)).sum() / (labels | (truth > 0)).sum()
    assert ious["tiled"] > 0.5 and ious["tiled"] > ious["downscaled"] + 0.2, ious
    bad = subprocess.run([sys.executable, "-m", "seggpt_plugins.cli", "segment", "--model", "demo", "--prompt",
                          str(tmp_path / "example.tif"), str(tmp_path / "example_mask.png"), str(tmp_path / "field.tif"),
                          "--out", str(tmp_path / "bad"), "--tile", "64", "--halo", "40"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no core" in bad.stderr and "loaded SegGPT" not in bad.stderr


def test_cli_large_image_objects_without_seams_says_how_it_tiles(tmp_path, nuclei2d):
    """Issue 30, item 3: the nuclei field enlarged to 2000x2000 (125 nuclei), its top-left 500x500 with its
    nuclei the example: the CLI says the tile and halo it chose, shows a tile bar, finds 0.8-1.25x the nuclei, and
    the foreground along the tile cores' borders is as good as elsewhere (benchmarks/eval_large_image.py)."""
    import re
    import subprocess
    import sys

    import tifffile
    from PIL import Image
    from skimage.transform import resize

    image, truth = nuclei2d
    big = resize(image.astype(np.float32), (2000, 2000), order=1, preserve_range=True).astype(image.dtype)
    labels = resize(truth, (2000, 2000), order=0, preserve_range=True, anti_aliasing=False).astype(np.uint16)
    tifffile.imwrite(tmp_path / "big.tif", big)
    tifffile.imwrite(tmp_path / "example.tif", big[:500, :500])
    tifffile.imwrite(tmp_path / "example_ids.tif", labels[:500, :500])
    result = subprocess.run([sys.executable, "-m", "seggpt_plugins.cli", "segment", "--model", "demo", "big.tif",
                             "--prompt", "example.tif", "example_ids.tif", "--tile", "auto", "--output", "instances",
                             "--out", "out"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    said = re.search(r"big\.tif: (\d+) tiles of (\d+)x\2 px, halo (\d+) \(auto", result.stderr)
    assert said and int(said.group(1)) > 4 and "tiles:" in result.stderr, result.stderr
    found = np.asarray(Image.open(tmp_path / "out" / "big_instances.png"))
    assert 0.8 <= (len(np.unique(found)) - 1) / (len(np.unique(labels)) - 1) <= 1.25  # 114 of 125 when written
    band = np.zeros(found.shape, bool)
    for tile in tile_grid(found.shape, (int(said.group(2)),) * 2, int(said.group(3))):
        r0, r1, c0, c1 = tile.core
        band[max(0, r0 - 4):r0 + 4, c0:c1] = band[r1 - 4:r1 + 4, c0:c1] = True
        band[r0:r1, max(0, c0 - 4):c0 + 4] = band[r0:r1, c1 - 4:c1 + 4] = True
    band[:4], band[-4:], band[:, :4], band[:, -4:] = False, False, False, False  # the image's own edges
    fg, true_fg = found > 0, labels > 0

    def iou(a, b):
        return (a & b).sum() / (a | b).sum()

    assert iou(fg & band, true_fg & band) > iou(fg & ~band, true_fg & ~band) - 0.05
