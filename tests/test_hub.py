"""Checkpoint registry, safe file reading, Hugging Face cache resolution and strict loading.

Everything runs offline: checkpoints are tiny models saved by the tests, and the "hub" is a
Hugging Face cache folder the tests lay out themselves.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import pytest
import torch
from conftest import randomize_, tiny_llamagen
from safetensors.torch import save_file

from tensorar_plugin import hub
from tensorar_plugin.hub import (
    LLAMAGEN_CHECKPOINTS,
    CheckpointInfo,
    build_from_info,
    checkpoint_info,
    infer_llamagen_config,
    infer_vq_config,
    list_checkpoints,
    load_llamagen,
    load_state_dict_file,
    load_vq,
    resolve_checkpoint,
)
from tensorar_plugin.models.llamagen import LLAMAGEN_PRESETS, LlamaGen, build_llamagen
from tensorar_plugin.models.vq import VQConfig, VQModel, build_vq

#: Architecture of conftest's tiny GPT, as overrides on top of a preset (weights cannot tell n_head).
TINY_ARCH = dict(dim=32, n_layer=2, n_head=4, multiple_of=16, block_size=16)
#: A tiny tokenizer; VQ-16 turns 16x16 test images into 1x1 codes, VQ-8 into 2x2.
TINY_VQ = dict(base_channels=32, num_res_blocks=1, z_channels=8, codebook_size=32, codebook_embed_dim=4)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def gpt_logits(model: LlamaGen, seed: int = 1) -> torch.Tensor:
    """Full-sequence logits of a c2i or t2i GPT on fixed random tokens and conditions."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    idx = torch.randint(cfg.vocab_size, (2, cfg.block_size - 1), generator=gen)
    if cfg.model_type == "c2i":
        cond = torch.randint(cfg.num_classes, (2,), generator=gen)
    else:
        cond = torch.randn(2, cfg.cls_token_num, cfg.caption_dim, generator=gen)
    with torch.no_grad():
        return model(idx, cond)[0]


def tiny_vq(preset: str = "VQ-16", seed: int = 0) -> VQModel:
    torch.manual_seed(seed)
    return build_vq(preset, **TINY_VQ).eval()


