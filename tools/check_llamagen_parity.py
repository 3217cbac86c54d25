"""Compare our LlamaGen with FoundationVision/LlamaGen's own `Transformer` and `generate()`.

Run with the path of a LlamaGen checkout you cloned yourself (never committed here):

    python tools/check_llamagen_parity.py --reference /path/to/LlamaGen

It builds both models on tiny configs (c2i and t2i, MHA and GQA where the reference allows),
loads one state dict into both with `strict=True`, and compares logits on the three forward
paths (full sequence, prefill, decode) and the tokens of greedy `generate()` vs our sampler
(also for a full 256-token image, where our sampler reads the KV cache in buckets).

It also compares the VQ tokenizers (`VQ-16`, one state dict in both): the codes LlamaGen's
`extract_codes_c2i.py` pipeline (ADM center crop, `ToTensor` + `Normalize`, batch size 1; the mirror image,
or `--ten-crop --crop-range 1.1`) gives for a few odd-sized images against the files `tokenize_images`
writes, and decoded images.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import numpy as np
import torch


def paired_models(ref_gpt, fields: dict, seed: int):
    """LlamaGen's `Transformer` with random weights (std 0.3) and our `LlamaGen` holding the same state dict."""
    from tensorar_plugin.models.llamagen import LlamaGen, LlamaGenConfig

    torch.manual_seed(seed)
    ref = ref_gpt.Transformer(ref_gpt.ModelArgs(**fields)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    ours = LlamaGen(LlamaGenConfig(**fields)).eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if "kv_cache" not in k}, strict=True)
    return ref, ours


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="path of a LlamaGen checkout")
    args = parser.parse_args()
    sys.path.insert(0, args.reference)
    from autoregressive.models import generate as ref_generate  # noqa: E402
    from autoregressive.models import gpt as ref_gpt  # noqa: E402

    from tensorar_plugin import TensorARWrapper
    from tensorar_plugin.generation import sample_plain

    failures = 0
    for model_type, cls_tokens in (("c2i", 1), ("t2i", 120)):
        fields = dict(dim=64, n_layer=2, n_head=4, vocab_size=128, block_size=16, num_classes=10,
                      cls_token_num=cls_tokens, model_type=model_type, caption_dim=32, multiple_of=32)
        ref, ours = paired_models(ref_gpt, fields, seed=0)

        tokens = torch.randint(0, 128, (2, 16))
        cond = torch.tensor([1, 7]) if model_type == "c2i" else torch.randn(2, 120, 32)
        pos = torch.arange(cls_tokens + 15)
        with torch.no_grad():
            ref_full, _ = ref(tokens[:, :-1], cond, input_pos=pos)
            our_full, _ = ours(tokens[:, :-1], cond, input_pos=pos)
            diff_full = (ref_full - our_full).abs().max().item()

            steps = {}
            for name, model in (("ref", ref), ("ours", ours)):
                model.setup_caches(2, cls_tokens + 16, torch.float32)
                logits, _ = model(None, cond, input_pos=torch.arange(cls_tokens))
                out = [logits[:, -1]]
                for i in range(15):
                    logits, _ = model(tokens[:, i: i + 1], None, input_pos=torch.tensor([cls_tokens + i]))
                    out.append(logits[:, -1])
                steps[name] = torch.stack(out, 1)
            diff_cached = (steps["ref"] - steps["ours"]).abs().max().item()

            ref_tokens = ref_generate.generate(ref, cond, 16, cfg_scale=2.0, sample_logits=False)
            our_tokens = sample_plain(ours, cond, cfg_scale=2.0, greedy=True)
        same = torch.equal(ref_tokens.long(), our_tokens.long())
        if model_type == "t2i":  # padded captions: LlamaGen's emb_masks vs our cond_mask
            mask = torch.ones(2, 120, dtype=torch.long)
            mask[0, :50] = 0
            ref_masked = ref_generate.generate(ref, cond, 16, emb_masks=mask, cfg_scale=2.0, sample_logits=False)
            ours_masked = sample_plain(ours, cond, cfg_scale=2.0, greedy=True, cond_mask=mask)
            same = same and torch.equal(ref_masked.long(), ours_masked.long())

        # the reference object itself, wrapped (duck-typed adapter): window=1 is the reference exactly
        # (dropout and label dropout stay on: the same seed must give the same result)
        for layer in ref.layers:
            layer.attention.kv_cache = None  # the reference cannot run a training forward with caches set
        ref.train()
        torch.manual_seed(7)
        ref_train, ref_loss = ref(tokens[:, :-1], cond, targets=tokens)
        wrapped = TensorARWrapper(ref, window=1).train()
        torch.manual_seed(7)
        out = wrapped(tokens, cond)
        wrapped_equal = torch.equal(out.logits[:, :, 0], ref_train) and torch.equal(out.loss, ref_loss)
        tensorar = TensorARWrapper(ref, window=4).eval()
        with torch.no_grad():
            cached = tensorar.generate(cond, greedy=True, draft="argmax")
            uncached = tensorar.generate(cond, greedy=True, draft="argmax", use_cache=False)
        wrapped_ok = wrapped_equal and torch.equal(cached, uncached)

        ok = diff_full < 1e-5 and diff_cached < 1e-5 and same and wrapped_ok
        failures += not ok
        print(f"{model_type}: full-sequence max|diff| {diff_full:.2e}, prefill+decode max|diff| "
              f"{diff_cached:.2e}, greedy generate() tokens equal: {same}, wrapped reference (k=1 exact, "
              f"k=4 cached == uncached): {wrapped_ok} -> {'OK' if ok else 'MISMATCH'}")

    # a full 16x16 image: our sampler reads the KV cache in buckets of 64 keys, LlamaGen reads all of it
    fields = dict(dim=64, n_layer=2, n_head=4, vocab_size=128, block_size=256, num_classes=10, multiple_of=32)
    ref, ours = paired_models(ref_gpt, fields, seed=1)
    cond = torch.tensor([1, 7, 3])
    with torch.no_grad():
        ref_tokens = ref_generate.generate(ref, cond, 256, cfg_scale=2.0, sample_logits=False)
        our_tokens = sample_plain(ours, cond, cfg_scale=2.0, greedy=True)
    same = torch.equal(ref_tokens.long(), our_tokens.long())
    failures += not same
    print(f"c2i, 256 tokens (bucketed KV reads): greedy generate() tokens equal: {same} -> "
          f"{'OK' if same else 'MISMATCH'}")
    failures += not check_tokenizer()
    return int(failures > 0)


