"""The bundled demo model, `tensorar sample`, the visualisation helpers and the `--tiny` quality benchmark."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from tensorar_plugin.cli import main as cli_main
from tensorar_plugin.demo import PatchTokenizer, demo_path, load_demo
from tensorar_plugin.visualize import history_to_tokens, image_grid, render_history, tokens_to_images

ROOT = Path(__file__).resolve().parents[1]
PIL = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models: intra-op threads only add contention (sampling was 100x slower on a busy 2-core box)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def demo():
    return load_demo(device="cpu")


def test_demo_assets_are_small_and_present():
    files = [p for p in demo_path().rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"demo_info.json", "llamagen_config.json", "tokenizer.safetensors", "tokenizer_config.json",
            "tensorar_config.json", "model.safetensors"} <= names
    assert sum(p.stat().st_size for p in files) < 5 * 2**20


def test_demo_loads_offline_and_generates(demo, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    info = demo.info
    assert info["class_names"] == [str(d) for d in range(10)]
    assert info["grid"] ** 2 == demo.wrapper.base_model.config.block_size
    assert demo.wrapper.window == info["window"] == 4
    assert not demo.wrapper.training
    cond = torch.tensor([0, 3, 7])
    gen = torch.Generator().manual_seed(0)
    out = demo.wrapper.generate(cond, generator=gen, return_history=True, **info["sampling_kwargs"])
    assert out.tokens.shape == (3, info["grid"] ** 2)
    assert out.history.shape == (3, info["grid"] ** 2, 4)
    assert torch.equal(out.history[..., -1], out.tokens)
    images = demo.vq.decode_code(out.tokens)
    assert images.shape == (3, 3, info["image_size"], info["image_size"])
    again = demo.wrapper.generate(cond, generator=torch.Generator().manual_seed(0), **info["sampling_kwargs"])
    assert torch.equal(again, out.tokens)


def test_patch_tokenizer_roundtrip(demo):
    tok = demo.vq
    codes = torch.randint(0, tok.codebook_size, (2, 64))
    images = tok.decode_code(codes)
    # a decoded image is made of codebook patches, so encoding it finds patches that decode to it exactly
    assert torch.equal(tok.decode_code(tok.encode_to_codes(images)), images)
    assert not torch.equal(images[0], images[1])  # and two random code grids are two different images
    fresh = PatchTokenizer(codebook_size=8, patch=4, image_size=8).fit(torch.rand(4, 3, 8, 8) * 2 - 1, iters=2)
    assert fresh.encode_to_codes(torch.zeros(1, 3, 8, 8)).shape == (1, 4)


def test_visualize_helpers(demo):
    tokens = torch.randint(0, 256, (5, 64))
    images = tokens_to_images(demo.vq, tokens, 8)
    assert len(images) == 5 and images[0].size == (32, 32)
    grid = image_grid(images, nrow=3, padding=2, scale=2)
    assert grid.size == (3 * 66 + 2, 2 * 66 + 2)
    history = torch.randint(0, 256, (5, 64, 4))
    history[:, :3, 0] = -1
    maps = history_to_tokens(history, tokens)
    assert maps.shape == (5, 4, 64) and torch.equal(maps[:, 0, :3], tokens[:, :3])
    picture = render_history(demo.vq, history, tokens, 8, max_samples=2)
    assert picture.size == (4 * 34 + 2, 2 * 34 + 2)
    with pytest.raises(ValueError):
        tokens_to_images(demo.vq, tokens, 7)


def test_cli_sample_writes_png_and_history(tmp_path, capsys):
    out = tmp_path / "grid.png"
    code = cli_main(["sample", "--per-class", "2", "--classes", "0", "1", "2", "--out", str(out), "--history",
                     "--no-progress", "--device", "cpu", "--seed", "1", "--threads", "1"])
    assert code == 0
    with PIL.open(out) as im:
        assert im.format == "PNG" and im.size == (2 * 66 + 2, 3 * 66 + 2)
    history = tmp_path / "grid_history.png"
    with PIL.open(history) as im:
        assert im.size == (4 * 66 + 2, 6 * 66 + 2)
    printed = capsys.readouterr().out
    assert str(out) in printed and str(history) in printed


def test_cli_sample_rejects_bad_class(tmp_path, cli_error):
    message = cli_error(["sample", "--classes", "12", "--out", str(tmp_path / "x.png"), "--no-progress"])
    assert message == "--classes [12]: class ids must be in [0, 9] (10 classes)"
    assert not (tmp_path / "x.png").exists()


def test_quality_benchmark_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("_quality_bench", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    result = module.main(["--tiny", "--seeds", "0", "1", "--threads", "1", "--out-json", str(tmp_path / "q.json"),
                          "--plot", str(tmp_path / "q.png"), "--markdown", str(tmp_path / "b.md")])
    assert (tmp_path / "q.json").is_file() and (tmp_path / "q.png").is_file()
    assert len(result["runs"]) == 4 and set(result["summary"]) == {"plain", "tensorar"}
    assert "STAND-IN" in result["settings"]["features"]["label"]
    assert "## Quality (small-scale reproduction)" in (tmp_path / "b.md").read_text()
    # re-rendering a saved result replaces the section and keeps the rest of the document
    doc = tmp_path / "doc.md"
    doc.write_text("# Benchmarks\n\n## Quality (small-scale reproduction)\n\nold table\n\n## Speed\n\nkept\n")
    module.main(["--from-json", str(tmp_path / "q.json"), "--markdown", str(doc), "--verdict", "Verdict here.",
                 "--command", "python benchmarks/quality.py --tiny"])
    text = doc.read_text()
    assert "old table" not in text and "Verdict here." in text and text.endswith("## Speed\n\nkept\n")
    assert "Command: `python benchmarks/quality.py --tiny`" in text and "| plain next-token |" in text


def _tiny_vq_file(path):
    from tensorar_plugin.models.vq import VQConfig, VQModel

    stages = [1, 2, 2, 4]  # VQ-8's stages at a small width: load_vq recognises the preset from the weights
    vq = VQModel(VQConfig(codebook_size=64, codebook_embed_dim=8, encoder_ch_mult=stages, decoder_ch_mult=stages,
                          z_channels=32, base_channels=32, num_res_blocks=1))
    torch.save(vq.state_dict(), path)
    return path


def test_cli_sample_refuses_flags_a_save_pretrained_folder_would_ignore(tmp_path, cli_error):
    from conftest import tiny_llamagen

    from tensorar_plugin import TensorARWrapper

    TensorARWrapper(tiny_llamagen(), window=3).save_pretrained(tmp_path / "run")
    vq = _tiny_vq_file(tmp_path / "vq.pt")
    base = ["sample", "--model", str(tmp_path / "run"), "--vq", str(vq), "--out", str(tmp_path / "g.png"),
            "--device", "cpu", "--no-progress", "--per-class", "1", "--classes", "0"]
    assert cli_error([*base, "--tensorar", str(tmp_path)]).startswith(
        f"--tensorar: {tmp_path / 'run'} is a save_pretrained folder, which carries its own")
    assert cli_error([*base, "--image-size", "32"]).startswith("--image-size: ")
    assert cli_error([*base, "--window", "2"]) == (f"--window 2, but {tmp_path / 'run'} holds a TensorAR model "
                                                   f"with window 3")
    assert cli_error([*base, "--window", "0"]) == "--window must be >= 1 (1 samples plainly), got 0"
    assert not (tmp_path / "g.png").exists()


def test_cli_sample_from_an_older_save_pretrained_folder_takes_its_shape_from_flags(tmp_path, capsys):
    """Without backbone_config.json the grid comes from --image-size and the tokenizer's own downsample factor
    (8 here), and a backbone that is no preset from --model-config."""
    from conftest import perturb_heads_, tiny_llamagen

    from tensorar_plugin import TensorARWrapper

    perturb_heads_(TensorARWrapper(tiny_llamagen(), window=3)).save_pretrained(tmp_path / "run")
    vq = _tiny_vq_file(tmp_path / "vq.pt")
    base = ["sample", "--model", str(tmp_path / "run"), "--vq", str(vq), "--per-class", "1", "--classes", "0", "1",
            "--device", "cpu", "--no-progress"]
    assert cli_main([*base, "--out", str(tmp_path / "with_config.png")]) == 0
    (tmp_path / "run" / "backbone_config.json").unlink()
    shape = ["--image-size", "32", "--model-config", "n_head=4", "--model-config", "multiple_of=16"]
    assert cli_main([*base, *shape, "--out", str(tmp_path / "from_flags.png")]) == 0
    with PIL.open(tmp_path / "with_config.png") as a, PIL.open(tmp_path / "from_flags.png") as b:
        assert a.tobytes() == b.tobytes()


def test_cli_sample_puts_adapter_parts_around_a_checkpoint_file_that_is_no_preset(tmp_path, capsys):
    """`finetune --freeze-backbone` of a custom backbone saves only the TensorAR parts and backbone_config.json:
    `sample --model FILE --tensorar DIR` rebuilds the backbone from that file (or from --model-config)."""
    from conftest import perturb_heads_, tiny_llamagen

    from tensorar_plugin import TensorARWrapper

    base_model = tiny_llamagen()
    torch.save({"model": base_model.state_dict()}, tmp_path / "gpt.pt")
    wrapper = perturb_heads_(TensorARWrapper(base_model, window=3, freeze_backbone=True))
    wrapper.save_pretrained(tmp_path / "parts")
    assert not (tmp_path / "parts" / "model.safetensors").exists()
    vq = _tiny_vq_file(tmp_path / "vq.pt")
    base = ["sample", "--model", str(tmp_path / "gpt.pt"), "--tensorar", str(tmp_path / "parts"), "--vq", str(vq),
            "--device", "cpu", "--no-progress", "--per-class", "1", "--classes", "0", "1"]
    assert cli_main([*base, "--out", str(tmp_path / "a.png")]) == 0
    assert "window 3" in capsys.readouterr().err
    explicit = ["--image-size", "64", "--model-config", "n_head=4", "--model-config", "multiple_of=16"]
    assert cli_main([*base, *explicit, "--out", str(tmp_path / "b.png")]) == 0
    with PIL.open(tmp_path / "a.png") as a, PIL.open(tmp_path / "b.png") as b:
        assert a.tobytes() == b.tobytes()  # same backbone either way, same seed: the same grid


def test_cli_sample_from_a_save_pretrained_folder(tmp_path, capsys):
    """A non-preset backbone is rebuilt from the backbone_config.json that save_pretrained writes."""
    import json

    from conftest import perturb_heads_, tiny_llamagen

    from tensorar_plugin import TensorARWrapper
    from tensorar_plugin.models.vq import VQConfig, VQModel

    wrapper = perturb_heads_(TensorARWrapper(tiny_llamagen(), window=3))
    wrapper.save_pretrained(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "backbone_config.json").read_text()) == wrapper.base_model.config.to_dict()
    stages = [1, 2, 2, 4]  # VQ-8's stages at a small width: load_vq recognises the preset from the weights
    vq = VQModel(VQConfig(codebook_size=64, codebook_embed_dim=8, encoder_ch_mult=stages, decoder_ch_mult=stages,
                          z_channels=32, base_channels=32, num_res_blocks=1))
    torch.save(vq.state_dict(), tmp_path / "vq.pt")
    out = tmp_path / "grid.png"
    assert cli_main(["sample", "--model", str(tmp_path / "run"), "--vq", str(tmp_path / "vq.pt"), "--per-class", "2",
                 "--classes", "0", "1", "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    with PIL.open(out) as image:
        assert image.size[0] > 0
