"""Datasets of image tokens: LlamaGen's code layout (`CodesDataset`) and in-memory tensors (`TokenDataset`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tensorar_plugin.data import CodesDataset, CodeSetsDataset, TokenDataset


def write_layout(root: Path, codes: list[np.ndarray], labels: list[int], name: str = "imagenet64") -> Path:
    """LlamaGen's extract_codes_c2i.py layout: <root>/<name>_codes/<i>.npy and <name>_labels/<i>.npy."""
    (root / f"{name}_codes").mkdir(parents=True)
    (root / f"{name}_labels").mkdir(parents=True)
    for i, (array, label) in enumerate(zip(codes, labels, strict=True)):
        np.save(root / f"{name}_codes" / f"{i}.npy", array)
        np.save(root / f"{name}_labels" / f"{i}.npy", np.array([label], dtype=np.int64))
    return root


def llamagen_codes(n: int = 6, n_aug: int = 2, length: int = 16, vocab: int = 64, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, (1, n_aug, length), dtype=np.int64) for _ in range(n)]


# -- CodesDataset: reading ---------------------------------------------------------------------


def test_reads_llamagen_layout_and_returns_long_tensors(tmp_path):
    codes = llamagen_codes()
    ds = CodesDataset(write_layout(tmp_path, codes, [3, 1, 4, 1, 5, 9]), codebook_size=64, num_tokens=16)
    assert len(ds) == 6 and ds.num_tokens == 16 and ds.num_augmentations == 2
    for i in range(len(ds)):
        tokens, label = ds[i]
        assert tokens.dtype == torch.long and tokens.shape == (16,)
        assert label.dtype == torch.long and label.shape == () and int(label) == [3, 1, 4, 1, 5, 9][i]
        assert any(np.array_equal(tokens.numpy(), row) for row in codes[i][0])
    assert ds[-1][1] == 9
    with pytest.raises(IndexError):
        ds[6]


def test_augmentation_choice_is_seeded_per_epoch_and_index(tmp_path):
    codes = llamagen_codes(n=40, n_aug=2)
    root = write_layout(tmp_path, codes, [0] * 40)

    def picks(ds):
        return [int(np.where((codes[i][0] == ds[i][0].numpy()).all(axis=1))[0][0]) for i in range(len(ds))]

    a, b = CodesDataset(root, seed=1), CodesDataset(root, seed=1)
    assert picks(a) == picks(b)  # reproducible
    assert picks(a) == picks(a)  # independent of read order / repetition
    assert 0 < sum(picks(a)) < 40  # both augmentations are used
    first = picks(a)
    a.set_epoch(1)
    assert picks(a) != first  # a new draw every epoch
    assert picks(CodesDataset(root, seed=2)) != first
    assert sum(picks(CodesDataset(root, augment=False))) == 0


# -- CodeSetsDataset: several code sets of the same images ------------------------------------------------


def test_code_sets_pick_a_set_then_a_view_uniformly_and_reproducibly(tmp_path):
    n = 2000
    sets = {"crop110": llamagen_codes(n=n, n_aug=2, seed=1), "crop105": llamagen_codes(n=n, n_aug=2, seed=2)}
    labels = [i % 7 for i in range(n)]
    for name, codes in sets.items():
        write_layout(tmp_path / name, codes, labels, name=name)

    def build(seed=0, augment=True):
        return CodeSetsDataset([CodesDataset(tmp_path / name) for name in sets], seed=seed, augment=augment)

    def picks(ds):
        """(set, view) of every item, found by content."""
        out = []
        for i in range(len(ds)):
            tokens, label = ds[i]
            assert int(label) == labels[i]
            out.append(next((s, v) for s, codes in enumerate(sets.values()) for v in range(2)
                            if np.array_equal(codes[i][0, v], tokens.numpy())))
        return out

    ds = build()
    first = picks(ds)
    counts = np.bincount([2 * s + v for s, v in first], minlength=4) / n
    np.testing.assert_allclose(counts, 0.25, atol=0.035)  # uniform over sets, and views independent of the set
    assert picks(build()) == first  # reproducible, whatever the read order
    ds.set_epoch(1)
    assert picks(ds) != first and picks(build(seed=1)) != first
    assert repr(ds).startswith("CodeSetsDataset([") and "items=2000" in repr(ds)


