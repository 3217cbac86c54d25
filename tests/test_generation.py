"""Refinement-aware generation: parities, history, step/cache accounting, sampling and argument errors."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb_heads_, tiny_llamagen

from tensorar_plugin import TensorARWrapper, sample_plain
from tensorar_plugin.adapters import find_adapter
from tensorar_plugin.sampling import filter_logits, sample_tokens

CLASSES = torch.tensor([0, 3, 3, 9])  # a batch of mixed classes


def wrapped(window: int, seed: int = 0, **overrides) -> TensorARWrapper:
    return perturb_heads_(TensorARWrapper(tiny_llamagen(seed=seed, **overrides), window=window), seed=seed).eval()


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_window_one_equals_plain_sampler_for_same_generator(cfg_scale):
    wrapper = TensorARWrapper(tiny_llamagen(), window=1)
    ours = wrapper.generate(CLASSES, cfg_scale=cfg_scale, top_k=20, generator=torch.Generator().manual_seed(5))
    plain = sample_plain(wrapper.base_model, CLASSES, cfg_scale=cfg_scale, top_k=20,
                         generator=torch.Generator().manual_seed(5))
    assert ours.shape == (4, 16)
    assert torch.equal(ours, plain)


def _reference_plain_greedy(model, cond, cfg_scale):
    """Textbook greedy decoding that re-runs the full sequence each step (no cache, no shared code)."""
    seq = torch.empty(cond.shape[0], 0, dtype=torch.long)
    for _ in range(16):
        both = torch.cat([cond, torch.full_like(cond, model.num_classes)])
        idx = torch.cat([seq, seq]) if seq.shape[1] else None
        if idx is None:
            model.setup_caches(both.shape[0], 20, torch.float32)
            logits, _ = model(None, both, input_pos=torch.arange(1))
            model.clear_caches()
        else:
            logits, _ = model(idx, both)
        c, u = logits[:, -1].chunk(2)
        seq = torch.cat([seq, (u + cfg_scale * (c - u)).argmax(-1, keepdim=True)], dim=1)
    return seq


def test_plain_sampler_matches_textbook_greedy_decoding():
    model = tiny_llamagen()
    with torch.no_grad():
        expected = _reference_plain_greedy(model, CLASSES, 2.0)
    assert torch.equal(sample_plain(model, CLASSES, cfg_scale=2.0, greedy=True), expected)


@pytest.mark.parametrize("window", [1, 2, 4])
@pytest.mark.parametrize("model_type", ["c2i", "t2i"])
def test_cached_generation_equals_recomputing_the_sequence(window, model_type):
    if model_type == "c2i":
        wrapper, cond = wrapped(window), CLASSES
    else:
        wrapper = wrapped(window, model_type="t2i", cls_token_num=5)
        cond = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(0))
    for draft in ("argmax", "sample"):
        cached = wrapper.generate(cond, cfg_scale=2.0, greedy=True, draft=draft,
                                  generator=torch.Generator().manual_seed(2))
        uncached = wrapper.generate(cond, cfg_scale=2.0, greedy=True, draft=draft, use_cache=False,
                                    generator=torch.Generator().manual_seed(2))
        assert torch.equal(cached, uncached)
    sampled = wrapper.generate(cond, cfg_scale=2.0, top_p=0.9, generator=torch.Generator().manual_seed(1))
    resampled = wrapper.generate(cond, cfg_scale=2.0, top_p=0.9, generator=torch.Generator().manual_seed(1),
                                 use_cache=False)
    assert torch.equal(sampled, resampled)


def test_drafts_change_the_result():
    """The refinement path is live: the drafts fed back influence the committed tokens."""
    wrapper = wrapped(4)
    runs = [wrapper.generate(CLASSES, greedy=True, draft="sample", generator=torch.Generator().manual_seed(s))
            for s in range(3)]
    assert not all(torch.equal(runs[0], r) for r in runs[1:])  # only the sampled drafts differ between runs
    argmax = wrapper.generate(CLASSES, greedy=True, draft="argmax", generator=torch.Generator().manual_seed(0))
    assert torch.equal(argmax, wrapper.generate(CLASSES, greedy=True, draft="argmax"))


def test_fresh_wrapper_generates_exactly_what_the_base_generates():
    fresh = TensorARWrapper(tiny_llamagen(), window=4)
    plain = sample_plain(tiny_llamagen(), CLASSES, cfg_scale=2.0, greedy=True)
    for draft in ("argmax", "sample"):
        assert torch.equal(fresh.generate(CLASSES, cfg_scale=2.0, greedy=True, draft=draft), plain)


def test_sampling_logits_are_window_logits_with_one_head_call():
    wrapper = wrapped(4)
    hidden = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))
    calls = []
    handle = wrapper.base_model.output.register_forward_hook(lambda *args: calls.append(1))
    fused = wrapper.sampling_logits(hidden)
    handle.remove()
    assert len(calls) == 1 and fused.shape == (3, 5, 4, 64) and fused.dtype == torch.float32
    torch.testing.assert_close(fused, wrapper.window_logits(hidden), rtol=1e-5, atol=1e-5)


def test_history_shape_order_and_final_entries():
    wrapper = wrapped(4)
    out = wrapper.generate(CLASSES, greedy=True, draft="argmax", return_history=True)
    tokens, history = out
    assert history.shape == (4, 16, 4)
    assert torch.equal(history[..., -1], tokens)
    # position t is predicted min(t + 1, k) times; earlier slots stay -1
    for t in range(16):
        predicted = min(t + 1, 4)
        assert torch.all(history[:, t, 4 - predicted:] >= 0)
        assert torch.all(history[:, t, : 4 - predicted] == -1)
    # the coarsest draft of position t comes from step t - 3, which only saw tokens < t - 3
    recomputed = wrapper.generate(CLASSES, greedy=True, draft="argmax", use_cache=False, return_history=True)
    assert torch.equal(recomputed.history, history)


class CountingAdapter:
    """Counts forward steps and records cache sizes of the adapter it wraps."""

    def __init__(self, adapter):
        self.inner, self.calls, self.cache_rows, self.kv_lens = adapter, 0, [], []
        original = adapter.forward_hidden

        def counted(embeddings, input_pos=None, **kwargs):
            self.calls += 1
            self.cache_rows.append(embeddings.shape[1])
            self.kv_lens.append(kwargs.get("kv_len"))
            return original(embeddings, input_pos, **kwargs)

        adapter.forward_hidden = counted


def test_exactly_T_steps_one_position_each_and_base_cache_size():
    wrapper = wrapped(4)
    counter = CountingAdapter(wrapper.adapter)
    wrapper.generate(CLASSES, cfg_scale=2.0)
    assert counter.calls == 16
    assert counter.cache_rows == [1] + [1] * 15  # prefill of the 1 condition token, then 1 new position per step
    ours = wrapper.base_model.layers[0].attention.kv_cache.k_cache.shape

    base = tiny_llamagen()
    sample_plain(base, CLASSES, cfg_scale=2.0)
    assert base.layers[0].attention.kv_cache.k_cache.shape == ours


def test_decode_steps_read_the_filled_cache_in_buckets_and_match_full_reads():
    """A 12x12 image: steps attend to 64, 128, then all 152 cache slots; tokens equal the uncached path."""
    wrapper = wrapped(4, block_size=144)
    counter = CountingAdapter(wrapper.adapter)
    cached = wrapper.generate(CLASSES[:2], cfg_scale=2.0, top_k=10, generator=torch.Generator().manual_seed(0))
    assert counter.kv_lens == [None] + [64] * 63 + [128] * 64 + [152] * 16  # prefill, then steps 1..143
    uncached = wrapper.generate(CLASSES[:2], cfg_scale=2.0, top_k=10, generator=torch.Generator().manual_seed(0),
                                use_cache=False)
    assert torch.equal(cached, uncached)
    assert wrapper.base_model.layers[0].attention.kv_cache.k_cache.shape[2] == 160  # reads are strict prefixes
    del wrapper.adapter.forward_hidden  # unhook the counter: its bookkeeping would be traced into the graph
    torch._dynamo.reset()
    recorder = GraphRecorder()
    compiled = wrapper.generate(CLASSES[:2], cfg_scale=2.0, top_k=10, generator=torch.Generator().manual_seed(0),
                                compile={"backend": recorder, "fullgraph": True})
    assert torch.equal(compiled, cached)
    assert recorder.dynamic == [True]  # one graph, traced with a symbolic key length, for all lengths


def test_static_caches_are_reused_between_calls():
    wrapper = wrapped(2)
    wrapper.generate(CLASSES)
    first = wrapper.base_model.layers[0].attention.kv_cache.k_cache
    wrapper.generate(torch.tensor([1, 2, 3, 4]))
    assert wrapper.base_model.layers[0].attention.kv_cache.k_cache is first


def test_drivers_sharing_one_model_never_reuse_each_others_cache_or_mask():
    """A wrapper and `sample_plain` each build their own adapter over one model; the model's cache and
    condition mask are shared, so reuse must be decided from the model's state, not an adapter's record."""
    model = tiny_llamagen(model_type="t2i", cls_token_num=5)
    wrapper = TensorARWrapper(model, window=2).eval()
    caption = torch.randn(4, 5, 24, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 0, 1, 1, 1]] * 4)
    kwargs = dict(cfg_scale=2.0, greedy=True)
    reference = sample_plain(model, caption, use_cache=False, **kwargs)
    assert torch.equal(sample_plain(model, caption, **kwargs), reference)
    wrapper.generate(caption, cond_mask=mask, **kwargs)  # masks the model's causal mask
    assert torch.equal(sample_plain(model, caption, **kwargs), reference)  # the plain sampler's call unmasks it
    wrapper_reference = wrapper.generate(caption, use_cache=False, **kwargs)
    sample_plain(model, caption[:1], **kwargs)  # reallocates the model's cache for a smaller batch
    assert torch.equal(wrapper.generate(caption, **kwargs), wrapper_reference)


def test_caches_made_under_inference_mode_are_not_reused_outside_it():
    """Inference tensors cannot be updated outside inference mode: such caches are reallocated."""
    wrapper = wrapped(2)
    with torch.inference_mode():
        inside = wrapper.generate(CLASSES, cfg_scale=2.0, greedy=True, draft="argmax")
    outside = wrapper.generate(CLASSES, cfg_scale=2.0, greedy=True, draft="argmax")
    assert torch.equal(inside, outside)
    assert not wrapper.base_model.layers[0].attention.kv_cache.k_cache.is_inference()
    cache = wrapper.base_model.layers[0].attention.kv_cache.k_cache
    with torch.inference_mode():  # normal caches are fine to reuse inside inference mode
        wrapper.generate(CLASSES, cfg_scale=2.0, greedy=True, draft="argmax")
    assert wrapper.base_model.layers[0].attention.kv_cache.k_cache is cache


def test_generator_reproducibility_and_num_tokens():
    wrapper = wrapped(3)
    a = wrapper.generate(CLASSES, num_tokens=10, generator=torch.Generator().manual_seed(3))
    b = wrapper.generate(CLASSES, num_tokens=10, generator=torch.Generator().manual_seed(3))
    c = wrapper.generate(CLASSES, num_tokens=10, generator=torch.Generator().manual_seed(4))
    assert a.shape == (4, 10) and torch.equal(a, b) and not torch.equal(a, c)


def test_sampled_drafts_stay_sampled_when_the_committed_token_is_greedy():
    wrapper = wrapped(4)

    def history(draft: str, seed: int) -> torch.Tensor:
        return wrapper.generate(CLASSES, greedy=True, draft=draft, return_history=True,
                                generator=torch.Generator().manual_seed(seed)).history

    assert torch.equal(history("argmax", 0), history("argmax", 1))  # nothing random left
    assert not torch.equal(history("sample", 0)[..., :-1], history("sample", 1)[..., :-1])  # drafts drawn


def test_cfg_scale_zero_samples_from_the_null_condition_alone():
    """Unlike LlamaGen (which skips guidance for cfg_scale <= 1), any scale != 1 mixes: 0 is unconditional."""
    wrapper = wrapped(4)
    null = torch.full_like(CLASSES, wrapper.base_model.num_classes)
    unconditional = wrapper.generate(CLASSES, cfg_scale=0.0, greedy=True, draft="argmax")
    assert torch.equal(unconditional, wrapper.generate(null, cfg_scale=1.0, greedy=True, draft="argmax"))
    assert not torch.equal(unconditional, wrapper.generate(CLASSES, cfg_scale=1.0, greedy=True, draft="argmax"))


def test_top_k_one_is_greedy():
    wrapper = wrapped(3)
    assert torch.equal(wrapper.generate(CLASSES, top_k=1, draft="argmax", generator=torch.Generator()),
                       wrapper.generate(CLASSES, greedy=True, draft="argmax"))


def test_cfg_interval_switches_guidance_off_after_the_interval():
    wrapper = wrapped(2)
    always = wrapper.generate(CLASSES, cfg_scale=4.0, greedy=True, draft="argmax")
    never_off = wrapper.generate(CLASSES, cfg_scale=4.0, greedy=True, draft="argmax", cfg_interval=100)
    unguided = wrapper.generate(CLASSES, cfg_scale=1.0, greedy=True, draft="argmax")
    assert torch.equal(always, never_off)
    assert not torch.equal(always[:, :4], unguided[:, :4])  # guidance changes these tokens here
    for interval in (0, 2):  # N guides N + 2 tokens: the prefill and N + 1 decode steps (LlamaGen's counting)
        early_off = wrapper.generate(CLASSES, cfg_scale=4.0, greedy=True, draft="argmax", cfg_interval=interval)
        assert torch.equal(always[:, :interval + 2], early_off[:, :interval + 2])
        assert not torch.equal(always, early_off)
    with pytest.raises(ValueError, match="cfg_interval must be an integer >= -1"):
        wrapper.generate(CLASSES, cfg_interval=-7)


def test_kv_caches_stay_for_the_next_sampling_call_but_not_into_training():
    wrapper = wrapped(4).eval()

    def cached() -> bool:
        return any(layer.attention.kv_cache is not None for layer in wrapper.base_model.layers)

    first = wrapper.generate(CLASSES, greedy=True, draft="argmax")
    assert cached()  # kept: the next call reuses them
    assert torch.equal(wrapper.generate(CLASSES, greedy=True, draft="argmax"), first)
    wrapper.train()  # a training forward has no use for them: they are freed
    assert not cached()
    wrapper.generate(CLASSES, greedy=True, draft="argmax")  # sampling from a model in training (a notebook preview)
    assert cached() and wrapper.training  # kept for the next preview: generate's own mode restore frees nothing
    kept = wrapper.base_model.layers[0].attention.kv_cache
    wrapper.generate(CLASSES, greedy=True, draft="argmax")
    assert wrapper.base_model.layers[0].attention.kv_cache is kept  # reused, not reallocated
    wrapper.train()  # training starts again: freed
    assert not cached()
    assert torch.equal(wrapper.eval().generate(CLASSES, greedy=True, draft="argmax"), first)  # set up again when needed
    wrapper.clear_caches()
    assert not cached()


def test_generate_restores_training_mode_and_runs_in_bf16():
    wrapper = wrapped(4).train()
    wrapper.base_model.eval()  # a frozen backbone kept in eval mode while the new parts train
    wrapper.generate(CLASSES, num_tokens=4)
    assert wrapper.training and wrapper.encoder.training and not wrapper.base_model.training
    from tensorar_plugin.models.llamagen import KVCache  # made during generation, holds no behaviour

    assert not any(module.training for module in wrapper.base_model.modules() if not isinstance(module, KVCache))
    model = tiny_llamagen().train()
    model.layers[0].eval()
    calls = []
    original_train = type(model.layers[1]).train
    model.layers[1].train = lambda mode=True: (calls.append(mode), original_train(model.layers[1], mode))[1]
    sample_plain(model, CLASSES, num_tokens=4)
    assert model.training and not model.layers[0].training and model.layers[1].training
    assert calls[-1] is True  # modes come back through train(), so overrides of it run
    bf16 = wrapped(4).to(torch.bfloat16)
    tokens = bf16.generate(CLASSES, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (4, 16) and tokens.dtype == torch.long
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 64


def test_progress_bar(capsys):
    wrapped(2).generate(CLASSES, progress=True)
    assert "sampling" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"), ({"cfg_scale": -0.5}, "cfg_scale"), ({"top_k": -2}, "top_k"),
        ({"temperature": float("nan")}, "temperature"), ({"temperature": 1e-40}, "temperature"),
        ({"temperature": True}, "temperature"), ({"cfg_scale": float("inf")}, "cfg_scale"),
        ({"cfg_scale": 1e39}, "cfg_scale"), ({"top_p": float("nan")}, "top_p"), ({"top_k": 2.0}, "top_k"),
        ({"greedy": "no"}, "greedy"),
        ({"num_tokens": 17}, "num_tokens"), ({"num_tokens": 0}, "num_tokens"), ({"draft": "beam"}, "draft"),
        ({"use_cache": None}, "use_cache must be True or False"), ({"return_history": "yes"}, "return_history"),
        ({"compile": "no"}, "compile must be True, False or a dict"), ({"progress": 1}, "progress"),
    ],
)
def test_invalid_sampling_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        wrapped(2).generate(CLASSES, **kwargs)


def test_numpy_scalar_sampling_values_act_as_python_numbers():
    import numpy as np

    wrapper = wrapped(2)
    assert torch.equal(wrapper.generate(CLASSES, greedy=np.bool_(True), draft="argmax"),
                       wrapper.generate(CLASSES, greedy=True, draft="argmax"))
    cold = wrapper.generate(CLASSES, temperature=1e-5, draft="argmax", generator=torch.Generator().manual_seed(0))
    assert torch.equal(cold, wrapper.generate(CLASSES, greedy=True, draft="argmax"))  # a tiny temperature is argmax
    kwargs = dict(cfg_scale=2.0, temperature=0.8, top_p=0.9, top_k=5)
    as_numpy = {key: (np.int64(v) if isinstance(v, int) else np.float32(v)) for key, v in kwargs.items()}
    assert torch.equal(wrapper.generate(CLASSES, generator=torch.Generator().manual_seed(0), **as_numpy),
                       wrapper.generate(CLASSES, generator=torch.Generator().manual_seed(0), **kwargs))


def test_invalid_conditions():
    wrapper = wrapped(2)
    with pytest.raises(ValueError, match="cond must hold a batch of at least one condition"):
        wrapper.generate(torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="cond must hold a batch of at least one condition"):
        wrapper(torch.zeros(0, 16, dtype=torch.long), torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="tokens holds an empty batch"):
        wrapper._check_tokens(torch.zeros(0, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^cond holds class ids outside \[0, 10\] \(min 0, max 11\)$"):
        wrapper.generate(torch.tensor([0, 11]))
    with pytest.raises(ValueError, match=r"^cond must be a 1-D integer tensor of class ids, got shape \(2,\) "
                                         r"and dtype torch.float32$"):
        wrapper.generate(torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="cfg_scale"):
        wrapped(2, class_dropout_prob=0.0).generate(CLASSES, cfg_scale=2.0)
    # the null class is a valid condition: unconditional samples
    assert wrapper.generate(torch.tensor([10, 10])).shape == (2, 16)


def test_sample_tokens_draws_from_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    draws = sample_tokens(logits.expand(60000, -1), generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(freq, logits.softmax(-1), atol=0.01, rtol=0)
    hot = sample_tokens(logits.expand(20000, -1), temperature=0.5, generator=torch.Generator().manual_seed(1))
    freq_hot = torch.bincount(hot, minlength=4).float() / hot.numel()
    torch.testing.assert_close(freq_hot, (logits / 0.5).softmax(-1), atol=0.01, rtol=0)


def test_filter_logits_matches_top_k_top_p_definitions():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0, -1.0]])
    topk = filter_logits(logits, top_k=2)
    assert torch.isinf(topk).tolist() == [[False, True, False, True, True]]
    probs = logits.softmax(-1)[0]  # sorted: 3.0 (0.64), 2.0 (0.24), 1.0 (0.09), ...
    nucleus = filter_logits(logits, top_p=0.7)  # 0.64 < 0.7, so the token that crosses it is kept
    assert torch.isinf(nucleus).tolist() == [[False, True, False, True, True]]
    assert probs[0] < 0.7 < probs[0] + probs[2]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True, True]]


def test_adapter_is_shared_with_plain_sampler():
    model = tiny_llamagen()
    adapter = find_adapter(model)
    assert torch.equal(sample_plain(adapter, CLASSES, greedy=True), sample_plain(model, CLASSES, greedy=True))


class GraphRecorder:
    """A torch.compile backend that runs graphs eagerly; records each one's tensor-output dtypes, the shapes
    of its tensor inputs traced with symbolic sizes, and whether it was traced with any symbolic size."""

    def __init__(self):
        self.outputs, self.symbolic_shapes, self.dynamic = [], [], []

    def __call__(self, gm, example_inputs):
        inputs = [node.meta.get("example_value") for node in gm.graph.nodes if node.op == "placeholder"]
        self.symbolic_shapes.append([tuple("s" if isinstance(d, torch.SymInt) else d for d in v.shape)
                                     for v in inputs if isinstance(v, torch.Tensor)
                                     and any(isinstance(d, torch.SymInt) for d in v.shape)])
        self.dynamic.append(bool(self.symbolic_shapes[-1]) or any(isinstance(v, torch.SymInt) for v in inputs))
        out_node = next(node for node in gm.graph.nodes if node.op == "output")
        values = out_node.args[0] if isinstance(out_node.args[0], (tuple, list)) else (out_node.args[0],)
        examples = [v.meta.get("example_value") for v in values if hasattr(v, "meta")]
        self.outputs.append([e.dtype for e in examples if isinstance(e, torch.Tensor)])  # tensors, not sizes
        return gm.forward


def test_compiled_decode_step_is_one_graph_from_window_to_sampled_window():
    """Guidance batch, backbone, heads, guidance mix and sampling compile as ONE graph that returns
    token ids: the Python loop is left with drawing noise and storing the committed token."""
    torch._dynamo.reset()
    wrapper = wrapped(4)
    recorder = GraphRecorder()
    options = {"backend": recorder, "fullgraph": True}
    kwargs = dict(cfg_scale=2.0, top_k=20, generator=torch.Generator().manual_seed(3))
    wrapper.generate(CLASSES, compile=options, **kwargs)
    assert recorder.outputs == [[torch.int64]]  # one graph, whose only output is the next window's ids
    wrapper.generate(CLASSES, compile=options, **kwargs)  # the second call reuses the compiled step
    assert len(recorder.outputs) == 1 and len(wrapper._compiled_decode_steps) == 1
    wrapper.generate(CLASSES[:2], compile=options, **kwargs)  # another batch size: its own static-shape step
    assert len(recorder.outputs) == 2 and len(wrapper._compiled_decode_steps) == 2
    assert all(shape[0] != "s" for shapes in recorder.symbolic_shapes for shape in shapes)  # batch stays static


@pytest.mark.parametrize("sampling", [
    dict(greedy=True, draft="argmax"),
    dict(top_k=20, top_p=0.9, temperature=0.8),
    dict(greedy=True, draft="sample", cfg_interval=5),
    dict(draft="argmax", cfg_interval=3),
])
def test_compiled_decode_step_samples_the_same_tokens(sampling):
    """Same generator, same tokens: the race noise is drawn outside the compiled step."""
    torch._dynamo.reset()
    options = {"backend": "aot_eager", "fullgraph": True}  # traces the whole step; no C++ toolchain needed
    wrapper = wrapped(4)
    for cfg_scale in (1.0, 2.0):
        kwargs = dict(cfg_scale=cfg_scale, **sampling)
        eager = wrapper.generate(CLASSES, generator=torch.Generator().manual_seed(7), **kwargs)
        compiled = wrapper.generate(CLASSES, generator=torch.Generator().manual_seed(7), compile=options, **kwargs)
        assert torch.equal(eager, compiled)
    model = tiny_llamagen()
    plain = {k: v for k, v in sampling.items() if k != "draft"}
    assert torch.equal(sample_plain(model, CLASSES, cfg_scale=2.0, compile=options, **plain,
                                    generator=torch.Generator().manual_seed(1)),
                       sample_plain(model, CLASSES, cfg_scale=2.0, **plain, generator=torch.Generator().manual_seed(1)))


def test_one_compiled_step_serves_every_cfg_scale_temperature_and_top_p():
    """Sampling values are inputs of the compiled step, not constants: a sweep compiles once."""
    torch._dynamo.reset()
    wrapper = wrapped(4)
    recorder = GraphRecorder()
    for cfg_scale, temperature, top_p in [(1.5, 1.0, 0.9), (2.0, 0.7, 0.8), (4.0, 1.3, 0.95)]:
        kwargs = dict(cfg_scale=cfg_scale, temperature=temperature, top_p=top_p)
        compiled = wrapper.generate(CLASSES, compile={"backend": recorder, "fullgraph": True},
                                    generator=torch.Generator().manual_seed(2), **kwargs)
        assert torch.equal(compiled, wrapper.generate(CLASSES, generator=torch.Generator().manual_seed(2), **kwargs))
    assert len(recorder.outputs) == 1


def test_many_compiled_models_in_one_process_all_stay_compiled():
    """Dynamo caps recompiles per code object (then fails under fullgraph); each model's step has its own."""
    torch._dynamo.reset()
    recorder = GraphRecorder()
    limit = torch._dynamo.config.recompile_limit
    for seed in range(limit + 2):
        wrapped(2, seed=seed).generate(CLASSES[:1], cfg_scale=2.0, greedy=True,
                                       compile={"backend": recorder, "fullgraph": True})
    assert len(recorder.outputs) == limit + 2


