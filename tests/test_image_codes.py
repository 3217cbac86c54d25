"""`tokenize_images` and `tensorar tokenize`: images into LlamaGen's code layout, resumable and split over processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import as_torchrun_process, spawn_processes
from safetensors.torch import save_file

from tensorar_plugin.cli import main as cli_main
from tensorar_plugin.data import CodesDataset
from tensorar_plugin.image_codes import RECORD_SUFFIX, center_crop, ten_crop_views, tokenize_images
from tensorar_plugin.models.vq import VQConfig, VQModel, build_vq, images_to_tensor


def tiny_vq(seed: int = 0) -> VQModel:
    """A 4x-downsampling tokenizer with 64 codes (16 px images -> 4x4 grids)."""
    torch.manual_seed(seed)
    return VQModel(VQConfig(codebook_size=64, codebook_embed_dim=8, encoder_ch_mult=[1, 2, 2],
                            decoder_ch_mult=[1, 2, 2], z_channels=32, base_channels=32)).eval()


class CountingVQ(torch.nn.Module):
    """Wraps a tokenizer and records how many views each `encode_to_codes` call got; can fail on a given call.
    The first call of every `tokenize_images` run is its one-image check, before any file is written."""

    def __init__(self, vq: VQModel, fail_on_call: int | None = None):
        super().__init__()
        self.vq, self.calls, self.fail_on_call = vq, [], fail_on_call

    def encode_to_codes(self, images: torch.Tensor) -> torch.Tensor:
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise RuntimeError("simulated crash")
        self.calls.append(images.shape[0])
        return self.vq.encode_to_codes(images)


def random_images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def read_layout(codes_dir: Path) -> dict[str, bytes]:
    """Every code and label file of an output, by relative path: byte-identical outputs compare equal."""
    root = codes_dir.parent
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*/*.npy"))}


def image_folder(root: Path, counts: dict[str, int], size: int = 20, seed: int = 1) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


# -- tokenize_images ----------------------------------------------------------------------------


def test_tokenize_arrays_writes_the_layout_codes_dataset_reads(tmp_path):
    vq = tiny_vq()
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    codes_dir = tokenize_images(images, vq, tmp_path, labels=[0, 1, 2, 1, 0], batch_size=2, progress=False)
    assert codes_dir == tmp_path / "images16_codes"
    raw = np.load(codes_dir / "3.npy")
    assert raw.shape == (1, 2, 16) and raw.dtype == np.int64
    assert np.load(tmp_path / "images16_labels" / "3.npy").tolist() == [1]
    x = images_to_tensor(images)
    with torch.no_grad():
        plain, flipped = vq.encode_to_codes(x), vq.encode_to_codes(x.flip(-1))
    assert np.array_equal(raw[0, 0], plain[3].numpy()) and np.array_equal(raw[0, 1], flipped[3].numpy())
    ds = CodesDataset(tmp_path, num_tokens=16, codebook_size=64, validate=True)
    assert len(ds) == 5 and int(ds[2][1]) == 2 and ds.num_augmentations == 2

    with pytest.raises(ValueError, match="already holds 5 .npy files"):
        tokenize_images(images[:2], vq, tmp_path, labels=[0, 0], progress=False)
    tokenize_images(images[:2], vq, tmp_path, labels=[0, 0], progress=False, overwrite=True, flip=False)
    ds = CodesDataset(tmp_path)
    assert len(ds) == 2 and ds.num_augmentations == 1


def test_tokenize_image_folder_with_class_subfolders(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    folder = tmp_path / "images"
    for name, count in (("cat", 2), ("ant", 1), ("dog", 2)):
        (folder / name / "sub").mkdir(parents=True)
        for i in range(count):
            shape = (28, 28, 3) if name == "dog" else (24, 20, 3)  # not square / not one size: center-cropped
            array = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(array).save(folder / name / ("sub" if i else ".") / f"{i}.png")
    (folder / "cat" / "notes.txt").write_text("ignored")
    codes_dir = tokenize_images(folder, tiny_vq(), tmp_path / "out", image_size=16, progress=False, name="pets")
    ds = CodesDataset(codes_dir)
    assert [int(ds[i][1]) for i in range(len(ds))] == [0, 1, 1, 2, 2]  # ant, cat, cat, dog, dog
    assert json.loads((tmp_path / "out" / "pets_classes.json").read_text())["classes"] == ["ant", "cat", "dog"]
    with pytest.raises(ValueError, match="labels must not be given"):
        tokenize_images(folder, tiny_vq(), tmp_path / "x", labels=[0], progress=False)
    with pytest.raises(ValueError, match=r"ant/0\.png: images are 20x24, not square; pass image_size="):
        tokenize_images(folder, tiny_vq(), tmp_path / "y", progress=False)  # without image_size: square images only


def test_tokenize_errors(tmp_path):
    vq = tiny_vq()
    with pytest.raises(ValueError, match="labels are required"):
        tokenize_images(np.zeros((2, 16, 16, 3), np.uint8), vq, tmp_path)
    with pytest.raises(ValueError, match="got 2 images but 3 labels"):
        tokenize_images(np.zeros((2, 16, 16, 3), np.uint8), vq, tmp_path, labels=[0, 1, 2])
    with pytest.raises(ValueError, match="image 1: image is 8x8"):
        tokenize_images([np.zeros((16, 16, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)], vq, tmp_path,
                        labels=[0, 0], progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        tokenize_images(tmp_path / "empty", vq, tmp_path / "out")
    with pytest.raises(ValueError, match="labels must be integer class ids, got dtype float64"):
        tokenize_images(np.zeros((2, 16, 16, 3), np.uint8), vq, tmp_path, labels=[0.9, 2.7])  # not cut to 0, 2
    with pytest.raises(ValueError, match="images are 24x16, not square; pass image_size="):
        tokenize_images(np.zeros((2, 16, 24, 3), np.uint8), vq, tmp_path / "wide", labels=[0, 1], progress=False)


def test_folder_order_and_labels_are_image_folders(tmp_path):
    datasets = pytest.importorskip("torchvision.datasets")
    from PIL import Image

    folder = tmp_path / "images"
    for n, relative in enumerate(("cat/z.png", "cat/a/1.png", "cat/a/b/0.jpg", "cat/B/2.PNG", "dog/x.bmp",
                                  "dog/.5.png")):
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(n).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, format="BMP" if path.suffix == ".bmp" else None, quality=100)
    vq = tiny_vq()
    codes_dir = tokenize_images(folder, vq, tmp_path / "out", progress=False)
    (folder / ".hidden").mkdir()  # not a class for us (ImageFolder would count it), so added after
    reference = datasets.ImageFolder(str(folder), allow_empty=True)
    assert len(reference.samples) == len(CodesDataset(codes_dir)) == 6
    for i, (path, label) in enumerate(reference.samples):  # its order and labels (shifted by the hidden class)
        with torch.no_grad():
            expected = vq.encode_to_codes(images_to_tensor(reference.loader(path)))
        assert np.array_equal(np.load(codes_dir / f"{i}.npy")[0, 0], expected[0].numpy()), path
        assert int(np.load(codes_dir.parent / "images16_labels" / f"{i}.npy")[0]) == label - 1, path
    (folder / "emu").mkdir()
    with pytest.raises(ValueError, match=r"emu: no image files .* in this class folder; every sub-folder"):
        tokenize_images(folder, vq, tmp_path / "out2", progress=False)


def test_unreadable_files_and_odd_inputs_are_named(tmp_path):
    vq = tiny_vq()
    folder = image_folder(tmp_path / "images", {"ant": 2})
    (folder / "ant" / "9.ppm").write_bytes(b"P6\n4\xa1 4\n255\n" + bytes(48))  # PIL raises a bare ValueError
    with pytest.raises(ValueError, match=r"ant/9\.ppm: cannot read image \("):
        tokenize_images(folder, vq, tmp_path / "out", image_size=16, progress=False)
    with pytest.raises(ValueError, match="images must not be empty"):
        tokenize_images([], vq, tmp_path / "x", labels=[])
    with pytest.raises(ValueError, match=r"got 16 images but 1 labels \(a 3-d array is read as \[N, H, W\] grey"):
        tokenize_images(random_images(1)[0], vq, tmp_path / "x", labels=[0])
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"file\.png: not a folder"):
        tokenize_images(tmp_path / "file.png", vq, tmp_path / "x")
    with pytest.raises(ValueError, match="image_size must be an integer >= 1, got 1.5"):
        tokenize_images(random_images(2), vq, tmp_path / "x", labels=[0, 1], image_size=1.5)
    codes_dir = tokenize_images(random_images(2, size=20), vq, tmp_path / "y", labels=[0, 1], progress=False,
                                image_size=np.int64(16))  # NumPy integers work (and go into the JSON record)
    assert np.load(codes_dir / "0.npy").shape == (1, 2, 16)


def test_sixteen_bit_grey_images_keep_their_high_byte_and_float_images_are_refused(tmp_path):
    from PIL import Image

    grey8 = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    folder = tmp_path / "images" / "ant"
    folder.mkdir(parents=True)
    Image.fromarray(grey8).save(folder / "a8.png")
    Image.fromarray(grey8.astype(np.uint16) * 256 + 100).save(folder / "b16.png")  # same high byte, 16 bits
    assert Image.open(folder / "b16.png").mode == "I;16"
    vq = tiny_vq()
    codes_dir = tokenize_images(tmp_path / "images", vq, tmp_path / "out", progress=False)
    assert np.array_equal(np.load(codes_dir / "0.npy"), np.load(codes_dir / "1.npy"))
    Image.fromarray(grey8.astype(np.float32)).save(folder / "c.tiff")
    with pytest.raises(ValueError, match=r"ant/c\.tiff: floating-point image \(mode F\); convert it to 8-bit"):
        tokenize_images(tmp_path / "images", vq, tmp_path / "out2", progress=False)


def test_overwrite_removes_the_class_names_of_an_earlier_folder_run(tmp_path):
    folder = image_folder(tmp_path / "images", {"ant": 1, "bee": 1}, size=16)
    tokenize_images(folder, tiny_vq(), tmp_path / "out", image_size=16, progress=False)
    assert (tmp_path / "out" / "images16_classes.json").is_file()
    tokenize_images(random_images(2), tiny_vq(), tmp_path / "out", labels=[0, 1], progress=False, overwrite=True)
    assert not (tmp_path / "out" / "images16_classes.json").exists()


def test_center_crop():
    from PIL import Image

    out = center_crop(Image.new("RGB", (100, 60)), 16)
    assert out.size == (16, 16)
    # a 120x60 image, red | green | blue in vertical thirds: the 16x16 crop of its 32x16 resize is the middle
    stripes = np.zeros((60, 120, 3), np.uint8)
    for third in range(3):
        stripes[:, 40 * third: 40 * (third + 1), third] = 255
    crop = np.asarray(center_crop(Image.fromarray(stripes), 16)).astype(int)
    assert crop.shape == (16, 16, 3)
    assert (crop[:, 3:13, 1] > 200).all() and (crop[:, 3:13, [0, 2]] < 60).all()  # green inside, away from the edges
    tall = np.asarray(center_crop(Image.fromarray(stripes.transpose(1, 0, 2).copy()), 16)).astype(int)
    assert (tall[3:13, :, 1] > 200).all()  # the same along the other axis


# -- ten crops (LlamaGen's --ten-crop) --------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(25, 27, 3), (20, 31, 3), (24, 24, 3)])  # centre offsets 2.5 / 3.5: round half
def test_ten_crop_views_are_torchvisions_ten_crop(shape):
    transforms = pytest.importorskip("torchvision.transforms")
    from PIL import Image

    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    expected = np.stack([np.asarray(crop) for crop in transforms.TenCrop(20)(Image.fromarray(image))])
    assert np.array_equal(ten_crop_views(image, 20), expected)
    with pytest.raises(ValueError, match=r"ten_crop size 30 is larger than the image"):
        ten_crop_views(image, 30)


def test_ten_crop_tokenizing_matches_llamagens_pipeline(tmp_path):
    """extract_codes_c2i.py --ten-crop: center_crop_arr to int(size * crop_range), TenCrop(size), ten codes rows."""
    transforms = pytest.importorskip("torchvision.transforms")
    from PIL import Image

    vq = tiny_vq()
    images = [np.random.default_rng(i).integers(0, 256, (30 + 7 * i, 26, 3), dtype=np.uint8) for i in range(3)]
    codes_dir = tokenize_images(images, vq, tmp_path, labels=[0, 1, 2], image_size=16, ten_crop=True,
                                crop_range=1.25, batch_size=2, progress=False)
    for i, image in enumerate(images):
        crops = transforms.TenCrop(16)(center_crop(Image.fromarray(image), 20))  # int(16 * 1.25) = 20
        with torch.no_grad():
            expected = vq.encode_to_codes(images_to_tensor(list(crops))).numpy()
        written = np.load(codes_dir / f"{i}.npy")
        assert written.shape == (1, 10, 16) and written.dtype == np.int64
        assert np.array_equal(written[0], expected)
    assert CodesDataset(tmp_path).num_augmentations == 10
    with pytest.raises(ValueError, match=r"ten_crop: 1.25 there, 1.1 now"):
        tokenize_images(images, vq, tmp_path, labels=[0, 1, 2], image_size=16, ten_crop=True, resume=True,
                        progress=False)


def test_ten_crops_reach_the_tokenizer_in_pieces_of_two_views_per_image(tmp_path):
    """The tokenizer's memory use must not grow tenfold with ten_crop: at most 2 * batch_size views per call."""
    images, labels = random_images(3, size=20), [0, 1, 2]
    counting = CountingVQ(tiny_vq())
    codes_dir = tokenize_images(images, counting, tmp_path / "small", labels=labels, image_size=16, ten_crop=True,
                                batch_size=2, progress=False)
    assert counting.calls == [1, 4, 4, 4, 4, 4, 4, 4, 2]  # the check, then 20 views and 10 views in pieces of 4
    whole = tokenize_images(images, tiny_vq(), tmp_path / "whole", labels=labels, image_size=16, ten_crop=True,
                            batch_size=8, progress=False)
    assert read_layout(codes_dir).values() and list(read_layout(codes_dir).values()) == \
        list(read_layout(whole).values())
    flipped = CountingVQ(tiny_vq())
    tokenize_images(images, flipped, tmp_path / "flip", labels=labels, image_size=16, batch_size=2, progress=False)
    assert flipped.calls == [1, 4, 2]  # an image and its mirror: one call per batch, as before


