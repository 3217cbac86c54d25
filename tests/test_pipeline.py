"""The commands compose: `tokenize` -> `finetune` -> `sample-npz` -> `fid`, each reading what the one before wrote.

Everything is tiny and local (an 8x-downsampling VQ with 64 codes, a 2-layer GPT on a 4x4 grid, 32 px images),
so this runs in seconds; each command's own behaviour is tested in its own file.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_llamagen
from safetensors.torch import save_file
from test_evaluation import save_scripted
from test_image_codes import image_folder

from tensorar_plugin.cli import main
from tensorar_plugin.data import CodesDataset
from tensorar_plugin.models.vq import build_vq


@pytest.mark.filterwarnings("ignore:.*covariance is rank-deficient")  # 4 samples: FID is only plumbing here
def test_tokenize_finetune_sample_npz_fid(tmp_path, capsys):
    images = image_folder(tmp_path / "images", {"ant": 4, "bee": 4}, size=40)
    torch.manual_seed(0)
    vq = build_vq("VQ-8", base_channels=32, num_res_blocks=1, z_channels=8, codebook_size=64, codebook_embed_dim=4)
    save_file(vq.state_dict(), str(tmp_path / "vq.safetensors"))
    torch.save({"model": tiny_llamagen().state_dict()}, tmp_path / "gpt.pt")
    quiet = ["--device", "cpu", "--threads", "1", "--no-progress"]

    assert main(["tokenize", str(images), "--out", str(tmp_path / "codes"), "--vq", str(tmp_path / "vq.safetensors"),
                 "--image-size", "32", "--batch-size", "4", "--workers", "0", *quiet]) == 0
    codes = CodesDataset(tmp_path / "codes", num_tokens=16, codebook_size=64, num_classes=2, validate=True)
    assert len(codes) == 8 and codes.num_augmentations == 2

    # --image-size 64 gives the GPT its 4x4 grid (LlamaGen's 16x downsampling); the codes come from 32 px at 8x
    assert main(["finetune", "--model", str(tmp_path / "gpt.pt"), "--image-size", "64", "--model-config", "n_head=4",
                 "--model-config", "multiple_of=16", "--codes", str(tmp_path / "codes"), "--window", "3",
                 "--steps", "2", "--batch-size", "4", "--num-workers", "0", "--precision", "no",
                 "--out", str(tmp_path / "run"), "--device", "cpu", "--no-progress"]) == 0

    assert main(["sample-npz", "--model", str(tmp_path / "run" / "final"), "--vq", str(tmp_path / "vq.safetensors"),
                 "--num-samples", "4", "--batch-size", "2", "--out", str(tmp_path / "samples"), *quiet]) == 0
    with np.load(tmp_path / "samples.npz") as samples:
        assert samples["arr_0"].shape == (4, 32, 32, 3) and samples["arr_1"].tolist() == [0, 1, 2, 3]

    capsys.readouterr()
    inception = save_scripted(tmp_path / "stand_in_inception.pt")
    assert main(["fid", str(tmp_path / "samples.npz"), str(images / "ant"), "--inception", str(inception),
                 "--json", str(tmp_path / "fid.json"), "--device", "cpu", "--no-progress"]) == 0
    fid = json.loads((tmp_path / "fid.json").read_text())["fid"]
    assert np.isfinite(fid) and fid > 0
