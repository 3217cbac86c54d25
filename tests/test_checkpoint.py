"""save_pretrained / from_pretrained / push_to_hub for TensorARWrapper."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import batch, perturb_heads_, tiny_llamagen
from safetensors.torch import load_file

from tensorar_plugin import TensorARWrapper
from tensorar_plugin.wrapper import ADAPTER_NAME, CONFIG_NAME, WEIGHTS_NAME


def trained_like(window=4, **kwargs) -> TensorARWrapper:
    return perturb_heads_(TensorARWrapper(tiny_llamagen(seed=1), window=window, **kwargs), seed=4)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_full_round_trip_is_bit_exact(tmp_path):
    wrapper = trained_like(slot_weights=[1, 1, 0.5, 0.5], noise_schedule="sine")
    wrapper.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).is_file() and not (tmp_path / ADAPTER_NAME).exists()
    loaded = TensorARWrapper.from_pretrained(tmp_path, tiny_llamagen(seed=99))
    assert_same_state(wrapper, loaded)
    assert loaded.config == wrapper.config
    tokens, cond = batch()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(tokens, cond).logits, wrapper.eval()(tokens, cond).logits)
    assert torch.equal(loaded.generate(cond, greedy=True, draft="argmax"),
                       wrapper.generate(cond, greedy=True, draft="argmax"))


def test_adapter_only_round_trip(tmp_path):
    wrapper = trained_like(freeze_backbone=True)
    wrapper.save_pretrained(tmp_path)
    assert (tmp_path / ADAPTER_NAME).is_file() and not (tmp_path / WEIGHTS_NAME).exists()
    stored = load_file(str(tmp_path / ADAPTER_NAME))
    assert stored and all(k.startswith(("encoder.", "decoder.")) for k in stored)
    loaded = TensorARWrapper.from_pretrained(tmp_path, tiny_llamagen(seed=1))
    assert_same_state(wrapper, loaded)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["window"] == 4 and config["includes_backbone"] is False
    # it comes back as it was saved: backbone frozen, so saving again writes the adapter format again
    assert loaded.backbone_frozen and not any(p.requires_grad for p in loaded.base_model.parameters())
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / ADAPTER_NAME).is_file() and not (tmp_path / "again" / WEIGHTS_NAME).exists()
    full = tmp_path / "full"
    trained_like().save_pretrained(full)
    assert not TensorARWrapper.from_pretrained(full, tiny_llamagen(seed=1)).backbone_frozen


def test_a_wrapper_starts_in_the_mode_of_the_model_it_wraps(tmp_path):
    """nn.Module's default (training) would leave an eval-mode checkpoint half in training mode."""
    for mode in (False, True):
        base = tiny_llamagen().train(mode)
        wrapper = TensorARWrapper(base, window=3)
        assert wrapper.training is mode and all(m.training is mode for m in wrapper.modules())
    trained_like().save_pretrained(tmp_path)
    loaded = TensorARWrapper.from_pretrained(tmp_path, tiny_llamagen(seed=1))  # an eval-mode base model
    assert not any(m.training for m in loaded.modules())
    tokens, cond = batch()
    with torch.no_grad():
        assert torch.equal(loaded(tokens, cond).loss, loaded(tokens, cond).loss)  # no draft noise: repeatable


def test_save_backbone_overrides_and_replaces_stale_file(tmp_path):
    wrapper = trained_like()
    wrapper.save_pretrained(tmp_path, save_backbone=False)
    wrapper.save_pretrained(tmp_path, save_backbone=True)
    assert (tmp_path / WEIGHTS_NAME).is_file() and not (tmp_path / ADAPTER_NAME).exists()


def test_loading_for_another_window_fails_clearly(tmp_path):
    trained_like(window=4).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="window=4"):
        TensorARWrapper.from_pretrained(tmp_path, tiny_llamagen(), window=2)
    # a config edited to another window no longer matches the stored tensors
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["window"] = 3
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"window=3.*shape mismatch\(es\)"):
        TensorARWrapper.from_pretrained(tmp_path, tiny_llamagen())


def test_loading_around_a_model_of_another_width_fails_clearly(tmp_path):
    trained_like().save_pretrained(tmp_path, save_backbone=False)
    with pytest.raises(ValueError, match="width 32.*width 64"):
        TensorARWrapper.from_pretrained(tmp_path, tiny_llamagen(dim=64))


def test_missing_files_and_newer_format(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        TensorARWrapper.from_pretrained(tmp_path, tiny_llamagen())
    trained_like().save_pretrained(tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=ADAPTER_NAME):
        TensorARWrapper.from_pretrained(tmp_path, tiny_llamagen())
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["format_version"] = 99
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="upgrade"):
        TensorARWrapper.from_pretrained(tmp_path, tiny_llamagen())


def test_truncated_weights_file_is_a_value_error_naming_it(tmp_path):
    trained_like().save_pretrained(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"cannot read {weights}: the file is damaged"):
        TensorARWrapper.from_pretrained(tmp_path, tiny_llamagen())


def test_damaged_config_file_is_a_value_error_naming_it(tmp_path):
    trained_like().save_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text('{"window": 4, "noise_')
    with pytest.raises(ValueError, match=f"cannot read {tmp_path / CONFIG_NAME}: the file is damaged"):
        TensorARWrapper.from_pretrained(tmp_path, tiny_llamagen())


def test_offline_hub_repo_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="'someone/not-here' is neither a local folder nor a Hugging Face "
                                                "Hub repo that could be fetched.*hf download someone/not-here"):
        TensorARWrapper.from_pretrained("someone/not-here", tiny_llamagen(), local_files_only=True,
                                        cache_dir=str(tmp_path))