def test_ten_crop_errors(tmp_path):
    images, vq = random_images(2), tiny_vq()
    with pytest.raises(ValueError, match="ten_crop=True needs image_size"):
        tokenize_images(images, vq, tmp_path, labels=[0, 1], ten_crop=True)
    with pytest.raises(ValueError, match="flip=False cannot apply"):
        tokenize_images(images, vq, tmp_path, labels=[0, 1], image_size=16, ten_crop=True, flip=False)
    with pytest.raises(ValueError, match=r"crop_range must be a number in \[1, 4\), got 0.9"):
        tokenize_images(images, vq, tmp_path, labels=[0, 1], image_size=16, ten_crop=True, crop_range=0.9)


# -- resuming ---------------------------------------------------------------------------------


def test_resume_encodes_only_the_missing_images_and_gives_the_same_files(tmp_path):
    vq, images, labels = tiny_vq(), random_images(7), [0, 1, 2, 3, 0, 1, 2]
    codes_dir = tokenize_images(images, vq, tmp_path, labels=labels, batch_size=2, progress=False)
    complete = read_layout(codes_dir)
    (codes_dir / "3.npy").unlink()          # an image whose label was written but not its codes
    (codes_dir / "6.npy").unlink()
    (tmp_path / "images16_labels" / "6.npy").unlink()
    counting = CountingVQ(vq)
    assert tokenize_images(images, counting, tmp_path, labels=labels, batch_size=2, progress=False,
                           resume=True) == codes_dir
    assert counting.calls == [1, 4]         # the check, then images 3 and 6 in one batch, each with its mirror
    assert read_layout(codes_dir) == complete
    tokenize_images(images, counting, tmp_path, labels=labels, batch_size=2, progress=False, resume=True)
    assert counting.calls == [1, 4, 1]      # complete: nothing encoded after the check


