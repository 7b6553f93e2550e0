"""The public API: SegGPT.segment / iter_segment / propagate, inputs of every kind, bad input."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from seggpt_plugins import EmptyPromptWarning, InputError, Prediction, SegGPT, TunedPrompt
from seggpt_plugins.colors import ColorCode
from seggpt_plugins.propagation import plan_runs
from seggpt_plugins.prompts import PromptSet


@pytest.fixture
def pair(rng):
    image = rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)
    mask = np.zeros((80, 96), np.uint16)
    mask[10:40, 10:50], mask[50:70, 60:90] = 17, 300
    return image, mask


def test_predictions_have_target_size_dtypes_and_prompt_ids(model64, pair, rng):
    targets = [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8), rng.integers(0, 65535, (120, 40), dtype=np.uint16)]
    preds = model64.segment(targets, *pair, with_painting=True)
    assert len(preds) == 2 and all(isinstance(p, Prediction) for p in preds)
    for pred, target in zip(preds, targets):
        assert pred.labels.shape == target.shape[:2] and pred.scores.shape == target.shape[:2]
        assert pred.painting.shape == (*target.shape[:2], 3) and pred.painting.dtype == np.uint8
        assert pred.scores.dtype == np.float32 and 0 <= pred.scores.min() and pred.scores.max() <= 1
        assert set(np.unique(pred.labels)) <= {0, 17, 300}
        assert pred.labels.dtype == np.uint16  # smallest dtype holding id 300
        assert set(pred.colors) == {17, 300}
    assert [p.index for p in preds] == [0, 1]


def test_labels_are_the_nearest_prompt_colour_of_the_painting(demo_model, nuclei2d):
    """Nearest, with black's distance scaled by the model's foreground margin (colors.favour_background)."""
    image, truth = nuclei2d
    pred = demo_model.segment(image[128:256, :128], image[:128, :128], (truth[:128, :128] > 0) * 3,
                              with_painting=True)[0]
    code = ColorCode.for_ids([3])
    distance = np.linalg.norm(pred.painting[..., None, :].astype(float) - code.all_colors[None, None].astype(float), axis=-1)
    margin = demo_model.foreground_margin
    distance[..., 0] *= (1 - margin) / (1 + margin)
    clear = pred.scores > 0.05  # the uint8 painting is rounded: only near-ties may differ
    assert clear.mean() > 0.9
    # the painting is resized from the model's canvas apart from the labels: a boundary pixel may differ
    assert np.mean(pred.labels[clear] != code.all_ids[distance.argmin(-1)][clear]) < 1e-3


def test_the_foreground_margin_comes_with_the_model_and_changes_its_fingerprint(demo_model, nuclei2d, tmp_path):
    """A config's foreground margin (for a model trained with foreground pixels weighted x10, which paints a halo
    of blends): the demo model ships 0.7, and paints less than the plain nearest colour (the same weights read
    with 0), and nearer the truth, on real nuclei; the margin is saved with the model and is part of its
    fingerprint."""
    from seggpt_plugins.loading import load_network

    image, truth = nuclei2d
    net = load_network("demo")
    net.config.foreground_margin = 0.0
    plain = SegGPT(net, device="cpu")
    assert demo_model.foreground_margin == 0.7 and plain.foreground_margin == 0
    assert plain.fingerprint != demo_model.fingerprint
    args = ([image[256:384, 256:384]], image[:128, :128], (truth[:128, :128] > 0).astype(np.uint8))
    with_margin, without = demo_model.segment(*args)[0].labels > 0, plain.segment(*args)[0].labels > 0
    true = truth[256:384, 256:384] > 0
    iou = lambda a: (a & true).sum() / (a | true).sum()  # noqa: E731
    assert with_margin.sum() < without.sum() and (with_margin & ~without).sum() == 0
    assert iou(with_margin) > iou(without)
    demo_model.save_pretrained(tmp_path / "saved")
    assert SegGPT.from_pretrained(tmp_path / "saved", device="cpu").foreground_margin == 0.7
    from seggpt_plugins.errors import ModelSourceError

    net.config.foreground_margin = 1.5  # a bad config value: one line naming the field, not labels of nothing
    with pytest.raises(ModelSourceError, match=r"foreground_margin must be a number in \[0, 1\).*got 1.5"):
        SegGPT(net, device="cpu")


def test_shared_prompts_equal_per_target_prompts_and_batches_do_not_matter(model64, pair, rng):
    targets = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    shared = model64.segment(targets, [pair[0]], [pair[1]], batch_size=3)
    per_target = model64.segment(targets, [[pair[0]]] * 3, [[pair[1]]] * 3, batch_size=2)
    one_by_one = [model64.segment(t, pair[0], pair[1])[0] for t in targets]
    for a, b, c in zip(shared, per_target, one_by_one):
        assert np.array_equal(a.labels, b.labels) and np.array_equal(a.labels, c.labels)
        np.testing.assert_allclose(a.scores, c.scores, atol=1e-4)


def test_per_target_prompt_sets_with_their_own_ids(model64, pair, rng):
    other_mask = (pair[1] > 0).astype(np.uint8) * 5
    targets = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    preds = model64.segment(targets, [[pair[0]], [pair[0], pair[0]]], [[pair[1]], [other_mask, other_mask]])
    assert set(preds[0].colors) == {17, 300} and set(preds[1].colors) == {5}


def test_label_ids_fix_the_colour_code(model64, pair):
    pred = model64.segment(pair[0], pair[0], pair[1], label_ids=[1, 17, 300, 999])[0]
    assert set(pred.colors) == {1, 17, 300, 999}
    with pytest.raises(InputError, match="not in label_ids"):
        model64.segment(pair[0], pair[0], pair[1], label_ids=[1, 2])


def test_rgb_colour_prompts_give_labels_in_sorted_colour_order(model64, pair):
    colour = np.zeros((*pair[1].shape, 3), np.uint8)
    colour[pair[1] == 17] = (0, 200, 0)
    colour[pair[1] == 300] = (200, 0, 0)
    pred = model64.segment(pair[0], pair[0], colour)[0]
    assert pred.colors == {1: (0, 200, 0), 2: (200, 0, 0)}


def test_inputs_as_paths_pil_and_float(model64, pair, tmp_path):
    Image.fromarray(pair[0]).save(tmp_path / "img.png")
    Image.fromarray(pair[1].astype(np.uint8) % 251, mode="L").save(tmp_path / "mask.png")
    as_float = pair[0].mean(-1).astype(np.float32) * 10.0 - 500.0
    preds = model64.segment([tmp_path / "img.png", Image.fromarray(pair[0]), as_float],
                            str(tmp_path / "img.png"), str(tmp_path / "mask.png"))
    assert [p.labels.shape for p in preds] == [(80, 96)] * 3


def test_iter_segment_yields_as_batches_finish(model64, pair, rng):
    targets = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(5)]
    seen = [p.index for p in model64.iter_segment(targets, *pair, batch_size=2)]
    assert seen == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("call, message", [
    (lambda m, p: m.segment(p[0], [], []), "no prompts"),
    (lambda m, p: m.segment([], p[0], p[1]), "no target"),
    (lambda m, p: m.segment(p[0], p[0], p[1][:40]), "differs from its image size"),
    (lambda m, p: m.segment(p[0], [p[0], p[0]], [p[1]]), "one mask per image"),
    (lambda m, p: m.segment(p[0], p[0], p[1], seg_type="panoptic"), "seg_type"),
    (lambda m, p: m.segment(p[0], p[0], p[1], batch_size=0), "batch_size"),
    (lambda m, p: m.segment(p[0], p[0], np.arange(80 * 96).reshape(80, 96)), "more than the 124"),
    (lambda m, p: m.segment([p[0]], [[p[0]]] * 2, [[p[1]]] * 2), "per-target prompts"),
    (lambda m, p: m.segment("no/such/image.png", p[0], p[1]), "no such file"),
    (lambda m, p: m.segment(np.zeros((3, 4, 5, 6)), p[0], p[1]), "shape"),
])
def test_bad_input_gives_clear_errors(model64, pair, call, message):
    with pytest.raises(InputError, match=message):
        call(model64, pair)


def test_all_background_prompt_warns(model64, pair):
    with pytest.warns(EmptyPromptWarning, match="all background"):
        pred = model64.segment(pair[0], pair[0], np.zeros(pair[1].shape, np.uint8))[0]
    assert pred.labels.max() == 0 and pred.colors == {}


def test_tuned_prompt_stands_in_for_an_example_pair(model64, pair, tmp_path, rng):
    code = ColorCode.for_ids([17, 300])
    tuned = TunedPrompt(torch.randn(3, 64, 64), torch.randn(3, 64, 64), code, "semantic")
    path = tuned.save(tmp_path / "p.safetensors")
    loaded = TunedPrompt.load(path)
    assert torch.equal(loaded.image, tuned.image) and loaded.code.ids.tolist() == [17, 300]
    target = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    a = model64.segment(target, [loaded])[0]
    b = model64.segment(target, [str(path)])[0]
    assert np.array_equal(a.labels, b.labels) and set(a.colors) == {17, 300}
    # a tuned prompt plus an ordinary pair: one ensemble, the tuned prompt's colour code
    c = model64.segment(target, [loaded, pair[0]], [pair[1]])[0]
    assert set(c.colors) == {17, 300}
    with pytest.raises(InputError, match="tuned prompt"):
        (tmp_path / "x.safetensors").write_bytes(b"not a file")
        model64.segment(target, [tmp_path / "x.safetensors"])


# ------------------------------------------------------------------------------------------ propagate


def test_plan_runs_goes_outward_from_annotations():
    runs = plan_runs(10, [3, 7])
    assert [(r.origin, r.frames) for r in runs] == [(3, [2, 1, 0]), (3, [4, 5]), (7, [6]), (7, [8, 9])]
    assert [(r.origin, r.frames) for r in plan_runs(4, [])] == [(None, [0, 1, 2, 3])]
    covered = sorted(f for r in plan_runs(31, [0, 15, 30]) for f in r.frames)
    assert covered == [z for z in range(31) if z not in (0, 15, 30)]


def test_propagate_through_a_stack_keeps_annotations_and_ids(model64, rng):
    stack = rng.integers(0, 4000, (9, 48, 40), dtype=np.uint16)
    annotation = np.zeros((48, 40), np.uint16)
    annotation[5:20, 5:20], annotation[25:40, 10:30] = 4, 9
    preds = list(model64.propagate(stack, annotations={4: annotation}, memory=2, batch_size=4))
    assert sorted(p.index for p in preds) == [0, 1, 2, 3, 5, 6, 7, 8]
    assert all(p.labels.shape == (48, 40) and set(np.unique(p.labels)) <= {0, 4, 9} for p in preds)
    # lockstep: the two directions advance together (3 and 5 first, then 2 and 6, ...)
    assert [p.index for p in preds][:4] == [3, 5, 2, 6]


def test_propagate_memory_uses_previous_predictions(model64, rng):
    frames = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(4)]
    prompt_mask = np.zeros((64, 64), np.uint8)
    prompt_mask[10:30, 10:30] = 2
    with_memory = list(model64.propagate(frames, frames[0], prompt_mask, memory=3, memory_gate=False))
    without = list(model64.propagate(frames, frames[0], prompt_mask, memory=0))
    assert [p.index for p in with_memory] == [0, 1, 2, 3]
    assert all(p.joined_memory for p in with_memory) and not any(p.joined_memory for p in without)
    np.testing.assert_allclose(with_memory[0].scores, without[0].scores, atol=1e-5)  # nothing in memory yet
    # later frames see the earlier predictions as extra prompts
    later = model64.segment(frames[1], [frames[0], frames[0]], [prompt_mask, with_memory[0].labels])[0]
    np.testing.assert_allclose(with_memory[1].scores, later.scores, atol=1e-4)


def test_a_weighted_prompt_counts_as_that_many_copies(model64, rng):
    """The ensemble's weights (PromptSet.weights, modeling.encode): a prompt weighing 2 paints as the same
    prompt given twice, so the memory of a propagation can weigh less than its examples."""
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    masks = [np.zeros((64, 64), np.uint8) for _ in range(2)]
    masks[0][8:30, 8:40], masks[1][30:60, 20:50] = 1, 1
    code = model64.color_code([], masks)
    a, b = (model64.prepare_prompts([images[k]], [masks[k]], code=code) for k in range(2))
    target = model64.encode_images([images[2]])
    twice_a = PromptSet.concat([a, a, b])
    weighted = a.extended(b.images, b.masks, weight=0.5)  # a: 1, b: 0.5 -> the same mean as a, a, b
    painted = [model64.paint_targets(target, [s], "instance") for s in (twice_a, weighted, PromptSet.concat([a, b]))]
    np.testing.assert_allclose(painted[1].numpy(), painted[0].numpy(), atol=1e-3)
    assert np.abs(painted[2].numpy() - painted[0].numpy()).max() > 1e-2  # (the weight changes the painting)


def test_the_memory_keeps_out_frames_painted_far_from_the_examples(model64):
    """A predicted frame joins the memory only when its painted share is within MEMORY_SHARE_FACTOR of the
    examples' (propagation.py): frames the model over- or under-paints are predicted, not remembered."""
    from seggpt_plugins.propagation import MEMORY_SHARE_FACTOR
    from seggpt_plugins.scenes import moving_objects

    frames, truth = moving_objects("video", seed=1, num_frames=8, size=(64, 64))
    predictions = list(model64.propagate(frames, annotations={0: truth[0]}, memory=3))
    expected = np.count_nonzero(truth[0]) / truth[0].size
    for p in predictions:
        share = np.count_nonzero(p.labels) / p.labels.size
        assert p.joined_memory == (expected / MEMORY_SHARE_FACTOR <= share <= expected * MEMORY_SHARE_FACTOR)
    assert not any(p.joined_memory for p in model64.propagate(frames, annotations={0: truth[0]}, memory=0))