def test_code_sets_leave_their_members_as_they_were(tmp_path):
    labels = list(range(40))
    a = CodesDataset(write_layout(tmp_path / "a", llamagen_codes(n=40, n_aug=2, seed=1), labels, name="a"), seed=5)
    b = CodesDataset(write_layout(tmp_path / "b", llamagen_codes(n=40, n_aug=2, seed=2), labels, name="b"),
                     augment=False)
    alone = [a[i][0] for i in range(40)]
    both = CodeSetsDataset([a, b], seed=0)
    both.set_epoch(3)
    [both[i] for i in range(40)]
    assert (a.seed, a.augment, a.epoch, b.seed, b.augment, b.epoch) == (5, True, 0, 0, False, 0)
    assert all(torch.equal(a[i][0], alone[i]) for i in range(40))  # a member still serves its own views
    # the choices follow the CodeSetsDataset's seed and flag alone: members made otherwise give the same items
    plain = CodeSetsDataset([CodesDataset(a.codes_dir), CodesDataset(b.codes_dir)], seed=0)
    plain.set_epoch(3)
    assert all(torch.equal(both[i][0], plain[i][0]) for i in range(40))
    views_of_b = {v for i in range(40) for v, row in enumerate(b._read_codes(i)) if np.array_equal(row, both[i][0])}
    assert views_of_b == {0, 1}  # b's own augment=False does not pin the views read from it to the first


def test_code_sets_refuse_augment_off_with_several_sets_and_warn_on_uneven_views(tmp_path):
    labels = [0, 1, 2, 3]
    a = CodesDataset(write_layout(tmp_path / "a", llamagen_codes(n=4, n_aug=2), labels, name="a"))
    ten = CodesDataset(write_layout(tmp_path / "t", llamagen_codes(n=4, n_aug=10), labels, name="t"))
    with pytest.raises(ValueError, match=r"augment=False always reads the first view of the first set, so the other "
                                         r"1 set\(s\) would never be read"):
        CodeSetsDataset([a, a], augment=False)
    single = CodeSetsDataset([a], augment=False)
    assert all(torch.equal(single[i][0], torch.from_numpy(a._read_codes(i)[0])) for i in range(4))
    with pytest.warns(UserWarning, match=r"different numbers of views per image \(.*a_codes 2, .*t_codes 10\).*"
                                         r"read 5x as often"):
        CodeSetsDataset([a, ten])


def test_code_sets_must_hold_the_same_images(tmp_path):
    labels = [0, 1, 2, 3]
    a = CodesDataset(write_layout(tmp_path / "a", llamagen_codes(n=4), labels, name="a"))
    fewer = CodesDataset(write_layout(tmp_path / "b", llamagen_codes(n=3), labels[:3], name="b"))
    with pytest.raises(ValueError, match=r"must hold the same images: 3 and 4 items, item 3 is in one but not"):
        CodeSetsDataset([a, fewer])
    other_grid = CodesDataset(write_layout(tmp_path / "c", llamagen_codes(n=4, length=25), labels, name="c"))
    with pytest.raises(ValueError, match="code sets of one dataset need one grid"):
        CodeSetsDataset([a, other_grid])
    relabelled = CodesDataset(write_layout(tmp_path / "d", llamagen_codes(n=4), [0, 1, 5, 3], name="d"))
    mixed = CodeSetsDataset([a, relabelled])
    with pytest.raises(ValueError, match=r"d_labels/2\.npy and .*a_labels/2\.npy: the code sets disagree"):
        for _ in range(20):  # until item 2 is read from the second set
            mixed.set_epoch(mixed.epoch + 1)
            mixed[2]
    with pytest.raises(ValueError, match=r"a_labels/2\.npy: the code sets disagree on the class of this image \(\[2,"):
        mixed.verify(progress=False)
    with pytest.raises(ValueError, match="non-empty sequence of CodesDataset"):
        CodeSetsDataset([])