def test_an_interrupted_run_leaves_only_complete_files_and_resumes(tmp_path):
    vq, images, labels = tiny_vq(), random_images(6), [0, 1, 2, 0, 1, 2]
    expected = read_layout(tokenize_images(images, vq, tmp_path / "clean", labels=labels, batch_size=2,
                                           progress=False))
    crashing = CountingVQ(vq, fail_on_call=3)  # the check, two batches, then the crash
    with pytest.raises(RuntimeError, match="simulated crash"):
        tokenize_images(images, crashing, tmp_path / "run", labels=labels, batch_size=2, progress=False)
    codes_dir = tmp_path / "run" / "images16_codes"
    assert sorted(p.name for p in codes_dir.iterdir()) == ["0.npy", "1.npy", "2.npy", "3.npy"]  # no partial files
    counting = CountingVQ(vq)
    tokenize_images(images, counting, tmp_path / "run", labels=labels, batch_size=2, progress=False, resume=True)
    assert counting.calls == [1, 4]
    assert read_layout(codes_dir) == expected
    record = json.loads((tmp_path / "run" / f"images16{RECORD_SUFFIX}").read_text())
    assert record["num_images"] == 6 and record["flip"] is True and record["pixels"] == 16


def test_resume_refuses_other_images_tokenizer_or_settings(tmp_path):
    vq, images, labels = tiny_vq(), random_images(4), [0, 1, 2, 3]
    tokenize_images(images, vq, tmp_path, labels=labels, progress=False)
    kwargs = dict(progress=False, resume=True)
    with pytest.raises(ValueError, match=r"other images or settings \(flip: True there, False now\)"):
        tokenize_images(images, vq, tmp_path, labels=labels, flip=False, **kwargs)
    with pytest.raises(ValueError, match=r"other images or settings \(vq_sha256: "):
        tokenize_images(images, tiny_vq(seed=1), tmp_path, labels=labels, **kwargs)
    with pytest.raises(ValueError, match=r"other images or settings \(vq_sha256: "):
        tokenize_images(images, tiny_vq().double(), tmp_path, labels=labels, **kwargs)  # same weights, other dtype
    with pytest.raises(ValueError, match=r"other images or settings \(images_sha256: "):
        tokenize_images(images, vq, tmp_path, labels=[0, 1, 2, 2], **kwargs)
    changed = images.copy()
    changed[2, 0, 0, 0] ^= 1
    with pytest.raises(ValueError, match=r"other images or settings \(images_sha256: "):
        tokenize_images(changed, vq, tmp_path, labels=labels, **kwargs)
    with pytest.raises(ValueError, match=r"images_sha256: .*num_images: 4 there, 3 now"):
        tokenize_images(images[:3], vq, tmp_path, labels=labels[:3], **kwargs)
    with pytest.raises(ValueError, match=r"already holds 4 \.npy files \(codes of 4 of 4 images\); resume=True fin"):
        tokenize_images(images, vq, tmp_path, labels=labels, progress=False)
    with pytest.raises(ValueError, match="overwrite=True and resume=True contradict"):
        tokenize_images(images, vq, tmp_path, labels=labels, overwrite=True, **kwargs)


