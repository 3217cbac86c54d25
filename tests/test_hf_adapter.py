"""HFCausalLMAdapter: transformers causal LMs (Llama, GPT-2) as TensorAR backbones, built from tiny configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_
from torch import nn

transformers = pytest.importorskip("transformers")

from tensorar_plugin import TensorARWrapper, sample_plain  # noqa: E402
from tensorar_plugin.adapters import HFCausalLMAdapter, find_adapter  # noqa: E402

VOCAB, PROMPT = 100, 3


def tiny_llama(seed: int = 0, vocab: int = VOCAB):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=None)
    return randomize_(transformers.LlamaForCausalLM(config), seed=seed).eval()


def tiny_gpt2(seed: int = 0, vocab: int = VOCAB):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return randomize_(transformers.GPT2LMHeadModel(config), seed=seed).eval()


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def perturb_heads_(wrapper: TensorARWrapper, seed: int = 0) -> TensorARWrapper:
    for module in wrapper.new_modules().values():
        randomize_(module, seed=seed, std=0.3)
    return wrapper


def data(b=2, t=8, vocab=VOCAB, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=gen), torch.randint(0, vocab, (b, PROMPT), generator=gen)


def test_transformers_models_are_detected_without_settings():
    llama, gpt2 = tiny_llama(), tiny_gpt2()
    adapter = find_adapter(llama)
    assert isinstance(adapter, HFCausalLMAdapter)
    assert adapter.final_norm is llama.model.norm and adapter.decoder is llama.model
    assert find_adapter(gpt2).final_norm is gpt2.transformer.ln_f
    assert isinstance(TensorARWrapper(gpt2, window=2).adapter, HFCausalLMAdapter)
    assert adapter.vocab_size == VOCAB and adapter.hidden_size == 32
    with pytest.raises(TypeError, match="no TensorAR adapter"):
        find_adapter(llama.model)  # a bare decoder has no LM head


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("final_norm", ["auto", None])
def test_window_one_equals_model_logits(arch, final_norm):
    model = BUILDERS[arch]()
    wrapper = TensorARWrapper(model, window=1, adapter=HFCausalLMAdapter(model, final_norm=final_norm)).eval()
    tokens, prompt = data()
    with torch.no_grad():
        out = wrapper(tokens, prompt)
        ref = model(input_ids=torch.cat([prompt, tokens[:, :-1]], dim=1)).logits[:, PROMPT - 1:]
    assert out.logits.shape == (2, 8, 1, VOCAB)
    torch.testing.assert_close(out.logits[:, :, 0], ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, F.cross_entropy(ref.reshape(-1, VOCAB), tokens.reshape(-1)))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pre_norm_hidden_states_and_fresh_slot_zero(arch):
    model = BUILDERS[arch]()
    wrapper = TensorARWrapper(model, window=4).eval()
    tokens, prompt = data()
    with torch.no_grad():
        emb = model.get_input_embeddings()(torch.cat([prompt, tokens[:, :-1]], dim=1))
        hidden = wrapper.adapter.forward_hidden(emb)
        normed = model.base_model(inputs_embeds=emb).last_hidden_state
        ref = model(input_ids=torch.cat([prompt, tokens[:, :-1]], dim=1)).logits[:, PROMPT - 1:]
        out = wrapper(tokens, prompt)
    assert not torch.allclose(hidden, normed)  # before the final norm ...
    torch.testing.assert_close(wrapper.adapter.final_norm(hidden), normed)  # ... which head() applies
    torch.testing.assert_close(out.logits[:, :, 0], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("window", [1, 4])
def test_cached_generation_equals_uncached(arch, window):
    model = BUILDERS[arch]()
    tokens, prompt = data()
    uncond = torch.zeros(PROMPT, dtype=torch.long)
    adapter = HFCausalLMAdapter(model, uncond_ids=uncond, max_image_tokens=16)
    wrapper = perturb_heads_(TensorARWrapper(model, window=window, adapter=adapter))
    for cfg in (1.0, 2.0):
        cached = wrapper.generate(prompt, 10, greedy=True, draft="argmax", cfg_scale=cfg)
        uncached = wrapper.generate(prompt, 10, greedy=True, draft="argmax", cfg_scale=cfg, use_cache=False)
        assert torch.equal(cached, uncached)
    assert wrapper.generate(prompt, greedy=True, draft="argmax").shape == (2, 16)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cache_goes_by_the_name_the_installed_transformers_declares(arch):
    """transformers 5 renames `past_key_values` to `cache` (the old name warns, and goes in 5.40): the adapter
    passes and reads back whichever name the decoder's forward declares, so cached sampling warns nothing."""
    import inspect
    import warnings

    model = BUILDERS[arch]()
    _, prompt = data()
    adapter = HFCausalLMAdapter(model, uncond_ids=torch.zeros(PROMPT, dtype=torch.long), max_image_tokens=16)
    declared = inspect.signature(adapter.decoder.forward).parameters
    assert adapter._cache_name == ("cache" if "cache" in declared else "past_key_values")
    wrapper = TensorARWrapper(model, window=4, adapter=adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        wrapper.generate(prompt, 6, greedy=True, draft="argmax", cfg_scale=2.0)
    assert adapter._cache is not None  # the model's own cache object was kept between steps


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_plain_greedy_sampling_matches_the_models_own_forward(cache):
    if cache == "static" and tuple(int(p) for p in transformers.__version__.split(".")[:2]) < (4, 48):
        pytest.skip("StaticCache support needs transformers >= 4.48")
    model = tiny_llama()
    _, prompt = data()
    adapter = HFCausalLMAdapter(model, cache=cache, num_cond_tokens=PROMPT)
    tokens = sample_plain(adapter, prompt, 6, greedy=True)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(tokens, ids[:, PROMPT:])
    assert torch.equal(sample_plain(adapter, prompt, 6, greedy=True), tokens)  # caches are rebuilt per call


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_condition_mask_is_the_models_attention_mask(arch):
    model = BUILDERS[arch]()
    tokens, prompt = data()
    mask = torch.tensor([[0, 1, 1], [0, 0, 1]])  # left-padded prompts
    with torch.no_grad():
        out = TensorARWrapper(model, window=1).eval()(tokens, prompt, cond_mask=mask)
        attention = torch.cat([mask, torch.ones(2, 7, dtype=torch.long)], dim=1)
        ref = model(input_ids=torch.cat([prompt, tokens[:, :-1]], dim=1), attention_mask=attention).logits
    torch.testing.assert_close(out.logits[:, :, 0], ref[:, PROMPT - 1:], atol=1e-5, rtol=0)
    adapter = HFCausalLMAdapter(model, uncond_ids=torch.zeros(PROMPT, dtype=torch.long))
    wrapper = perturb_heads_(TensorARWrapper(model, window=4, adapter=adapter))
    greedy = dict(greedy=True, draft="argmax", cfg_scale=2.0)
    masked = wrapper.generate(prompt, 8, cond_mask=mask, **greedy)
    assert torch.equal(masked, wrapper.generate(prompt, 8, cond_mask=mask, use_cache=False, **greedy))
    assert not torch.equal(masked, wrapper.generate(prompt, 8, **greedy))  # the next call drops the mask
    with pytest.raises(ValueError, match=r"cond_mask must have shape \(2, 3\) \(batch, condition tokens\), got"):
        wrapper.generate(prompt, 8, cond_mask=torch.ones(2, 5, dtype=torch.long), **greedy)  # prompts are never cut


def test_construction_checks_the_position_range_and_takes_numpy_integers():
    import numpy as np

    model = tiny_llama()  # 64 positions
    with pytest.raises(ValueError, match="max_image_tokens=100 with 3 condition token.* needs 103 positions, but "
                                         "LlamaForCausalLM has 64"):
        HFCausalLMAdapter(model, num_cond_tokens=3, max_image_tokens=100)
    adapter = HFCausalLMAdapter(model, num_cond_tokens=np.int64(3), max_image_tokens=np.int64(16))
    assert (adapter.num_cond_tokens, adapter.max_image_tokens) == (3, 16)


def test_compile_is_refused_with_a_clear_error():
    model = BUILDERS["llama"]()
    _, prompt = data()
    with pytest.raises(ValueError, match="compile=True: HFCausalLMAdapter's decode step reads values back"):
        TensorARWrapper(model, window=2).generate(prompt, 4, compile={"backend": "eager"})


def test_save_load_round_trip_of_the_tensorar_parts(tmp_path):
    model = tiny_llama()
    tokens, prompt = data()
    make = lambda: HFCausalLMAdapter(model, image_token_offset=36, image_vocab_size=64, num_cond_tokens=PROMPT)
    wrapper = perturb_heads_(TensorARWrapper(model, window=4, adapter=make())).eval()
    wrapper.save_pretrained(tmp_path, save_backbone=False)
    assert (tmp_path / "tensorar_adapter.safetensors").is_file()
    loaded = TensorARWrapper.from_pretrained(tmp_path, model, adapter=make()).eval()
    small = tokens % 64
    with torch.no_grad():
        assert torch.equal(loaded(small, prompt).logits, wrapper(small, prompt).logits)
    greedy = dict(greedy=True, draft="argmax")
    assert torch.equal(loaded.generate(prompt, 5, **greedy), wrapper.generate(prompt, 5, **greedy))
    with pytest.raises(ValueError, match="codebook"):
        TensorARWrapper.from_pretrained(tmp_path, model, adapter=HFCausalLMAdapter(model))


def test_image_token_range_inside_a_larger_vocabulary():
    model = tiny_llama()
    offset, n = 30, 64
    adapter = HFCausalLMAdapter(model, image_token_offset=offset, image_vocab_size=n)
    wrapper = TensorARWrapper(model, window=1, adapter=adapter).eval()
    tokens, prompt = data(vocab=n)
    with torch.no_grad():
        out = wrapper(tokens, prompt)
        ref = model(input_ids=torch.cat([prompt, tokens[:, :-1] + offset], dim=1)).logits[:, PROMPT - 1:]
    assert out.logits.shape == (2, 8, 1, n)
    torch.testing.assert_close(out.logits[:, :, 0], ref[..., offset: offset + n], atol=1e-5, rtol=1e-5)
    assert torch.equal(adapter.embed_tokens(tokens), model.get_input_embeddings()(tokens + offset))
    wrapper4 = perturb_heads_(TensorARWrapper(model, window=4, adapter=adapter))
    sampled = wrapper4.generate(prompt, 8, greedy=True, draft="argmax")
    assert torch.equal(sampled, wrapper4.generate(prompt, 8, greedy=True, draft="argmax", use_cache=False))
    assert int(sampled.max()) < n
    with pytest.raises(ValueError, match="tokens"):
        wrapper(torch.full((2, 8), n), prompt)
    with pytest.raises(ValueError, match="do not fit"):
        HFCausalLMAdapter(model, image_token_offset=50, image_vocab_size=64)


class MultiModality(nn.Module):
    """Laid out like deepseek-ai/Janus's `MultiModalityCausalLM`: a language model plus image-generation
    parts `gen_embed`, `gen_aligner` and `gen_head` next to it (no LM head of its own)."""

    def __init__(self, codebook: int = 48):
        super().__init__()
        self.language_model = tiny_llama()
        self.config = self.language_model.config
        torch.manual_seed(1)
        self.gen_embed = nn.Embedding(codebook, 16)
        self.gen_aligner = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32))
        self.gen_head = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, codebook))

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()


