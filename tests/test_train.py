"""The fine-tuning loop: exact resume, learning, checkpoints, optimizer groups, data order, and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_llamagen
from safetensors.torch import load_file

from tensorar_plugin import TensorARWrapper
from tensorar_plugin.cli import build_parser, main
from tensorar_plugin.data import CodesDataset, TokenDataset
from tensorar_plugin.hub import load_llamagen
from tensorar_plugin.train import GlobalBatchSampler, TrainConfig, Trainer, find_latest_checkpoint


def make_wrapper(seed: int = 0, dropout: float = 0.1, **kwargs) -> TensorARWrapper:
    base = tiny_llamagen(token_dropout_p=dropout, resid_dropout_p=dropout, ffn_dropout_p=dropout)
    torch.manual_seed(seed + 1)
    return TensorARWrapper(base, window=4, **kwargs)


def random_dataset(n: int = 24, n_aug: int = 2, seed: int = 0) -> TokenDataset:
    gen = torch.Generator().manual_seed(seed)
    return TokenDataset(torch.randint(0, 64, (n, n_aug, 16), generator=gen), torch.randint(0, 10, (n,), generator=gen))


def config(tmp_path, name: str = "run", **overrides) -> TrainConfig:
    base = dict(max_steps=6, batch_size=8, lr=1e-3, log_every=2, ckpt_every=0, progress=False,
                mixed_precision="no", out_dir=str(tmp_path / name))
    base.update(overrides)
    return TrainConfig(**base)


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"differ: {different[:5]}"


# -- resume -------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, precision):
    # everything random is on: dropout, label dropout, draft noise, augmentation; plus EMA, warm-up,
    # cosine decay, accumulation and an epoch boundary between the save and the resumed steps
    opts = dict(max_steps=7, grad_accum_steps=2, warmup_steps=2, lr_schedule="cosine", ema_decay=0.9,
                mixed_precision=precision)
    data = random_dataset()
    full = make_wrapper()
    full_trainer = Trainer(full, data, config(tmp_path, "full", **opts))
    full_trainer.train()

    # the same run, "killed" after step 5 with its last checkpoint at step 4
    first = Trainer(make_wrapper(), data, config(tmp_path, "split", **{**opts, "ckpt_every": 4}))
    first.train(until_step=5)
    assert find_latest_checkpoint(tmp_path / "split").name == "checkpoint-4"
    assert not (tmp_path / "split" / "final").exists()

    resumed = make_wrapper(seed=99)  # different new-part init: the checkpoint must overwrite it
    trainer = Trainer(resumed, data, config(tmp_path, "split", **{**opts, "ckpt_every": 4, "resume_from": "latest"}))
    assert trainer.step == 4
    trainer.train()
    assert trainer.step == 7
    assert_same_state(full.state_dict(), resumed.state_dict())
    assert_same_state(full_trainer.ema, trainer.ema)
    assert full_trainer.scheduler.get_last_lr() == trainer.scheduler.get_last_lr()
    # the resumed run replaced the abandoned metrics lines past step 4
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 7]


def test_resume_with_frozen_backbone_and_workers(tmp_path):
    data = random_dataset()
    opts = dict(max_steps=5, num_workers=1)
    full = make_wrapper(freeze_backbone=True)
    Trainer(full, data, config(tmp_path, "full", **opts)).train()
    Trainer(make_wrapper(freeze_backbone=True), data, config(tmp_path, "split", **opts, ckpt_every=2)).train(3)
    ckpt = tmp_path / "split" / "checkpoint-2"
    assert (ckpt / "tensorar_adapter.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    resumed = make_wrapper(seed=7, freeze_backbone=True)
    Trainer(resumed, data, config(tmp_path, "split", **opts, resume_from=str(ckpt))).train()
    assert_same_state(full.state_dict(), resumed.state_dict())
    assert_same_state(full.base_model.state_dict(), make_wrapper().base_model.state_dict())  # frozen stayed put


def test_resume_latest_without_checkpoints_starts_fresh_and_bad_paths_fail(tmp_path):
    trainer = Trainer(make_wrapper(), random_dataset(), config(tmp_path, resume_from="latest"))
    assert trainer.step == 0
    with pytest.raises(FileNotFoundError, match="trainer_state.json not found"):
        trainer.resume(tmp_path)
    assert find_latest_checkpoint(tmp_path / "nothing") is None


def test_a_new_run_over_an_earlier_one_is_refused_unless_resumed_or_overwritten(tmp_path):
    data = random_dataset()
    Trainer(make_wrapper(), data, config(tmp_path, ckpt_every=2, max_steps=4)).train()
    run = tmp_path / "run"
    before = {p.name for p in run.iterdir()}
    assert {"metrics.jsonl", "checkpoint-2", "checkpoint-4", "final"} <= before
    with pytest.raises(FileExistsError, match=r"holds an earlier run \(metrics.jsonl, checkpoint-2/, checkpoint-4/, "
                                              r"final/\).*resume_from='latest'.*overwrite=True"):
        Trainer(make_wrapper(), data, config(tmp_path, max_steps=3))
    assert {p.name for p in run.iterdir()} == before  # refused before touching anything

    Trainer(make_wrapper(), data, config(tmp_path, max_steps=3, ckpt_every=3, overwrite=True)).train()
    assert not (run / "checkpoint-2").exists() and not (run / "checkpoint-4").exists()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 3]  # the earlier run's lines are gone, not mixed with these
    Trainer(make_wrapper(), data, config(tmp_path, max_steps=3, resume_from="latest"))  # resuming is allowed
    Trainer(make_wrapper(), data, config(tmp_path, "empty_dir", max_steps=3))  # so is a folder without a run


def test_overwrite_deletes_only_after_every_other_check_and_never_beside_a_resume(tmp_path):
    data = random_dataset()
    Trainer(make_wrapper(), data, config(tmp_path, ckpt_every=2, max_steps=2)).train()
    run = tmp_path / "run"
    before = {p.name for p in run.iterdir()}
    with pytest.raises(ValueError, match="save_backbone=False"):  # refused for another reason: nothing deleted
        Trainer(make_wrapper(), data, config(tmp_path, overwrite=True, save_backbone=False))
    assert {p.name for p in run.iterdir()} == before
    with pytest.raises(ValueError, match="overwrite=True would delete the run that resume_from continues"):
        Trainer(make_wrapper(), data, config(tmp_path, overwrite=True, resume_from="latest"))
    # resuming another folder's checkpoint into an out_dir that holds a run would mix the two
    Trainer(make_wrapper(), data, config(tmp_path, "other", ckpt_every=2, max_steps=2)).train()
    with pytest.raises(FileExistsError, match="holds an earlier run"):
        Trainer(make_wrapper(), data, config(tmp_path, "other", resume_from=str(run / "checkpoint-2")))
    Trainer(make_wrapper(), data, config(tmp_path, "fresh", resume_from=str(run / "checkpoint-2")))  # empty: fine


def test_resume_latest_refuses_a_finished_run_without_checkpoints(tmp_path):
    data = random_dataset()
    Trainer(make_wrapper(), data, config(tmp_path, max_steps=2, ckpt_every=0)).train()  # final/ only
    with pytest.raises(FileExistsError, match=r"holds a finished run \(final/\) but no checkpoint to resume"):
        Trainer(make_wrapper(), data, config(tmp_path, max_steps=2, resume_from="latest"))
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1  # untouched


def test_resume_latest_before_any_checkpoint_drops_the_stopped_runs_metrics(tmp_path):
    data = random_dataset()
    Trainer(make_wrapper(), data, config(tmp_path, max_steps=6, ckpt_every=0)).train(until_step=4)
    assert (tmp_path / "run" / "metrics.jsonl").read_text()  # stopped before its first checkpoint
    Trainer(make_wrapper(), data, config(tmp_path, max_steps=4, resume_from="latest")).train()
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]


def test_resume_on_another_device_type_reseeds_with_a_warning(tmp_path):
    """A CUDA generator state does not fit a CPU generator (and back): the streams are re-seeded instead."""
    data = random_dataset()
    Trainer(make_wrapper(), data, config(tmp_path, max_steps=2, ckpt_every=1)).train()
    state_path = tmp_path / "run" / "checkpoint-1" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state["device_type"] = "cuda"
    state_path.write_text(json.dumps(state))
    with pytest.warns(UserWarning, match="written on cuda, this run is on cpu: random streams are re-seeded"):
        trainer = Trainer(make_wrapper(), data, config(tmp_path, max_steps=2, resume_from=str(state_path.parent)))
    assert trainer.step == 1
    trainer.train()


def test_resume_refuses_a_checkpoint_of_another_window(tmp_path):
    data = random_dataset()
    Trainer(make_wrapper(), data, config(tmp_path, max_steps=1, ckpt_every=1)).train()
    other = TensorARWrapper(tiny_llamagen(), window=2)
    with pytest.raises(ValueError, match="window=4, but the wrapper has window=2"):
        Trainer(other, data, config(tmp_path, resume_from=str(tmp_path / "run" / "checkpoint-1")))



def test_resume_from_a_damaged_checkpoint_is_a_value_error_naming_the_file(tmp_path):
    data = random_dataset()
    Trainer(make_wrapper(), data, config(tmp_path, max_steps=1, ckpt_every=1)).train()
    state = tmp_path / "run" / "checkpoint-1" / "trainer_state.safetensors"
    state.write_bytes(state.read_bytes()[:100])  # a copy that stopped early
    with pytest.raises(ValueError, match=f"cannot read {state}: the file is damaged"):
        Trainer(make_wrapper(), data, config(tmp_path, resume_from="latest"))


@pytest.mark.parametrize("frozen", [False, True])
def test_resume_refuses_a_checkpoint_of_another_model_naming_the_mismatch(tmp_path, frozen):
    data = random_dataset()
    Trainer(make_wrapper(freeze_backbone=frozen), data, config(tmp_path, max_steps=1, ckpt_every=1)).train()
    wider = TensorARWrapper(tiny_llamagen(dim=48, n_head=4), window=4, freeze_backbone=frozen)
    with pytest.raises(ValueError, match=r"checkpoint-1 does not fit this model.*shape mismatch\(es\): "
                                         r"[\w.]+: checkpoint \(.+\) vs model \(.+\)"):
        Trainer(wider, data, config(tmp_path, resume_from="latest"))


# -- learning ------------------------------------------------------------------------------------


def test_loss_decreases_on_a_learnable_pattern(tmp_path):
    # every image of class c is the same class-dependent token sequence
    patterns = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(32) % 4
    data = TokenDataset(patterns[labels], labels)
    wrapper = make_wrapper(dropout=0.0)
    trainer = Trainer(wrapper, data, config(tmp_path, max_steps=40, batch_size=16, lr=3e-3, log_every=5))
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(5, 41, 5))
    assert rows[-1]["loss"] < 0.4 * rows[0]["loss"], [r["loss"] for r in rows]
    assert set(rows[0]) >= {"step", "loss", "slot_losses", "lr", "grad_norm", "tokens_per_s"}
    assert len(rows[0]["slot_losses"]) == 4 and all(math.isfinite(x) for x in rows[-1]["slot_losses"])
    assert rows[0]["tokens_per_s"] > 0


# -- checkpoints -----------------------------------------------------------------------------------


def test_checkpoint_contents_load_with_from_pretrained(tmp_path):
    wrapper = make_wrapper()
    trainer = Trainer(wrapper, random_dataset(), config(tmp_path, max_steps=3, ckpt_every=2, ema_decay=0.5,
                                                        keep_checkpoints=1))
    trainer.train()
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-3", "final", "metrics.jsonl", "train_config.json"]
    ckpt = run / "checkpoint-3"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["world_size"] == 1 and state["config"]["ema_decay"] == 0.5
    tensors = load_file(str(ckpt / "trainer_state.safetensors"))
    assert any(k.startswith("optimizer/base_model.tok_embeddings.weight/") for k in tensors)
    assert "rng/0/torch" in tensors and "rng/0/noise" in tensors
    for folder in (ckpt, run / "final"):
        loaded = TensorARWrapper.from_pretrained(folder, tiny_llamagen(seed=3))
        assert_same_state(wrapper.state_dict(), loaded.state_dict())
        ema = TensorARWrapper.from_pretrained(folder / "ema", tiny_llamagen(seed=3)).state_dict()
        assert all(torch.equal(ema[name], value) for name, value in trainer.ema.items())
        assert not torch.equal(ema["encoder.out_proj.weight"], wrapper.state_dict()["encoder.out_proj.weight"])


def test_weight_decay_follows_llamagen_groups(tmp_path):
    trainer = Trainer(make_wrapper(), random_dataset(), config(tmp_path))
    decay, no_decay = trainer._group_names
    assert "base_model.tok_embeddings.weight" in decay and "base_model.cls_embedding.embedding_table.weight" in decay
    assert "base_model.layers.0.attention.wqkv.weight" in decay
    assert "base_model.norm.weight" in no_decay and "encoder.in_proj.bias" in no_decay
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.05, 0.0]
    assert trainer.optimizer.param_groups[0]["betas"] == (0.9, 0.95)


def test_learning_rate_schedule(tmp_path):
    trainer = Trainer(make_wrapper(), random_dataset(), config(tmp_path, max_steps=10, warmup_steps=4, lr=1.0,
                                                              lr_schedule="cosine", min_lr_ratio=0.1))
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.25)
    lrs = [trainer.scheduler.lr_lambdas[0](step) for step in range(10)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="divisible by grad_accum_steps"):
        TrainConfig(batch_size=6, grad_accum_steps=4)
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(max_steps=0)
    assert TrainConfig(mixed_precision="fp32").mixed_precision == "no"
    assert TrainConfig.from_dict(TrainConfig(betas=[0.8, 0.9]).to_dict()).betas == (0.8, 0.9)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        Trainer(make_wrapper(), random_dataset(n=4), config(tmp_path))
    with pytest.raises(ValueError, match="needs a process group"):
        Trainer(make_wrapper(), random_dataset(), config(tmp_path, fsdp=True))
    with pytest.raises(ValueError, match="device must name a torch device.*'foo'"):
        TrainConfig(device="foo")
    for clip in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="grad_clip"):
            TrainConfig(grad_clip=clip)
    import numpy as np

    numpy_config = TrainConfig(lr=np.float32(1e-3), max_steps=np.int64(5), keep_checkpoints=np.int64(2))
    assert type(numpy_config.lr) is float and type(numpy_config.max_steps) is int  # saved as JSON
    json.dumps(numpy_config.to_dict())
    for name, value in (("lr", "1e-3"), ("keep_checkpoints", 1.5), ("eps", -1.0), ("shuffle", "no"),
                        ("out_dir", None), ("min_lr_ratio", float("nan"))):
        with pytest.raises(ValueError, match=name):
            TrainConfig(**{name: value})
    with pytest.raises(ValueError, match="save_backbone=False, but the backbone is trained"):
        Trainer(make_wrapper(), random_dataset(), config(tmp_path, save_backbone=False))
    Trainer(make_wrapper(freeze_backbone=True), random_dataset(), config(tmp_path, save_backbone=False))


def test_train_until_step_must_be_a_step(tmp_path):
    trainer = Trainer(make_wrapper(), random_dataset(), config(tmp_path, max_steps=3))
    for bad in (-3, 2.7, "3", True):
        with pytest.raises(ValueError, match="until_step must be an integer >= 0"):
            trainer.train(until_step=bad)
    assert trainer.step == 0
    trainer.train(until_step=1)
    assert trainer.step == 1


def test_trainer_on_cuda_without_a_gpu_is_a_value_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'cuda', but torch sees no CUDA GPU here"):
        Trainer(make_wrapper(), random_dataset(), config(tmp_path, device="cuda"))


@pytest.mark.parametrize(("bad_code", "bad_label", "match"), [
    (64, 9, "ids outside the codebook"),
    (63, 10, "labels must lie in"),  # 10 is the null class: 1-based labels would train unconditionally
    (63, 11, "class ids outside"),
])
def test_training_data_outside_the_model_is_refused_naming_it(tmp_path, bad_code, bad_label, match):
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 64, (8, 16), generator=gen)
    labels = torch.randint(0, 10, (8,), generator=gen)
    codes[3, 5], labels[2] = bad_code, bad_label
    data = TokenDataset(codes, labels)
    with pytest.raises(ValueError, match=f"training data does not fit the model: .*{match}"):
        Trainer(make_wrapper(), data, config(tmp_path, max_steps=1)).train()


class _PaddedCaptions(torch.utils.data.Dataset):
    """(codes [16], caption features [5, 24], mask [5]): every caption padded at its first two positions."""

    def __init__(self, pad_value: float):
        gen = torch.Generator().manual_seed(0)
        self.codes = torch.randint(0, 64, (8, 16), generator=gen)
        self.feats = torch.randn(8, 5, 24, generator=gen)
        self.feats[:, :2] = pad_value
        self.mask = torch.tensor([[0, 0, 1, 1, 1]] * 8)

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return self.codes[i], self.feats[i], self.mask[i]


class _Triples(torch.utils.data.Dataset):
    def __init__(self, third):
        self.third = third

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.randint(0, 64, (16,)), self.third[0], self.third[1]


def test_a_third_item_must_be_a_valid_caption_mask(tmp_path):
    wrapper = TensorARWrapper(tiny_llamagen(), window=2)  # class-conditional: no masks
    with pytest.raises(ValueError, match="third element, taken as a condition mask, but this model is class-cond"):
        Trainer(wrapper, _Triples((torch.tensor(3), torch.ones(1))), config(tmp_path, max_steps=1)).train()
    t2i = TensorARWrapper(tiny_llamagen(model_type="t2i", cls_token_num=5), window=2)
    weights = _Triples((torch.randn(5, 24), torch.full((5,), 0.5)))  # per-position weights, not a 0/1 mask
    with pytest.raises(ValueError, match="training data does not fit the model: cond_mask must hold only 1"):
        Trainer(t2i, weights, config(tmp_path, "b", max_steps=1)).train()


def test_trainer_passes_a_caption_mask_so_padding_cannot_change_training(tmp_path):
    def final_state(pad_value: float, name: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        base = tiny_llamagen(model_type="t2i", cls_token_num=5, class_dropout_prob=0.0)
        wrapper = TensorARWrapper(base, window=4)
        Trainer(wrapper, _PaddedCaptions(pad_value), config(tmp_path, name, max_steps=2, batch_size=4)).train()
        return wrapper.state_dict()

    assert_same_state(final_state(0.0, "a"), final_state(100.0, "b"))  # the padded positions are never seen


def test_trainer_keeps_prompt_id_conditions_whole(tmp_path):
    """Integer conditions of more than one position (prompt ids) must not be flattened like [B, 1] labels."""
    from test_hf_adapter import tiny_llama  # a Llama LM over [prompt ids] + [image ids]

    gen = torch.Generator().manual_seed(0)
    wrapper = TensorARWrapper(tiny_llama(), window=2)
    data = torch.utils.data.TensorDataset(torch.randint(0, 100, (8, 8), generator=gen),
                                          torch.randint(0, 100, (8, 3), generator=gen))
    metrics = Trainer(wrapper, data, config(tmp_path, max_steps=1, batch_size=4)).train()
    assert math.isfinite(metrics["loss"])


def test_resume_applies_a_changed_schedule_and_learning_rate_with_a_warning(tmp_path):
    """Extending a cosine run: the new max_steps and lr win over the checkpoint's (and say so)."""
    data = random_dataset()
    opts = dict(lr_schedule="cosine", ckpt_every=2)
    Trainer(make_wrapper(), data, config(tmp_path, max_steps=4, **opts)).train()
    with pytest.warns(UserWarning, match=r"max_steps 4 -> 8, lr 0.001 -> 0.002"):
        trainer = Trainer(make_wrapper(), data, config(tmp_path, max_steps=8, lr=2e-3, resume_from="latest", **opts))
    assert trainer.step == 4
    expected = 2e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 8))
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    before = {k: v.clone() for k, v in trainer.wrapper.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in trainer.wrapper.state_dict().items())


