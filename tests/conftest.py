"""Shared fixtures: tiny LlamaGen configs that run in milliseconds on a CPU."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch

from tensorar_plugin.models.llamagen import LlamaGen, LlamaGenConfig


def tiny_config(**overrides) -> LlamaGenConfig:
    """A 2-layer, 32-wide LlamaGen on a 4x4 token grid with a 64-entry codebook."""
    base = dict(
        dim=32, n_layer=2, n_head=4, multiple_of=16, vocab_size=64, block_size=16, num_classes=10,
        cls_token_num=1, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0,
        class_dropout_prob=0.1, caption_dim=24,
    )
    base.update(overrides)
    return LlamaGenConfig(**base)


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Give every parameter (and the zero-initialised head) random values so outputs are informative."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * std + (1.0 if param.ndim == 1 else 0.0))
    return model


def tiny_llamagen(seed: int = 0, **overrides) -> LlamaGen:
    torch.manual_seed(seed)
    return randomize_(LlamaGen(tiny_config(**overrides)), seed=seed).eval()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: extra intra-op threads only add overhead (and contention on shared CI cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def perturb_heads_(wrapper, seed: int = 0):
    """Move a TensorARWrapper's new parts away from their zero-initialised output projections."""
    for module in wrapper.new_modules().values():
        randomize_(module, seed=seed, std=0.3)
    return wrapper


def batch(b: int = 3, t: int = 16, seed: int = 0):
    """Random image tokens `[b, t]` (codebook 64) and class ids `[b]` (10 classes)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (b, t), generator=gen), torch.randint(0, 10, (b,), generator=gen)


@pytest.fixture
def tiny_c2i() -> LlamaGen:
    return tiny_llamagen()


@pytest.fixture
def tiny_t2i() -> LlamaGen:
    return tiny_llamagen(model_type="t2i", cls_token_num=5, n_kv_head=2)


@pytest.fixture
def cli_error(capsys, monkeypatch):
    """Run `tensorar ARGV` expecting a mistake in its input: exit code 2 and one `tensorar CMD: error:` line
    on stderr (no traceback). Returns the message after `error: `."""
    from tensorar_plugin.cli import main

    monkeypatch.delenv("TENSORAR_TRACEBACK", raising=False)

    def run(argv: list[str]) -> str:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        prefix = f"tensorar {argv[0]}: error: "
        errors = [line for line in err.splitlines() if line.startswith(prefix)]  # after any progress lines
        assert len(errors) == 1 and "Traceback" not in err, err
        return errors[0][len(prefix):]

    return run


def as_torchrun_process(rank: int, port: int, world: int = 2) -> None:
    """Set the environment torchrun gives process `rank` of `world` (a gloo group on `port` of this machine)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))


def spawn_processes(worker, *args, world: int = 2, timeout_s: float = 120, what: str = "run") -> None:
    """Run `worker(rank, port, *args)` in `world` spawned processes (`port`: a free one for their process group);
    the test fails if they have not finished after `timeout_s` (they are killed then)."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.spawn(worker, args=(port, *args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world}-process {what} did not finish within {timeout_s} s")
