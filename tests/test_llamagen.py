"""LlamaGen backbone: checkpoint layout, cache consistency, conditioning, loss and config errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config, tiny_llamagen

from tensorar_plugin.models.llamagen import (
    LLAMAGEN_PRESETS,
    LlamaGen,
    LlamaGenConfig,
    build_llamagen,
)


def expected_layout(cfg: LlamaGenConfig) -> dict[str, tuple[int, ...]]:
    """The state-dict layout of LlamaGen's `Transformer`, written out from its module structure."""
    d, hd, kv = cfg.dim, cfg.head_dim, cfg.kv_heads
    hidden = cfg.ffn_hidden_dim
    keys: dict[str, tuple[int, ...]] = {}
    if cfg.model_type == "c2i":
        keys["cls_embedding.embedding_table.weight"] = (cfg.num_classes + int(cfg.class_dropout_prob > 0), d)
    else:
        keys["cls_embedding.uncond_embedding"] = (120, cfg.caption_dim)
        keys["cls_embedding.cap_proj.fc1.weight"] = (d, cfg.caption_dim)
        keys["cls_embedding.cap_proj.fc2.weight"] = (d, d)
    keys["tok_embeddings.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        keys[p + "attention.wqkv.weight"] = ((cfg.n_head + 2 * kv) * hd, d)
        keys[p + "attention.wo.weight"] = (d, d)
        keys[p + "feed_forward.w1.weight"] = (hidden, d)
        keys[p + "feed_forward.w3.weight"] = (hidden, d)
        keys[p + "feed_forward.w2.weight"] = (d, hidden)
        keys[p + "attention_norm.weight"] = (d,)
        keys[p + "ffn_norm.weight"] = (d,)
    keys["norm.weight"] = (d,)
    keys["output.weight"] = (cfg.vocab_size, d)
    return keys


# Parameter counts LlamaGen quotes for its c2i models (vocab 16384, 1000 classes).
QUOTED_PARAMS = {"GPT-B": 111e6, "GPT-L": 343e6, "GPT-XL": 775e6, "GPT-XXL": 1.4e9, "GPT-XXXL": 3.9e9}


@pytest.mark.parametrize("preset", list(LLAMAGEN_PRESETS))
@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
def test_preset_state_dict_layout_on_meta(preset, model_type):
    extra = {"cls_token_num": 120} if model_type == "t2i" else {}
    with torch.device("meta"):
        model = build_llamagen(preset, model_type=model_type, **extra)
    layout = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert layout == expected_layout(model.config)
    if model_type == "c2i" and preset in QUOTED_PARAMS:
        n = sum(p.numel() for p in model.parameters())
        assert abs(n - QUOTED_PARAMS[preset]) / QUOTED_PARAMS[preset] < 0.02


def test_setup_caches_adds_nothing_to_state_dict(tiny_c2i):
    before = set(tiny_c2i.state_dict())
    tiny_c2i.setup_caches(2, 20, torch.float32)
    assert set(tiny_c2i.state_dict()) == before


def _cached_logits(model: LlamaGen, cond, tokens):
    """Prefill on the condition, then decode the image tokens one by one through the cache."""
    batch, n_cond = cond.shape[0], model.cls_token_num
    model.setup_caches(batch, n_cond + tokens.shape[1], torch.float32)
    logits, _ = model(None, cond, input_pos=torch.arange(n_cond))
    steps = [logits[:, -1]]
    for i in range(tokens.shape[1] - 1):
        logits, _ = model(tokens[:, i: i + 1], None, input_pos=torch.tensor([n_cond + i]))
        steps.append(logits[:, -1])
    return torch.stack(steps, dim=1)


def _full_logits(model: LlamaGen, cond, tokens):
    logits, _ = model(tokens[:, :-1], cond)
    return logits[:, model.cls_token_num - 1:]


@pytest.mark.parametrize("overrides", [{}, {"n_kv_head": 2}, {"n_kv_head": 1}])
def test_full_sequence_equals_prefill_plus_decode_c2i(overrides):
    model = tiny_llamagen(**overrides)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (3, 16), generator=gen)
    cond = torch.tensor([0, 4, 9])
    with torch.no_grad():
        full = _full_logits(model, cond, tokens)
        cached = _cached_logits(model, cond, tokens)
    assert full.shape == (3, 16, 64)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    assert full.std() > 0.1  # the comparison is not between constants


def test_full_sequence_equals_prefill_plus_decode_t2i(tiny_t2i):
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 64, (2, 16), generator=gen)
    caption = torch.randn(2, 5, 24, generator=gen)
    with torch.no_grad():
        full = _full_logits(tiny_t2i, caption, tokens)
        cached = _cached_logits(tiny_t2i, caption, tokens)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_training_mode_matches_eval_without_dropout(tiny_c2i):
    tokens = torch.randint(0, 64, (2, 16))
    cond = torch.tensor([1, 2])
    with torch.no_grad():
        eval_logits = _full_logits(tiny_c2i, cond, tokens)
        tiny_c2i.train()
        tiny_c2i.cls_embedding.dropout_prob = 0.0
        train_logits, _ = tiny_c2i(tokens[:, :-1], cond)
    assert train_logits.shape == (2, 16, 64)
    torch.testing.assert_close(train_logits, eval_logits)