@pytest.mark.parametrize("name", ["runs/b256/final", "/no/such/dir", "./final"])
def test_missing_local_folder_is_named_as_a_folder_without_asking_the_hub(tmp_path, monkeypatch, name):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("a path must not reach the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"no folder {name}: pass the folder written by save_pretrained"):
        TensorARWrapper.from_pretrained(name, tiny_llamagen())


def test_custom_schedule_is_recorded_and_can_be_supplied_again(tmp_path):
    wrapper = trained_like(noise_schedule=lambda u: u**2)
    wrapper.save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["noise_schedule"] == "custom"
    schedule = lambda u: u**3  # noqa: E731
    loaded = TensorARWrapper.from_pretrained(tmp_path, tiny_llamagen(), noise_schedule=schedule)
    assert loaded._schedule is schedule
    with pytest.warns(UserWarning, match="custom noise schedule, which cannot be saved"):
        assert TensorARWrapper.from_pretrained(tmp_path, tiny_llamagen())._schedule == "exponential"
    named = TensorARWrapper.from_pretrained(tmp_path, tiny_llamagen(), noise_schedule="linear")
    assert named._schedule == "linear" and named.config.noise_schedule == "linear"
    with pytest.raises(ValueError, match="noise_schedule must be one of"):
        TensorARWrapper.from_pretrained(tmp_path, tiny_llamagen(), noise_schedule="cosine")


def test_the_adaptive_schedule_cannot_be_switched_at_load_time(tmp_path):
    """Its state (the draft accuracy) lives in the weights: a requested fixed schedule would be overruled."""
    TensorARWrapper(tiny_llamagen(), window=3, noise_schedule="adaptive").save_pretrained(tmp_path / "adaptive")
    TensorARWrapper(tiny_llamagen(), window=3).save_pretrained(tmp_path / "fixed")
    with pytest.raises(ValueError, match="cannot be switched on or off"):
        TensorARWrapper.from_pretrained(tmp_path / "adaptive", tiny_llamagen(), noise_schedule="linear")
    with pytest.raises(ValueError, match="cannot be switched on or off"):
        TensorARWrapper.from_pretrained(tmp_path / "fixed", tiny_llamagen(), noise_schedule="adaptive")
    loaded = TensorARWrapper.from_pretrained(tmp_path / "adaptive", tiny_llamagen(), noise_schedule="adaptive")
    assert loaded.adaptive_beta() is not None


def test_push_to_hub_uploads_safetensors_config_and_card(tmp_path, monkeypatch):
    """push_to_hub goes through huggingface_hub's ModelHubMixin (its HfApi is replaced by a recorder)."""
    from pathlib import Path

    import huggingface_hub.hub_mixin as hub_mixin

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
            calls["repo"] = (repo_id, private, exist_ok)
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def upload_folder(self, *, repo_id, folder_path, commit_message, **kwargs):
            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            calls["card"] = (Path(folder_path) / "README.md").read_text()
            calls["message"] = commit_message
            return type("Info", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()

    monkeypatch.setattr(hub_mixin, "HfApi", FakeApi)
    wrapper = trained_like(freeze_backbone=True)
    assert isinstance(wrapper, hub_mixin.ModelHubMixin)
    url = wrapper.push_to_hub("me/tensorar-tiny", token="t0k")
    assert url == "https://hub/me/tensorar-tiny/commit/1"
    assert calls["repo"] == ("me/tensorar-tiny", None, True) and calls["token"] == "t0k"
    assert calls["files"] == ["README.md", "backbone_config.json", ADAPTER_NAME, CONFIG_NAME]
    assert "# me/tensorar-tiny" in calls["card"] and "window (tokens per predicted tensor): 4" in calls["card"]
    assert "only the TensorAR parts" in calls["card"]


def test_local_save_writes_a_model_card(tmp_path):
    trained_like().save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "library_name: tensorar-plugin" in card and "the whole model" in card
    assert not (tmp_path / "config.json").exists()  # our config is tensorar_config.json


def test_save_pretrained_can_write_other_tensors_under_the_same_keys(tmp_path):
    wrapper = trained_like()
    shadow = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v for k, v in wrapper.state_dict().items()}
    wrapper.save_pretrained(tmp_path / "full", state_dict=shadow)
    wrapper.save_pretrained(tmp_path / "parts", state_dict=shadow, save_backbone=False)
    full = load_file(str(tmp_path / "full" / WEIGHTS_NAME))
    parts = load_file(str(tmp_path / "parts" / ADAPTER_NAME))
    assert full.keys() == shadow.keys() and all(torch.equal(full[k], shadow[k]) for k in full)
    assert parts and all(k.startswith(("encoder.", "decoder.")) and torch.all(v == 0.5) for k, v in parts.items())
    assert not torch.all(wrapper.encoder.query == 0.5)  # the live weights are untouched


def test_mixin_entry_point_and_copies(tmp_path):
    import copy

    from huggingface_hub import ModelHubMixin

    wrapper = trained_like()
    wrapper.save_pretrained(tmp_path)
    loaded = ModelHubMixin.from_pretrained.__func__(TensorARWrapper, tmp_path, model=tiny_llamagen(seed=5))
    assert_same_state(wrapper, loaded)
    with pytest.raises(ValueError, match="base model"):
        ModelHubMixin.from_pretrained.__func__(TensorARWrapper, tmp_path)
    assert_same_state(copy.deepcopy(wrapper), wrapper)