@pytest.mark.parametrize("shape", [(2, 16), (16,)])
def test_accepts_two_and_one_dimensional_code_files(tmp_path, shape):
    rng = np.random.default_rng(0)
    codes = [rng.integers(0, 64, shape) for _ in range(3)]
    ds = CodesDataset(write_layout(tmp_path, codes, [0, 1, 2]))
    tokens, label = ds[2]
    assert tokens.shape == (16,) and int(label) == 2
    assert ds.num_augmentations == (shape[0] if len(shape) == 2 else 1)


def test_root_may_be_the_codes_folder_itself_and_files_sort_numerically(tmp_path):
    codes = llamagen_codes(n=12, n_aug=1)
    write_layout(tmp_path, codes, list(range(12)))
    ds = CodesDataset(tmp_path / "imagenet64_codes")
    assert [int(ds[i][1]) for i in range(12)] == list(range(12))  # 10.npy after 9.npy
    for folder in ("imagenet64_codes", "imagenet64_labels"):  # zero-padded names, as other tools write them
        for path in (tmp_path / folder).glob("*.npy"):
            path.rename(path.with_name(f"{int(path.stem):05d}.npy"))
    padded = CodesDataset(tmp_path / "imagenet64_codes")
    assert [int(padded[i][1]) for i in range(12)] == list(range(12)) and padded.code_path(3).name == "00003.npy"
    (tmp_path / "imagenet64_codes" / "3.npy").write_bytes((tmp_path / "imagenet64_codes" / "00003.npy").read_bytes())
    with pytest.raises(ValueError, match=r"00003.npy and 3.npy are the same item number"):
        CodesDataset(tmp_path / "imagenet64_codes")


# -- CodesDataset: errors name the file -----------------------------------------------------------


def test_missing_label_file_is_named(tmp_path):
    write_layout(tmp_path, llamagen_codes(n=3), [0, 1, 2])
    (tmp_path / "imagenet64_labels" / "1.npy").unlink()
    with pytest.raises(ValueError, match=r"imagenet64_labels/1\.npy.*missing label file"):
        CodesDataset(tmp_path)


def test_missing_label_folder_is_named(tmp_path):
    (tmp_path / "x_codes").mkdir()
    np.save(tmp_path / "x_codes" / "0.npy", np.zeros((1, 1, 16), dtype=np.int64))
    with pytest.raises(ValueError, match=r"x_labels: missing label folder"):
        CodesDataset(tmp_path)


def test_wrong_grid_size_is_named(tmp_path):
    codes = llamagen_codes(n=3)
    codes[2] = np.zeros((1, 2, 25), dtype=np.int64)  # a 5x5 grid among 4x4 ones
    root = write_layout(tmp_path, codes, [0, 0, 0])
    with pytest.raises(ValueError, match=r"imagenet64_codes/2\.npy: wrong grid size: 25 tokens .* expected 16"):
        CodesDataset(root, validate=True)
    ds = CodesDataset(root)  # lazily: the first bad read fails, naming the file
    ds[0]
    with pytest.raises(ValueError, match=r"2\.npy: wrong grid size.*as in .*0\.npy"):
        ds[2]
    with pytest.raises(ValueError, match=r"0\.npy: wrong grid size: 16 tokens per image, expected 256"):
        CodesDataset(root, num_tokens=256)


def test_non_square_grid_is_named(tmp_path):
    root = write_layout(tmp_path, [np.zeros((1, 2, 15), dtype=np.int64)], [0])
    with pytest.raises(ValueError, match=r"0\.npy: wrong grid size: 15 tokens per image is not a square"):
        CodesDataset(root)