def test_janus_style_separate_image_embedding_and_head():
    model, codebook = MultiModality().eval(), 48
    uncond = torch.tensor([5, 5, 5])
    adapter = HFCausalLMAdapter(model, image_embedding=["gen_embed", "gen_aligner"], image_head="gen_head",
                                decoder="language_model.model", uncond_ids=uncond, max_image_tokens=16)
    assert adapter.vocab_size == codebook and adapter.num_cond_tokens == PROMPT
    assert adapter.final_norm is model.language_model.model.norm and adapter.embedding_weight is model.gen_embed.weight
    wrapper = TensorARWrapper(model, window=1, adapter=adapter).eval()
    tokens, prompt = data(vocab=codebook)
    with torch.no_grad():
        image = model.gen_aligner(model.gen_embed(tokens[:, :-1]))
        emb = torch.cat([model.get_input_embeddings()(prompt), image], dim=1)
        ref = model.gen_head(model.language_model.model(inputs_embeds=emb).last_hidden_state)[:, PROMPT - 1:]
        out = wrapper(tokens, prompt)
    torch.testing.assert_close(out.logits[:, :, 0], ref, atol=1e-5, rtol=0)
    wrapper4 = perturb_heads_(TensorARWrapper(model, window=4, adapter=adapter))
    greedy = dict(greedy=True, draft="argmax", cfg_scale=3.0)
    cached = wrapper4.generate(prompt, 12, **greedy)
    assert torch.equal(cached, wrapper4.generate(prompt, 12, use_cache=False, **greedy))
    assert int(cached.max()) < codebook
    with pytest.raises(TypeError, match="causal LM head"):
        HFCausalLMAdapter(model, decoder="language_model.model")


