"""Examples and target in one colour mode (images.one_colour_mode, applied by the runner): a colour example
finds little in a grey target, and a grey example little in a colour one (issue 33, item 3)."""

import numpy as np

from seggpt_plugins.images import looks_grey, one_colour_mode, scale_to_uint8, to_grey


def grey3(rng, shape=(64, 64)):
    return np.repeat(rng.integers(0, 256, shape, dtype=np.uint8)[..., None], 3, axis=-1)


def test_one_colour_mode_makes_the_colour_side_grey(rng):
    grey, colour = grey3(rng), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert looks_grey(grey) and not looks_grey(colour)
    examples = np.stack([colour, grey])
    target, made = one_colour_mode(grey, examples)  # a grey target: the colour example is made grey
    assert target is grey and made is not examples
    np.testing.assert_array_equal(made[0], to_grey(colour))
    np.testing.assert_array_equal(made[1], grey)
    target, made = one_colour_mode(colour, np.stack([grey, grey]))  # grey examples: the target is made grey
    assert looks_grey(target) and made.shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(target, to_grey(colour))
    for pair in ((colour, examples), (grey, np.stack([grey]))):  # one mode already (or mixed examples)
        target, made = one_colour_mode(*pair)
        assert target is pair[0] and made is pair[1]
    noisy = grey.astype(np.int16) + rng.integers(-3, 4, grey.shape)  # JPEG-like chroma noise is still grey
    assert looks_grey(np.clip(noisy, 0, 255).astype(np.uint8))


def test_runner_segments_in_one_colour_mode(model64, rng):
    """The runner shows a grey target colour examples made grey, and makes a colour target of grey examples
    grey: the same answer as giving them so (model64's canvas is 64x64: nothing is resized)."""
    mask = np.zeros((64, 64), np.uint8)
    mask[8:30, 8:30], mask[40:60, 36:60] = 1, 2
    colour = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    colour[mask > 0, 0] = 255
    grey_target = grey3(rng)
    colour_target = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)

    mixed = model64.segment([grey_target], [colour], [mask], quality=None)[0]
    given = model64.segment([grey_target], [to_grey(colour)], [mask], quality=None)[0]
    unchanged = model64.segment([colour_target], [colour], [mask], quality=None)[0]
    np.testing.assert_array_equal(mixed.labels, given.labels)
    np.testing.assert_allclose(mixed.scores, given.scores, atol=1e-5)

    mixed = model64.segment([colour_target], [to_grey(colour)], [mask], quality=None)[0]
    given = model64.segment([to_grey(colour_target)], [to_grey(colour)], [mask], quality=None)[0]
    np.testing.assert_array_equal(mixed.labels, given.labels)
    assert not np.array_equal(unchanged.scores, given.scores)  # colour to colour is left as it was


def test_colour_example_on_grey_nuclei(demo_model, nuclei2d):
    """stardist's nuclei: a green example (a fluorescence channel as RGB) on the grey other half found 5 of
    57 nuclei before; in one colour mode about as many as grey to grey (28 of 57)."""
    image, truth = nuclei2d
    grey = scale_to_uint8(image)
    green = np.stack([np.zeros_like(grey), grey, np.zeros_like(grey)], axis=-1)[:, :256]
    found = demo_model.segment([grey[:, 256:]], [green], [truth[:, :256]], example_ids="instances")[0]
    objects = found.objects().map
    target = truth[:, 256:]
    matched = 0
    for i in np.unique(target)[1:]:
        best = np.bincount(objects[target == i].astype(np.int64)).argmax()
        if best and ((target == i) & (objects == best)).sum() / ((target == i) | (objects == best)).sum() > 0.5:
            matched += 1
    assert matched >= 20, matched
