"""Tests for the LlamaGen-compatible VQ image tokenizer (tensorar_plugin.models.vq)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tensorar_plugin.models import vq
from tensorar_plugin.models.vq import (
    VQ_8,
    VQ_16,
    VQ_MODELS,
    VQConfig,
    VQModel,
    build_vq,
    images_to_tensor,
    tensor_to_pil,
    tensor_to_uint8,
)

# A tokenizer small enough for CPU tests: 2x downsampling, 32 codes of dimension 8.
TINY = dict(
    codebook_size=32,
    codebook_embed_dim=8,
    encoder_ch_mult=(1, 2),
    decoder_ch_mult=(1, 2),
    z_channels=16,
    base_channels=32,
)

# (state-dict entries, total elements) of LlamaGen's reference VQModel with default ModelArgs,
# read off the reference implementation once; the released checkpoints have exactly these.
REFERENCE_TOTALS = {"VQ-16": (344, 71_948_939), "VQ-8": (300, 70_175_371)}


def tiny_model(seed: int = 0, **overrides) -> VQModel:
    """A deterministic tiny tokenizer in eval mode."""
    torch.manual_seed(seed)
    return VQModel(VQConfig(**{**TINY, **overrides})).eval()


def tiny_images(batch: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Random images in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


def expected_shapes(cfg: VQConfig) -> dict[str, tuple[int, ...]]:
    """State-dict layout of LlamaGen's VQModel for ``cfg``, written from its architecture description."""
    out: dict[str, tuple[int, ...]] = {}

    def conv(name, cin, cout, k):
        out[f"{name}.weight"], out[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        out[f"{name}.weight"], out[f"{name}.bias"] = (c,), (c,)

    def res(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for proj in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{proj}", c, c, 1)

    def mid(prefix, c):
        res(f"{prefix}.mid.0", c, c)
        attn(f"{prefix}.mid.1", c)
        res(f"{prefix}.mid.2", c, c)

    ch, n_blocks = cfg.base_channels, cfg.num_res_blocks
    # Encoder: stages from high to low resolution; attention only in the last stage.
    mults = cfg.encoder_ch_mult
    conv("encoder.conv_in", 3, ch, 3)
    width = ch
    for i, m in enumerate(mults):
        for j in range(n_blocks):
            res(f"encoder.conv_blocks.{i}.res.{j}", width, ch * m)
            width = ch * m
        if i == len(mults) - 1:
            for j in range(n_blocks):
                attn(f"encoder.conv_blocks.{i}.attn.{j}", width)
        else:
            conv(f"encoder.conv_blocks.{i}.downsample.conv", width, width, 3)
    mid("encoder", width)
    norm("encoder.norm_out", width)
    conv("encoder.conv_out", width, cfg.z_channels, 3)
    # Decoder: stages stored from low to high resolution, one extra residual block each.
    mults = cfg.decoder_ch_mult
    width = ch * mults[-1]
    conv("decoder.conv_in", cfg.z_channels, width, 3)
    mid("decoder", width)
    for i, level in enumerate(reversed(range(len(mults)))):
        for j in range(n_blocks + 1):
            res(f"decoder.conv_blocks.{i}.res.{j}", width, ch * mults[level])
            width = ch * mults[level]
        if level == len(mults) - 1:
            for j in range(n_blocks + 1):
                attn(f"decoder.conv_blocks.{i}.attn.{j}", width)
        if level != 0:
            conv(f"decoder.conv_blocks.{i}.upsample.conv", width, width, 3)
    norm("decoder.norm_out", width)
    conv("decoder.conv_out", width, 3, 3)
    # Quantizer and the 1x1 convs around it.
    if cfg.codebook_show_usage:  # a buffer of the quantizer itself, so listed before its submodules
        out["quantize.codebook_used"] = (65536,)
    out["quantize.embedding.weight"] = (cfg.codebook_size, cfg.codebook_embed_dim)
    conv("quant_conv", cfg.z_channels, cfg.codebook_embed_dim, 1)
    conv("post_quant_conv", cfg.codebook_embed_dim, cfg.z_channels, 1)
    return out


# --------------------------------------------------------------------------------------------
# Config and presets
# --------------------------------------------------------------------------------------------


def test_config_fields_and_defaults_match_llamagen():
    fields = dataclasses.fields(VQConfig)
    names = [f.name for f in fields]
    assert names[:10] == [
        "codebook_size",
        "codebook_embed_dim",
        "codebook_l2_norm",
        "codebook_show_usage",
        "commit_loss_beta",
        "entropy_loss_ratio",
        "encoder_ch_mult",
        "decoder_ch_mult",
        "z_channels",
        "dropout_p",
    ]
    cfg = VQConfig()
    assert (cfg.codebook_size, cfg.codebook_embed_dim, cfg.z_channels) == (16384, 8, 256)
    assert cfg.codebook_l2_norm and cfg.codebook_show_usage
    assert (cfg.commit_loss_beta, cfg.entropy_loss_ratio, cfg.dropout_p) == (0.25, 0.0, 0.0)
    assert cfg.encoder_ch_mult == cfg.decoder_ch_mult == [1, 1, 2, 2, 4]
    assert (cfg.base_channels, cfg.num_res_blocks) == (128, 2)  # LlamaGen's hard-coded values
    assert VQConfig(encoder_ch_mult=(1, 2)) == VQConfig(encoder_ch_mult=[1, 2])


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"codebook_size": 0}, "codebook_size"),
        ({"codebook_embed_dim": -1}, "codebook_embed_dim"),
        ({"z_channels": 0}, "z_channels"),
        ({"encoder_ch_mult": []}, "encoder_ch_mult"),
        ({"decoder_ch_mult": [1, 0]}, "decoder_ch_mult"),
        ({"encoder_ch_mult": [1, 1.5]}, "encoder_ch_mult"),
        ({"commit_loss_beta": -0.1}, "commit_loss_beta"),
        ({"entropy_loss_ratio": float("nan")}, "entropy_loss_ratio"),
        ({"dropout_p": 1.0}, "dropout_p"),
        ({"base_channels": 48}, "base_channels"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
    ],
)
def test_config_rejects_bad_values(overrides, field):
    with pytest.raises(ValueError, match=field):
        VQConfig(**overrides)


