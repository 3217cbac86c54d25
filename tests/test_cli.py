"""The `tensorar` console script."""

from __future__ import annotations

import pytest

from tensorar_plugin import __version__
from tensorar_plugin.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: tensorar" in capsys.readouterr().out


# -- mistakes get one `error:` line, before any model is loaded or image sampled -------------------------


@pytest.mark.parametrize(("flags", "message"), [
    (["--temperature", "0"], "--temperature must be a finite number"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--top-k", "-3"], "--top-k must be an integer >= 0"),
    (["--cfg-scale", "-2"], "--cfg-scale must be a finite number >= 0"),
    (["--scale", "0"], "--scale must be >= 1"),
    (["--history-samples", "0"], "--history-samples must be >= 1"),
    (["--window", "2"], "--window: these flags apply to hub models, checkpoint files and save_pretrained"),
    (["--tensorar", "somewhere", "--preset", "GPT-B"], "--tensorar, --preset: these flags apply to hub models"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--out", "noext"], "--out noext: the file name needs an image suffix such as .png"),
])
def test_sample_flag_mistakes_are_reported_as_errors(tmp_path, monkeypatch, flags, message, cli_error):
    monkeypatch.chdir(tmp_path)
    assert message in cli_error(["sample", "--out", "x.png", "--no-progress", "--device", "cpu", *flags])
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "noext").exists()


def test_missing_gpu_and_bad_paths_are_one_line_errors(tmp_path, monkeypatch, cli_error):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for command in (["sample"], ["sample-npz", "--num-samples", "1"], ["fid", str(tmp_path), str(tmp_path)]):
        message = cli_error([*command, "--device", "cuda", "--no-progress"]
                            + {"sample": ["--out", str(tmp_path / "out.png")],
                               "sample-npz": ["--out", str(tmp_path / "out")]}.get(command[0], []))
        assert message == "--device cuda, but torch sees no CUDA GPU here"
    assert "missing.pt" in cli_error(["sample", "--model", str(tmp_path / "missing.pt"), "--device", "cpu",
                                      "--no-progress", "--out", str(tmp_path / "x.png")])
    monkeypatch.setenv("TENSORAR_TRACEBACK", "1")  # the full traceback on request
    with pytest.raises((ValueError, FileNotFoundError)):
        main(["sample", "--model", str(tmp_path / "missing.pt"), "--device", "cpu", "--out", str(tmp_path / "x.png")])


def test_hub_models_default_to_no_top_k_for_fid_samples(monkeypatch):
    """LlamaGen's FID numbers use top_k=0; its demo grids use the registry's 2000."""
    import argparse

    from conftest import tiny_llamagen

    from tensorar_plugin import hub
    from tensorar_plugin.commands import sample

    def fake_gpt(name, **kwargs):
        model = tiny_llamagen()
        model.hub_info = hub.LLAMAGEN_CHECKPOINTS["c2i_B_256"]
        return model

    monkeypatch.setattr(hub, "load_llamagen", fake_gpt)
    monkeypatch.setattr(hub, "load_vq", lambda name, **kwargs: object())
    args = argparse.Namespace(
        model="c2i_B_256", tensorar=None, vq=None, image_size=None, window=None, preset=None, model_config=[],
        cache_dir=None, local_files_only=False)
    assert hub.LLAMAGEN_CHECKPOINTS["c2i_B_256"].top_k == 2000
    assert sample.load_model(args, "cpu", None)[3]["top_k"] == 2000
    assert sample.load_model(args, "cpu", None, fid_defaults=True)[3]["top_k"] == 0


def test_flag_context_keeps_errors_that_cannot_be_rebuilt_from_a_message():
    """`about_flag` re-raises with the flag in front; JSONDecodeError & co. become the listed kind they are."""
    import json

    from tensorar_plugin.cli import about_flag

    with pytest.raises(ValueError, match=r"^--tensorar dir: Expecting value") as excinfo:
        with about_flag("--tensorar", "dir"):
            json.loads("")
    assert type(excinfo.value) is ValueError
    with pytest.raises(FileNotFoundError, match="^--vq: no checkpoint file x.pt"):
        with about_flag("--vq", "x.pt"):
            raise FileNotFoundError("no checkpoint file x.pt")