def tiny_janus():
    from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig

    torch.manual_seed(0)
    text = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    vision = JanusVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                               image_size=32, patch_size=16, projection_dim=32)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=48, latent_channels=8, base_channels=32,
                          channel_multiplier=[1, 1], num_res_blocks=1, projection_dim=32, image_token_embed_dim=32,
                          num_patches=4, resolution=32)
    config = transformers.JanusConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                      vq_config=vq.to_dict())
    return randomize_(transformers.JanusForConditionalGeneration(config), std=0.1).eval()


@pytest.mark.skipif(not hasattr(transformers, "JanusForConditionalGeneration"), reason="no Janus in this transformers")
def test_transformers_janus_image_generation_path():
    model = tiny_janus()
    adapter = HFCausalLMAdapter(model, image_embedding=["model.generation_embeddings", "model.generation_aligner"],
                                image_head="model.generation_head", decoder="model.language_model",
                                uncond_ids=torch.zeros(PROMPT, dtype=torch.long), max_image_tokens=16)
    assert adapter.vocab_size == 48 and adapter.final_norm is model.model.language_model.norm
    tokens, prompt = data(vocab=48)
    with torch.no_grad():
        out = TensorARWrapper(model, window=1, adapter=adapter)(tokens, prompt)
        emb = torch.cat([model.get_input_embeddings()(prompt),
                         model.prepare_embeddings_for_image_generation(tokens[:, :-1])], dim=1)
        hidden = model.model.language_model(inputs_embeds=emb).last_hidden_state
        ref = model.model.generation_head(hidden)[:, PROMPT - 1:]
    torch.testing.assert_close(out.logits[:, :, 0], ref, atol=1e-5, rtol=0)
    wrapper = perturb_heads_(TensorARWrapper(model, window=4, adapter=adapter))
    greedy = dict(greedy=True, draft="argmax", cfg_scale=2.0)
    assert torch.equal(wrapper.generate(prompt, 8, **greedy), wrapper.generate(prompt, 8, use_cache=False, **greedy))