def vq_outputs(model: VQModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of a fixed image batch and the images decoded from fixed codes."""
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    side = 16 // model.downsample_factor
    codes = torch.randint(model.config.codebook_size, (2, side * side), generator=gen)
    with torch.no_grad():
        return model.encode_to_codes(images), model.decode_code(codes)


def save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def make_hub_cache(root: Path, info: CheckpointInfo, state_dict: dict) -> Path:
    """Lay out `root` as a Hugging Face cache holding `info`'s file at revision main; return the file."""
    repo_dir = root / f"models--{info.repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    return save({"model": state_dict}, snapshot / info.filename)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

EXPECTED_GPT = {  # name: (preset, block_size, model_type, cls_token_num, vq)
    "c2i_B_256": ("GPT-B", 256, "c2i", 1, "vq_ds16_c2i"),
    "c2i_B_384": ("GPT-B", 576, "c2i", 1, "vq_ds16_c2i"),
    "c2i_L_256": ("GPT-L", 256, "c2i", 1, "vq_ds16_c2i"),
    "c2i_L_384": ("GPT-L", 576, "c2i", 1, "vq_ds16_c2i"),
    "c2i_XL_384": ("GPT-XL", 576, "c2i", 1, "vq_ds16_c2i"),
    "c2i_XXL_384": ("GPT-XXL", 576, "c2i", 1, "vq_ds16_c2i"),
    "c2i_3B_384": ("GPT-3B", 576, "c2i", 1, "vq_ds16_c2i"),
    "t2i_XL_stage1_256": ("GPT-XL", 256, "t2i", 120, "vq_ds16_t2i"),
    "t2i_XL_stage2_512": ("GPT-XL", 1024, "t2i", 120, "vq_ds16_t2i"),
}
EXPECTED_VQ = {"vq_ds16_c2i": 16, "vq_ds8_c2i": 8, "vq_ds16_t2i": 16}


def test_registry_lists_every_released_file():
    assert set(list_checkpoints()) == set(EXPECTED_GPT) | set(EXPECTED_VQ)
    assert set(list_checkpoints("gpt")) == set(EXPECTED_GPT)
    assert set(list_checkpoints("vq")) == set(EXPECTED_VQ)
    for name, info in LLAMAGEN_CHECKPOINTS.items():
        assert info.name == name and info.filename == f"{name}.pt"
        assert checkpoint_info(info.filename) is info
        expected_repo = "peizesun/llamagen_t2i" if "t2i" in name else "FoundationVision/LlamaGen"
        assert info.repo_id == expected_repo
    with pytest.raises(ValueError, match="kind"):
        list_checkpoints("tokenizer")


def test_registry_sampling_defaults():
    cfg = {name: LLAMAGEN_CHECKPOINTS[name].cfg_scale for name in EXPECTED_GPT}
    assert cfg["c2i_B_256"] == cfg["c2i_L_384"] == 2.0
    assert cfg["c2i_XL_384"] == cfg["c2i_XXL_384"] == 1.75
    assert cfg["c2i_3B_384"] == 1.65
    info = checkpoint_info("c2i_L_384")
    assert (info.token_grid, info.block_size) == (24, 576)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.image_size = 256


@pytest.mark.parametrize("name", list(EXPECTED_GPT))
def test_gpt_entries_build_their_preset_on_meta(name):
    preset, block_size, model_type, cls_token_num, vq = EXPECTED_GPT[name]
    info = checkpoint_info(name)
    assert (info.kind, info.preset, info.vq) == ("gpt", preset, vq)
    with torch.device("meta"):
        model = build_from_info(info)
    cfg = model.config
    assert isinstance(model, LlamaGen) and model.tok_embeddings.weight.is_meta
    arch = LLAMAGEN_PRESETS[preset]
    assert (cfg.dim, cfg.n_layer, cfg.n_head) == (arch["dim"], arch["n_layer"], arch["n_head"])
    assert (cfg.block_size, cfg.model_type, cfg.cls_token_num, cfg.vocab_size) == (
        block_size, model_type, cls_token_num, 16384)
    if model_type == "c2i":
        assert cfg.num_classes == 1000
        assert model.cls_embedding.embedding_table.weight.shape == (1001, cfg.dim)
    else:
        assert model.cls_embedding.cap_proj.fc1.weight.shape == (cfg.dim, 2048)


@pytest.mark.parametrize("name", list(EXPECTED_VQ))
def test_vq_entries_build_their_preset_on_meta(name):
    info = checkpoint_info(name)
    with torch.device("meta"):
        model = build_from_info(info)
    assert isinstance(model, VQModel) and info.kind == "vq"
    assert model.downsample_factor == info.downsample == EXPECTED_VQ[name]
    assert model.quantize.embedding.weight.shape == (16384, 8)


def test_unknown_names_list_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="c2i_B_256.*vq_ds16_t2i"):
        checkpoint_info("c2i_Z_256")
    with pytest.raises(ValueError, match="neither an existing file.*c2i_XL_384"):
        resolve_checkpoint("c2i_Z_256")
    with pytest.raises(FileNotFoundError, match="no checkpoint file .*missing.pt"):  # a path is a missing file
        resolve_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint file nope.safetensors"):
        load_vq("nope.safetensors")
    # a loader lists only the names of its own kind
    with pytest.raises(ValueError, match="known VQ tokenizer names: vq_ds16_c2i, ") as excinfo:
        load_vq("vq_nope")
    assert "c2i_B_256" not in str(excinfo.value)
    with pytest.raises(ValueError, match="known GPT names: c2i_B_256, ") as excinfo:
        load_llamagen("gpt_nope")
    assert "vq_ds16_c2i" not in str(excinfo.value)


def test_loaders_reject_the_other_kind_before_downloading(tmp_path):
    empty = tmp_path / "empty"
    with pytest.raises(ValueError, match="'vq_ds16_c2i' is a VQ tokenizer checkpoint, not a GPT; load it with load_vq"):
        load_llamagen("vq_ds16_c2i", cache_dir=empty, local_files_only=True)
    with pytest.raises(ValueError, match="load_llamagen"):
        load_vq("c2i_B_256", cache_dir=empty, local_files_only=True)


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def gpt_layouts(sd: dict) -> dict[str, object]:
    """The ways LlamaGen's scripts (DDP, DeepSpeed, FSDP, compile) store a GPT state dict."""
    junk = {
        "freqs_cis": torch.zeros(17, 4, 2),
        "layers.0.attention.kv_cache.k_cache": torch.zeros(1, 4, 24, 8),
        "layers.0.attention.kv_cache.v_cache": torch.zeros(1, 4, 24, 8),
    }
    return {
        "bare": dict(sd),
        "model": {"model": sd, "optimizer": {"state": {}}, "steps": 100, "args": argparse.Namespace(lr=1e-4)},
        "module": {"module": sd},
        "state_dict": {"state_dict": sd},
        "module_prefix": {"model": {f"module.{k}": v for k, v in sd.items()}},
        "compile_prefix": {f"_orig_mod.{k}": v for k, v in sd.items()},
        "extras": {**sd, **junk, "epoch": 3, "note": "not a tensor"},
    }