@pytest.mark.parametrize("preset", ["VQ-16", "VQ-8"])
@pytest.mark.parametrize("show_usage", [True, False])
def test_preset_state_dict_matches_llamagen_layout(preset, show_usage):
    with torch.device("meta"):
        model = build_vq(preset, codebook_show_usage=show_usage)
    sd = model.state_dict()
    assert all(t.is_meta for t in sd.values())
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_shapes(model.config)
    assert list(sd) == list(expected_shapes(model.config))  # same registration order too
    n_entries, n_elements = REFERENCE_TOTALS[preset]
    if not show_usage:
        n_entries, n_elements = n_entries - 1, n_elements - 65536
    assert (len(sd), sum(v.numel() for v in sd.values())) == (n_entries, n_elements)
    # The usage ring buffer is a buffer, not a trainable parameter.
    assert "quantize.codebook_used" not in dict(model.named_parameters())


def test_presets_and_build_vq():
    assert set(VQ_MODELS) == {"VQ-16", "VQ-8"}
    with torch.device("meta"):
        m16, m8 = VQ_16(), VQ_8(codebook_size=4096)
        built = build_vq("VQ-8", codebook_embed_dim=32)
    assert (m16.downsample_factor, m8.downsample_factor) == (16, 8)
    assert m8.config.codebook_size == 4096 and m8.quantize.embedding.weight.shape == (4096, 8)
    assert built.config.encoder_ch_mult == [1, 2, 2, 4] and built.config.codebook_embed_dim == 32
    with pytest.raises(ValueError, match="VQ-16"):
        build_vq("VQ-32")


def test_tiny_state_dict_layout_and_codebook_init():
    model = tiny_model()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected_shapes(model.config)
    norms = model.quantize.embedding.weight.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))  # l2-normalised at init
    assert model.downsample_factor == 2


# --------------------------------------------------------------------------------------------
# Encoding and decoding
# --------------------------------------------------------------------------------------------


