"""TensorARWrapper training forward: base equivalence, windows/targets, gradients, errors, adapters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import batch, perturb_heads_, tiny_config, tiny_llamagen
from torch import nn

from tensorar_plugin import TensorARWrapper
from tensorar_plugin.adapters import LlamaGenAdapter, find_adapter
from tensorar_plugin.models.llamagen import KVCache, LlamaGen, build_llamagen
from tensorar_plugin.noise import PAD_ID
from tensorar_plugin.windows import IGNORE_INDEX, input_windows, target_windows


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_window_one_equals_base_training_forward_exactly(dropout):
    base = tiny_llamagen(token_dropout_p=dropout, resid_dropout_p=dropout, ffn_dropout_p=dropout).train()
    wrapper = TensorARWrapper(base, window=1).train()
    tokens, cond = batch()
    torch.manual_seed(123)
    base_logits, base_loss = base(tokens[:, :-1], cond, targets=tokens)
    torch.manual_seed(123)
    out = wrapper(tokens, cond)
    assert out.logits.shape == (3, 16, 1, 64)
    assert torch.equal(out.logits[:, :, 0], base_logits)
    assert torch.equal(out.loss, base_loss)
    assert wrapper.num_new_parameters() == 0


@pytest.mark.parametrize("window", [2, 4, 8])
def test_fresh_wrapper_slot_zero_equals_base_in_train_and_eval(window):
    base = tiny_llamagen()
    wrapper = TensorARWrapper(base, window=window)
    tokens, cond = batch()
    with torch.no_grad():
        base_logits, _ = base(tokens[:, :-1], cond)
        out = wrapper.eval()(tokens, cond)
        assert torch.equal(out.logits[:, :, 0], base_logits[:, base.cls_token_num - 1:])
        wrapper.train()
        base.cls_embedding.dropout_prob = 0.0
        noisy = wrapper(tokens, cond, generator=torch.Generator().manual_seed(0))
        assert torch.equal(noisy.logits[:, :, 0], base_logits)  # noise only reaches the zero-init encoder
    # and the equivalence is a property of the initial values, not of the wiring
    perturb_heads_(wrapper)
    with torch.no_grad():
        moved = wrapper.eval()(tokens, cond)
    assert not torch.allclose(moved.logits[:, :, 0], base_logits)


@pytest.mark.parametrize("window", [2, 4])
def test_fresh_wrapper_with_dropout_equals_base_in_training_when_noise_has_its_own_generator(window):
    """Noise drawn from `generator=` leaves the global RNG, hence every dropout mask, where the base has it."""
    base = tiny_llamagen(token_dropout_p=0.2, resid_dropout_p=0.2, ffn_dropout_p=0.2).train()
    wrapper = TensorARWrapper(base, window=window).train()
    tokens, cond = batch()
    torch.manual_seed(7)
    base_logits, _ = base(tokens[:, :-1], cond, targets=tokens)
    torch.manual_seed(7)
    out = wrapper(tokens, cond, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.logits[:, :, 0], base_logits)
    torch.manual_seed(7)  # without a generator the noise draws shift the dropout masks that follow
    assert not torch.equal(wrapper(tokens, cond).logits[:, :, 0], base_logits)


def test_windows_and_targets_layout():
    tokens = torch.tensor([[10, 11, 12, 13, 14]])
    inputs = input_windows(tokens, 3)
    assert inputs.tolist() == [[[10, 11, 12], [11, 12, 13], [12, 13, 14], [13, 14, PAD_ID]]]
    targets = target_windows(tokens, 3)
    assert targets.tolist() == [[[10, 11, 12], [11, 12, 13], [12, 13, 14], [13, 14, -100], [14, -100, -100]]]


def test_loss_is_weighted_cross_entropy_over_valid_slots():
    wrapper = perturb_heads_(TensorARWrapper(tiny_llamagen(), window=3, slot_weights=[1.0, 0.5, 0.25])).eval()
    tokens, cond = batch()
    out = wrapper(tokens, cond)
    ce = F.cross_entropy(out.logits.reshape(-1, 64), out.targets.reshape(-1), reduction="none",
                         ignore_index=IGNORE_INDEX).view(out.targets.shape)
    valid = out.targets != IGNORE_INDEX
    w = torch.tensor([1.0, 0.5, 0.25]) * valid
    torch.testing.assert_close(out.loss, (ce * w).sum() / w.sum())
    assert (~valid).sum() == 3 * (1 + 2)  # the last 2 output positions have 1 and 2 padded slots
    for j in range(3):
        torch.testing.assert_close(out.slot_losses[j], ce[..., j][valid[..., j]].mean())


def test_noise_only_in_training_and_reproducible():
    wrapper = perturb_heads_(TensorARWrapper(tiny_llamagen(class_dropout_prob=0.0), window=4))
    tokens, cond = batch()
    with torch.no_grad():
        wrapper.eval()
        a = wrapper(tokens, cond, generator=torch.Generator().manual_seed(1)).logits
        b = wrapper(tokens, cond, generator=torch.Generator().manual_seed(2)).logits
        assert torch.equal(a, b)
        wrapper.train()
        c = wrapper(tokens, cond, generator=torch.Generator().manual_seed(1)).logits
        d = wrapper(tokens, cond, generator=torch.Generator().manual_seed(1)).logits
        e = wrapper(tokens, cond, generator=torch.Generator().manual_seed(2)).logits
    assert torch.equal(c, d)
    assert not torch.equal(c, e)
    assert not torch.equal(a, c)


def test_gradients_reach_new_parts_and_backbone_unless_frozen():
    wrapper = TensorARWrapper(tiny_llamagen(), window=4).train()
    tokens, cond = batch()
    wrapper(tokens, cond).loss.backward()
    assert wrapper.encoder.out_proj.weight.grad.abs().sum() > 0
    assert wrapper.decoder.out_proj.weight.grad.abs().sum() > 0
    assert wrapper.base_model.layers[0].attention.wqkv.weight.grad.abs().sum() > 0

    frozen = perturb_heads_(TensorARWrapper(tiny_llamagen(), window=4, freeze_backbone=True)).train()
    frozen(tokens, cond).loss.backward()
    assert all(p.grad is None for p in frozen.base_model.parameters())
    assert frozen.encoder.in_proj.weight.grad.abs().sum() > 0
    assert frozen.decoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("encoder.", "decoder.")) for n in trainable)


def test_label_dropout_option():
    tokens, cond = batch()
    kept = TensorARWrapper(tiny_llamagen(class_dropout_prob=1.0), window=2).train()
    dropped = kept(tokens, cond).logits
    null = kept(tokens, torch.full_like(cond, 10)).logits
    torch.testing.assert_close(dropped[:, :, 0], null[:, :, 0])
    off = TensorARWrapper(tiny_llamagen(class_dropout_prob=1.0), window=2, label_dropout=False).train()
    assert not torch.allclose(off(tokens, cond).logits[:, :, 0], null[:, :, 0])


def test_force_drop_ids_as_a_list_works_and_a_wrong_length_is_refused():
    wrapper = TensorARWrapper(tiny_llamagen(), window=2).eval()
    tokens, cond = batch()
    with torch.no_grad():
        as_list = wrapper(tokens, cond, force_drop_ids=[1, 0, 1]).logits
        as_tensor = wrapper(tokens, cond, force_drop_ids=torch.tensor([1, 0, 1])).logits
    assert torch.equal(as_list, as_tensor)
    with pytest.raises(ValueError, match=r"force_drop_ids must hold one 0/1 flag per batch item, shape \(3,\)"):
        wrapper(tokens, cond, force_drop_ids=torch.tensor([1, 0]))


def test_bf16_autocast_training_step():
    wrapper = perturb_heads_(TensorARWrapper(tiny_llamagen(), window=4)).train()
    tokens, cond = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = wrapper(tokens, cond)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()


def test_t2i_training_forward():
    wrapper = TensorARWrapper(tiny_llamagen(model_type="t2i", cls_token_num=5), window=3).train()
    tokens, _ = batch(2)
    out = wrapper(tokens, torch.randn(2, 5, 24))
    assert out.logits.shape == (2, 16, 3, 64) and torch.isfinite(out.loss)


def test_narrow_integer_ids_and_other_float_caption_dtypes_give_the_same_results():
    """int32 / uint8 codes and labels (numpy-made data) and bf16 caption features (T5 runs in bf16) are cast,
    not left to fail inside torch; integer caption features are refused naming `cond`."""
    wrapper = TensorARWrapper(tiny_llamagen(), window=3).eval()
    tokens, cond = batch(2)
    with torch.no_grad():
        expected = wrapper(tokens, cond)
        for dtype in (torch.int32, torch.uint8):
            out = wrapper(tokens.to(dtype), cond.to(dtype))
            assert torch.equal(out.logits, expected.logits) and torch.equal(out.loss, expected.loss)
        assert torch.equal(wrapper.generate(cond.to(torch.int32), greedy=True), wrapper.generate(cond, greedy=True))
    t2i = TensorARWrapper(tiny_llamagen(model_type="t2i", cls_token_num=5), window=3).eval()
    feats = torch.randn(2, 5, 24).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(t2i(tokens, feats).logits, t2i(tokens, feats.float()).logits)
        assert torch.equal(t2i.generate(feats, greedy=True), t2i.generate(feats.float(), greedy=True))
    with pytest.raises(ValueError, match="cond must be floating-point caption features, got dtype torch.int64"):
        t2i(tokens, torch.zeros(2, 5, 24, dtype=torch.long))


@pytest.mark.parametrize(
    ("make_inputs", "match"),
    [
        (lambda: (torch.randint(0, 64, (2, 17)), torch.tensor([1, 2])), "block_size"),
        (lambda: (torch.full((2, 16), 64), torch.tensor([1, 2])), "tokens"),
        (lambda: (torch.full((2, 16), -1), torch.tensor([1, 2])), "tokens"),
        (lambda: (torch.rand(2, 16), torch.tensor([1, 2])), "tokens"),
        (lambda: (torch.randint(0, 64, (2, 16)), torch.tensor([1, 2, 3])), "cond"),
        (lambda: (torch.randint(0, 64, (2, 16)), torch.tensor([[1], [2]])), "cond"),
        (lambda: (torch.randint(0, 64, (2, 16)), torch.tensor([1, 12])), "cond"),
    ],
)
def test_bad_input_raises_value_error_naming_argument(make_inputs, match):
    wrapper = TensorARWrapper(tiny_llamagen(), window=2)
    tokens, cond = make_inputs()
    with pytest.raises(ValueError, match=match):
        wrapper(tokens, cond)


def test_numpy_integers_are_taken_and_saved_as_ints(tmp_path):
    import numpy as np

    wrapper = TensorARWrapper(tiny_llamagen(), window=np.int64(3), encoder_depth=np.int32(1))
    assert type(wrapper.config.window) is int and wrapper.window == 3
    wrapper.save_pretrained(tmp_path)  # the config is JSON: a numpy integer would not serialise
    assert TensorARWrapper.from_pretrained(tmp_path, tiny_llamagen()).window == 3
    for bad in (2.0, True, "3"):
        with pytest.raises(ValueError, match="window must be an integer >= 1"):
            TensorARWrapper(tiny_llamagen(), window=bad)


def test_a_window_as_long_as_the_image_is_allowed():
    wrapper = TensorARWrapper(tiny_llamagen(), window=16).eval()  # the tiny model generates 16 tokens
    tokens, cond = batch()
    assert wrapper(tokens, cond).logits.shape[2] == 16
    assert wrapper.generate(cond, greedy=True).shape == (len(cond), 16)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"window": 0}, "window"), ({"window": 2, "slot_weights": [1.0]}, "slot_weights"),
     ({"window": 2, "noise_schedule": "cosine"}, "noise_schedule"), ({"window": 2, "max_noise": 2.0}, "max_noise"),
     ({"window": 17}, r"window \(17\) must be at most the number of image tokens the model generates \(16\)"),
     ({"window": 2, "freeze_backbone": "no"}, "freeze_backbone must be True or False")],
)
def test_bad_wrapper_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TensorARWrapper(tiny_llamagen(), **kwargs)


@pytest.mark.parametrize(("preset", "limit"), [("GPT-B", 0.05), ("GPT-L", 0.05), ("GPT-XL", 0.05)])
def test_parameter_overhead_at_default_config(preset, limit):
    with torch.device("meta"):
        base = build_llamagen(preset)
        wrapper = TensorARWrapper(base, window=4)
    base_params = sum(p.numel() for p in base.parameters())
    assert wrapper.num_new_parameters() / base_params < limit


class ForeignGPT(nn.Module):
    """Not a `LlamaGen`: a stand-in with the reference `Transformer`'s attribute names and habits
    (a plain-tensor rotary table, caches allocated on the default device)."""

    def __init__(self, source: LlamaGen):
        super().__init__()
        for name in ("tok_embeddings", "cls_embedding", "tok_dropout", "layers", "norm", "output"):
            setattr(self, name, getattr(source, name))
        self.config = source.config
        self.cls_token_num, self.model_type = source.cls_token_num, source.model_type
        self.num_classes, self.block_size = source.num_classes, source.block_size
        self.freqs_cis = source.freqs_cis.clone()
        self.causal_mask = None

    def setup_caches(self, max_batch_size, max_seq_length, dtype):
        max_seq_length = (max_seq_length + 7) // 8 * 8
        for block in self.layers:
            block.attention.kv_cache = KVCache(max_batch_size, max_seq_length, self.config.kv_heads,
                                               self.config.head_dim, dtype)
        mask = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool))
        self.causal_mask = mask.unsqueeze(0).repeat(max_batch_size, 1, 1)

    def forward(self, idx, cond_idx):
        cond = self.cls_embedding(cond_idx, train=self.training)
        h = self.tok_dropout(torch.cat([cond, self.tok_embeddings(idx)], 1))
        freqs = self.freqs_cis[: h.shape[1]]
        for layer in self.layers:
            h = layer(h, freqs, None, None)
        return self.output(self.norm(h)).float(), None


def test_duck_typed_reference_style_model_is_adapted():
    source = tiny_llamagen()
    foreign = ForeignGPT(source).eval()
    assert isinstance(find_adapter(foreign), LlamaGenAdapter)
    wrapper = TensorARWrapper(foreign, window=3).eval()
    tokens, cond = batch()
    with torch.no_grad():
        base_logits, _ = foreign(tokens[:, :-1], cond)
        out = wrapper(tokens, cond)
        assert torch.equal(out.logits[:, :, 0], base_logits)
        gen = wrapper.generate(cond, greedy=True)
        again = wrapper.generate(cond, greedy=True, use_cache=False)
    assert torch.equal(gen, again)


def test_class_conditional_reference_model_with_several_condition_tokens_is_refused():
    """A c2i label embedding yields one token; cls_token_num=2 would shift every image position by one."""
    foreign = ForeignGPT(tiny_llamagen())
    foreign.cls_token_num = 2
    with pytest.raises(ValueError, match="cls_token_num == 1.*got cls_token_num=2"):
        TensorARWrapper(foreign, window=3)


def test_unknown_model_type_error_lists_what_was_looked_for():
    with pytest.raises(TypeError, match="tok_embeddings.*missing"):
        TensorARWrapper(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        TensorARWrapper("not a model")


def test_wrapper_follows_model_dtype_and_device():
    base = LlamaGen(tiny_config()).to(torch.bfloat16)
    wrapper = TensorARWrapper(base, window=2)
    assert wrapper.encoder.in_proj.weight.dtype == torch.bfloat16


def test_adaptive_noise_follows_the_models_own_draft_accuracy():
    wrapper = perturb_heads_(TensorARWrapper(tiny_llamagen(), window=3, noise_schedule="adaptive",
                                             adaptive_momentum=0.0)).train()
    assert torch.equal(wrapper.adaptive_beta(), torch.ones(3))  # nothing measured yet: drafts fully noised
    tokens, cond = batch()
    out = wrapper(tokens, cond, generator=torch.Generator().manual_seed(0))
    valid = out.targets != IGNORE_INDEX
    p_target = out.logits.softmax(-1).gather(-1, out.targets.clamp(min=0)[..., None])[..., 0]
    expected = (p_target * valid).sum(dim=(0, 1)) / valid.sum(dim=(0, 1))
    torch.testing.assert_close(wrapper.encoder.draft_accuracy, expected.detach())
    torch.testing.assert_close(wrapper.adaptive_beta(), 1 - expected.detach())
    # eval forwards do not move the estimate; it is saved with the encoder
    before = wrapper.encoder.draft_accuracy.clone()
    wrapper.eval()(tokens, cond)
    assert torch.equal(wrapper.encoder.draft_accuracy, before)
    assert "encoder.draft_accuracy" in wrapper.tensorar_state_dict()


def test_deferred_draft_accuracy_pools_micro_batches_into_one_update():
    """With `defer_draft_accuracy` (the Trainer's setting) two micro-batches make one EMA update with the
    token-weighted mean of both, as one forward over the whole batch would."""
    wrapper = perturb_heads_(TensorARWrapper(tiny_llamagen(), window=3, noise_schedule="adaptive",
                                             adaptive_momentum=0.5)).train()
    wrapper.defer_draft_accuracy = True
    tokens, cond = batch()
    outs = [wrapper(tokens[half], cond[half], generator=torch.Generator().manual_seed(0))
            for half in (slice(0, 2), slice(2, None))]
    assert torch.equal(wrapper.encoder.draft_accuracy, torch.zeros(3))  # nothing folded in yet
    wrapper.update_draft_accuracy()
    hits = torch.zeros(3)
    count = torch.zeros(3)
    for out in outs:
        valid = out.targets != IGNORE_INDEX
        p_target = out.logits.softmax(-1).gather(-1, out.targets.clamp(min=0)[..., None])[..., 0]
        hits += (p_target * valid).sum(dim=(0, 1)).detach()
        count += valid.sum(dim=(0, 1))
    torch.testing.assert_close(wrapper.encoder.draft_accuracy, 0.5 * hits / count)
    wrapper.update_draft_accuracy()  # nothing pending: no change
    torch.testing.assert_close(wrapper.encoder.draft_accuracy, 0.5 * hits / count)


def test_draft_accuracy_stays_float32_in_a_bf16_model():
    """A momentum-0.99 EMA cannot move in bfloat16 (0.99 * a + 0.01 * hit rounds back to a)."""
    wrapper = TensorARWrapper(tiny_llamagen(), window=3, noise_schedule="adaptive").to(torch.bfloat16)
    accuracy = wrapper.encoder.draft_accuracy
    assert accuracy.dtype == torch.float32 and wrapper.encoder.in_proj.weight.dtype == torch.bfloat16
    for _ in range(300):
        wrapper._track_draft_accuracy(torch.full((1, 4, 3), 0.5108), torch.zeros(1, 4, 3, dtype=torch.long))
    torch.testing.assert_close(accuracy, torch.full((3,), 0.6 * (1 - 0.99 ** 300)), atol=1e-3, rtol=0)


def test_config_argument_is_not_changed_and_clashing_settings_are_refused():
    from tensorar_plugin import TensorARConfig

    config = TensorARConfig(window=2)
    wrapper = TensorARWrapper(tiny_llamagen(), config=config, freeze_backbone=True)
    assert wrapper.window == 2 and config.hidden_dim is None and config.base_hidden_size is None
    assert TensorARWrapper(tiny_llamagen(dim=48), config=config).config.base_hidden_size == 48
    with pytest.raises(ValueError, match="window, max_noise were also given"):
        TensorARWrapper(tiny_llamagen(), window=8, max_noise=0.1, config=config)
    # a setting given at its default value is refused too: window=4 must not silently become the config's 2
    with pytest.raises(ValueError, match="window was also given"):
        TensorARWrapper(tiny_llamagen(), 4, config=config)
    with pytest.raises(ValueError, match="noise_schedule was also given"):
        TensorARWrapper(tiny_llamagen(), noise_schedule="exponential", config=config)
    with pytest.raises(TypeError):  # a malformed call keeps Python's own error
        TensorARWrapper(tiny_llamagen(), config=config, no_such_setting=1)


def test_adaptive_noise_never_touches_the_first_slot():
    """At the start the adaptive beta is 1 for every slot; the final token (slot 0) must still be fed clean."""
    from tensorar_plugin.windows import input_windows

    wrapper = TensorARWrapper(tiny_llamagen(), window=3, noise_schedule="adaptive").train()
    assert torch.equal(wrapper.adaptive_beta(), torch.ones(3))
    seen, embed = [], wrapper.embed_windows
    wrapper.embed_windows = lambda windows: (seen.append(windows), embed(windows))[1]
    tokens, cond = batch(b=8)
    wrapper(tokens, cond, generator=torch.Generator().manual_seed(0))
    clean = input_windows(tokens, 3)
    assert torch.equal(seen[0][..., 0], clean[..., 0])
    valid = clean[..., 1:] >= 0
    assert (seen[0][..., 1:] != clean[..., 1:])[valid].float().mean() > 0.9  # drafts: (almost) all replaced


def test_adaptive_beta_drives_the_replacement_rate():
    from tensorar_plugin.noise import discrete_tensor_noise

    clean = torch.randint(0, 50, (20000, 3), generator=torch.Generator().manual_seed(0))
    _, replaced = discrete_tensor_noise(clean, 50, beta=torch.tensor([0.9, 0.25, 0.75]),
                                        generator=torch.Generator().manual_seed(1), return_mask=True)
    rate = replaced.float().mean(0)
    assert rate[0] == 0  # slot 0 stays clean whatever beta says
    torch.testing.assert_close(rate[1:], torch.tensor([0.25, 0.75]), atol=0.015, rtol=0)
    with pytest.raises(ValueError, match="beta"):
        discrete_tensor_noise(clean, 50, beta=torch.tensor([0.0, 1.5, 0.2]))


def test_model_drafts_take_each_slot_from_the_output_that_generation_would_use():
    windows = input_windows(torch.tensor([[10, 11, 12, 13, 14]]), 3)  # [1, 4, 3], PAD past the end
    logits = torch.full((1, 5, 3, 64), -1e4)
    for t in range(5):
        for j in range(3):
            logits[0, t, j, 20 * j + t] = 0.0  # output t, slot j puts all mass on token 20j + t
    drafts = TensorARWrapper._model_drafts(windows, lambda j: logits[:, :, j], torch.Generator().manual_seed(0))
    # window fed at position t: [x_t, sample(output t, slot 1), sample(output t, slot 2)]
    assert drafts.tolist() == [[[10, 20, 40], [11, 21, 41], [12, 22, 42], [13, 23, PAD_ID]]]


def test_model_draft_training_runs_and_is_reproducible():
    wrapper = perturb_heads_(TensorARWrapper(tiny_llamagen(class_dropout_prob=0.0), window=4,
                                             draft_source="model")).train()
    tokens, cond = batch()
    a = wrapper(tokens, cond, generator=torch.Generator().manual_seed(3))
    b = wrapper(tokens, cond, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.logits, b.logits) and torch.isfinite(a.loss)
    a.loss.backward()
    assert wrapper.encoder.in_proj.weight.grad.abs().sum() > 0
    noise_only = perturb_heads_(TensorARWrapper(tiny_llamagen(class_dropout_prob=0.0), window=4)).train()
    with torch.no_grad():
        c = noise_only(tokens, cond, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(a.logits.detach(), c.logits)
    with pytest.raises(ValueError, match="draft_source"):
        TensorARWrapper(tiny_llamagen(), window=2, draft_source="oracle")


# -- return_logits=False: the same loss and gradients without holding the [B, T, k, V] logits ----------------


def _loss_and_grads(wrapper, tokens, cond, **kwargs):
    wrapper.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # label dropout
    out = wrapper(tokens, cond, generator=torch.Generator().manual_seed(3), **kwargs)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in wrapper.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize(("window", "options"), [
    (1, {}), (4, {}), (3, {"slot_weights": (1.0, 0.5, 0.25)}), (4, {"draft_source": "model"}),
    (4, {"noise_schedule": "adaptive"}),
])
def test_recomputed_logits_give_the_same_loss_and_gradients(window, options):
    wrapper = TensorARWrapper(tiny_llamagen().double(), window=window, **options).train()
    perturb_heads_(wrapper)
    tokens, cond = batch()
    full, full_grads = _loss_and_grads(wrapper, tokens, cond)
    accuracy = None if wrapper.adaptive_beta() is None else wrapper.encoder.draft_accuracy.clone()
    lean, lean_grads = _loss_and_grads(wrapper, tokens, cond, return_logits=False)
    assert lean.logits is None and full.logits.shape == (3, 16, window, 64)
    torch.testing.assert_close(lean.loss, full.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lean.slot_losses, full.slot_losses, rtol=1e-12, atol=1e-12)
    assert torch.equal(lean.targets, full.targets)
    assert lean_grads.keys() == full_grads.keys() and len(full_grads) == len(list(wrapper.parameters()))
    for name, grad in full_grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)
    if accuracy is not None:  # the adaptive schedule saw the same per-token losses both times
        assert not torch.equal(wrapper.encoder.draft_accuracy, accuracy)


def _largest_saved_tensor(wrapper, tokens, cond, **kwargs) -> int:
    sizes = [0]

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        wrapper(tokens, cond, **kwargs).loss.backward()
    return max(sizes)


def test_recomputed_logits_keep_no_logits_for_the_backward_pass():
    # a codebook large enough that logits, not the new parts' activations, are the largest tensors (as at scale)
    wrapper = perturb_heads_(TensorARWrapper(tiny_llamagen(vocab_size=1024), window=4)).train()
    tokens, cond = batch()
    one_slot = tokens.numel() * wrapper.vocab_size  # the logits of one slot: [B, T, V]
    assert _largest_saved_tensor(wrapper, tokens, cond) >= 4 * one_slot  # the probe sees the full logits
    assert _largest_saved_tensor(wrapper, tokens, cond, return_logits=False) < one_slot


# -- the noise schedule is computed once, not in every training step ---------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "sine", "sqrt", "exponential", lambda u: u**2])
def test_training_noise_uses_the_schedule_computed_at_construction(schedule):
    from tensorar_plugin.noise import discrete_tensor_noise, noise_schedule, replace_slots

    wrapper = TensorARWrapper(tiny_llamagen(), window=4, noise_schedule=schedule, max_noise=0.8)
    torch.testing.assert_close(wrapper.noise_beta, noise_schedule(4, schedule, max_noise=0.8), rtol=0, atol=0)
    windows = input_windows(batch()[0], 4)
    noised, _ = replace_slots(windows, wrapper.noise_beta, 64, torch.Generator().manual_seed(5))
    expected = discrete_tensor_noise(windows, 64, schedule, max_noise=0.8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(noised, expected)  # the same draws as the checked public function


def test_config_buffers_keep_exact_float32_values_through_casts_and_to_empty():
    from tensorar_plugin.noise import noise_schedule

    weights = [1.0, 0.1, 0.1, 0.3]
    for build in ("cast", "meta"):
        if build == "cast":
            wrapper = TensorARWrapper(tiny_llamagen(), window=4, slot_weights=weights).to(torch.bfloat16)
        else:  # built without memory, then materialised: non-persistent buffers are not in any state dict
            with torch.device("meta"):
                wrapper = TensorARWrapper(tiny_llamagen(), window=4, slot_weights=weights)
            wrapper.to_empty(device="cpu")
        assert wrapper.noise_beta.dtype == wrapper.slot_weights.dtype == torch.float32
        assert torch.equal(wrapper.noise_beta, noise_schedule(4, "exponential")), build  # not rounded to bf16
        assert torch.equal(wrapper.slot_weights, torch.tensor(weights)), build


def test_bad_custom_schedule_is_refused_at_construction_and_unsaved_ones_at_training():
    with pytest.raises(ValueError, match=r"schedule must map u in \[0, 1\] to values in \[0, 1\]"):
        TensorARWrapper(tiny_llamagen(), window=4, noise_schedule=lambda u: 2 * u)
    from tensorar_plugin.wrapper import TensorARConfig

    wrapper = TensorARWrapper(tiny_llamagen(), config=TensorARConfig(window=3, noise_schedule="custom")).train()
    tokens, cond = batch()
    with pytest.raises(ValueError, match="custom noise schedule, which cannot be saved: pass the callable"):
        wrapper(tokens, cond)
    wrapper.eval()(tokens, cond)  # evaluation needs no noise


def test_loading_with_another_schedule_recomputes_the_noise(tmp_path):
    TensorARWrapper(tiny_llamagen(), window=4).save_pretrained(tmp_path)
    from tensorar_plugin.noise import noise_schedule

    loaded = TensorARWrapper.from_pretrained(tmp_path, tiny_llamagen(), noise_schedule="linear")
    assert torch.equal(loaded.noise_beta, noise_schedule(4, "linear"))
    assert torch.equal(TensorARWrapper.from_pretrained(tmp_path, tiny_llamagen()).noise_beta,
                       noise_schedule(4, "exponential"))