def test_resume_of_codes_without_a_record_is_refused(tmp_path):
    (tmp_path / "images16_codes").mkdir()
    np.save(tmp_path / "images16_codes" / "0.npy", np.zeros((1, 2, 16), np.int64))  # e.g. made by LlamaGen
    with pytest.raises(ValueError, match=r"images16_codes: already holds 1 \.npy files and no record of how they "
                                         r"were made, so they cannot be resumed\. Codes made elsewhere .* need no "
                                         r"tokenizing: fine-tune on them as they are \(`tensorar finetune --codes "
                                         r".*`\); or choose another out_root / name .* or overwrite=True"):
        tokenize_images(random_images(2), tiny_vq(), tmp_path, labels=[0, 1], progress=False, resume=True)


def test_image_folder_moved_elsewhere_resumes(tmp_path):
    """The record names files by their path inside the image folder, so a moved folder is the same images."""
    folder = image_folder(tmp_path / "a", {"ant": 2, "bee": 3})
    vq = tiny_vq()
    codes_dir = tokenize_images(folder, vq, tmp_path / "out", image_size=16, batch_size=2, progress=False)
    complete = read_layout(codes_dir)
    (codes_dir / "4.npy").unlink()
    moved = folder.rename(tmp_path / "b")
    counting = CountingVQ(vq)
    tokenize_images(moved, counting, tmp_path / "out", image_size=16, batch_size=2, progress=False, resume=True)
    assert counting.calls == [1, 2] and read_layout(codes_dir) == complete
    (moved / "bee" / "2.png").rename(moved / "ant" / "9.png")  # a file moved to another class: other labels
    with pytest.raises(ValueError, match="images_sha256"):
        tokenize_images(moved, vq, tmp_path / "out", image_size=16, progress=False, resume=True)