def check_tokenizer() -> bool:
    """LlamaGen's VQ and code extraction against our `VQModel` and `tokenize_images` (needs torchvision)."""
    from dataset.augmentation import center_crop_arr  # noqa: E402  (LlamaGen's checkout)
    from PIL import Image
    from tokenizer.tokenizer_image.vq_model import VQ_models  # noqa: E402
    from torchvision import transforms

    from tensorar_plugin.data import CodesDataset, tokenize_images
    from tensorar_plugin.models.vq import build_vq

    torch.manual_seed(0)
    ref = VQ_models["VQ-16"](codebook_size=512, codebook_embed_dim=8).eval()
    ours = build_vq("VQ-16", codebook_size=512, codebook_embed_dim=8).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)

    size = 64
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
              ((100, 80), (300, 260), (64, 64), (70, 200))]
    normalize = [transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], inplace=True)]
    flipped = transforms.Compose([transforms.Lambda(lambda image: center_crop_arr(image, size)),
                                  transforms.ToTensor(), *normalize])
    ten_crop = transforms.Compose([transforms.Lambda(lambda image: center_crop_arr(image, int(size * 1.1))),
                                   transforms.TenCrop(size),
                                   transforms.Lambda(lambda crops: torch.stack([transforms.ToTensor()(c)
                                                                                for c in crops])), *normalize])
    codes_equal = {}
    for mode in ("flip", "ten_crop"):
        expected = []
        with torch.no_grad():
            for image in images:  # extract_codes_c2i.py: batch size 1; the image and its mirror, or ten crops
                if mode == "flip":
                    x = flipped(image)[None]
                    x_all, num_aug = torch.cat([x, torch.flip(x, dims=[-1])]), 2
                else:
                    x_all, num_aug = ten_crop(image), 10
                _, _, (_, _, indices) = ref.encode(x_all)
                expected.append(indices.reshape(1, num_aug, -1).cpu().numpy())
        with tempfile.TemporaryDirectory() as out:
            codes_dir = tokenize_images(images, ours, out, labels=list(range(len(images))), image_size=size,
                                        ten_crop=mode == "ten_crop", crop_range=1.1, batch_size=len(images),
                                        progress=False)
            dataset = CodesDataset(codes_dir)
            written = [np.load(dataset.code_path(i)) for i in range(len(images))]
        codes_equal[mode] = all(a.dtype == b.dtype and np.array_equal(a, b)
                                for a, b in zip(written, expected, strict=True))
    with torch.no_grad():
        codes = torch.from_numpy(expected[0][0][:2])  # two views of the first image
        shape = (2, 8, size // 16, size // 16)
        decode_diff = (ref.decode_code(codes.reshape(-1), shape) - ours.decode_code(codes, shape)).abs().max().item()
    ok = all(codes_equal.values()) and decode_diff < 1e-4
    print(f"VQ-16 tokenizer: extract_codes_c2i.py codes == tokenize_images files (4 odd-sized images): with mirrors "
          f"{codes_equal['flip']}, --ten-crop --crop-range 1.1 {codes_equal['ten_crop']}; decode max|diff| "
          f"{decode_diff:.2e} -> {'OK' if ok else 'MISMATCH'}")
    return ok


if __name__ == "__main__":
    raise SystemExit(main())