def test_repeated_plain_sampling_compiles_once_and_reuses_its_cache():
    torch._dynamo.reset()
    model, recorder = tiny_llamagen(), GraphRecorder()
    for seed in range(3):
        sample_plain(model, CLASSES, cfg_scale=2.0, generator=torch.Generator().manual_seed(seed),
                     compile={"backend": recorder, "fullgraph": True})
    assert len(recorder.outputs) == 1
    cache = model.layers[0].attention.kv_cache.k_cache
    sample_plain(model, CLASSES, cfg_scale=2.0)
    assert model.layers[0].attention.kv_cache.k_cache is cache  # static caches kept between calls


def test_compiled_steps_are_keyed_by_their_functions_and_accept_nested_options():
    """`generate_windows(compile=...)` with other heads must not reuse a step compiled around the first
    ones; torch.compile's own nested `options` dict is a valid part of the key."""
    from tensorar_plugin.generation import generate_windows

    torch._dynamo.reset()
    adapter = find_adapter(tiny_llamagen())
    forced = torch.nn.functional.one_hot(torch.tensor(7), 64) * 100.0

    def forced_logits(hidden):
        return (adapter.head(hidden) + forced)[:, None]

    options = {"backend": "eager", "fullgraph": True, "options": {"nested": {"value": 1}}}
    kwargs = dict(window=1, embed_window=adapter.plain_embed_window, greedy=True, compile=options)
    first = generate_windows(adapter, CLASSES, window_logits=adapter.plain_window_logits, **kwargs).tokens
    assert torch.equal(first, sample_plain(adapter, CLASSES, greedy=True))
    second = generate_windows(adapter, CLASSES, window_logits=forced_logits, **kwargs).tokens
    assert torch.equal(second, torch.full_like(second, 7))
    assert len(adapter._compiled_decode_steps) == 2