@pytest.mark.parametrize("layout", list(gpt_layouts({})))
def test_every_gpt_layout_loads_with_equal_logits(tmp_path, layout):
    model = tiny_llamagen()
    path = save(gpt_layouts(model.state_dict())[layout], tmp_path / f"{layout}.pt")
    cleaned = load_state_dict_file(path, kind="gpt")
    assert set(cleaned) == set(model.state_dict())
    loaded = load_llamagen(path, preset="GPT-B", **TINY_ARCH)
    assert isinstance(loaded, LlamaGen) and not loaded.training and loaded.hub_info is None
    assert (loaded.config.vocab_size, loaded.config.num_classes) == (64, 10)  # inferred
    assert torch.equal(gpt_logits(loaded), gpt_logits(model))


def test_safetensors_file_loads(tmp_path):
    model = tiny_llamagen(seed=2)
    path = tmp_path / "tiny.safetensors"
    save_file(model.state_dict(), str(path))
    loaded = load_llamagen(path, preset="GPT-B", **TINY_ARCH)
    assert torch.equal(gpt_logits(loaded), gpt_logits(model))


def test_t2i_gpt_loads_with_inferred_condition(tmp_path):
    model = tiny_llamagen(model_type="t2i", cls_token_num=5, n_kv_head=2)
    path = save({"module": model.state_dict()}, tmp_path / "t2i.pt")
    loaded = load_llamagen(path, preset="GPT-B", cls_token_num=5, **TINY_ARCH)
    cfg = loaded.config
    assert (cfg.model_type, cfg.caption_dim, cfg.n_kv_head) == ("t2i", 24, 2)
    assert torch.equal(gpt_logits(loaded), gpt_logits(model))


def test_custom_width_loads_without_preset_given_n_head(tmp_path):
    model = tiny_llamagen(seed=4)
    path = save(model.state_dict(), tmp_path / "custom.pt")
    loaded = load_llamagen(path, n_head=4, multiple_of=16, image_size=64)
    assert (loaded.config.dim, loaded.config.n_layer, loaded.config.block_size) == (32, 2, 16)
    assert torch.equal(gpt_logits(loaded), gpt_logits(model))
    with pytest.raises(ValueError, match="no LlamaGen preset has dim=32 and n_layer=2"):
        load_llamagen(path)


