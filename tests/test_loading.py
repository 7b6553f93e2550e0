"""Model sources: transformers directories, Painter .pth checkpoints, conversion, the hub offline, the demo."""

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from seggpt_plugins import ModelSourceError, SegGPT
from seggpt_plugins.errors import InputError
from seggpt_plugins.loading import PAINTER_RENAMES, load_network, painter_to_transformers_keys

from .conftest import random_net


def to_painter_state(net) -> dict:
    """Rename a transformers model's parameters to the original Painter names (inverse of PAINTER_RENAMES)."""
    inverse = [
        (r"^model\.embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (r"^model\.embeddings\.mask_token$", "mask_token"),
        (r"^model\.embeddings\.segment_token_input$", "segment_token_x"),
        (r"^model\.embeddings\.segment_token_prompt$", "segment_token_y"),
        (r"^model\.embeddings\.type_token_semantic$", "type_token_cls"),
        (r"^model\.embeddings\.type_token_instance$", "type_token_ins"),
        (r"^model\.embeddings\.position_embeddings$", "pos_embed"),
        (r"^model\.encoder\.layernorm\.", "norm."),
        (r"^model\.encoder\.layers\.(\d+)\.attention\.", r"blocks.\1.attn."),
        (r"^model\.encoder\.layers\.(\d+)\.mlp\.lin1\.", r"blocks.\1.mlp.fc1."),
        (r"^model\.encoder\.layers\.(\d+)\.mlp\.lin2\.", r"blocks.\1.mlp.fc2."),
        (r"^model\.encoder\.layers\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
        (r"^model\.encoder\.layers\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
        (r"^decoder\.decoder_embed\.", "decoder_embed."),
        (r"^decoder\.decoder_pred\.conv\.", "decoder_pred.0."),
        (r"^decoder\.decoder_pred\.layernorm\.", "decoder_pred.1."),
        (r"^decoder\.decoder_pred\.head\.", "decoder_pred.3."),
    ]
    out = {}
    for key, value in net.state_dict().items():
        for pattern, replacement in inverse:
            new, n = re.subn(pattern, replacement, key)
            if n:
                out[new] = value.clone()
                break
        else:
            raise AssertionError(f"no Painter name for {key}")
    return out


def paint_once(model):
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[8:40, 8:40] = 1
    return model.segment(image, image, mask, with_painting=True)[0].painting


@pytest.fixture(scope="module")
def painter_net():
    # Painter reads features after every (depth/4)-th block: 24 -> 5, 11, 17, 23; 8 -> 1, 3, 5, 7
    return random_net(seed=5, num_hidden_layers=8, intermediate_hidden_state_indices=[1, 3, 5, 7], merge_index=1,
                      image_size=[128, 64], patch_size=8, pretrain_image_size=64)


def test_save_pretrained_directory_round_trip(net64, tmp_path):
    net64.save_pretrained(tmp_path / "m")
    a, b = SegGPT(net64, device="cpu"), SegGPT.from_pretrained(tmp_path / "m", device="cpu")
    assert np.array_equal(paint_once(a), paint_once(b))


def test_a_model_held_at_reduced_precision_saves_its_float32_weights(net64, tmp_path):
    """Loaded at bfloat16 or quantized, then saved: the weights written are the source's float32 ones, not
    rounded (so the saved model has the source's fingerprint), with the margin the model reads with."""
    net64.save_pretrained(tmp_path / "src")
    source = SegGPT.from_pretrained(tmp_path / "src", device="cpu", dtype="float32")
    for held in ({"dtype": "bfloat16"}, {"quantize": "int8"}):
        model, name = SegGPT.from_pretrained(tmp_path / "src", device="cpu", **held), next(iter(held.values()))
        same = SegGPT.from_pretrained(model.save_pretrained(tmp_path / f"{name}-same"), device="cpu")
        assert same.fingerprint == source.fingerprint
        model.net.config.foreground_margin = 0.25
        saved = SegGPT.from_pretrained(model.save_pretrained(tmp_path / name), device="cpu", dtype="float32")
        assert saved.foreground_margin == 0.25
        for (key, a), b in zip(saved.net.state_dict().items(), source.net.state_dict().values()):
            assert torch.equal(a, b), key
    with pytest.raises(InputError, match="no source to reload them from"):
        SegGPT(net64, device="cpu", dtype="bfloat16").save_pretrained(tmp_path / "nowhere")


def test_saved_model_folders_get_the_umask_modes(net64, tmp_path):
    """transformers writes model.safetensors 0600; every file of a saved model folder gets the umask's modes."""
    import os

    from seggpt_plugins.training import export

    old = os.umask(0o027)
    try:
        folders = [SegGPT(net64, device="cpu").save_pretrained(tmp_path / "saved"), export(net64, tmp_path / "run")]
    finally:
        os.umask(old)
    for folder in folders:
        assert os.stat(folder).st_mode & 0o777 == 0o750
        modes = {path.name: path.stat().st_mode & 0o777 for path in folder.iterdir()}
        assert "model.safetensors" in modes and set(modes.values()) == {0o640}, modes


def test_painter_checkpoint_loads_with_inferred_config(painter_net, tmp_path):
    torch.save({"model": to_painter_state(painter_net)}, tmp_path / "seggpt_small.pth")
    loaded = load_network(tmp_path / "seggpt_small.pth")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "decoder_hidden_size",
                "intermediate_hidden_state_indices", "mlp_dim"):
        assert getattr(loaded.config, key) == getattr(painter_net.config, key), key
    assert list(loaded.config.image_size) == [128, 64]
    original = SegGPT(painter_net, device="cpu")
    assert np.array_equal(paint_once(original), paint_once(SegGPT(loaded, device="cpu")))


def test_painter_renames_cover_vit_large_names():
    names = ["patch_embed.proj.weight", "blocks.23.attn.rel_pos_h", "blocks.0.mlp.fc2.bias", "decoder_pred.3.weight",
             "type_token_ins", "norm.bias", "something.else"]
    renamed, unknown = painter_to_transformers_keys({n: 0 for n in names})
    assert "model.encoder.layers.23.attention.rel_pos_h" in renamed and "decoder.decoder_pred.head.weight" in renamed
    assert unknown == ["something.else"]
    assert len(PAINTER_RENAMES) == 17


def test_convert_command_writes_a_transformers_directory(painter_net, tmp_path):
    torch.save(to_painter_state(painter_net), tmp_path / "ckpt.pth")
    run = lambda *a: subprocess.run([sys.executable, "-m", "seggpt_plugins.cli", "convert", *a],  # noqa: E731
                                    capture_output=True, text=True)
    result = run(str(tmp_path / "ckpt.pth"), str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "config.json").is_file()
    assert np.array_equal(paint_once(SegGPT(painter_net, device="cpu")),
                          paint_once(SegGPT.from_pretrained(tmp_path / "out", device="cpu")))
    again = run(str(tmp_path / "ckpt.pth"), str(tmp_path / "out"))
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_offline_hub_id_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelSourceError) as info:
        SegGPT.from_pretrained("BAAI/seggpt-vit-large")
    message = str(info.value)
    assert "offline" in message and "demo" in message and ".pth" in message and "hf download" in message


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "nothing.pth", "no such file"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "config.json"),
    (lambda p: (p / "notes.txt").write_text("x") and p / "notes.txt", "not a model checkpoint"),
    (lambda p: (p / "junk.pth").write_bytes(b"junk") and p / "junk.pth", "could not read"),
    (lambda p: torch.save({"a": torch.zeros(1)}, p / "other.pth") or p / "other.pth", "not a Painter SegGPT"),
])
def test_bad_sources(tmp_path, make, message):
    with pytest.raises(ModelSourceError, match=message):
        load_network(make(tmp_path))


def test_demo_model_loads_offline_and_is_small():
    from seggpt_plugins.loading import DEMO_MODEL_DIR

    size = sum(p.stat().st_size for p in DEMO_MODEL_DIR.iterdir())
    assert size < 25e6
    model = SegGPT.from_pretrained("demo", device="cpu")
    assert model.input_size == (128, 128) and model.dtype == torch.float32


def test_device_and_dtype_choice(monkeypatch):
    from seggpt_plugins.loading import cpu_has_native_bf16, pick_device, pick_dtype

    assert pick_device(None).type in ("cpu", "cuda", "mps")
    assert pick_dtype(None, torch.device("cpu")) == torch.float32  # the suite's $SEGGPT_DTYPE (conftest.py)
    monkeypatch.delenv("SEGGPT_DTYPE")
    assert pick_dtype(None, torch.device("cpu")) == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert pick_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert pick_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ModelSourceError, match="dtype"):
        pick_dtype("int8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ModelSourceError, match="no CUDA"):
            pick_device("cuda")