def test_a_run_that_finished_no_image_starts_again_with_new_settings(tmp_path):
    images, labels, vq = random_images(4), [0, 1, 2, 3], tiny_vq()
    with pytest.raises(ValueError, match="multiple"):  # 18 px do not fit the 4x downsampling: refused before set-up
        tokenize_images(random_images(4, size=18), vq, tmp_path, labels=labels, progress=False)
    assert not tmp_path.joinpath("images18_codes").exists() and not list(tmp_path.iterdir())
    with pytest.raises(RuntimeError, match="simulated crash"):  # the first batch fails: a record, no codes
        tokenize_images(images, CountingVQ(vq, fail_on_call=1), tmp_path, labels=labels, progress=False)
    assert tmp_path.joinpath(f"images16{RECORD_SUFFIX}").is_file()
    codes_dir = tokenize_images(images, vq, tmp_path, labels=labels, flip=False, progress=False)  # other settings
    assert CodesDataset(codes_dir).num_augmentations == 1 and len(CodesDataset(codes_dir)) == 4


def test_sync_gives_every_process_rank_zeros_refusal(tmp_path):
    images, labels, vq = random_images(4), [0, 1, 2, 3], tiny_vq()
    tokenize_images(images, vq, tmp_path, labels=labels, progress=False)
    shared = []

    def rank_zero_sync(message):
        shared.append(message)
        return message

    kwargs = dict(labels=labels, flip=False, resume=True, progress=False, world_size=2)
    with pytest.raises(ValueError, match=r"\(flip: True there, False now\)") as on_rank_zero:
        tokenize_images(images, vq, tmp_path, rank=0, sync=rank_zero_sync, **kwargs)
    with pytest.raises(ValueError) as on_rank_one:
        tokenize_images(images, vq, tmp_path, rank=1, sync=lambda message: shared[0], **kwargs)
    assert str(on_rank_one.value) == str(on_rank_zero.value) == shared[0]