def test_loss_is_cross_entropy_over_targets(tiny_c2i):
    tokens = torch.randint(0, 64, (2, 16))
    cond = torch.tensor([3, 5])
    tiny_c2i.train()
    tiny_c2i.cls_embedding.dropout_prob = 0.0
    logits, loss = tiny_c2i(tokens[:, :-1], cond, targets=tokens)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 64), tokens.reshape(-1)))
    valid = torch.tensor([1.0, 0.0])
    _, masked = tiny_c2i(tokens[:, :-1], cond, targets=tokens, valid=valid)
    torch.testing.assert_close(masked, F.cross_entropy(logits[0], tokens[0]))


def test_label_dropout_uses_the_null_class(tiny_c2i):
    emb = tiny_c2i.cls_embedding
    labels = torch.tensor([1, 2, 3])
    null = emb.embedding_table.weight[10]
    forced = emb(labels, train=False, force_drop_ids=torch.tensor([1, 0, 1]))
    torch.testing.assert_close(forced[:, 0], torch.stack([null, emb.embedding_table.weight[2], null]))
    emb.dropout_prob = 1.0
    assert torch.equal(emb(labels, train=True)[:, 0], null.expand(3, -1))
    assert torch.equal(emb(labels, train=False)[:, 0], emb.embedding_table.weight[labels])


def test_caption_dropout_uses_uncond_embedding(tiny_t2i):
    emb = tiny_t2i.cls_embedding
    caption = torch.randn(2, 5, 24)
    out = emb(caption, train=False, force_drop_ids=torch.tensor([1, 0]))
    torch.testing.assert_close(out[0], emb.cap_proj(emb.uncond_embedding[:5]))
    torch.testing.assert_close(out[1], emb.cap_proj(caption[1]))


def test_buffers_follow_device_and_rope_stays_float32(tiny_c2i):
    tiny_c2i.setup_caches(2, 17, torch.float32)
    assert tiny_c2i.max_seq_length == 24  # rounded up to a multiple of 8, as LlamaGen
    tiny_c2i.to(torch.bfloat16)
    assert tiny_c2i.freqs_cis.dtype == torch.float32
    assert tiny_c2i.tok_embeddings.weight.dtype == torch.bfloat16
    tiny_c2i.to("meta")
    assert tiny_c2i.freqs_cis.device.type == "meta"
    assert tiny_c2i.causal_mask.device.type == "meta"
    assert tiny_c2i.layers[0].attention.kv_cache.k_cache.device.type == "meta"


def test_condition_rows_of_rope_are_zero(tiny_c2i):
    table = tiny_c2i.freqs_cis
    assert table.shape == (1 + 16, 4, 2)
    assert torch.count_nonzero(table[:1]) == 0
    torch.testing.assert_close(table[1:].pow(2).sum(-1), torch.ones(16, 4))


def test_gqa_cache_is_sized_with_kv_heads():
    model = tiny_llamagen(n_kv_head=1)
    model.setup_caches(2, 17, torch.float32)
    assert model.layers[0].attention.kv_cache.k_cache.shape == (2, 1, 24, 8)


def test_state_dict_round_trip_strict(tmp_path):
    model = tiny_llamagen(seed=3)
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    fresh = LlamaGen(tiny_config())
    fresh.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True), strict=True)
    fresh.eval()
    tokens = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(_full_logits(fresh, torch.tensor([2]), tokens),
                                   _full_logits(model, torch.tensor([2]), tokens))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"block_size": 15}, "block_size"),
        ({"dim": 30}, "dim"),
        ({"n_kv_head": 3}, "n_kv_head"),
        ({"model_type": "video"}, "model_type"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"token_dropout_p": 1.5}, "token_dropout_p"),
        ({"dim": 24, "n_head": 4}, "dim"),  # head_dim 6 is not divisible by 4
        ({"cls_token_num": 2}, "cls_token_num"),  # a class label is one token
    ],
)
def test_bad_config_raises_value_error_naming_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_unknown_preset_and_override():
    with pytest.raises(ValueError, match="GPT-B"):
        build_llamagen("GPT-Z")
    with pytest.raises(ValueError, match="n_layers"):
        build_llamagen("GPT-B", n_layers=3)


def test_config_dict_round_trip():
    cfg = tiny_config(n_kv_head=2)
    assert LlamaGenConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="bogus"):
        LlamaGenConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_decode_without_cache_is_a_clear_error(tiny_c2i):
    with pytest.raises(ValueError, match="setup_caches"):
        tiny_c2i(torch.tensor([[1]]), None, input_pos=torch.tensor([1]))


def test_decode_with_a_shorter_mask_reads_only_that_many_cached_keys(monkeypatch):
    """The bounded read sampling uses: same hidden states, fewer keys handed to attention (GQA too)."""
    from tensorar_plugin.adapters import LlamaGenAdapter
    from tensorar_plugin.models import llamagen as module

    model = tiny_llamagen(n_kv_head=2)
    adapter = LlamaGenAdapter(model)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    emb = torch.cat([adapter.embed_condition(torch.tensor([1, 2]), train=False), adapter.embed_tokens(tokens)], 1)
    adapter.setup_caches(2, 17)  # cache of 24 slots
    adapter.forward_hidden(emb[:, :12], torch.arange(12))
    step = emb[:, 12:13]
    full = adapter.forward_hidden(step, torch.tensor([12]))
    seen = []
    real_sdpa = module.F.scaled_dot_product_attention
    monkeypatch.setattr(module.F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append(k.shape[2]) or real_sdpa(q, k, v, **kw))
    bounded = adapter.forward_hidden(step, torch.tensor([12]), kv_len=16)
    assert seen == [16, 16]  # both layers
    torch.testing.assert_close(bounded, full, rtol=1e-6, atol=1e-6)
