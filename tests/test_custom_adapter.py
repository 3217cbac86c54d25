"""ModuleAdapter: custom causal transformers described by their parts (the example's toy GPT and others)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import batch, perturb_heads_, randomize_
from torch import nn

from tensorar_plugin import TensorARWrapper, sample_plain
from tensorar_plugin.adapters import KVCache, ModuleAdapter, find_adapter

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_model.py"
GREEDY = dict(greedy=True, draft="argmax")


def load_example():
    spec = importlib.util.spec_from_file_location("tensorar_custom_model_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = load_example()


def toy(seed: int = 0):
    torch.manual_seed(seed)
    return randomize_(example.ToyGPT(), seed=seed).eval()


def test_toy_model_window_one_equals_its_own_forward():
    model = toy()
    wrapper = TensorARWrapper(model, window=1, adapter=example.toy_adapter(model)).eval()
    tokens, labels = batch()
    with torch.no_grad():
        out = wrapper(tokens, labels)
        ref = model(tokens, labels)
    assert torch.equal(out.logits[:, :, 0], ref)
    torch.testing.assert_close(out.loss, F.cross_entropy(ref.reshape(-1, 64), tokens.reshape(-1)))
    fresh = TensorARWrapper(model, window=4, adapter=example.toy_adapter(model)).eval()
    with torch.no_grad():
        assert torch.equal(fresh(tokens, labels).logits[:, :, 0], ref)


@pytest.mark.parametrize("window", [1, 4])
@pytest.mark.parametrize("kv_cache", [True, False])
def test_toy_model_cached_generation_equals_uncached(window, kv_cache):
    model = toy()
    adapter = example.toy_adapter(model)
    adapter.kv_cache = kv_cache  # False: the blocks are called as block(h) and the prefix is re-run
    wrapper = perturb_heads_(TensorARWrapper(model, window=window, adapter=adapter))
    _, labels = batch()
    for cfg in (1.0, 2.5):
        cached = wrapper.generate(labels, cfg_scale=cfg, **GREEDY)
        assert cached.shape == (3, 16)
        assert torch.equal(cached, wrapper.generate(labels, cfg_scale=cfg, use_cache=False, **GREEDY))
    # a second, shorter call (same batch) reuses the caches
    wrapper.generate(labels, **GREEDY)
    kept = adapter._caches
    assert torch.equal(wrapper.generate(labels, 5, **GREEDY), wrapper.generate(labels, 5, use_cache=False, **GREEDY))
    assert not kv_cache or adapter._caches is kept
    with torch.inference_mode():  # caches made here (new batch size) cannot be written outside it: reallocated
        inside = wrapper.generate(labels[:2], 5, **GREEDY)
    assert torch.equal(wrapper.generate(labels[:2], 5, **GREEDY), inside)


def test_toy_model_decode_step_compiles_as_one_graph_and_samples_like_eager():
    """docs/adapters.md: a ModuleAdapter's cached step has no host sync, so it compiles without graph breaks."""
    model = toy()
    wrapper = perturb_heads_(TensorARWrapper(model, window=4, adapter=example.toy_adapter(model))).eval()
    _, labels = batch()
    settings = dict(cfg_scale=2.0, top_k=8)
    eager = wrapper.generate(labels, generator=torch.Generator().manual_seed(0), **settings)
    compiled = wrapper.generate(labels, generator=torch.Generator().manual_seed(0), **settings,
                                compile={"backend": "aot_eager", "fullgraph": True})  # a graph break would raise
    assert torch.equal(compiled, eager)


def test_mistakes_in_a_module_adapter_are_named_not_raw_tracebacks():
    model = toy()
    plain_blocks = [lambda h: h]  # block(h) only, as in docs/adapters.md's kv_cache=False case
    with pytest.raises(ValueError, match="the blocks take no input_pos / cache arguments.*pass kv_cache=False"):
        ModuleAdapter(model, embedding="tok", blocks=plain_blocks, head="out", pos_embedding="pos")
    ModuleAdapter(model, embedding="tok", blocks=plain_blocks, head="out", pos_embedding="pos", kv_cache=False)
    no_bound = ModuleAdapter(model, embedding="tok", blocks="blocks", norm="norm", head="out", cond_embedding="cls",
                             pos_embedding="pos", null_cond=10)  # no num_classes: the table's rows bound the ids
    wrapper = TensorARWrapper(model, window=2, adapter=no_bound)
    tokens, _ = batch()
    rows = model.cls.num_embeddings
    with pytest.raises(ValueError, match=rf"cond holds ids outside \[0, {rows - 1}\]"):
        wrapper(tokens, torch.tensor([1, 2, rows]))
    with pytest.raises(ValueError, match="cond must be integer ids into cond_embedding"):
        wrapper(tokens, torch.tensor([1.0, 2.0, 3.0]))