def test_condition_dropout_training_and_frozen_backbone():
    model = tiny_gpt2()
    uncond = torch.tensor([[7, 8, 9]])
    adapter = HFCausalLMAdapter(model, uncond_ids=uncond, cond_dropout_prob=0.5)
    wrapper = perturb_heads_(TensorARWrapper(model, window=4, adapter=adapter, freeze_backbone=True)).train()
    tokens, prompt = data()
    gen = lambda: torch.Generator().manual_seed(0)
    dropped = wrapper(tokens, prompt, force_drop_ids=torch.ones(2, dtype=torch.long), generator=gen()).logits
    null = wrapper(tokens, uncond.expand(2, -1), force_drop_ids=torch.zeros(2, dtype=torch.long), generator=gen())
    torch.testing.assert_close(dropped, null.logits)
    wrapper(tokens, prompt).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert wrapper.decoder.out_proj.weight.grad.abs().sum() > 0


def test_embedded_conditions_equal_prompt_ids():
    model = tiny_llama()
    tokens, prompt = data()
    by_ids = TensorARWrapper(model, window=2).eval()
    by_emb = TensorARWrapper(model, window=2, adapter=HFCausalLMAdapter(model, condition="embeds")).eval()
    by_emb.load_state_dict(by_ids.state_dict())
    with torch.no_grad():
        emb = model.get_input_embeddings()(prompt)
        assert torch.equal(by_emb(tokens, emb).logits, by_ids(tokens, prompt).logits)
    call = HFCausalLMAdapter(model, condition=lambda c: model.get_input_embeddings()(c), num_cond_tokens=PROMPT)
    with torch.no_grad():
        assert torch.equal(TensorARWrapper(model, window=1, adapter=call)(tokens, prompt).logits[:, :, 0],
                           by_ids(tokens, prompt).logits[:, :, 0])