def test_propagate_bad_input(model64, rng):
    stack = rng.integers(0, 255, (3, 32, 32), dtype=np.uint8)
    with pytest.raises(InputError, match="outside the stack"):
        list(model64.propagate(stack, annotations={5: np.ones((32, 32), np.uint8)}))
    with pytest.raises(InputError, match="no prompts"):
        list(model64.propagate(stack))
    with pytest.raises(InputError, match="differs"):
        list(model64.propagate(stack, annotations={0: np.ones((16, 32), np.uint8)}))


def test_propagate_reads_frames_lazily(model64, rng):
    class Lazy:
        def __init__(self):
            self.reads = []

        def __len__(self):
            return 5

        def __getitem__(self, i):
            self.reads.append(i)
            return np.full((32, 32), 10 * i, np.uint8)

    lazy = Lazy()
    list(model64.propagate(lazy, annotations={2: np.eye(32, dtype=np.uint8)}, memory=1))
    assert sorted(set(lazy.reads)) == [0, 1, 2, 3, 4]


def test_more_prompts_than_the_annotated_slices_is_fine(model64, rng):
    stack = rng.integers(0, 255, (6, 32, 32), dtype=np.uint8)
    masks = {0: np.eye(32, dtype=np.uint8), 5: np.eye(32, dtype=np.uint8)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preds = list(model64.propagate(stack, annotations=masks, max_prompts=1, memory=0))
    assert sorted(p.index for p in preds) == [1, 2, 3, 4]


def test_compiled_forward_equals_eager(net64, pair, rng):
    targets = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    eager = SegGPT(net64, device="cpu").segment(targets, [pair[0]] * 2, [pair[1]] * 2, with_painting=True)
    compiled = SegGPT(net64, device="cpu", compile="default").segment(targets, [pair[0]] * 2, [pair[1]] * 2,
                                                                      with_painting=True)
    for a, b in zip(eager, compiled):
        np.testing.assert_allclose(a.painting.astype(int), b.painting.astype(int), atol=1)
        assert (a.labels != b.labels).mean() < 0.01  # only near-ties may flip
    with pytest.raises(InputError, match="compile must be one of"):
        SegGPT(net64, device="cpu", compile="fast")
