"""Discrete tensor noising: schedules, replacement statistics, padding, reproducibility."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorar_plugin.noise import PAD_ID, SCHEDULES, discrete_tensor_noise, noise_schedule


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("window", [2, 3, 4, 8])
def test_schedules_rise_from_zero_to_one(name, window):
    beta = noise_schedule(window, name)
    assert beta.shape == (window,)
    assert beta[0] == 0 and beta[-1] == pytest.approx(1.0)
    assert torch.all(beta[1:] > beta[:-1])


def test_schedule_shapes_differ_as_named():
    u = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0])
    torch.testing.assert_close(noise_schedule(4, "linear"), u)
    torch.testing.assert_close(noise_schedule(4, "sqrt"), u.sqrt())
    torch.testing.assert_close(noise_schedule(4, "sine"), torch.sin(u * math.pi / 2))
    exp = noise_schedule(4, "exponential")
    assert torch.all(exp[1:-1] < u[1:-1])  # convex: drafts near the final token stay cleaner than linear


def test_window_one_and_max_noise_and_callable():
    assert noise_schedule(1).tolist() == [0.0]
    torch.testing.assert_close(noise_schedule(3, "linear", max_noise=0.5), torch.tensor([0.0, 0.25, 0.5]))
    custom = noise_schedule(5, lambda u: u**2)
    torch.testing.assert_close(custom, torch.linspace(0, 1, 5) ** 2)
    assert noise_schedule(3, lambda u: torch.ones_like(u))[0] == 0  # slot 0 is never noised


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": 0}, "window"),
        ({"window": 4, "schedule": "cosine"}, "cosine"),
        ({"window": 4, "max_noise": 1.5}, "max_noise"),
        ({"window": 4, "schedule": lambda u: u * 2}, "schedule"),
    ],
)
def test_bad_schedule_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        noise_schedule(**kwargs)


def test_bad_noise_arguments_and_list_beta():
    windows = torch.randint(0, 64, (3, 4))
    for size in (0, 2.5, True):
        with pytest.raises(ValueError, match="codebook_size must be an integer"):
            discrete_tensor_noise(windows, size)
    with pytest.raises(ValueError, match="beta must hold 4 probabilities"):
        discrete_tensor_noise(windows, 64, beta=torch.tensor([0.0, float("nan"), 0.5, 1.0]))
    as_list = discrete_tensor_noise(windows, 64, beta=[0.0, 0.0, 1.0, 1.0], generator=torch.Generator().manual_seed(0))
    as_tensor = discrete_tensor_noise(windows, 64, beta=torch.tensor([0.0, 0.0, 1.0, 1.0]),
                                      generator=torch.Generator().manual_seed(0))
    assert torch.equal(as_list, as_tensor) and torch.equal(as_list[:, :2], windows[:, :2])


# Derandomized examples and a generator seeded from the shape keep this statistical test deterministic.
@settings(max_examples=15, deadline=None, derandomize=True, database=None)
@given(window=st.integers(2, 6), rows=st.integers(1, 3), schedule=st.sampled_from(sorted(SCHEDULES)))
def test_replacement_rate_matches_beta(window, rows, schedule):
    codebook, n = 50, 6000
    gen = torch.Generator().manual_seed(12345 + 97 * window + 13 * rows + len(schedule))
    clean = torch.randint(0, codebook, (rows, n, window), generator=gen)
    noised, replaced = discrete_tensor_noise(clean, codebook, schedule, generator=gen, return_mask=True)
    beta = noise_schedule(window, schedule)
    rate = replaced.float().mean(dim=(0, 1))
    stderr = torch.sqrt(beta * (1 - beta) / (rows * n)).clamp_min(1e-6)
    assert torch.all((rate - beta).abs() <= 3 * stderr + 1e-6), (rate, beta)
    assert torch.equal(noised[..., 0], clean[..., 0])  # slot 0 untouched
    assert torch.equal(noised[~replaced], clean[~replaced])  # only replaced slots change


def test_replacements_are_uniform_over_codebook():
    codebook = 20
    gen = torch.Generator().manual_seed(0)
    clean = torch.zeros(40000, 2, dtype=torch.long)  # every clean token is id 0
    noised, replaced = discrete_tensor_noise(clean, codebook, "linear", generator=gen, return_mask=True)
    values = noised[replaced]
    assert replaced[:, 1].all()  # beta(last) = 1
    counts = torch.bincount(values, minlength=codebook).float()
    expected = values.numel() / codebook
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 45.3  # 99.9% quantile of chi-square with 19 degrees of freedom


def test_padding_is_never_noised():
    windows = torch.tensor([[5, 6, PAD_ID, PAD_ID]]).repeat(1000, 1)
    noised = discrete_tensor_noise(windows, 10, "linear", generator=torch.Generator().manual_seed(1))
    assert torch.all(noised[:, 2:] == PAD_ID)


def test_generator_makes_noise_reproducible():
    clean = torch.randint(0, 30, (8, 10, 4))
    a = discrete_tensor_noise(clean, 30, generator=torch.Generator().manual_seed(7))
    b = discrete_tensor_noise(clean, 30, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, clean)


def test_noise_rejects_float_windows():
    with pytest.raises(ValueError, match="windows"):
        discrete_tensor_noise(torch.zeros(2, 4), 10)
