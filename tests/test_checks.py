"""Integer arguments: NumPy integers are accepted wherever Python ints are (and stored as ints), bools nowhere."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import tiny_config, tiny_llamagen

from tensorar_plugin import TensorARWrapper, sample_plain
from tensorar_plugin.checks import is_integer
from tensorar_plugin.models.vq import VQConfig
from tensorar_plugin.noise import discrete_tensor_noise, noise_schedule
from tensorar_plugin.train import TrainConfig


def test_is_integer_takes_python_and_numpy_integers_only():
    assert all(is_integer(v) for v in (0, -3, np.int64(4), np.uint8(2), np.int32(7)))
    assert not any(is_integer(v) for v in (True, False, np.bool_(True), 2.0, np.float32(2), "2", None,
                                           torch.tensor(2)))


def test_generation_takes_numpy_counts_and_refuses_bools():
    model = tiny_llamagen()
    cond = torch.tensor([1, 2])
    wrapper = TensorARWrapper(model, window=np.int64(2))
    assert wrapper.window == 2 and type(wrapper.config.window) is int
    a = wrapper.generate(cond, np.int64(6), greedy=True, cfg_scale=2.0, cfg_interval=np.int64(1))
    b = wrapper.generate(cond, 6, greedy=True, cfg_scale=2.0, cfg_interval=1)
    assert torch.equal(a, b) and a.shape == (2, 6)
    seeded = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(sample_plain(model, cond, np.int32(5), top_k=np.int64(3), generator=seeded()),
                       sample_plain(model, cond, 5, top_k=3, generator=seeded()))
    with pytest.raises(ValueError, match="num_tokens must be an integer"):
        wrapper.generate(cond, True)
    with pytest.raises(ValueError, match="cfg_interval must be an integer"):
        wrapper.generate(cond, 4, cfg_interval=False)
    with pytest.raises(ValueError, match="top_k must be an integer"):
        wrapper.generate(cond, 4, top_k=True)


def test_configs_store_numpy_integers_as_ints_so_they_save_as_json():
    config = tiny_config(dim=np.int64(32), n_layer=np.int32(2))
    assert type(config.dim) is int and type(config.n_layer) is int
    json.dumps(dataclasses.asdict(config))
    vq = VQConfig(codebook_size=np.int64(64), encoder_ch_mult=(np.int64(1), 2), decoder_ch_mult=[1, np.int8(2)])
    assert type(vq.codebook_size) is int
    assert all(type(m) is int for m in (*vq.encoder_ch_mult, *vq.decoder_ch_mult))
    json.dumps(dataclasses.asdict(vq))
    train = TrainConfig(max_steps=np.int64(3), batch_size=np.int16(2))
    assert type(train.max_steps) is int and type(train.batch_size) is int
    with pytest.raises(ValueError, match="n_layer must be a positive integer"):
        tiny_config(n_layer=True)
    with pytest.raises(ValueError, match="codebook_size must be a positive int"):
        VQConfig(codebook_size=True)


def test_noise_takes_numpy_window_and_codebook_sizes():
    beta = noise_schedule(np.int64(4))
    torch.testing.assert_close(beta, noise_schedule(4))
    windows = torch.zeros(3, 4, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    noisy = discrete_tensor_noise(windows, np.int64(16), generator=gen)
    assert noisy.shape == windows.shape and int(noisy.max()) < 16
    with pytest.raises(ValueError, match="window must be a positive integer"):
        noise_schedule(True)