def test_bad_conditions_and_settings_raise_clear_errors():
    model = tiny_llama()
    wrapper = TensorARWrapper(model, window=2)
    tokens, prompt = data()
    wrapper(tokens, prompt)  # locks the prompt length to 3
    with pytest.raises(ValueError, match="num_cond_tokens=3"):
        wrapper(tokens, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^cond must be prompt token ids \[B, L\] \(an integer tensor\), got shape "
                                         r"\(2, 3\) and dtype torch.float32$"):
        wrapper(tokens, prompt.float())
    with pytest.raises(ValueError, match=rf"^cond holds token ids outside \[0, {VOCAB - 1}\] \(min {VOCAB}, "
                                         rf"max {VOCAB}\)$"):
        wrapper(tokens, torch.full((2, 3), VOCAB))
    with pytest.raises(ValueError, match="null condition"):
        wrapper.generate(prompt, 4, cfg_scale=2.0)
    with pytest.raises(ValueError, match="uncond_ids"):
        HFCausalLMAdapter(model, cond_dropout_prob=0.1)
    with pytest.raises(ValueError, match="num_cond_tokens"):
        HFCausalLMAdapter(model, uncond_ids=torch.zeros(3, dtype=torch.long), num_cond_tokens=4)
    with pytest.raises(ValueError, match="condition"):
        HFCausalLMAdapter(model, condition="text")
    with pytest.raises(RuntimeError, match="num_cond_tokens"):
        _ = HFCausalLMAdapter(model).num_cond_tokens
    with pytest.raises(ValueError, match=r"num_tokens must be an integer in \[1, 61\]"):  # 64 positions - 3 prompt
        TensorARWrapper(model, window=1).generate(prompt, 62, greedy=True)


def test_a_fresh_adapter_generates_the_default_length_for_its_prompt():
    """The prompt fixes how many image positions remain: the default length is checked after it is known."""
    model = tiny_llama()
    _, prompt = data()
    tokens = TensorARWrapper(model, window=1).generate(prompt, greedy=True)  # 64 positions - 3 prompt
    assert tokens.shape == (2, 61)


def test_adapter_settings_that_cannot_work_are_refused_at_construction():
    model = tiny_llama()
    for bad, match in ((torch.tensor([1.0, 2.0, 3.0]), "uncond_ids must be the null prompt's token ids"),
                       (torch.tensor([0, 5, VOCAB + 10]), r"uncond_ids holds token ids outside \[0, 99\]"),
                       (torch.zeros(2, PROMPT, dtype=torch.long), "uncond_ids must be the null prompt's token ids")):
        with pytest.raises(ValueError, match=match):
            HFCausalLMAdapter(model, uncond_ids=bad)
    head = nn.Linear(32, 48)
    with pytest.raises(ValueError, match="image_vocab_size=32, but image_head outputs 48 logits"):
        HFCausalLMAdapter(model, image_head=head, image_vocab_size=32)