def test_final_is_written_when_a_finished_run_stopped_before_writing_it(tmp_path):
    data = random_dataset()
    trainer = Trainer(make_wrapper(), data, config(tmp_path, max_steps=2, ckpt_every=2))
    trainer.train()
    import shutil

    shutil.rmtree(tmp_path / "run" / "final")  # as if killed between the last checkpoint and save_final
    Trainer(make_wrapper(), data, config(tmp_path, max_steps=2, ckpt_every=2, resume_from="latest")).train()
    assert (tmp_path / "run" / "final" / "tensorar_config.json").is_file()


def test_global_batch_sampler_shards_each_global_batch():
    single = list(GlobalBatchSampler(20, 8, seed=3, epoch=1))
    assert len(single) == 2 and all(len(b) == 8 for b in single)
    ranks = [list(GlobalBatchSampler(20, 8, world_size=2, rank=r, grad_accum_steps=2, seed=3, epoch=1))
             for r in range(2)]
    for step in range(2):
        shards = [b for r in range(2) for b in ranks[r][2 * step: 2 * step + 2]]
        assert all(len(b) == 2 for b in shards)
        assert sorted(i for b in shards for i in b) == sorted(single[step])
    assert list(GlobalBatchSampler(20, 8, seed=3, epoch=1, start_batch=1)) == single[1:]
    assert list(GlobalBatchSampler(20, 8, seed=3, epoch=2)) != single
    assert list(GlobalBatchSampler(8, 4, shuffle=False)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for kwargs, match in ((dict(rank=2, world_size=2), "rank must be"), (dict(world_size=0), "world_size"),
                          (dict(grad_accum_steps=0), "grad_accum_steps")):
        with pytest.raises(ValueError, match=match):
            GlobalBatchSampler(8, 4, **kwargs)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        GlobalBatchSampler(8, 0)


# -- the command line ---------------------------------------------------------------------------------

TINY_FLAGS = ["--image-size", "64", "--model-config", "n_head=4", "--model-config", "multiple_of=16"]


def write_codes(root, n: int = 12) -> None:
    (root / "toy64_codes").mkdir(parents=True)
    (root / "toy64_labels").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        np.save(root / "toy64_codes" / f"{i}.npy", rng.integers(0, 64, (1, 2, 16)))
        np.save(root / "toy64_labels" / f"{i}.npy", np.array([i % 10]))


def test_cli_finetune_end_to_end(tmp_path, capsys):
    torch.save({"model": tiny_llamagen().state_dict()}, tmp_path / "tiny.pt")
    write_codes(tmp_path / "codes")
    common = ["finetune", "--model", str(tmp_path / "tiny.pt"), *TINY_FLAGS, "--codes", str(tmp_path / "codes"),
              "--out", str(tmp_path / "run"), "--batch-size", "4", "--save-every", "2", "--num-workers", "0",
              "--no-progress", "--precision", "no", "--window", "3", "--lr", "1e-3"]
    assert main([*common, "--steps", "3"]) == 0
    assert "model saved to" in capsys.readouterr().out
    run = tmp_path / "run"
    assert {"checkpoint-2", "checkpoint-3", "final", "metrics.jsonl"} <= {p.name for p in run.iterdir()}
    base = load_llamagen(tmp_path / "tiny.pt", image_size=64, n_head=4, multiple_of=16)
    model = TensorARWrapper.from_pretrained(run / "final", base)
    assert model.window == 3
    tokens = model.generate(torch.tensor([1, 2]), cfg_scale=1.5, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (2, 16)
    saved = json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())
    assert saved["config"]["extra"]["window"] == 3 and saved["config"]["betas"] == [0.9, 0.95]

    # continue the same run to more steps, now recomputing the logits (a memory setting: free to change)
    assert saved["config"]["recompute_logits"] is False
    assert main([*common, "--steps", "4", "--resume", "latest", "--recompute-logits"]) == 0
    resumed = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())
    assert resumed["step"] == 4 and resumed["config"]["recompute_logits"] is True

    # the same --out again without --resume: refused, naming the ways on; --overwrite starts again
    assert main([*common, "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "holds an earlier run" in err and "--resume latest" in err and "--overwrite" in err
    assert main([*common, "--steps", "2", "--overwrite"]) == 0
    assert {p.name for p in run.iterdir() if p.name.startswith("checkpoint-")} == {"checkpoint-2"}


def test_cli_finetune_reads_several_code_sets_of_the_same_images(tmp_path, capsys, cli_error):
    torch.save({"model": tiny_llamagen().state_dict()}, tmp_path / "tiny.pt")
    write_codes(tmp_path / "crop110")
    write_codes(tmp_path / "crop105")
    common = ["finetune", "--model", str(tmp_path / "tiny.pt"), *TINY_FLAGS, "--out", str(tmp_path / "run"),
              "--batch-size", "4", "--num-workers", "0", "--no-progress", "--precision", "no", "--steps", "1"]
    assert main([*common, "--codes", str(tmp_path / "crop110"), str(tmp_path / "crop105")]) == 0
    saved = json.loads((tmp_path / "run" / "checkpoint-1" / "trainer_state.json").read_text())
    assert saved["config"]["extra"]["codes"] == [str(tmp_path / "crop110"), str(tmp_path / "crop105")]
    write_codes(tmp_path / "fewer", n=8)
    message = cli_error([*common, "--out", str(tmp_path / "run2"), "--codes", str(tmp_path / "crop110"),
                         str(tmp_path / "fewer")])
    assert "must hold the same images: 8 and 12 items" in message
    assert cli_error([*common, "--codes", str(tmp_path / "crop110"), str(tmp_path / "crop105"),
                      "--no-augment"]).startswith("--no-augment always reads the first view of the first --codes "
                                                  "folder, so the other 1 would never be read")
    # resuming on other codes is allowed, and said
    with pytest.warns(UserWarning, match=r"checkpoint-1 was saved by a run with other settings than this one: codes "
                                         r"\[.*crop105'\] -> '.*crop110'; continuing with this run's"):
        assert main([*common, "--steps", "2", "--resume", "latest", "--codes", str(tmp_path / "crop110")]) == 0


def test_cli_finetune_training_settings_are_saved_and_kept_by_init_from(tmp_path, capsys):
    torch.save({"model": tiny_llamagen().state_dict()}, tmp_path / "tiny.pt")
    write_codes(tmp_path / "codes")
    common = ["finetune", "--model", str(tmp_path / "tiny.pt"), *TINY_FLAGS, "--codes", str(tmp_path / "codes"),
              "--batch-size", "4", "--save-every", "0", "--num-workers", "0", "--no-progress", "--precision", "no",
              "--window", "3", "--steps", "1"]
    settings = ["--noise-schedule", "adaptive", "--slot-weights", "1", "0.5", "0.5", "--draft-source", "model"]
    assert main([*common, *settings, "--out", str(tmp_path / "a")]) == 0
    saved = json.loads((tmp_path / "a" / "final" / "tensorar_config.json").read_text())
    assert (saved["noise_schedule"], saved["slot_weights"], saved["draft_source"]) == ("adaptive", [1, 0.5, 0.5],
                                                                                        "model")
    capsys.readouterr()

    # --init-from keeps the saved settings; the same flags are fine, different ones are refused by name
    init = [*common, "--init-from", str(tmp_path / "a" / "final")]
    assert main([*init, *settings, "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    assert main([*init, "--slot-weights", "1", "1", "1", "--max-noise", "1.0", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert ("asks for --slot-weights [1.0, 1.0, 1.0] (saved: [1.0, 0.5, 0.5]); drop these flags or start a fresh "
            "model") in err
    assert not (tmp_path / "c").exists()

    # a weight per slot, named in the error
    assert main([*common, "--slot-weights", "1", "0.1", "--out", str(tmp_path / "d")]) == 2
    assert "slot_weights must be 3 non-negative numbers with a positive sum, got [1.0, 0.1]" in capsys.readouterr().err


def test_cli_reports_bad_data_naming_the_file(tmp_path, capsys):
    torch.save(tiny_llamagen().state_dict(), tmp_path / "tiny.pt")
    write_codes(tmp_path / "codes", n=4)
    np.save(tmp_path / "codes" / "toy64_codes" / "0.npy", np.zeros((1, 2, 36), dtype=np.int64))
    rc = main(["finetune", "--model", str(tmp_path / "tiny.pt"), *TINY_FLAGS, "--codes", str(tmp_path / "codes"),
               "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "toy64_codes/0.npy: wrong grid size: 36 tokens per image, expected 16" in err
    # a bad file met in a DataLoader worker: the same one line, not the worker's wrapped traceback
    np.save(tmp_path / "codes" / "toy64_codes" / "0.npy", np.zeros((1, 2, 16), dtype=np.int64))
    np.save(tmp_path / "codes" / "toy64_codes" / "3.npy", np.full((1, 2, 16), 99, dtype=np.int64))
    rc = main(["finetune", "--model", str(tmp_path / "tiny.pt"), *TINY_FLAGS, "--codes", str(tmp_path / "codes"),
               "--out", str(tmp_path / "run2"), "--steps", "2", "--batch-size", "2", "--no-progress",
               "--num-workers", "1", "--no-augment"])
    err = capsys.readouterr().err
    assert rc == 2 and "toy64_codes/3.npy" in err and "Original Traceback" not in err, err


@pytest.mark.parametrize(("flags", "message"), [
    (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["--grad-accum", "3"], "--batch-size (4) must be divisible by --grad-accum (3)"),
    (["--beta1", "1.5"], "--beta1/--beta2 must be two numbers in [0, 1), got (1.5, 0.95)"),
    (["--ema", "2"], "--ema must be in [0, 1) or None, got 2.0"),
    (["--save-every", "-1"], "--save-every must be an integer >= 0, got -1"),
    (["--device", "foo"], "--device foo: "),
    (["--fsdp"], "--fsdp shards the model over the processes of a torchrun launch"),
    (["--window", "0"], "--window must be >= 1, got 0"),
    (["--codes", "elsewhere"], "--codes: "),
])
def test_cli_finetune_refuses_bad_settings_naming_the_flag(tmp_path, cli_error, monkeypatch, flags, message):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    torch.save(tiny_llamagen().state_dict(), tmp_path / "tiny.pt")
    write_codes(tmp_path / "codes", n=4)
    error = cli_error(["finetune", "--model", str(tmp_path / "tiny.pt"), *TINY_FLAGS, "--codes",
                       str(tmp_path / "codes"), "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "4",
                       "--no-progress", *flags])
    assert error.startswith(message), error
    assert not (tmp_path / "run").exists()


def test_cli_finetune_on_cuda_without_a_gpu_is_a_one_line_error(tmp_path, cli_error, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    error = cli_error(["finetune", "--model", str(tmp_path / "tiny.pt"), "--codes", str(tmp_path),
                       "--device", "cuda"])
    assert error == "--device cuda, but torch sees no CUDA GPU here"


def test_cli_options_all_have_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["finetune"]
    options = {s for a in sub._actions for s in a.option_strings}
    for flag in ("--model", "--codes", "--window", "--out", "--steps", "--batch-size", "--lr", "--warmup",
                 "--grad-accum", "--precision", "--ema", "--freeze-backbone", "--save-every", "--resume", "--seed",
                 "--device", "--image-size", "--num-workers", "--noise-schedule", "--max-noise", "--fsdp",
                 "--preset", "--model-config", "--slot-weights", "--draft-source", "--init-from"):
        assert flag in options
    assert all(a.help for a in sub._actions)


def test_codes_dataset_feeds_the_trainer(tmp_path):
    write_codes(tmp_path / "codes")
    data = CodesDataset(tmp_path / "codes", num_tokens=16, codebook_size=64, num_classes=10)
    trainer = Trainer(make_wrapper(), data, config(tmp_path, max_steps=2, batch_size=4, mixed_precision="bf16"))
    metrics = trainer.train()
    assert metrics["step"] == 2 and math.isfinite(metrics["loss"])


def test_trainer_defers_the_adaptive_accuracy_only_while_training(tmp_path):
    wrapper = make_wrapper(noise_schedule="adaptive")
    Trainer(wrapper, random_dataset(), config(tmp_path, max_steps=2)).train()
    assert wrapper.encoder.draft_accuracy.min() > 0 and wrapper._pending_accuracy is None  # folded in every step
    assert wrapper.defer_draft_accuracy is False  # a later hand-written loop updates on every forward again


def test_recompute_logits_trains_like_the_default(tmp_path, monkeypatch):
    data = random_dataset()
    runs, calls = {}, []
    recomputed_loss = TensorARWrapper._recomputed_loss
    monkeypatch.setattr(TensorARWrapper, "_recomputed_loss", lambda *a: calls.append(1) or recomputed_loss(*a))
    for recompute in (False, True):
        wrapper = make_wrapper()
        Trainer(wrapper, data, config(tmp_path, f"recompute_{recompute}", max_steps=4, recompute_logits=recompute,
                                      grad_accum_steps=2)).train()
        assert len(calls) == (8 if recompute else 0)  # every micro-batch of the second run, none of the first
        lines = (tmp_path / f"recompute_{recompute}" / "metrics.jsonl").read_text().splitlines()
        runs[recompute] = wrapper.state_dict(), [json.loads(line)["loss"] for line in lines]
    (default_state, default_losses), (lean_state, lean_losses) = runs[False], runs[True]
    assert lean_losses == pytest.approx(default_losses, rel=1e-5) and len(lean_losses) == 2
    for name, value in default_state.items():
        torch.testing.assert_close(lean_state[name], value, rtol=1e-4, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match="recompute_logits"):
        config(tmp_path, recompute_logits=1)


def test_compiled_training_forward_trains_like_eager_and_checkpoints_the_same_keys(tmp_path):
    data = random_dataset()
    eager = make_wrapper(dropout=0.0)
    Trainer(eager, data, config(tmp_path, "eager", max_steps=3, ckpt_every=3)).train()
    compiled = make_wrapper(dropout=0.0)
    trainer = Trainer(compiled, data, config(tmp_path, "compiled", max_steps=3, ckpt_every=3,
                                             compile={"backend": "aot_eager", "fullgraph": False}))
    assert isinstance(trainer.forward_model, torch._dynamo.eval_frame.OptimizedModule)
    torch._dynamo.utils.counters.clear()
    trainer.train()
    assert torch._dynamo.utils.counters["frames"]["ok"] > 0  # the steps ran through dynamo
    assert trainer.forward_model._orig_mod is trainer.model  # checkpoints keep reading the plain model
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)
    keys = lambda run: set(load_file(tmp_path / run / "checkpoint-3" / "model.safetensors"))  # noqa: E731
    assert keys("compiled") == keys("eager")
    with pytest.raises(ValueError, match="compile must be True, False or a dict"):
        config(tmp_path, compile="yes")
    with pytest.raises(ValueError, match="compile options must be JSON values"):
        config(tmp_path, compile={"backend": lambda gm, inputs: gm})
    with pytest.raises(ValueError, match="fullgraph.*torch.Generator"):
        config(tmp_path, compile={"fullgraph": True})
