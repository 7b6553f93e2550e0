"""The forward pass: parity with transformers, Painter's ensemble schedule, batch invariance, kernels."""

import numpy as np
import pytest
import torch

from seggpt_plugins import SegGPT, modeling


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def painter_reference(net, target, prompt_images, prompt_masks, seg_type="instance"):
    """Painter's SegGPT forward for ONE target and P prompts, written from the description in docs/reference.md.

    Canvas: prompt image over target image; mask canvas: prompt mask over prompt mask, bottom half
    replaced by the mask token. Image and mask streams run as one batch of 2P; after attention in
    every block the target half is averaged over prompts: within each stream for blocks 0..merge,
    over the whole batch afterwards; at block `merge` the two streams are averaged. With one prompt
    there is no averaging at all. Features after the configured blocks feed the decoder; the output
    is the bottom half of the first row's painting.
    """
    config = net.config
    prompts = prompt_images.shape[0]
    images = torch.cat([prompt_images, target.expand(prompts, -1, -1, -1)], dim=2)
    masks = torch.cat([prompt_masks, prompt_masks], dim=2)
    num_patches = net.model.embeddings.patch_embeddings.num_patches
    masked = torch.zeros(1, num_patches, dtype=torch.bool)
    masked[:, num_patches // 2:] = True
    x = net.model.embeddings(images, masks, bool_masked_pos=masked, embedding_type=seg_type)
    features = []
    for index, layer in enumerate(net.model.encoder.layers):
        attended = layer.attention(layer.layernorm_before(x))[0]  # transformers' own eager attention
        if prompts > 1:
            top, bottom = attended.split(attended.shape[1] // 2, dim=1)
            if index <= config.merge_index:
                bottom = bottom.reshape(2, prompts, -1).mean(1, keepdim=True).expand(2, prompts, -1).reshape(top.shape)
            else:
                bottom = bottom.mean(0, keepdim=True).expand_as(bottom)
            attended = torch.cat([top, bottom], dim=1)
        x = x + attended
        x = x + layer.mlp(layer.layernorm_after(x))
        if index == config.merge_index:
            x = (x[:prompts] + x[prompts:]) * 0.5
        if index in config.intermediate_hidden_state_indices:
            features.append(net.model.encoder.layernorm(x))
    painting = net.decoder(torch.cat(features, dim=-1))
    return painting[:1, :, painting.shape[2] // 2:]


@pytest.mark.parametrize("kernel", ["eager", "sdpa", "folded", "chunked"])
def test_one_prompt_painting_equals_transformers(net448, kernel):
    target, prompt, mask = randn(1, 3, 448, 448, seed=1), randn(1, 3, 448, 448, seed=2), randn(1, 3, 448, 448, seed=3)
    with torch.no_grad():
        reference = net448(pixel_values=target, prompt_pixel_values=prompt, prompt_masks=mask).pred_masks
        ours = modeling.paint(net448, target, prompt, mask, torch.zeros(1, dtype=torch.long), kernel=kernel)
    torch.testing.assert_close(ours, reference[:, :, 448:], rtol=1e-4, atol=1e-5)


def test_painting_0_255_equals_transformers_postprocessing(net448):
    """SegGPT.paint un-normalises as transformers' post-processing does (mean/std, x255, clip)."""
    model = SegGPT(net448, device="cpu")
    target, prompt, mask = randn(1, 3, 448, 448, seed=4), randn(1, 3, 448, 448, seed=5), randn(1, 3, 448, 448, seed=6)
    with torch.no_grad():
        pred = net448(pixel_values=target, prompt_pixel_values=prompt, prompt_masks=mask).pred_masks[:, :, 448:]
    std, mean = torch.tensor(modeling.IMAGENET_STD).view(1, 3, 1, 1), torch.tensor(modeling.IMAGENET_MEAN).view(1, 3, 1, 1)
    expected = torch.clip((pred * std + mean) * 255, 0, 255)
    ours = model.paint(target, prompt, mask, torch.zeros(1, dtype=torch.long))
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-3)


def test_public_segment_painting_matches_transformers_pipeline(net448, rng):
    """End to end at 448x448 (no resize): segment()'s painting equals transformers' forward on the same input."""
    model = SegGPT(net448, device="cpu")
    image, prompt = rng.integers(0, 256, (448, 448, 3), dtype=np.uint8), rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)
    mask = np.zeros((448, 448), np.uint8)
    mask[100:300, 50:200] = 4
    pred = model.segment(image, prompt, mask, with_painting=True)[0]
    colour = np.zeros((448, 448, 3), np.uint8)
    colour[mask == 4] = pred.colors[4]
    to_input = lambda a: modeling.normalize(torch.from_numpy(a).permute(2, 0, 1)[None].float())  # noqa: E731
    with torch.no_grad():
        out = net448(pixel_values=to_input(image), prompt_pixel_values=to_input(prompt),
                     prompt_masks=to_input(colour)).pred_masks[:, :, 448:]
    expected = modeling.denormalize(out)[0].permute(1, 2, 0).numpy()
    assert np.abs(pred.painting.astype(float) - expected).max() <= 0.5 + 1e-3


def assert_equals_painter_reference(net, size, prompts, seed):
    """One target with `prompts` prompts: our paint() against painter_reference() on random inputs."""
    target = randn(1, 3, size, size, seed=seed)
    images, masks = randn(prompts, 3, size, size, seed=seed + 1), randn(prompts, 3, size, size, seed=seed + 2)
    with torch.no_grad():
        expected = painter_reference(net, target, images, masks)
        ours = modeling.paint(net, target, images, masks, torch.zeros(prompts, dtype=torch.long))
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("prompts", [2, 3])
def test_feature_ensemble_equals_painter_schedule(net448, prompts):
    assert_equals_painter_reference(net448, 448, prompts, seed=10)


def test_ensemble_differs_from_transformers_feature_ensemble(net448):
    """transformers' feature_ensemble averages across streams at the merge block; Painter does not."""
    target = randn(1, 3, 448, 448, seed=20)
    images, masks = randn(2, 3, 448, 448, seed=21), randn(2, 3, 448, 448, seed=22)
    with torch.no_grad():
        ours = modeling.paint(net448, target, images, masks, torch.zeros(2, dtype=torch.long))
        theirs = net448(pixel_values=target.expand(2, -1, -1, -1), prompt_pixel_values=images, prompt_masks=masks,
                        feature_ensemble=True).pred_masks[:1, :, 448:]
    assert (ours - theirs).abs().max() > 1e-4


def test_batch_invariance_and_per_target_prompts(net64):
    """A target's painting does not depend on the other targets (or their prompt counts) in its batch."""
    t = randn(3, 3, 64, 64, seed=30)
    p, m = randn(6, 3, 64, 64, seed=31), randn(6, 3, 64, 64, seed=32)
    with torch.no_grad():
        together = modeling.paint(net64, t, p, m, torch.tensor([0, 0, 1, 2, 2, 2]))
        alone = [modeling.paint(net64, t[0:1], p[0:2], m[0:2], torch.tensor([0, 0])),
                 modeling.paint(net64, t[1:2], p[2:3], m[2:3], torch.tensor([0])),
                 modeling.paint(net64, t[2:3], p[3:6], m[3:6], torch.tensor([0, 0, 0]))]
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-4, atol=1e-5)