def test_models_whose_logits_the_adapter_cannot_reproduce_are_refused():
    """Granite divides its LM head's output by `logits_scaling`; sampling from the undivided logits would be
    silently wrong at every temperature, so the construction-time check refuses it."""
    config = transformers.GraniteConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        logits_scaling=8.0)
    torch.manual_seed(0)
    granite = randomize_(transformers.GraniteForCausalLM(config)).eval()
    with pytest.raises(ValueError, match="GraniteForCausalLM's own logits differ from head"):
        HFCausalLMAdapter(granite)
    config.logits_scaling = 1.0  # the same architecture without the post-processing is accepted, and exact
    same = randomize_(transformers.GraniteForCausalLM(config)).eval()
    tokens, prompt = data()
    with torch.no_grad():
        ours = TensorARWrapper(same, window=1)(tokens, prompt).logits[:, :, 0]
        theirs = same(input_ids=torch.cat([prompt, tokens[:, :-1]], 1)).logits[:, PROMPT - 1:]
    torch.testing.assert_close(ours, theirs)


def test_static_cache_refuses_to_rewind_and_dynamic_cache_rewinds_exactly():
    model = tiny_llama()
    first, again = torch.randn(2, 8, 32), torch.randn(2, 3, 32)
    for cache in ("dynamic", "static"):
        adapter = HFCausalLMAdapter(model, num_cond_tokens=3, cache=cache)
        with torch.no_grad():
            reference = adapter.forward_hidden(torch.cat([first[:, :4], again], 1))
            adapter.setup_caches(2, 16)
            adapter.forward_hidden(first[:, :6], torch.arange(6))
            if cache == "static":
                with pytest.raises(ValueError, match="a static cache cannot drop positions"):
                    adapter.forward_hidden(again, torch.arange(4, 7))
            else:
                torch.testing.assert_close(adapter.forward_hidden(again, torch.arange(4, 7)), reference[:, 4:])


def test_models_that_mask_image_logits_in_their_own_forward_pass_the_self_check():
    """Chameleon (and Anole, Lumina-mGPT) sets image-token logits to the dtype minimum in its text forward:
    masked logits say nothing about the head, so they are left out of the construction-time comparison."""
    vocab = {f"t{i}": i for i in range(32)}
    for j in range(32):
        vocab["IMGIMG" + "".join("ABCDEFGHIJ"[int(c)] for c in f"{j:02d}") + "Z"] = 32 + j
    vocab["<image>"] = 31
    config = transformers.ChameleonConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, vocabulary_map=vocab, image_token_id=31,
        vq_config=dict(embed_dim=8, num_embeddings=32, base_channels=32, channel_multiplier=[1, 1],
                       num_res_blocks=1, attn_resolutions=[]))
    torch.manual_seed(0)
    chameleon = transformers.ChameleonForConditionalGeneration(config).eval()
    adapter = HFCausalLMAdapter(chameleon, image_token_offset=32, image_vocab_size=32, max_image_tokens=16)
    tokens = sample_plain(adapter, torch.tensor([[1, 2, 3]]), num_tokens=8, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (1, 8) and int(tokens.max()) < 32


def test_meta_device_models_and_unchecked_heads_build():
    """Building on the meta device (weights loaded later) checks uncond_ids by shape only; check_logits=False
    skips the forward."""
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=128)
    with torch.device("meta"):
        lm = transformers.LlamaForCausalLM(config)
        adapter = HFCausalLMAdapter(lm, image_token_offset=256, uncond_ids=[0, 1, 2], max_image_tokens=16)
    assert adapter.num_cond_tokens == 3 and adapter.uncond_ids.device.type == "meta"
    granite_like = transformers.GraniteConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64,
                                              logits_scaling=8.0)
    HFCausalLMAdapter(transformers.GraniteForCausalLM(granite_like).eval(), check_logits=False)  # opted out
