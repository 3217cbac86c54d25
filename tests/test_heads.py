"""The query transformers: timm-compatible blocks, row restriction, zero-initialised outputs."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import Block

from tensorar_plugin.heads import QueryBlock, TensorDecoder, TensorEncoder, default_num_heads


def test_query_block_is_a_timm_vit_block_that_can_skip_rows():
    torch.manual_seed(0)
    ours, timm_block = QueryBlock(32, 2, 4.0), Block(32, 2, mlp_ratio=4.0, qkv_bias=True)
    ours.load_state_dict(timm_block.state_dict(), strict=True)  # same layout, same keys
    x = torch.randn(5, 6, 32)
    full = timm_block(x)
    torch.testing.assert_close(ours(x), full)
    torch.testing.assert_close(ours(x, slice(0, 1)), full[:, :1])
    torch.testing.assert_close(ours(x, slice(2, None)), full[:, 2:])
    calls = []
    ours.attn.qkv.register_forward_hook(lambda *args: calls.append(1))
    ours(x, slice(0, 1))
    assert calls == [1]  # one qkv matmul (one kernel per sampling step), whichever rows are asked for


@pytest.mark.parametrize("depth", [1, 2])
def test_encoder_and_decoder_start_as_identity_residuals(depth):
    enc = TensorEncoder(dim=24, window=4, hidden_dim=16, depth=depth)
    dec = TensorDecoder(dim=24, window=4, hidden_dim=16, depth=depth)
    slots = torch.randn(3, 7, 4, 24)
    assert torch.count_nonzero(enc(slots)) == 0 and enc(slots).shape == (3, 7, 24)
    hidden = torch.randn(3, 7, 24)
    out = dec(hidden)
    assert out.shape == (3, 7, 4, 24)
    assert torch.equal(out, hidden[..., None, :].expand_as(out))


def test_decoder_slot_zero_is_always_the_input():
    dec = TensorDecoder(dim=24, window=3, hidden_dim=16)
    torch.nn.init.normal_(dec.out_proj.weight)
    hidden = torch.randn(4, 24)
    out = dec(hidden)
    assert torch.equal(out[:, 0], hidden) and not torch.allclose(out[:, 1], hidden)


def test_default_heads():
    assert default_num_heads(384) == 6 and default_num_heads(16) == 1 and default_num_heads(96) == 2
    with pytest.raises(ValueError, match="num_heads"):
        TensorEncoder(dim=24, window=2, hidden_dim=16, num_heads=3)
