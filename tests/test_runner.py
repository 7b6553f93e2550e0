"""The one loop (runner.py): prompt choice and its cache, failures per target, deadlines, events, objects,
and the threaded path giving the same answers as the inline one."""

import time

import numpy as np
import pytest

from seggpt_plugins import InputError
from seggpt_plugins.instances import ObjectRule
from seggpt_plugins.prompts import PromptPool
from seggpt_plugins.run_control import Missed
from seggpt_plugins.runner import NO_EXAMPLES, Event, Runner, Target


@pytest.fixture
def examples(rng):
    pairs = []
    for k in range(3):
        image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        image[..., k] = 255  # three looks: the pool tells them apart
        mask = np.zeros((64, 64), np.uint8)
        mask[8:30, 8:30], mask[40:60, 36:60] = 1, 2
        pairs.append((image, mask))
    return pairs


@pytest.fixture
def targets(rng):
    return [rng.integers(0, 256, (48 + 8 * k, 64, 3), dtype=np.uint8) for k in range(5)]


def _same(a, b):
    assert a.key == b.key and a.prompts == b.prompts and a.error == b.error
    np.testing.assert_array_equal(a.prediction.labels, b.prediction.labels)
    np.testing.assert_allclose(a.prediction.scores, b.prediction.scores, atol=1e-6)
    assert a.confidence == pytest.approx(b.confidence, abs=1e-6)


def test_threaded_and_inline_runs_agree_and_match_segment(model64, examples, targets):
    prompts = model64.prepare_prompts([examples[0][0]], [examples[0][1]])
    rule = ObjectRule(min_area=4)
    inline = list(Runner(model64, prompts, batch_size=2, objects=rule, overlap=False, readers=0).run(targets))
    threaded = list(Runner(model64, prompts, batch_size=2, objects=rule, overlap=True, readers=2).run(targets))
    assert [r.index for r in inline] == list(range(len(targets)))
    assert sorted(r.index for r in threaded) == list(range(len(targets)))
    for a, b in zip(inline, sorted(threaded, key=lambda r: r.index)):
        _same(a, b)
    plain = model64.segment(targets, prompts, batch_size=2)
    for result, prediction in zip(inline, plain):
        np.testing.assert_array_equal(result.prediction.labels, prediction.labels)
        assert result.confidence == pytest.approx(prediction.confidence)
        expected = prediction.objects(rule)
        np.testing.assert_array_equal(result.instances.map, expected.map)
        assert [o.confidence for o in result.instances.objects] == pytest.approx(
            [o.confidence for o in expected.objects])