def test_device_and_dtype_placement(tmp_path):
    model = tiny_llamagen()
    path = save({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, tmp_path / "bf16.pt")
    as_float = load_llamagen(path, preset="GPT-B", device="cpu", **TINY_ARCH)
    assert as_float.output.weight.dtype == torch.float32  # default dtype, as a fresh model + load_state_dict
    as_bf16 = load_llamagen(path, preset="GPT-B", dtype=torch.bfloat16, **TINY_ARCH)
    assert as_bf16.output.weight.dtype == torch.bfloat16
    assert as_bf16.freqs_cis.dtype == torch.float32 and not as_bf16.freqs_cis.is_meta
    assert all(not t.is_meta for t in (*as_bf16.parameters(), *as_bf16.buffers()))


def test_vq_layouts_load_and_prefer_ema(tmp_path):
    model, other = tiny_vq(seed=0), tiny_vq(seed=1)
    sd = model.state_dict()
    layouts = {
        "bare": sd,
        "model": {"model": sd, "args": argparse.Namespace(vq_model="VQ-16")},
        "ema": {"model": other.state_dict(), "ema": sd},
        "state_dict": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    }
    expected = vq_outputs(model)
    assert not torch.equal(vq_outputs(other)[1], expected[1])
    for name, obj in layouts.items():
        loaded = load_vq(save(obj, tmp_path / f"{name}.pt"))  # config fully inferred from the weights
        assert isinstance(loaded, VQModel) and not loaded.training and loaded.hub_info is None
        assert loaded.config.codebook_size == 32 and loaded.downsample_factor == 16
        codes, images = vq_outputs(loaded)
        assert torch.equal(codes, expected[0]), name
        assert torch.equal(images, expected[1]), name


def test_vq8_is_inferred_from_the_stage_count(tmp_path):
    model = tiny_vq("VQ-8")
    path = tmp_path / "vq8.safetensors"
    save_file(model.state_dict(), str(path))
    loaded = load_vq(path)
    assert loaded.config.encoder_ch_mult == [1, 2, 2, 4] and loaded.downsample_factor == 8
    assert torch.equal(vq_outputs(loaded)[1], vq_outputs(model)[1])


def test_a_custom_vq_of_no_preset_loads_with_its_stages_read_from_the_weights(tmp_path):
    torch.manual_seed(0)
    model = VQModel(VQConfig(codebook_size=32, codebook_embed_dim=4, encoder_ch_mult=[1, 2, 2],
                             decoder_ch_mult=[1, 2, 4], z_channels=8, base_channels=32, num_res_blocks=1)).eval()
    path = save({"model": model.state_dict()}, tmp_path / "small_vq.pt")
    for kwargs in ({}, {"preset": "VQ-16", "encoder_ch_mult": [1, 2, 2], "decoder_ch_mult": [1, 2, 4]}):
        loaded = load_vq(path, **kwargs)  # overrides win over the preset's stages, as documented
        assert (loaded.config.encoder_ch_mult, loaded.config.decoder_ch_mult) == ([1, 2, 2], [1, 2, 4])
        assert loaded.downsample_factor == 4
        images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
        with torch.no_grad():
            assert torch.equal(loaded.encode_to_codes(images), model.encode_to_codes(images))


def test_pickle_with_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"echo pwned > {marker}",)

    path = save({"model": tiny_llamagen().state_dict(), "payload": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="arbitrary code") as excinfo:
        load_state_dict_file(path, kind="gpt")
    assert excinfo.value.__cause__ is not None
    with pytest.raises(ValueError, match="refusing"):
        load_llamagen(path, preset="GPT-B", **TINY_ARCH)
    assert not marker.exists()


def _damaged_files(tmp_path: Path) -> dict[str, Path]:
    """Files a user can end up with: text, random bytes, empty, and truncated torch / safetensors checkpoints."""
    state = tiny_llamagen().state_dict()
    whole_pt = save({"model": state}, tmp_path / "whole.pt").read_bytes()
    save_file(state, tmp_path / "whole.safetensors")
    whole_st = (tmp_path / "whole.safetensors").read_bytes()
    contents = {"text.pt": b"hello world", "random.pt": torch.randint(0, 256, (100,), generator=torch.Generator()
                                                                         .manual_seed(0)).to(torch.uint8).numpy()
                .tobytes(), "empty.pt": b"", "truncated.pt": whole_pt[: len(whole_pt) // 2],
                "truncated.safetensors": whole_st[: len(whole_st) // 2], "header.safetensors": b"xx"}
    paths = {}
    for name, data in contents.items():
        paths[name] = tmp_path / name
        paths[name].write_bytes(data)
    return paths


def test_damaged_checkpoint_files_are_a_value_error_naming_the_file(tmp_path):
    for name, path in _damaged_files(tmp_path).items():
        with pytest.raises(ValueError, match=rf"cannot read .*{name}: the file is damaged") as excinfo:
            load_state_dict_file(path, kind="gpt")
        assert "arbitrary code" not in str(excinfo.value)  # broken bytes are not a security refusal
    with pytest.raises(ValueError, match="truncated.pt: the file is damaged"):
        load_vq(tmp_path / "truncated.pt", preset="VQ-16", **TINY_VQ)
    with pytest.raises(FileNotFoundError):  # a missing file stays what it is
        load_state_dict_file(tmp_path / "missing.pt", kind="gpt")


def test_a_checkpoint_of_the_other_kind_is_named_in_the_error(tmp_path):
    vq_file = save({"model": tiny_vq().state_dict()}, tmp_path / "tok.pt")
    with pytest.raises(ValueError, match=f"^{vq_file}: the weights do not look like a LlamaGen GPT state dict"):
        load_llamagen(vq_file)
    gpt_file = save({"model": tiny_llamagen().state_dict()}, tmp_path / "gpt.pt")
    with pytest.raises(ValueError, match=f"^{gpt_file}: the weights do not look like a LlamaGen VQ state dict"):
        load_vq(gpt_file)


def test_file_without_weights_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="no weight tensors"):
        load_state_dict_file(save({"steps": 3}, tmp_path / "empty.pt"), kind="gpt")
    with pytest.raises(ValueError, match="kind"):
        load_state_dict_file(tmp_path / "empty.pt", kind="llm")


# --------------------------------------------------------------------------------------------
# Strict loading
# --------------------------------------------------------------------------------------------


def test_key_mismatch_names_missing_and_unexpected_keys(tmp_path):
    sd = tiny_llamagen().state_dict()
    sd["extra_head.weight"] = sd.pop("norm.weight")
    path = save(sd, tmp_path / "broken.pt")
    with pytest.raises(ValueError) as excinfo:
        load_llamagen(path, preset="GPT-B", **TINY_ARCH)
    message = str(excinfo.value)
    assert "missing key(s): norm.weight" in message
    assert "unexpected key(s): extra_head.weight" in message
    assert "'GPT-B'" in message


def test_shape_mismatch_is_reported(tmp_path):
    path = save(tiny_llamagen().state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(ValueError, match=r"shape mismatch.*tok_embeddings\.weight: checkpoint \(64, 32\)"):
        load_llamagen(path, preset="GPT-B", vocab_size=128, **TINY_ARCH)
    with pytest.raises(ValueError, match="missing key.*layers.2"):  # wrong depth
        load_llamagen(path, preset="GPT-B", **{**TINY_ARCH, "n_layer": 3})


# --------------------------------------------------------------------------------------------
# Hugging Face cache
# --------------------------------------------------------------------------------------------


def test_registry_name_resolves_through_the_hub_cache(tmp_path):
    model = tiny_llamagen(seed=5)
    info = LLAMAGEN_CHECKPOINTS["c2i_B_256"]
    cached = make_hub_cache(tmp_path / "hub", info, model.state_dict())
    for name in ("c2i_B_256", "c2i_B_256.pt"):
        path, found = resolve_checkpoint(name, cache_dir=tmp_path / "hub", local_files_only=True)
        assert path.resolve() == cached.resolve() and found is info
    loaded = load_llamagen("c2i_B_256", cache_dir=tmp_path / "hub", local_files_only=True,
                           vocab_size=64, num_classes=10, **TINY_ARCH)
    assert loaded.hub_info is info
    assert torch.equal(gpt_logits(loaded), gpt_logits(model))


def test_registry_entry_drives_the_config(tmp_path, monkeypatch):
    tiny = CheckpointInfo(name="c2i_B_256", repo_id="FoundationVision/LlamaGen", filename="c2i_B_256.pt",
                          kind="gpt", preset="GPT-B", image_size=64, num_classes=10, cls_token_num=1,
                          model_type="c2i", codebook_size=64, cfg_scale=2.0, vq="vq_ds16_c2i")
    monkeypatch.setitem(LLAMAGEN_CHECKPOINTS, "c2i_B_256", tiny)
    model = tiny_llamagen(seed=6)
    make_hub_cache(tmp_path / "hub", tiny, model.state_dict())
    arch = {k: v for k, v in TINY_ARCH.items() if k != "block_size"}
    loaded = load_llamagen("c2i_B_256", cache_dir=tmp_path / "hub", local_files_only=True, **arch)
    assert loaded.config.block_size == tiny.block_size == 16
    assert torch.equal(gpt_logits(loaded), gpt_logits(model))
    bigger = load_llamagen("c2i_B_256", cache_dir=tmp_path / "hub", local_files_only=True, image_size=128, **arch)
    assert bigger.config.block_size == 64 and bigger.hub_info.image_size == 128 and bigger.hub_info.token_grid == 8


def test_local_file_named_like_a_release_gets_its_entry(tmp_path):
    path = save({"model": tiny_llamagen().state_dict()}, tmp_path / "c2i_L_384.pt")
    found_path, info = resolve_checkpoint(str(path))
    assert found_path == path and info is LLAMAGEN_CHECKPOINTS["c2i_L_384"]
    loaded = load_llamagen(path, vocab_size=64, num_classes=10, **TINY_ARCH)
    assert loaded.hub_info is info
    other = save(tiny_llamagen().state_dict(), tmp_path / "my_run.pt")
    assert resolve_checkpoint(other) == (other, None)


@pytest.mark.parametrize("name", ["c2i_L_384", "t2i_XL_stage2_512"])
def test_uncached_name_offline_gives_a_clear_error(tmp_path, name):
    info = LLAMAGEN_CHECKPOINTS[name]
    with pytest.raises(FileNotFoundError) as excinfo:
        resolve_checkpoint(name, cache_dir=tmp_path / "empty", local_files_only=True)
    message = str(excinfo.value)
    assert f"hf download {info.repo_id} {info.filename}" in message
    assert "local_files_only=True" in message and "local copy" in message


def test_network_failure_gives_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def unreachable(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(FileNotFoundError, match="could not be reached; offline, --local-files-only.*HF_HUB_OFFLINE=1.*"
                                                "FoundationVision/LlamaGen vq_ds8_c2i.pt"):
        load_vq("vq_ds8_c2i", cache_dir=tmp_path, revision="v1")
    assert calls == [("FoundationVision/LlamaGen", "vq_ds8_c2i.pt",
                      dict(cache_dir=str(tmp_path), revision="v1", local_files_only=False))]


# --------------------------------------------------------------------------------------------
# Config inference (pure, on meta-device state dicts)
# --------------------------------------------------------------------------------------------


def meta_state_dict(preset: str, **overrides) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return build_llamagen(preset, **overrides).state_dict()


def test_infer_c2i_config_from_gpt_b():
    cfg = infer_llamagen_config(meta_state_dict("GPT-B"))
    assert (cfg.dim, cfg.n_layer, cfg.n_head, cfg.n_kv_head) == (768, 12, 12, None)
    assert (cfg.vocab_size, cfg.num_classes, cfg.model_type, cfg.cls_token_num) == (16384, 1000, "c2i", 1)
    assert cfg.block_size == 256
    assert infer_llamagen_config(meta_state_dict("GPT-B"), image_size=384).block_size == 576


def test_infer_t2i_and_grouped_query_configs():
    cfg = infer_llamagen_config(meta_state_dict("GPT-XL", model_type="t2i", cls_token_num=120))
    assert (cfg.dim, cfg.n_layer, cfg.n_head) == (1280, 36, 20)
    assert (cfg.model_type, cfg.caption_dim, cfg.cls_token_num) == ("t2i", 2048, 120)
    gqa = infer_llamagen_config(meta_state_dict("GPT-L", n_kv_head=4, vocab_size=8192, num_classes=10))
    assert (gqa.n_kv_head, gqa.vocab_size, gqa.num_classes) == (4, 8192, 10)
    no_null = infer_llamagen_config(meta_state_dict("GPT-B", class_dropout_prob=0.0), class_dropout_prob=0.0)
    assert no_null.num_classes == 1000


def test_infer_rejects_unknown_shapes():
    with pytest.raises(ValueError, match="no LlamaGen preset"):
        infer_llamagen_config(meta_state_dict("GPT-B", n_layer=5))
    with pytest.raises(ValueError, match="tok_embeddings"):
        infer_llamagen_config({"norm.weight": torch.ones(4)})
    with pytest.raises(ValueError, match="unknown preset"):
        infer_llamagen_config(meta_state_dict("GPT-B"), preset="GPT-Z")


def test_infer_vq_config_on_meta():
    for preset, mult in (("VQ-16", [1, 1, 2, 2, 4]), ("VQ-8", [1, 2, 2, 4])):
        with torch.device("meta"):
            sd = build_vq(preset, codebook_size=4096, codebook_embed_dim=16).state_dict()
        cfg = infer_vq_config(sd)
        assert cfg.encoder_ch_mult == mult
        assert (cfg.codebook_size, cfg.codebook_embed_dim, cfg.z_channels, cfg.base_channels) == (4096, 16, 256, 128)
    with pytest.raises(ValueError, match="VQ state dict"):
        infer_vq_config({"tok_embeddings.weight": torch.ones(2, 2)})


def test_public_api_is_exported():
    for name in hub.__all__:
        assert hasattr(hub, name)


def test_randomized_model_differs_from_fresh_one():
    # Sanity check of the fixture: equality checks above would be vacuous for identical models.
    a, b = tiny_llamagen(seed=0), randomize_(tiny_llamagen(seed=0), seed=9)
    assert not torch.equal(gpt_logits(a), gpt_logits(b))