def test_ids_beyond_the_codebook_are_named(tmp_path):
    codes = llamagen_codes(n=3, vocab=64)
    codes[1][0, 1, 5] = 64
    root = write_layout(tmp_path, codes, [0, 0, 0])
    with pytest.raises(ValueError, match=r"imagenet64_codes/1\.npy: token id 64 is beyond the codebook "
                                         r"\(codebook_size=64"):
        CodesDataset(root, codebook_size=64, validate=True)
    CodesDataset(root, codebook_size=65, validate=True)
    codes[1][0, 1, 5] = -3
    np.save(root / "imagenet64_codes" / "1.npy", codes[1])
    with pytest.raises(ValueError, match=r"1\.npy: token ids must be >= 0"):
        CodesDataset(root)[1]


def test_other_bad_files_are_named(tmp_path):
    root = write_layout(tmp_path, [np.zeros((1, 1, 16), dtype=np.float32)], [0])
    with pytest.raises(ValueError, match=r"0\.npy: codes must be integer token ids"):
        CodesDataset(root)
    (root / "imagenet64_codes" / "0.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match=r"0\.npy: not a readable \.npy array"):
        CodesDataset(root)
    np.save(root / "imagenet64_codes" / "0.npy", np.zeros((2, 2, 16), dtype=np.int64))
    with pytest.raises(ValueError, match=r"0\.npy: codes must have shape"):
        CodesDataset(root)
    np.save(root / "imagenet64_codes" / "0.npy", np.zeros((1, 1, 16), dtype=np.int64))
    np.save(root / "imagenet64_labels" / "0.npy", np.array([7]))
    with pytest.raises(ValueError, match=r"imagenet64_labels/0\.npy: class id 7 is outside \[0, 4\]"):
        CodesDataset(root, num_classes=5)


def test_layout_errors(tmp_path):
    with pytest.raises(ValueError, match="codes folder not found"):
        CodesDataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no <name>_codes folder"):
        CodesDataset(tmp_path)
    write_layout(tmp_path / "two", llamagen_codes(n=1), [0], name="a")
    write_layout(tmp_path / "two", llamagen_codes(n=1), [0], name="b")
    with pytest.raises(ValueError, match=r"several code folders \(a_codes, b_codes\)"):
        CodesDataset(tmp_path / "two")
    assert len(CodesDataset(tmp_path / "two" / "b_codes")) == 1
    (tmp_path / "empty_codes").mkdir()
    (tmp_path / "empty_labels").mkdir()
    with pytest.raises(ValueError, match="no <i>.npy code files"):
        CodesDataset(tmp_path / "empty_codes")


# -- TokenDataset ------------------------------------------------------------------------------


def test_token_dataset_serves_in_memory_tensors():
    codes = torch.arange(3 * 2 * 16).reshape(3, 2, 16) % 64
    ds = TokenDataset(codes, torch.tensor([5, 6, 7]), seed=3)
    tokens, label = ds[1]
    assert tokens.dtype == torch.long and tokens.shape == (16,) and label.shape == () and int(label) == 6
    assert any(torch.equal(tokens, row) for row in codes[1])
    flat = TokenDataset(np.zeros((4, 16), dtype=np.int32), np.arange(4))
    assert len(flat) == 4 and flat[3][0].dtype == torch.long and int(flat[3][1]) == 3


def test_token_dataset_errors():
    with pytest.raises(ValueError, match="not a square grid"):
        TokenDataset(torch.zeros(2, 15, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must have shape \[2\]"):
        TokenDataset(torch.zeros(2, 16, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="beyond the codebook"):
        TokenDataset(torch.full((2, 16), 9), torch.zeros(2, dtype=torch.long), codebook_size=8)
    with pytest.raises(ValueError, match="integer token ids"):
        TokenDataset(torch.zeros(2, 16), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="class ids"):
        TokenDataset(torch.zeros(2, 16, dtype=torch.long), torch.tensor([0, 3]), num_classes=3)
    with pytest.warns(UserWarning, match=r"read as \[N, n_aug=4, 4 tokens\]; if they are \[N, h, w\] token grids"):
        ambiguous = TokenDataset(torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    assert ambiguous.num_augmentations == 4 and ambiguous.num_tokens == 4  # read as documented, and said so
    two_views = TokenDataset(torch.zeros(2, 2, 16, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    assert two_views.num_augmentations == 2