# -- several processes, DataLoader workers ---------------------------------------------------------


def test_split_over_processes_equals_one_process(tmp_path):
    vq, images, labels = tiny_vq(), random_images(7), [0, 1, 2, 3, 4, 5, 6]
    one = read_layout(tokenize_images(images, vq, tmp_path / "one", labels=labels, batch_size=2, progress=False))
    in_turn = dict(labels=labels, batch_size=2, progress=False, world_size=2, sync=lambda message: message)
    with pytest.raises(RuntimeError, match="rank 0 writes it first"):
        tokenize_images(images, vq, tmp_path / "two", rank=1, **in_turn)
    counts = []
    for rank in (0, 1):  # what two torchrun processes do, one after the other
        counting = CountingVQ(vq)
        tokenize_images(images, counting, tmp_path / "two", rank=rank, **in_turn)
        counts.append(counting.calls)
    assert counts == [[1, 4, 4], [1, 4, 2]]  # the check; batches 0 and 2, then 1 and 3 (the last holds one image)
    assert read_layout(tmp_path / "two" / "images16_codes") == one
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size\), got rank=2, world_size=2"):
        tokenize_images(images, vq, tmp_path / "x", labels=labels, rank=2, world_size=2, sync=in_turn["sync"])
    with pytest.raises(ValueError, match=r"world_size=2 needs sync="):
        tokenize_images(images, vq, tmp_path / "x", labels=labels, rank=0, world_size=2)