def test_prompt_order_within_interleaved_rows(net64):
    """Rows of different targets may be interleaved; only the owner ids matter."""
    t = randn(2, 3, 64, 64, seed=40)
    p, m = randn(4, 3, 64, 64, seed=41), randn(4, 3, 64, 64, seed=42)
    with torch.no_grad():
        grouped = modeling.paint(net64, t, p, m, torch.tensor([0, 0, 1, 1]))
        order = torch.tensor([0, 2, 1, 3])
        interleaved = modeling.paint(net64, t, p[order], m[order], torch.tensor([0, 1, 0, 1]))
    torch.testing.assert_close(grouped, interleaved, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("merge_index, indices", [(0, [0, 1, 2, 3]), (3, [3]), (1, [1, 3])])
@pytest.mark.parametrize("prompts", [1, 3])
def test_schedule_shapes_equal_painter_reference(merge_index, indices, prompts):
    """Other merge blocks and feature blocks, including a merge block that is also the last feature block."""
    from .conftest import random_net

    net = random_net(seed=7, num_hidden_layers=4, merge_index=merge_index, intermediate_hidden_state_indices=indices,
                     image_size=[128, 64], patch_size=8, pretrain_image_size=64)
    assert_equals_painter_reference(net, 64, prompts, seed=80)


def test_semantic_and_instance_type_tokens_differ(net64):
    t, p, m = randn(1, 3, 64, 64, seed=60), randn(1, 3, 64, 64, seed=61), randn(1, 3, 64, 64, seed=62)
    owner = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        a = modeling.paint(net64, t, p, m, owner, "instance")
        b = modeling.paint(net64, t, p, m, owner, "semantic")
    assert (a - b).abs().max() > 1e-5


def test_bfloat16_path_stays_close_to_float32(net64):
    """The bf16 path (used on GPUs) is within a stated error of fp32: relative L2 error below 3e-2."""
    t, p, m = randn(2, 3, 64, 64, seed=70), randn(2, 3, 64, 64, seed=71), randn(2, 3, 64, 64, seed=72)
    owner = torch.tensor([0, 1])
    with torch.no_grad():
        reference = modeling.paint(net64, t, p, m, owner)
        low = modeling.paint(net64.to(torch.bfloat16), t.bfloat16(), p.bfloat16(), m.bfloat16(), owner).float()
        net64.float()
    assert ((low - reference).norm() / reference.norm()).item() < 3e-2