def test_a_chained_embedding_takes_its_width_from_the_last_part():
    model = toy()
    model.small, model.proj = nn.Embedding(64, 16), nn.Linear(16, 32)  # a narrow codebook table and a projector
    adapter = ModuleAdapter(model, embedding=["small", "proj"], blocks="blocks", norm="norm", head="out",
                            cond_embedding="cls", pos_embedding="pos", null_cond=10, num_classes=10)
    assert adapter.hidden_size == 32
    tokens, labels = batch()
    assert torch.isfinite(TensorARWrapper(model, window=4, adapter=adapter)(tokens, labels).loss)


def test_compile_is_refused_clearly_where_the_decode_step_reads_the_host():
    model = toy()
    adapter = example.toy_adapter(model)
    adapter.kv_cache = False  # each step re-runs a prefix whose length is read on the host
    wrapper = TensorARWrapper(model, window=2, adapter=adapter)
    _, labels = batch()
    with pytest.raises(ValueError, match="compile=True: ModuleAdapter's decode step reads values back to the host"):
        wrapper.generate(labels, compile={"backend": "eager"})


def test_parts_named_by_path_follow_the_model_through_assign_loads_and_casts():
    model = toy(0)
    wrapper = TensorARWrapper(model, window=1, adapter=example.toy_adapter(model)).eval()
    model.load_state_dict(toy(1).state_dict(), assign=True)  # new Parameter objects, the position table too
    tokens, labels = batch()
    with torch.no_grad():
        assert torch.equal(wrapper(tokens, labels).logits[:, :, 0], model(tokens, labels))
        wrapper.to(torch.float64)
        assert wrapper.adapter.embedding_weight.dtype == torch.float64
        assert torch.equal(wrapper(tokens, labels).logits[:, :, 0], model(tokens, labels).float())


def test_an_adapter_of_another_model_and_dropping_without_a_null_condition_are_refused():
    model, other = toy(0), toy(1)
    with pytest.raises(ValueError, match="adapter was built on another model than the one wrapped"):
        TensorARWrapper(model, window=2, adapter=example.toy_adapter(other))
    no_null = ModuleAdapter(model, embedding="tok", blocks="blocks", norm="norm", head="out", cond_embedding="cls",
                            pos_embedding="pos", num_cond_tokens=1, num_classes=10)
    wrapper = TensorARWrapper(model, window=2, adapter=no_null)
    tokens, labels = batch()
    with pytest.raises(ValueError, match="force_drop_ids needs a null condition to drop to"):
        wrapper(tokens, labels, force_drop_ids=torch.ones(3, dtype=torch.long))


def test_plain_sampling_matches_a_greedy_loop_over_the_models_forward():
    model = toy()
    adapter = example.toy_adapter(model)
    _, labels = batch()
    tokens = sample_plain(adapter, labels, 6, greedy=True)
    seq = torch.zeros(3, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(6):
            nxt = model(seq, labels)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq[:, :-1], nxt, seq[:, -1:]], dim=1)
    assert torch.equal(tokens, seq[:, :-1])


def test_training_step_condition_dropout_and_save_load(tmp_path):
    model = toy()
    wrapper = perturb_heads_(TensorARWrapper(model, window=3, adapter=example.toy_adapter(model))).train()
    tokens, labels = batch()
    out = wrapper(tokens, labels)
    out.loss.backward()
    assert model.blocks[0].qkv.weight.grad.abs().sum() > 0 and wrapper.encoder.in_proj.weight.grad is not None
    with torch.no_grad():
        forced = wrapper(tokens, labels, force_drop_ids=torch.ones(3, dtype=torch.long),
                         generator=torch.Generator().manual_seed(0)).logits
        null = wrapper(tokens, torch.full_like(labels, 10), force_drop_ids=torch.zeros(3, dtype=torch.long),
                       generator=torch.Generator().manual_seed(0)).logits
    assert torch.equal(forced, null)

    wrapper.save_pretrained(tmp_path, save_backbone=False)
    loaded = TensorARWrapper.from_pretrained(tmp_path, model, adapter=example.toy_adapter(model)).eval()
    wrapper.eval()
    with torch.no_grad():
        assert torch.equal(loaded(tokens, labels).logits, wrapper(tokens, labels).logits)
    assert torch.equal(loaded.generate(labels, 6, **GREEDY), wrapper.generate(labels, 6, **GREEDY))


def test_example_script_runs(capsys):
    example.main()
    printed = capsys.readouterr().out
    assert "step 29" in printed and "sampled tokens" in printed