def test_a_bad_target_fails_alone_and_raises_in_raise_mode(model64, examples, targets, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    prompts = model64.prepare_prompts([examples[0][0]], [examples[0][1]])
    items = [Target("a", targets[0]), Target("bad", str(broken), name=str(broken)), Target("c", targets[1])]
    results = {r.key: r for r in Runner(model64, prompts, batch_size=2).run(items)}
    assert results["a"].ok and results["c"].ok and not results["bad"].ok
    assert str(broken) in results["bad"].error and "\n" not in results["bad"].error
    with pytest.raises(InputError, match="broken.png"):
        list(Runner(model64, prompts, batch_size=2).run(items, errors="raise"))

    def cut_download():
        raise Missed("http://host/x.png: the download did not finish within the request's time budget")

    for readers in (0, 2):  # a reader that says Missed (a download the deadline cut) leaves it for later
        results = {r.key: r for r in Runner(model64, prompts, batch_size=2, readers=readers).run(
            [Target("a", targets[0]), Target("cut", cut_download)])}
        assert results["a"].ok and results["cut"].missed and "time budget" in results["cut"].error


def test_a_batch_that_fails_is_retried_target_by_target(model64, examples, targets, monkeypatch):
    prompts = model64.prepare_prompts([examples[0][0]], [examples[0][1]])
    real = model64.encode_images

    def encode(rgbs, nearest=False):  # one poisoned target spoils any batch it is in
        if any(r.shape[0] == 64 for r in rgbs):
            raise RuntimeError("device error")
        return real(rgbs, nearest)

    monkeypatch.setattr(model64, "encode_images", encode)
    results = list(Runner(model64, prompts, batch_size=4).run(targets))
    failed = [r.index for r in results if not r.ok]
    assert failed == [2]  # the 64-row target
    assert "RuntimeError: device error" in results[2].error
    assert all(r.ok for r in results if r.index != 2)


def test_pool_choice_is_cached_within_its_bound_and_excludes_the_target_itself(model64, examples, targets):
    pool = PromptPool.from_pairs(["x", "y", "z"], examples)
    runner = Runner(model64, pool, most_similar=1, prompt_sets_kept=2)
    calls = []
    prepare = model64.prepare_prompts
    runner.model = type("Spy", (), {})()
    for name in ("encode_images", "paint_targets", "to_predictions", "assess", "color_code", "device"):
        setattr(runner.model, name, getattr(model64, name))
    runner.model.prepare_prompts = lambda *a, **k: calls.append(1) or prepare(*a, **k)
    items = [Target(k, examples[k % 3][0], exclude=(("x", "y", "z")[k % 3],)) for k in range(6)]
    results = list(runner.run(items))
    assert all(r.ok for r in results)
    assert all(len(r.prompts) == 1 and r.prompts[0] != ("x", "y", "z")[r.key % 3] for r in results)
    assert len(runner._sets) <= 2 and len(calls) <= 6
    only = Runner(model64, PromptPool.from_pairs(["x"], examples[:1]), most_similar=2)
    [alone] = list(only.run([Target("x", examples[0][0], exclude=("x",))]))
    assert alone.skipped and not alone.ok and alone.error == NO_EXAMPLES


def test_deadline_and_cancel_leave_the_rest_missed(model64, examples, targets):
    prompts = model64.prepare_prompts([examples[0][0]], [examples[0][1]])
    results = list(Runner(model64, prompts).run(targets, deadline=time.monotonic() - 1))
    assert all(r.missed and not r.ok for r in results) and len(results) == len(targets)
    seen = []
    runner = Runner(model64, prompts, batch_size=1)
    results = list(runner.run(targets, cancelled=lambda: len(seen) >= 2, on_event=seen.append))
    assert sum(r.ok for r in results) == 2 and all(r.missed for r in results if not r.ok)


def test_events_per_tile_and_per_image(model64, examples, rng):
    prompts = model64.prepare_prompts([examples[0][0]], [examples[0][1]], tile=64)
    big = rng.integers(0, 256, (150, 140, 3), dtype=np.uint8)
    events: list[Event] = []
    [result] = list(Runner(model64, prompts, tile=64, halo=8, batch_size=3).run([big], on_event=events.append))
    tiles = [e for e in events if e.kind == "tile"]
    assert result.ok and result.prediction.labels.shape == (150, 140)
    assert tiles and tiles[-1].done == tiles[-1].total == len(tiles)
    assert events[-1] == Event("image", 0, 1, 1)
    plain = model64.segment(big, prompts, tile=64, halo=8, batch_size=3)[0]
    np.testing.assert_array_equal(result.prediction.labels, plain.labels)
    assert result.confidence == pytest.approx(plain.confidence)


def test_ids_no_chosen_example_shows_are_background(model64, examples, targets):
    pool = PromptPool.from_pairs(["x"], [(examples[0][0], (examples[0][1] == 1).astype(np.uint8))])
    results = list(Runner(model64, pool, label_ids=[1, 2, 3]).run(targets))
    for result in results:
        assert set(np.unique(result.prediction.labels)) <= {0, 1}


def test_the_deadline_reaches_between_the_tiles_of_one_target(model64, examples, rng):
    prompts = model64.prepare_prompts([examples[0][0]], [examples[0][1]], tile=64)
    big = rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)
    clock = iter(range(100))
    stops = {"after": 2}
    events = []

    def cancelled():  # true once two tile batches have been painted
        return sum(e.kind == "tile" for e in events) >= stops["after"]

    [result] = list(Runner(model64, prompts, tile=64, halo=8, batch_size=1).run(
        [big], cancelled=cancelled, on_event=events.append))
    assert next(clock) == 0
    assert result.missed and not result.ok and result.error == "cancelled"
    assert sum(e.kind == "tile" for e in events) == 2


def test_16_bit_examples_and_targets_share_one_intensity_range(demo_model, nuclei2d):
    """Issue 30, item 2: a dim 16-bit target is read with its examples' range, not stretched by its own
    percentiles (which painted its background as nuclei); 8-bit targets are used as they are."""
    from seggpt_plugins.images import to_rgb8
    from seggpt_plugins.runner import Runner, Target

    image, truth = nuclei2d
    example, mask = image[:128, :128], (truth[:128, :128] > 0).astype(np.uint8)
    prompts = demo_model.prepare_prompts(example, mask)
    assert prompts.intensity_range is not None
    low, high = prompts.intensity_range
    assert low < np.percentile(example, 5) and high > np.percentile(example, 95)
    dim = (image[128:256, 128:256] // 4).astype(np.uint16)  # the same tissue, a quarter of the signal
    eight = to_rgb8(image[256:384, :128])
    runner = Runner(demo_model, prompts, keep_images=True, quality=None)
    results = list(runner.run([Target("dim", dim), Target("eight", eight)]))
    np.testing.assert_array_equal(results[0].rgb, to_rgb8(dim, prompts.intensity_range))
    assert results[0].rgb.max() < 128  # dim stays dim (its own percentiles would stretch it to 255)
    np.testing.assert_array_equal(results[1].rgb, eight)
    assert demo_model.prepare_prompts(to_rgb8(example), mask).intensity_range is None  # 8-bit examples