def test_worker_processes_give_the_same_files(tmp_path):
    folder = image_folder(tmp_path / "images", {"ant": 3, "bee": 2})
    vq = tiny_vq()
    inline = tokenize_images(folder, vq, tmp_path / "inline", image_size=16, batch_size=2, progress=False)
    workers = tokenize_images(folder, vq, tmp_path / "workers", image_size=16, batch_size=2, progress=False,
                              num_workers=2)
    assert read_layout(workers) == read_layout(inline)
    (folder / "bee" / "1.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"bee/1\.png: cannot read image"):
        tokenize_images(folder, vq, tmp_path / "bad", image_size=16, batch_size=2, progress=False, num_workers=1)
    with pytest.raises(ValueError, match="num_workers must be >= 0, got -1"):
        tokenize_images(folder, vq, tmp_path / "bad2", image_size=16, num_workers=-1)


# -- tensorar tokenize ------------------------------------------------------------------------------------


def vq_file(path: Path) -> Path:
    """A tiny 8x-downsampling tokenizer saved as a checkpoint file `load_vq` reads (16 px -> 2x2 codes)."""
    torch.manual_seed(0)
    save_file(build_vq("VQ-8", base_channels=32, num_res_blocks=1, z_channels=8, codebook_size=32,
                       codebook_embed_dim=4).state_dict(), str(path))
    return path


def tokenize_argv(folder: Path, out: Path, vq: Path, *extra: str) -> list[str]:
    return ["tokenize", str(folder), "--out", str(out), "--vq", str(vq), "--image-size", "16", "--batch-size", "2",
            "--workers", "0", "--device", "cpu", "--threads", "1", "--no-progress", *extra]


def test_tokenize_command_writes_resumes_and_overwrites(tmp_path, capsys):
    folder = image_folder(tmp_path / "images", {"ant": 2, "bee": 3})
    vq = vq_file(tmp_path / "vq.safetensors")
    assert cli_main(tokenize_argv(folder, tmp_path / "codes", vq)) == 0
    assert "wrote the codes of 5 images to" in capsys.readouterr().out
    codes_dir = tmp_path / "codes" / "images16_codes"
    dataset = CodesDataset(tmp_path / "codes", num_tokens=4, codebook_size=32, validate=True)
    assert len(dataset) == 5 and [int(dataset[i][1]) for i in range(5)] == [0, 0, 1, 1, 1]
    complete = read_layout(codes_dir)
    (codes_dir / "1.npy").unlink()
    assert cli_main(tokenize_argv(folder, tmp_path / "codes", vq)) == 0  # the same command again resumes
    assert read_layout(codes_dir) == complete
    assert cli_main(tokenize_argv(folder, tmp_path / "codes", vq, "--no-flip", "--overwrite", "--name", "x")) == 0
    assert CodesDataset(tmp_path / "codes" / "x_codes").num_augmentations == 1
    assert cli_main(tokenize_argv(folder, tmp_path / "codes", vq, "--ten-crop", "--crop-range", "1.25", "--name",
                                  "ten")) == 0
    assert CodesDataset(tmp_path / "codes" / "ten_codes").num_augmentations == 10
    record = json.loads((tmp_path / "codes" / f"ten{RECORD_SUFFIX}").read_text())
    assert record["ten_crop"] == 1.25 and record["image_size"] == 16


def test_tokenize_command_errors(tmp_path, cli_error):
    folder = image_folder(tmp_path / "images", {"ant": 2})
    vq = vq_file(tmp_path / "vq.safetensors")
    assert cli_error(tokenize_argv(tmp_path / "nowhere", tmp_path / "out", vq)).startswith(
        f"IMAGES {tmp_path / 'nowhere'}: not a folder")
    assert cli_error(tokenize_argv(folder, tmp_path / "out", vq, "--batch-size", "0")) == \
        "--batch-size must be >= 1, got 0"
    assert cli_error(tokenize_argv(folder, tmp_path / "out", vq, "--ten-crop", "--no-flip")).startswith(
        "--ten-crop stores mirrored crops by itself")
    assert cli_error(tokenize_argv(folder, tmp_path / "out", vq, "--ten-crop", "--crop-range", "0.5")) == \
        "--crop-range must be in [1, 4), got 0.5"
    assert cli_error(tokenize_argv(folder, tmp_path / "out", vq, "--crop-range", "1.05")) == \
        "--crop-range only applies with --ten-crop (the crop its ten views are cut from)"
    assert cli_error(tokenize_argv(folder, tmp_path / "out", vq, "--image-size", "12")) == \
        f"--image-size 12 must be a multiple of the tokenizer's downsample factor 8 (--vq {vq})"
    assert cli_error(tokenize_argv(folder, tmp_path / "out", Path("c2i_B_256"))) == (
        "--vq: 'c2i_B_256' is a GPT checkpoint, not a VQ tokenizer; load it with load_llamagen (on the command "
        "line: pass it as --model)")
    assert cli_error(tokenize_argv(folder, tmp_path / "out", tmp_path / "nope.safetensors")).startswith(
        f"--vq: no checkpoint file {tmp_path / 'nope.safetensors'}")
    for name in ("../evil", "a/b", ".hidden"):
        assert cli_error(tokenize_argv(folder, tmp_path / "out", vq, "--name", name)).startswith(
            f"--name must be a plain folder prefix (no path separators, not starting with '.'), got {name!r}")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil_codes").exists()
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "images16_codes").write_text("a file where the codes folder goes")
    assert cli_error(tokenize_argv(folder, tmp_path / "taken", vq)).startswith(
        f"{tmp_path / 'taken' / 'images16_codes'}: a file is where the output folder goes; choose another")
    assert cli_error(tokenize_argv(folder, tmp_path / "file", vq)).startswith(f"{tmp_path / 'file'}: a file is where")
    assert cli_main(tokenize_argv(folder, tmp_path / "out", vq)) == 0
    message = cli_error(tokenize_argv(folder, tmp_path / "out", vq, "--no-flip"))
    assert "other images or settings (flip: True there, False now)" in message