class EncoderLM(nn.Module):
    """A causal model built from torch's own layers: `nn.TransformerEncoder` with a causal mask."""

    def __init__(self, vocab=32, dim=16, length=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(length + 2, dim)
        layer = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.ln, self.proj = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def run(self, h):
        mask = nn.Transformer.generate_square_subsequent_mask(h.shape[1])
        return self.encoder(h, mask=mask, is_causal=True)


def test_any_causal_module_with_embedded_conditions_and_recompute_decoding():
    torch.manual_seed(0)
    model = EncoderLM().eval()
    null = torch.zeros(2, 16)
    adapter = ModuleAdapter(model, embedding="embed", blocks=model.run, norm="ln", head="proj",
                            pos_embedding="positions", num_cond_tokens=2, null_cond=null, kv_cache=False,
                            model_type="t2i")
    assert adapter.max_image_tokens == 8 and adapter.vocab_size == 32 and adapter.hidden_size == 16
    wrapper = perturb_heads_(TensorARWrapper(model, window=2, adapter=adapter))
    cond = torch.randn(3, 2, 16)
    tokens = torch.randint(0, 32, (3, 8))
    with torch.no_grad():
        h = torch.cat([cond, model.embed(tokens[:, :-1])], 1) + model.positions(torch.arange(9))
        ref = model.proj(model.ln(model.run(h)))[:, 1:]
        assert torch.equal(TensorARWrapper(model, window=1, adapter=adapter)(tokens, cond).logits[:, :, 0], ref)
    cached = wrapper.generate(cond, cfg_scale=2.0, **GREEDY)
    assert torch.equal(cached, wrapper.generate(cond, cfg_scale=2.0, use_cache=False, **GREEDY))


def test_kv_cache_masks_positions_not_yet_written():
    cache = KVCache(2, 6)
    k, v = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    keys, values, mask = cache.update(k, v, torch.arange(4))
    assert keys.shape == (2, 3, 6, 5) and torch.equal(keys[:, :, :4], k) and torch.equal(values[:, :, :4], v)
    assert mask.tolist() == [[j <= i for j in range(6)] for i in range(4)]
    keys, _, mask = cache.update(k[:1, :, :1], v[:1, :, :1], torch.tensor([4]))
    assert keys.shape == (1, 3, 6, 5) and mask.tolist() == [[True] * 5 + [False]]
    with pytest.raises(ValueError, match="batch size"):
        cache.update(torch.randn(3, 3, 1, 5), torch.randn(3, 3, 1, 5), torch.tensor([0]))


def test_bad_parts_and_conditions_raise_clear_errors():
    model = toy()
    with pytest.raises(AttributeError, match="no attribute path 'tokens'"):
        ModuleAdapter(model, embedding="tokens", blocks="blocks", head="out", max_image_tokens=16)
    with pytest.raises(ValueError, match="max_image_tokens"):
        ModuleAdapter(model, embedding="tok", blocks="blocks", head="out")
    with pytest.raises(ValueError, match="null_cond"):
        ModuleAdapter(model, embedding="tok", blocks="blocks", head="out", pos_embedding="pos", cond_dropout_prob=0.1)
    plain = ModuleAdapter(model, embedding="tok", blocks="blocks", norm="norm", head="out", cond_embedding="cls",
                          pos_embedding="pos", num_classes=10)
    assert find_adapter(plain) is plain and not plain.has_null_condition
    wrapper = TensorARWrapper(model, window=2, adapter=plain)
    tokens, labels = batch()
    with pytest.raises(ValueError, match="cond"):
        wrapper(tokens, torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError, match="null condition"):
        wrapper.generate(labels, 4, cfg_scale=2.0)
    with pytest.raises(TypeError, match="no TensorAR adapter"):
        TensorARWrapper(model)  # a custom model is not auto-detected: it needs a ModuleAdapter
    with pytest.raises(ValueError, match="needs 33 positions, but pos_embedding has 17"):
        ModuleAdapter(model, embedding="tok", blocks="blocks", head="out", pos_embedding="pos", max_image_tokens=32)
    embedded = ModuleAdapter(model, embedding="tok", blocks="blocks", norm="norm", head="out", pos_embedding="pos")
    with pytest.raises(ValueError, match=r"must be \[B, 1, 32\] .*got \(3, 4, 32\)"):  # extra tokens: not cut off
        TensorARWrapper(model, window=2, adapter=embedded)(tokens, torch.randn(3, 4, 32))


def test_package_imports_and_detects_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import torch, tensorar_plugin\n"
        "from tensorar_plugin.adapters import HFCausalLMAdapter, find_adapter, registered_adapters\n"
        "assert HFCausalLMAdapter in registered_adapters()\n"
        "assert not HFCausalLMAdapter.matches(torch.nn.Linear(2, 2))\n"
        "assert 'transformers' not in {m.split('.')[0] for m in sys.modules if sys.modules[m] is not None}\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