def test_copies_of_a_compiled_wrapper_compile_their_own_step():
    """A deep copy (an EMA model) must not reuse steps traced from the original; pickling works."""
    import copy
    import io

    torch._dynamo.reset()
    options = {"backend": "aot_eager", "fullgraph": True}
    kwargs = dict(cfg_scale=2.0, greedy=True, draft="argmax")
    original = wrapped(4)
    original.generate(CLASSES, compile=options, **kwargs)
    twin = perturb_heads_(copy.deepcopy(original), seed=5)
    assert len(twin._compiled_decode_steps) == 0
    assert torch.equal(twin.generate(CLASSES, compile=options, **kwargs), twin.generate(CLASSES, **kwargs))
    assert not torch.equal(twin.generate(CLASSES, **kwargs), original.generate(CLASSES, **kwargs))
    sample_plain(original.base_model, CLASSES, compile=options)
    torch.save(original, io.BytesIO())  # whole-module pickling still works after compiling


def test_compiled_step_with_padded_text_conditions_and_bounded_reads():
    """t2i, left-padded captions (cond_mask), 144 tokens (three key lengths): compiled == cached == uncached."""
    torch._dynamo.reset()
    wrapper = wrapped(4, model_type="t2i", cls_token_num=5, block_size=144)
    caption = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(0))
    kwargs = dict(cfg_scale=2.0, top_k=10, cond_mask=torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))
    runs = [wrapper.generate(caption, generator=torch.Generator().manual_seed(0), **extra, **kwargs)
            for extra in ({}, {"compile": {"backend": "aot_eager"}}, {"use_cache": False})]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_inductor_compiled_generation_matches_eager():
    """The real compiler (inductor, as on GPUs without CUDA graphs) lowers the whole step."""
    import shutil

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("inductor on CPU needs a C compiler")
    torch._dynamo.reset()
    wrapper = wrapped(4)
    kwargs = dict(cfg_scale=2.0, greedy=True, draft="argmax")
    assert torch.equal(wrapper.generate(CLASSES, compile=True, **kwargs), wrapper.generate(CLASSES, **kwargs))