def _tokenize_worker(rank: int, port: int, folder: str, out: str, vq: str, extra: tuple[str, ...] = ()) -> None:
    as_torchrun_process(rank, port)
    code = cli_main(tokenize_argv(Path(folder), Path(out), Path(vq), *extra))
    Path(out, f"exit_code_{rank}").write_text(str(code))


def run_two_processes(folder: Path, out: Path, vq: Path, *extra: str) -> list[str]:
    """`tensorar tokenize` as two torchrun processes (gloo): their exit codes."""
    spawn_processes(_tokenize_worker, str(folder), str(out), str(vq), extra, what="tokenizing")
    return [Path(out, f"exit_code_{rank}").read_text() for rank in (0, 1)]


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
def test_tokenize_command_under_two_processes_equals_one(tmp_path, capfd):
    folder = image_folder(tmp_path / "images", {"ant": 3, "bee": 4})
    vq = vq_file(tmp_path / "vq.safetensors")
    assert run_two_processes(folder, tmp_path / "two", vq) == ["0", "0"]
    assert cli_main(tokenize_argv(folder, tmp_path / "one", vq)) == 0
    two = read_layout(tmp_path / "two" / "images16_codes")
    assert len(two) == 14 and two == read_layout(tmp_path / "one" / "images16_codes")
    # rank 0 refuses to resume with other settings: both processes stop with that error, none waits for it
    capfd.readouterr()
    assert run_two_processes(folder, tmp_path / "two", vq, "--no-flip") == ["2", "2"]
    errors = [line for line in capfd.readouterr().err.splitlines() if line.startswith("tensorar tokenize: error:")]
    assert len(errors) == 2 and all("(flip: True there, False now)" in line for line in errors)


def test_resume_restores_missing_labels_and_takes_path_objects(tmp_path):
    import shutil

    folder = image_folder(tmp_path / "images", {"ant": 2, "bee": 2})
    paths = sorted((folder / "ant").iterdir()) + sorted((folder / "bee").iterdir())
    vq = tiny_vq()
    codes_dir = tokenize_images(paths, vq, tmp_path / "out", labels=[0, 0, 1, 1], image_size=16, progress=False)
    complete = read_layout(codes_dir)
    shutil.rmtree(tmp_path / "out" / "images16_labels")
    tokenize_images(paths, vq, tmp_path / "out", labels=[0, 0, 1, 1], image_size=16, progress=False, resume=True)
    assert read_layout(codes_dir) == complete