def test_encode_decode_round_trip_shapes():
    model, x = tiny_model(), tiny_images()
    with torch.no_grad():
        quant, emb_loss, info = model.encode(x)
        codes = model.encode_to_codes(x)
        assert quant.shape == (2, 8, 8, 8)
        assert tuple(emb_loss) == (None, None, None, 0)  # eval mode: no losses
        assert info.indices.shape == (2 * 8 * 8,)
        assert codes.shape == (2, 64) and codes.dtype == torch.long
        assert int(codes.min()) >= 0 and int(codes.max()) < 32
        assert torch.equal(codes, info.indices.view(2, -1))

        images = model.decode_code(codes)
        assert images.shape == x.shape
        flat = model.decode_code(codes.flatten(), shape=(2, 8, 8, 8))
        last = model.decode_code(codes, shape=(2, 8, 8, 8), channel_first=False)
        single = model.decode_code(codes[1])  # 1-D codes without shape: one image
        recon, diff = model(x)
    torch.testing.assert_close(flat, images, rtol=0, atol=0)
    torch.testing.assert_close(last, images, rtol=0, atol=0)
    torch.testing.assert_close(single, images[1:], rtol=1e-5, atol=1e-5)
    assert recon.shape == x.shape and len(diff) == 4


@pytest.mark.parametrize("l2_norm", [True, False])
def test_encode_to_codes_is_nearest_codebook_entry(l2_norm):
    model, x = tiny_model(codebook_l2_norm=l2_norm), tiny_images()
    with torch.no_grad():
        codes = model.encode_to_codes(x)
        z = model.quant_conv(model.encoder(x)).permute(0, 2, 3, 1).reshape(-1, 8)
        codebook = model.quantize.embedding.weight
        if l2_norm:
            z, codebook = F.normalize(z, dim=-1), F.normalize(codebook, dim=-1)
        dist = torch.cdist(z, codebook)
    chosen = dist.gather(1, codes.view(-1, 1)).squeeze(1)
    torch.testing.assert_close(chosen, dist.min(dim=1).values, rtol=0, atol=1e-5)
    assert (codes.view(-1) == dist.argmin(dim=1)).float().mean() > 0.95  # ties aside, identical


def test_decode_code_matches_decode_of_quantized_latents():
    model, x = tiny_model(), tiny_images()
    with torch.no_grad():
        quant, _, _ = model.encode(x)
        from_quant = model.decode(quant)
        from_codes = model.decode_code(model.encode_to_codes(x))
    torch.testing.assert_close(from_codes, from_quant, rtol=1e-5, atol=1e-5)


def test_training_mode_losses_and_usage_buffer():
    model, x = tiny_model(entropy_loss_ratio=0.1), tiny_images()
    model.train()
    before = model.quantize.codebook_used.clone()
    model.encode_to_codes(x)  # pure inference: must not touch training state
    assert torch.equal(model.quantize.codebook_used, before)

    recon, (vq_loss, commit_loss, entropy_loss, usage) = model(x)
    (recon.mean() + vq_loss + commit_loss + entropy_loss).backward()
    torch.testing.assert_close(commit_loss, 0.25 * vq_loss)  # same value, different gradient paths
    assert 0 < usage <= 1
    assert model.encoder.conv_in.weight.grad is not None  # straight-through gradient reaches encoder
    assert model.quantize.embedding.weight.grad is not None
    n = 2 * 8 * 8
    assert not torch.equal(model.quantize.codebook_used[-n:], before[-n:])


def test_state_dict_save_load_round_trip():
    model, x = tiny_model(seed=0), tiny_images()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other = tiny_model(seed=1)
    other.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    with torch.no_grad():
        assert torch.equal(model.encode_to_codes(x), other.encode_to_codes(x))
        assert torch.equal(model(x)[0], other(x)[0])


# --------------------------------------------------------------------------------------------
# Image helpers
# --------------------------------------------------------------------------------------------


def random_uint8(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((8, 6, 3), (1, 3, 8, 6)),
        ((2, 8, 6, 3), (2, 3, 8, 6)),
        ((8, 6), (1, 3, 8, 6)),
        ((2, 8, 6), (2, 3, 8, 6)),
    ],
)
def test_images_to_tensor_arrays(shape, expected):
    arr = random_uint8(*shape)
    x = images_to_tensor(arr)
    assert x.shape == expected and x.dtype == torch.float32
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    back = tensor_to_uint8(x)
    rgb = arr if arr.shape[-1] == 3 else np.repeat(arr[..., None], 3, axis=-1)
    np.testing.assert_array_equal(back, rgb.reshape(back.shape))


