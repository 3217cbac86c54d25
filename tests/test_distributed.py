"""The training loop under torch.distributed on CPU (gloo): DDP and FSDP match one process.

Two processes are spawned (as torchrun would start them: RANK / WORLD_SIZE / MASTER_* in the
environment, the Trainer opens the process group itself) and train on the same global batches as
a single process. Adam is run with a large `eps` so that an update is a smooth function of the
gradient: with the default `eps` Adam's first step is `lr * sign(grad)`, which turns float rounding
differences of near-zero gradients (different reduction order) into full-size parameter differences.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import as_torchrun_process, spawn_processes, tiny_llamagen
from safetensors.torch import load_file, save_file

from tensorar_plugin import TensorARWrapper
from tensorar_plugin.data import TokenDataset
from tensorar_plugin.train import TrainConfig, Trainer

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

WORLD = 2
TIMEOUT_S = 120


def make_wrapper() -> TensorARWrapper:
    base = tiny_llamagen()
    torch.manual_seed(1)
    # no randomness inside a step: every rank must compute what the single process computes. The
    # adaptive schedule at max_noise=0 noises nothing but still tracks the draft accuracy (a buffer that
    # must come out the same on every rank and as in one process, whatever the micro-batching)
    return TensorARWrapper(base, window=4, max_noise=0.0, label_dropout=False, noise_schedule="adaptive")


def dataset() -> TokenDataset:
    gen = torch.Generator().manual_seed(0)
    return TokenDataset(torch.randint(0, 64, (16, 2, 16), generator=gen), torch.randint(0, 10, (16,), generator=gen))


def config(out: Path, **overrides) -> TrainConfig:
    base = dict(max_steps=2, batch_size=8, lr=0.05, eps=1.0, log_every=1, ckpt_every=1, progress=False,
                mixed_precision="no", ema_decay=0.5, out_dir=str(out))
    base.update(overrides)
    return TrainConfig(**base)


def plain(wrapper: TensorARWrapper) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in wrapper.state_dict().items()}


def worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    as_torchrun_process(rank, port, WORLD)
    out = Path(out)
    try:
        # DDP: two optimizer steps (grad accumulation on), a checkpoint after each
        wrapper = make_wrapper()
        trainer = Trainer(wrapper, dataset(), config(out / "ddp", grad_accum_steps=2))
        assert dist.is_initialized() and trainer.world_size == WORLD and trainer.rank == rank
        trainer.train()
        if rank == 0:
            save_file(plain(wrapper), str(out / "ddp.safetensors"))
        # every rank reads checkpoint-1 and continues: must end where the uninterrupted run ended
        again = make_wrapper()
        Trainer(again, dataset(), config(out / "ddp", grad_accum_steps=2, resume_from=str(out / "ddp" / "checkpoint-1"))
                ).train()
        if rank == 0:
            save_file(plain(again), str(out / "ddp_resumed.safetensors"))

        # FSDP2 on CPU: two steps with checkpoints, then a resume from checkpoint-1
        sharded = make_wrapper()
        Trainer(sharded, dataset(), config(out / "fsdp", fsdp=True)).train()
        resumed = make_wrapper()
        Trainer(resumed, dataset(), config(out / "fsdp_resumed", fsdp=True,
                                           resume_from=str(out / "fsdp" / "checkpoint-1"))).train()
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def ema_weights(run: Path) -> dict[str, torch.Tensor]:
    return TensorARWrapper.from_pretrained(run / "final" / "ema", tiny_llamagen(seed=5)).state_dict()


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    spawn_processes(worker, str(out), world=WORLD, timeout_s=TIMEOUT_S)
    return out


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        wrapper = make_wrapper()
        Trainer(wrapper, dataset(), config(out)).train()
    finally:
        torch.set_num_threads(previous)
    return plain(wrapper), out


def test_ddp_takes_the_same_steps_as_one_process(two_process_run, single_process_run):
    single, _ = single_process_run
    ddp = load_file(str(two_process_run / "ddp.safetensors"))
    assert max_diff(single, ddp) < 1e-6
    assert single["encoder.draft_accuracy"].min() > 0  # the accuracy estimate moved, identically
    assert max_diff(single, plain(make_wrapper())) > 1e-2  # and the steps did move the weights
    final = TensorARWrapper.from_pretrained(two_process_run / "ddp" / "final", tiny_llamagen(seed=5))
    assert max_diff(final.state_dict(), ddp) == 0.0
    assert max_diff(ema_weights(two_process_run / "ddp"), ema_weights(single_process_run[1])) < 1e-6


def test_ddp_resume_is_exact_and_only_rank_zero_writes(two_process_run, single_process_run):
    ddp = load_file(str(two_process_run / "ddp.safetensors"))
    assert max_diff(ddp, load_file(str(two_process_run / "ddp_resumed.safetensors"))) == 0.0
    run = two_process_run / "ddp"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-1", "checkpoint-2", "final", "metrics.jsonl",
                                                     "train_config.json"]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # one line per step from rank 0 (the resumed run replaced step 2's line)
    _, single_out = single_process_run
    single_lines = (single_out / "metrics.jsonl").read_text().splitlines()
    for ours, theirs in zip(lines, single_lines, strict=True):
        assert json.loads(ours)["loss"] == pytest.approx(json.loads(theirs)["loss"], abs=1e-5)


def test_fsdp_matches_one_process_and_writes_loadable_checkpoints(two_process_run, single_process_run):
    single, _ = single_process_run
    final = TensorARWrapper.from_pretrained(two_process_run / "fsdp" / "final", tiny_llamagen(seed=5))
    assert max_diff(final.state_dict(), single) < 1e-6
    step1 = TensorARWrapper.from_pretrained(two_process_run / "fsdp" / "checkpoint-1", tiny_llamagen(seed=5))
    assert max_diff(step1.state_dict(), single) > 1e-4  # one step behind
    resumed = TensorARWrapper.from_pretrained(two_process_run / "fsdp_resumed" / "final", tiny_llamagen(seed=5))
    assert max_diff(resumed.state_dict(), final.state_dict()) == 0.0
    fsdp_ema = ema_weights(two_process_run / "fsdp")
    assert max_diff(fsdp_ema, ema_weights(single_process_run[1])) < 1e-6
    assert max_diff(fsdp_ema, ema_weights(two_process_run / "fsdp_resumed")) == 0.0