def test_condition_mask_hides_padded_text_tokens_in_generation_and_training():
    wrapper = wrapped(4, model_type="t2i", cls_token_num=5)
    gen = torch.Generator().manual_seed(0)
    caption = torch.randn(2, 5, 24, generator=gen)
    other = caption.clone()
    other[:, :2] = torch.randn(2, 2, 24, generator=gen)  # differs only where the mask hides it
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1]])  # left padding, as LlamaGen's t2i sampler
    kwargs = dict(cfg_scale=2.0, greedy=True, draft="argmax")
    masked = wrapper.generate(caption, cond_mask=mask, **kwargs)
    assert torch.equal(masked, wrapper.generate(other, cond_mask=mask, **kwargs))
    assert torch.equal(masked, wrapper.generate(caption, cond_mask=mask, use_cache=False, **kwargs))
    unmasked = wrapper.generate(caption, **kwargs)
    assert not torch.equal(unmasked, wrapper.generate(other, **kwargs))
    assert torch.equal(unmasked, wrapper.generate(caption, use_cache=False, **kwargs))  # the mask was reset

    tokens = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        a = wrapper(tokens, caption, cond_mask=mask).logits
        b = wrapper(tokens, other, cond_mask=mask).logits
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="cond_mask"):
        wrapper.generate(caption, cond_mask=mask[:, :3])
    with pytest.raises(ValueError, match="cond_mask must hold only 1"):
        wrapper.generate(caption, cond_mask=mask * 0.3)
    assert torch.equal(wrapper.generate(caption, cond_mask=mask.float(), **kwargs), masked)
    # longer captions are cut to cls_token_num (as LlamaGen does), and their masks with them
    longer, longer_mask = torch.cat([caption, torch.randn(2, 3, 24)], 1), torch.cat([mask, torch.ones(2, 3)], 1)
    assert torch.equal(wrapper.generate(longer, cond_mask=longer_mask, **kwargs), masked)
