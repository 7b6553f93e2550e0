"""Training, fine-tuning, prompt tuning, checkpoints and the shipped demo model's measured accuracy."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from seggpt_plugins import SegGPT
from seggpt_plugins.synthetic import SyntheticTasks
from seggpt_plugins.datasets import PairedSamples
from seggpt_plugins.evaluation import evaluate_generated
from seggpt_plugins.prompt_tuning import tune_prompt
from seggpt_plugins.training import TrainSettings, forward_batch, make_config, painting_loss, train


def test_generator_is_deterministic_and_well_formed():
    gen = SyntheticTasks(48, max_objects=12)
    a, b = gen.sample(3, prompts=2, seed=7), gen.sample(3, prompts=2, seed=7)
    assert torch.equal(a.target_images, b.target_images) and torch.equal(a.prompt_masks, b.prompt_masks)
    assert a.prompt_images.shape == (3, 2, 3, 48, 48) and a.target_masks.shape == (3, 3, 48, 48)
    assert 0 <= a.prompt_images.min() and a.prompt_images.max() <= 1
    assert a.target_masks.max() <= 255 and (a.target_masks > 0).any()
    swapped = a.swapped()
    assert torch.equal(swapped.target_images, a.prompt_images[:, -1].flip(-1, -2))
    for variant in ("v1", "v2"):
        tracking = SyntheticTasks(48, max_objects=12, variant=variant).sample(2, prompts=3, seed=1, family="tracking")
        assert tracking.seg_type == "instance"


def test_training_lowers_the_loss_on_a_fixed_batch(tmp_path):
    from transformers import SegGptForImageSegmentation

    torch.manual_seed(0)
    fixed = SyntheticTasks(32).sample(8, prompts=1, seed=123, family="semantic")

    class FixedBatch:
        def sample(self, batch, prompts=1, seed=0):
            return fixed

    def loss(net):
        with torch.no_grad():
            return painting_loss(forward_batch(net.eval(), fixed), fixed.target_masks).item()

    net = SegGptForImageSegmentation(make_config("tiny"))
    before = loss(net)
    net, summary = train(tmp_path / "run", net=net, data=FixedBatch(), progress=False, evaluate_at_end=False,
                         settings=TrainSettings(steps=100, batch_size=8, lr=3e-3, warmup=5, prompt_counts=(1,),
                                                log_every=25))
    assert summary["finished"] and summary["steps"] == 100
    after = loss(net)
    assert after < 0.75 * before, (before, after)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [25, 50, 75, 100] and log[-1]["loss"] < log[0]["loss"]


def test_saved_model_reloads_with_identical_predictions(tmp_path):
    net, _ = train(tmp_path / "run", config="tiny", settings=TrainSettings(steps=3, batch_size=4), progress=False,
                   evaluate_at_end=False)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = (rng.random((32, 32)) > 0.7).astype(np.uint8)
    in_memory = SegGPT(net, device="cpu").segment(image, image, mask, with_painting=True)[0]
    reloaded = SegGPT.from_pretrained(tmp_path / "run" / "model", device="cpu").segment(image, image, mask,
                                                                                       with_painting=True)[0]
    assert np.array_equal(in_memory.painting, reloaded.painting) and np.array_equal(in_memory.labels, reloaded.labels)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    settings = dict(steps=8, batch_size=4, lr=1e-3, warmup=2, save_every=100)
    straight, _ = train(tmp_path / "a", config="tiny", settings=TrainSettings(**settings), progress=False,
                        evaluate_at_end=False)
    first, summary = train(tmp_path / "b", config="tiny", settings=TrainSettings(**settings, stop_after=5),
                           progress=False, evaluate_at_end=False)
    assert summary == {"steps": 5, "finished": False, "seconds": summary["seconds"]}
    resumed, summary = train(tmp_path / "b", config="tiny", settings=TrainSettings(**settings), progress=False,
                             evaluate_at_end=False)
    assert summary["steps"] == 8 and summary["finished"]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def nuclei_folder(tmp_path_factory, nuclei2d):
    image, truth = nuclei2d
    root = tmp_path_factory.mktemp("nuclei")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    scaled = np.clip(image / np.percentile(image, 99.8) * 255, 0, 255).astype(np.uint8)
    for k, (r, c) in enumerate((r, c) for r in range(0, 512, 128) for c in range(0, 512, 128)):
        Image.fromarray(scaled[r:r + 128, c:c + 128]).save(root / "images" / f"tile{k:02d}.png")
        Image.fromarray((truth[r:r + 128, c:c + 128] > 0).astype(np.uint8)).save(root / "masks" / f"tile{k:02d}.png")
    return root


def test_folder_dataset_pairs_and_split(nuclei_folder):
    samples = PairedSamples.from_folder(nuclei_folder, 64)
    assert list(samples.tasks) == [nuclei_folder.name] and samples.ids.tolist() == [1]
    train_part, held = samples.split(0.25, seed=0)
    assert sum(map(len, train_part.tasks.values())) == 12 and sum(map(len, held.tasks.values())) == 4
    batch = samples.sample(4, prompts=2, seed=3)
    assert batch.prompt_images.shape == (4, 2, 3, 64, 64)
    colours = {tuple(c) for c in batch.target_masks.permute(0, 2, 3, 1).reshape(-1, 3).tolist()}
    assert len(colours) <= 1 + 4  # background plus one random colour per sample


def test_prompt_tuning_lowers_its_loss_and_segments(demo_model, nuclei_folder, tmp_path):
    samples = PairedSamples.from_folder(nuclei_folder, 128)
    train_part, held = samples.split(0.25, seed=0)
    tuned, log = tune_prompt(demo_model, train_part, steps=12, lr=0.05, batch_size=4, progress=False)
    first, last = np.mean([r["loss"] for r in log[:3]]), np.mean([r["loss"] for r in log[-3:]])
    assert last < first
    path = tuned.save(tmp_path / "nuclei.safetensors")
    image = next(iter(held.tasks.values()))[0][0]
    pred = demo_model.segment(image, [path])[0]
    assert pred.labels.shape == (128, 128) and set(np.unique(pred.labels)) <= {0, 1}


def test_finetune_and_tune_prompt_commands(nuclei_folder, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "seggpt_plugins.cli", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True)
    net, _ = train(tmp_path / "base", config="tiny", settings=TrainSettings(steps=2, batch_size=2), progress=False,
                   evaluate_at_end=False)
    result = run("finetune", "--model", tmp_path / "base" / "model", "--data", nuclei_folder, "--out",
                 tmp_path / "ft", "--steps", 4, "--batch-size", 2, "--trainable", "decoder")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["finished"] and "miou" in summary["eval"]
    assert (tmp_path / "ft" / "model" / "config.json").is_file()
    result = run("tune-prompt", "--model", tmp_path / "base" / "model", "--data", nuclei_folder, "--out",
                 tmp_path / "p.safetensors", "--steps", 3, "--batch-size", 2)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "p.safetensors").is_file()
    bad = run("finetune", "--model", tmp_path / "base" / "model", "--data", tmp_path / "nope", "--out", tmp_path / "x")
    assert bad.returncode == 2 and "no such directory" in bad.stderr


def test_demo_model_reaches_its_stated_accuracy(demo_model):
    """Measured on 24 held-out generated tasks (seeds never used in training): 1-shot mIoU 0.46 (BENCHMARKS.md).
    The bar sits below the measurement to allow for library numerics; an untrained model scores ~0.02."""
    scores = evaluate_generated(demo_model, tasks=24, prompts=1)
    assert scores["miou"] >= 0.40, scores


def test_demo_model_segments_real_nuclei_better_than_chance(demo_model, nuclei2d):
    image, truth = nuclei2d
    intensity = (float(np.percentile(image, 0.5)), float(np.percentile(image, 99.8)))
    preds = demo_model.segment([image[128:256, 128:256], image[384:512, 256:384]], image[:128, :128],
                               (truth[:128, :128] > 0).astype(np.uint8), intensity_range=intensity)
    for pred, (r, c) in zip(preds, [(128, 128), (384, 256)]):
        t = truth[r:r + 128, c:c + 128] > 0
        iou = np.logical_and(pred.labels > 0, t).sum() / np.logical_or(pred.labels > 0, t).sum()
        assert iou > 0.55, iou