def test_uint8_round_trip_is_exact_for_every_value():
    arr = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    x = images_to_tensor(arr)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    np.testing.assert_array_equal(tensor_to_uint8(x), arr)


def test_pil_conversions():
    from PIL import Image

    rgb = random_uint8(8, 6, 3)
    gray = random_uint8(8, 6, seed=1)
    x = images_to_tensor(Image.fromarray(rgb))
    assert x.shape == (1, 3, 8, 6)
    np.testing.assert_array_equal(tensor_to_uint8(x)[0], rgb)

    batch = images_to_tensor([Image.fromarray(rgb), Image.fromarray(gray, mode="L")])
    assert batch.shape == (2, 3, 8, 6)
    np.testing.assert_array_equal(tensor_to_uint8(batch)[1], np.repeat(gray[..., None], 3, axis=-1))

    pils = tensor_to_pil(batch)
    assert len(pils) == 2 and all(p.mode == "RGB" and p.size == (6, 8) for p in pils)
    np.testing.assert_array_equal(np.asarray(pils[0]), rgb)


def test_tensor_to_uint8_clamps_and_rounds():
    x = torch.tensor([-3.0, -1.0, 0.0, 0.999, 1.0, 5.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    out = tensor_to_uint8(x)
    assert out.shape == (1, 1, 6, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255, 255]


def test_pillow_is_imported_lazily(monkeypatch):
    roots = set()
    for node in ast.parse(inspect.getsource(vq)).body:  # module-level statements only
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    assert "numpy" in roots and "PIL" not in roots
    monkeypatch.setitem(sys.modules, "PIL", None)  # as if Pillow were not installed
    assert images_to_tensor(np.zeros((4, 4, 3), np.uint8)).shape == (1, 3, 4, 4)


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "images",
    [torch.zeros(3, 16, 16), torch.zeros(1, 1, 16, 16), torch.zeros(1, 3, 15, 16), np.zeros((1, 3, 16, 16))],
)
def test_bad_images_raise(images):
    model = tiny_model()
    with pytest.raises(ValueError, match="images"):
        model.encode_to_codes(images)
    with pytest.raises(ValueError, match="images"):
        model.encode(images)


@pytest.mark.parametrize(
    "codes",
    [
        torch.zeros(1, 10, dtype=torch.long),  # not a square grid
        torch.full((1, 16), 32),  # id == codebook_size
        torch.full((1, 16), -1),  # negative id
        torch.zeros(1, 16),  # float ids
        torch.zeros(1, 4, 4, dtype=torch.long),  # wrong rank
    ],
)
def test_bad_codes_raise(codes):
    with pytest.raises(ValueError, match="codes"):
        tiny_model().decode_code(codes)


def test_bad_shape_raises():
    model, codes = tiny_model(), torch.zeros(2, 16, dtype=torch.long)
    with pytest.raises(ValueError, match="shape"):
        model.decode_code(codes, shape=(2, 8, 4, 8))  # wrong count
    with pytest.raises(ValueError, match="shape"):
        model.decode_code(codes, shape=(2, 4, 4, 4))  # wrong channel count


@pytest.mark.parametrize(
    "images",
    [
        np.zeros((4, 4, 3), np.float32),  # not uint8
        np.zeros((4, 4, 4), np.uint8),  # RGBA
        np.zeros((1, 4, 4, 2), np.uint8),  # 2 channels
        np.zeros((4,), np.uint8),  # rank 1
        [],
        [np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4, 3), np.uint8)],  # mixed sizes
        "image.png",
    ],
)
def test_images_to_tensor_rejects_bad_input(images):
    with pytest.raises(ValueError, match="images"):
        images_to_tensor(images)


def test_tensor_to_uint8_rejects_bad_input():
    with pytest.raises(ValueError, match="x"):
        tensor_to_uint8(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="x"):
        tensor_to_pil(torch.zeros(1, 4, 4, 4))
