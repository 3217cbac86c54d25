"""VQ image tokenizer compatible with LlamaGen's released tokenizer checkpoints.

LlamaGen (Sun et al., 2024) turns images into grids of discrete codes with a VQGAN-style
convolutional autoencoder and a vector quantizer whose codebook is l2-normalised. This module
is an independent implementation of that tokenizer: the module tree, parameter names, buffer
names and tensor shapes match LlamaGen's ``VQModel`` exactly, so the released checkpoints
(``vq_ds16_c2i.pt``, ``vq_ds8_c2i.pt``, ``vq_ds16_t2i.pt``) load unchanged with ``strict=True``
and produce the same codes and reconstructions.

Typical use::

    model = build_vq("VQ-16").eval()
    # LlamaGen's .pt files keep the weights under "model" and may also pickle the training args;
    # allow-list argparse.Namespace for torch.load(weights_only=True) instead of unpickling freely.
    torch.serialization.add_safe_globals([argparse.Namespace])
    ckpt = torch.load("vq_ds16_c2i.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["model"])  # strict: every key and shape matches
    codes = model.encode_to_codes(images_to_tensor(pil_images))  # LongTensor [B, h*w]
    pil_out = tensor_to_pil(model.decode_code(codes))

Images are float tensors in ``[-1, 1]`` of shape ``[B, 3, H, W]``; ``images_to_tensor``,
``tensor_to_uint8`` and ``tensor_to_pil`` convert from and to PIL images / uint8 arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import is_integer

__all__ = [
    "VQConfig",
    "VQModel",
    "VectorQuantizer",
    "QuantizerLoss",
    "QuantizerInfo",
    "VQ_8",
    "VQ_16",
    "VQ_MODELS",
    "build_vq",
    "images_to_tensor",
    "tensor_to_uint8",
    "tensor_to_pil",
]

# Length of the ring buffer of recently used code ids; the size is part of the checkpoint format.
USAGE_BUFFER_SIZE = 65536
# Every GroupNorm in the tokenizer uses 32 groups, as in LlamaGen.
NORM_GROUPS = 32
# A grid shape: (B, C, h, w), or (B, h, w, C) for channel-last lookups.
Shape = Sequence[int]


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def _check_ch_mult(name: str, value: Any) -> list[int]:
    """Return ``value`` as a list of positive ints, or raise ValueError naming the field."""
    try:
        mult = list(value)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of positive ints, got {value!r}") from None
    if not mult:
        raise ValueError(f"{name} must not be empty")
    if any(not is_integer(m) or m < 1 for m in mult):
        raise ValueError(f"{name} must contain only positive ints, got {value!r}")
    return [int(m) for m in mult]


@dataclass
class VQConfig:
    """Tokenizer hyper-parameters; the first ten fields mirror LlamaGen's tokenizer ``ModelArgs``."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    decoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    z_channels: int = 256
    dropout_p: float = 0.0
    # Extensions (not in LlamaGen, which hard-codes them): keep the defaults for released weights.
    base_channels: int = 128
    """Width of the first encoder/decoder stage (LlamaGen's hard-coded ``ch``); small values suit tests."""
    num_res_blocks: int = 2
    """Residual blocks per encoder stage (the decoder uses one more), as hard-coded by LlamaGen."""

    def __post_init__(self) -> None:
        """Validate the fields so that a bad config fails here rather than deep inside a layer."""
        for name in ("codebook_size", "codebook_embed_dim", "z_channels", "base_channels", "num_res_blocks"):
            value = getattr(self, name)
            if not is_integer(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
            setattr(self, name, int(value))  # NumPy integers become ints: the config is saved as JSON
        for name in ("commit_loss_beta", "entropy_loss_ratio"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.dropout_p, (int, float)) or not 0.0 <= self.dropout_p < 1.0:
            raise ValueError(f"dropout_p must be in [0, 1), got {self.dropout_p!r}")
        self.encoder_ch_mult = _check_ch_mult("encoder_ch_mult", self.encoder_ch_mult)
        self.decoder_ch_mult = _check_ch_mult("decoder_ch_mult", self.decoder_ch_mult)
        for m in (*self.encoder_ch_mult, *self.decoder_ch_mult):
            if (self.base_channels * m) % NORM_GROUPS:
                raise ValueError(
                    f"base_channels * ch_mult must be divisible by {NORM_GROUPS} (GroupNorm groups), "
                    f"got base_channels={self.base_channels} and mult {m}"
                )


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with LlamaGen's settings (32 groups, eps 1e-6, affine)."""
    return nn.GroupNorm(NORM_GROUPS, channels, eps=1e-6, affine=True)


def conv3x3(in_ch: int, out_ch: int) -> nn.Conv2d:
    """Size-preserving 3x3 convolution."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=1, padding=1)


def conv1x1(in_ch: int, out_ch: int) -> nn.Conv2d:
    """Pointwise convolution (channel mixing only)."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=1)


class ResBlock(nn.Module):
    """Pre-norm residual block: (GroupNorm, SiLU, conv) x 2 plus a 1x1 shortcut when widths differ."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = conv3x3(in_ch, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(out_ch, out_ch)
        # Named as in the checkpoint; only present when the block changes the channel count.
        self.nin_shortcut = conv1x1(in_ch, out_ch) if in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        """Add the residual branch to the (projected) input."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all pixels of a feature map, with 1x1-conv projections."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.q = conv1x1(channels, channels)
        self.k = conv1x1(channels, channels)
        self.v = conv1x1(channels, channels)
        self.proj_out = conv1x1(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        """Attend every pixel to every pixel and add the projected result to the input."""
        b, c, h, w = x.shape
        y = self.norm(x)
        # [B, C, H, W] -> [B, 1, H*W, C]: one head whose width is the full channel count.
        q, k, v = (proj(y).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        y = y.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv after padding one pixel on the right/bottom."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        """Asymmetric zero padding keeps the output at exactly H/2 x W/2 for even inputs."""
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the resolution with nearest-neighbour interpolation followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        """Nearest upsampling avoids checkerboard artefacts of transposed convolutions."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Module):
    """One resolution level: residual blocks, optional attention after each, optional resampler."""

    def __init__(self, blocks: list[ResBlock], attn: list[SpatialSelfAttention]) -> None:
        super().__init__()
        self.res = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)  # empty, or one attention block per residual block

    def run_blocks(self, h: Tensor) -> Tensor:
        """Apply the residual blocks, each followed by its attention block when there is one."""
        for i, block in enumerate(self.res):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


def middle_blocks(channels: int, dropout: float) -> nn.ModuleList:
    """Bottleneck of encoder and decoder: residual block, attention, residual block."""
    return nn.ModuleList(
        [
            ResBlock(channels, channels, dropout),
            SpatialSelfAttention(channels),
            ResBlock(channels, channels, dropout),
        ]
    )


class Encoder(nn.Module):
    """Convolutional encoder: image [B, 3, H, W] -> latent [B, z_channels, H/f, W/f]."""

    def __init__(self, config: VQConfig, in_channels: int = 3) -> None:
        super().__init__()
        ch, mults, dropout = config.base_channels, config.encoder_ch_mult, config.dropout_p
        last = len(mults) - 1
        self.conv_in = conv3x3(in_channels, ch)
        self.conv_blocks = nn.ModuleList()
        width = ch
        for level, mult in enumerate(mults):
            out = ch * mult
            blocks = [ResBlock(width if i == 0 else out, out, dropout) for i in range(config.num_res_blocks)]
            # Only the lowest-resolution stage attends (attention is quadratic in pixels).
            attn = [SpatialSelfAttention(out) for _ in blocks] if level == last else []
            stage = Stage(blocks, attn)
            if level != last:
                stage.downsample = Downsample(out)
            self.conv_blocks.append(stage)
            width = out
        self.mid = middle_blocks(width, dropout)
        self.norm_out = group_norm(width)
        self.conv_out = conv3x3(width, config.z_channels)

    def forward(self, x: Tensor) -> Tensor:
        """Run the stages (downsampling between them), the bottleneck and the output head."""
        h = self.conv_in(x)
        for stage in self.conv_blocks:
            h = stage.run_blocks(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Convolutional decoder: latent [B, z_channels, h, w] -> image [B, 3, h*f, w*f]."""

    def __init__(self, config: VQConfig, out_channels: int = 3) -> None:
        super().__init__()
        ch, mults, dropout = config.base_channels, config.decoder_ch_mult, config.dropout_p
        last = len(mults) - 1
        width = ch * mults[last]
        self.conv_in = conv3x3(config.z_channels, width)
        self.mid = middle_blocks(width, dropout)
        # Stages are stored from the lowest resolution up, i.e. in the order they run.
        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(len(mults))):
            out = ch * mults[level]
            n_blocks = config.num_res_blocks + 1  # one more than the encoder, as in LlamaGen
            blocks = [ResBlock(width if i == 0 else out, out, dropout) for i in range(n_blocks)]
            attn = [SpatialSelfAttention(out) for _ in blocks] if level == last else []
            stage = Stage(blocks, attn)
            if level != 0:
                stage.upsample = Upsample(out)
            self.conv_blocks.append(stage)
            width = out
        self.norm_out = group_norm(width)
        self.conv_out = conv3x3(width, out_channels)

    @property
    def last_layer(self) -> Tensor:
        """Weight of the final conv (used by adaptive GAN-loss weighting during training)."""
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        """Run the bottleneck, the stages (upsampling between them) and the output head."""
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for stage in self.conv_blocks:
            h = stage.run_blocks(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# --------------------------------------------------------------------------------------------
# Vector quantizer
# --------------------------------------------------------------------------------------------


class QuantizerLoss(NamedTuple):
    """Training losses of the quantizer (all None, usage 0, in eval mode), as in LlamaGen."""

    vq_loss: Tensor | None
    commit_loss: Tensor | None
    entropy_loss: Tensor | None
    codebook_usage: float


class QuantizerInfo(NamedTuple):
    """Side outputs of the quantizer; only ``indices`` (flat, [B*h*w]) is populated, as in LlamaGen."""

    perplexity: None
    min_encodings: None
    indices: Tensor


def entropy_loss(affinity: Tensor, temperature: float = 0.01) -> Tensor:
    """Mean per-sample entropy minus entropy of the mean: low when codes are confident and diverse."""
    logits = affinity.reshape(-1, affinity.shape[-1]) / temperature
    probs = F.softmax(logits, dim=-1)
    log_probs = F.log_softmax(logits, dim=-1)
    avg_probs = probs.mean(dim=0)
    avg_entropy = -torch.sum(avg_probs * torch.log(avg_probs + 1e-5))
    sample_entropy = -torch.mean(torch.sum(probs * log_probs, dim=-1))
    return sample_entropy - avg_entropy


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with a straight-through gradient estimator."""

    def __init__(
        self,
        codebook_size: int,
        embed_dim: int,
        beta: float = 0.25,
        entropy_loss_ratio: float = 0.0,
        l2_norm: bool = True,
        show_usage: bool = True,
    ) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.embed_dim = embed_dim
        self.beta = beta
        self.entropy_loss_ratio = entropy_loss_ratio
        self.l2_norm = l2_norm
        self.show_usage = show_usage
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
            if l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        if show_usage:
            # Ring buffer of the most recent code ids (stored as floats), part of the checkpoint.
            self.register_buffer("codebook_used", torch.zeros(USAGE_BUFFER_SIZE))

    def codebook(self) -> Tensor:
        """Codebook vectors [N, D] as used for lookup (l2-normalised when configured)."""
        weight = self.embedding.weight
        return F.normalize(weight, p=2, dim=-1) if self.l2_norm else weight

    def _distances(self, z_flat: Tensor, codebook: Tensor) -> Tensor:
        """Squared distances [M, N] via |z|^2 + |e|^2 - 2 z.e (the reference's formula and rounding)."""
        return (
            z_flat.pow(2).sum(dim=1, keepdim=True)
            + codebook.pow(2).sum(dim=1)
            - 2 * torch.einsum("md,dn->mn", z_flat, codebook.t())
        )

    def _normalize_input(self, z: Tensor) -> Tensor:
        """Move channels last ([B, D, h, w] -> [B, h, w, D]) and l2-normalise when configured."""
        z = z.permute(0, 2, 3, 1).contiguous()
        return F.normalize(z, p=2, dim=-1) if self.l2_norm else z

    @torch.no_grad()
    def nearest_codes(self, z: Tensor) -> Tensor:
        """Ids [B, h*w] of the codebook vectors nearest to latents ``z`` [B, D, h, w]; no side effects."""
        z = self._normalize_input(z)
        d = self._distances(z.reshape(-1, self.embed_dim), self.codebook())
        return d.argmin(dim=1).view(z.shape[0], -1)

    @torch.no_grad()
    def _record_usage(self, indices: Tensor) -> float:
        """Push ``indices`` into the usage ring buffer and return the fraction of codes seen in it."""
        buf = self.codebook_used
        indices = indices[-buf.numel() :].to(buf.dtype)
        n = indices.numel()
        buf.copy_(torch.cat([buf[n:], indices]))
        return len(torch.unique(buf)) / self.codebook_size

    def forward(self, z: Tensor) -> tuple[Tensor, QuantizerLoss, QuantizerInfo]:
        """Quantise latents [B, D, h, w]; return (quantised latents, losses, info with flat indices)."""
        z = self._normalize_input(z)
        codebook = self.codebook()
        d = self._distances(z.reshape(-1, self.embed_dim), codebook)
        indices = d.argmin(dim=1)
        z_q = codebook[indices].view(z.shape)

        vq_loss = commit_loss = ent_loss = None
        usage = 0
        if self.training:
            if self.show_usage:
                usage = self._record_usage(indices)
            vq_loss = torch.mean((z_q - z.detach()) ** 2)  # pulls codes towards encoder outputs
            commit_loss = self.beta * torch.mean((z_q.detach() - z) ** 2)  # keeps the encoder committed
            if self.entropy_loss_ratio > 0:
                ent_loss = self.entropy_loss_ratio * entropy_loss(-d)
            else:
                ent_loss = d.new_zeros(())  # skip the [M, N] softmax when it would be multiplied by 0

        z_q = z + (z_q - z).detach()  # straight-through: forward uses codes, backward flows into z
        z_q = z_q.permute(0, 3, 1, 2)
        return z_q, QuantizerLoss(vq_loss, commit_loss, ent_loss, usage), QuantizerInfo(None, None, indices)

    def get_codebook_entry(self, indices: Tensor, shape: Shape | None = None, channel_first=True) -> Tensor:
        """Look up code vectors, reshaped to ``shape`` (B, C, h, w), or (B, h, w, C) if not channel_first."""
        z_q = self.codebook()[indices]
        if shape is None:
            return z_q
        if channel_first:
            b, c, h, w = shape
            return z_q.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
        return z_q.reshape(tuple(shape))


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


class VQModel(nn.Module):
    """LlamaGen's VQ tokenizer: encoder, l2-normalised vector quantizer and decoder."""

    def __init__(self, config: VQConfig | None = None) -> None:
        super().__init__()
        self.config = config = config if config is not None else VQConfig()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(
            config.codebook_size,
            config.codebook_embed_dim,
            config.commit_loss_beta,
            config.entropy_loss_ratio,
            config.codebook_l2_norm,
            config.codebook_show_usage,
        )
        self.quant_conv = conv1x1(config.z_channels, config.codebook_embed_dim)
        self.post_quant_conv = conv1x1(config.codebook_embed_dim, config.z_channels)

    @property
    def downsample_factor(self) -> int:
        """Pixels per code along each side (16 for VQ-16, 8 for VQ-8)."""
        return 2 ** (len(self.config.encoder_ch_mult) - 1)

    def _check_images(self, images: Tensor) -> None:
        """Raise ValueError naming ``images`` unless it is a [B, 3, H, W] tensor with H, W divisible by f."""
        if not isinstance(images, Tensor):
            raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(images.shape)}")
        f = self.downsample_factor
        if images.shape[2] % f or images.shape[3] % f:
            hw = tuple(images.shape[2:])
            raise ValueError(f"images height and width must be multiples of the downsample factor {f}: {hw}")

    def encode(self, images: Tensor) -> tuple[Tensor, QuantizerLoss, QuantizerInfo]:
        """Encode images in [-1, 1] to quantised latents [B, D, h, w], quantizer losses and info."""
        self._check_images(images)
        h = self.quant_conv(self.encoder(images))
        return self.quantize(h)

    @torch.no_grad()
    def encode_to_codes(self, images: Tensor) -> Tensor:
        """Token ids [B, h*w] (row-major) of images [B, 3, H, W] in [-1, 1]; never touches training state."""
        self._check_images(images)
        return self.quantize.nearest_codes(self.quant_conv(self.encoder(images)))

    def decode(self, quant: Tensor) -> Tensor:
        """Decode quantised latents [B, D, h, w] to images [B, 3, h*f, w*f] (roughly in [-1, 1])."""
        return self.decoder(self.post_quant_conv(quant))

    def _grid_shape(self, codes: Tensor, shape: Shape | None, channel_first: bool) -> tuple[int, ...]:
        """Validate ``codes`` against ``shape``, inferring a square (B, C, h, w) grid when shape is None."""
        if codes.ndim not in (1, 2):
            raise ValueError(f"codes must have shape [B, h*w] or [B*h*w], got {tuple(codes.shape)}")
        if codes.dtype in (torch.bool, torch.uint8) or codes.is_floating_point() or codes.is_complex():
            raise ValueError(f"codes must be an integer tensor (e.g. torch.long), got {codes.dtype}")
        dim = self.config.codebook_embed_dim
        if shape is None:
            # A 1-D tensor is taken to be a single image.
            batch, n = (1, codes.numel()) if codes.ndim == 1 else tuple(codes.shape)
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"codes must form a square grid when shape is None, got {n} codes per image")
            return (batch, dim, side, side) if channel_first else (batch, side, side, dim)
        shape = tuple(int(s) for s in shape)
        if len(shape) != 4:
            raise ValueError(f"shape must have 4 entries, got {shape}")
        b, c, h, w = shape if channel_first else (shape[0], shape[3], shape[1], shape[2])
        if c != dim:
            raise ValueError(f"shape has {c} channels but codebook_embed_dim is {dim}")
        if b * h * w != codes.numel():
            raise ValueError(f"shape {shape} does not match the {codes.numel()} entries of codes")
        return shape

    def decode_code(self, codes: Tensor, shape: Shape | None = None, channel_first: bool = True) -> Tensor:
        """Decode token ids [B, h*w] or [B*h*w] to images [B, 3, H, W].

        ``shape`` is (B, C, h, w), or (B, h, w, C) when ``channel_first`` is False; when None a
        square grid is inferred (a 1-D ``codes`` is one image).
        """
        shape = self._grid_shape(codes, shape, channel_first)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.config.codebook_size}), the codebook size")
        quant = self.quantize.get_codebook_entry(codes.reshape(-1), shape, channel_first)
        if not channel_first:
            quant = quant.permute(0, 3, 1, 2).contiguous()  # the decoder always wants [B, C, h, w]
        return self.decode(quant)

    def forward(self, images: Tensor) -> tuple[Tensor, QuantizerLoss]:
        """Reconstruct images; return (reconstruction, quantizer losses) as LlamaGen's training expects."""
        quant, diff, _ = self.encode(images)
        return self.decode(quant), diff


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


def VQ_16(**kwargs: Any) -> VQModel:  # noqa: N802 - preset names follow LlamaGen
    """Tokenizer with 16x downsampling (256px image -> 16x16 codes), as in vq_ds16_*.pt."""
    return VQModel(VQConfig(**{"encoder_ch_mult": [1, 1, 2, 2, 4], "decoder_ch_mult": [1, 1, 2, 2, 4], **kwargs}))


def VQ_8(**kwargs: Any) -> VQModel:  # noqa: N802 - preset names follow LlamaGen
    """Tokenizer with 8x downsampling (256px image -> 32x32 codes), as in vq_ds8_c2i.pt."""
    return VQModel(VQConfig(**{"encoder_ch_mult": [1, 2, 2, 4], "decoder_ch_mult": [1, 2, 2, 4], **kwargs}))


VQ_MODELS: dict[str, Callable[..., VQModel]] = {"VQ-16": VQ_16, "VQ-8": VQ_8}


def build_vq(preset: str, **overrides: Any) -> VQModel:
    """Build a preset tokenizer by name ("VQ-16" or "VQ-8"), overriding any VQConfig field."""
    if preset not in VQ_MODELS:
        raise ValueError(f"unknown preset {preset!r}; known presets: {', '.join(sorted(VQ_MODELS))}")
    return VQ_MODELS[preset](**overrides)


# --------------------------------------------------------------------------------------------
# Image <-> tensor helpers
# --------------------------------------------------------------------------------------------


def _to_uint8_array(item: Any) -> np.ndarray:
    """One PIL image or uint8 array -> uint8 array [H, W, 3] or [B, H, W, 3]."""
    try:
        from PIL import Image
    except ImportError:  # without Pillow there can be no PIL images to convert
        Image = None  # noqa: N806
    if Image is not None and isinstance(item, Image.Image):
        return np.asarray(item.convert("RGB"))
    if not isinstance(item, np.ndarray):
        raise ValueError(f"images must be PIL images or uint8 numpy arrays, got {type(item).__name__}")
    if item.dtype != np.uint8:
        raise ValueError(f"images arrays must have dtype uint8, got {item.dtype}")
    if item.ndim == 3 and item.shape[-1] == 4:
        raise ValueError("images arrays with 4 channels (RGBA) are not supported; convert them to RGB first")
    if item.ndim == 2 or (item.ndim == 3 and item.shape[-1] != 3):  # grayscale [H, W] or [B, H, W]
        return np.repeat(item[..., None], 3, axis=-1)
    if item.ndim in (3, 4) and item.shape[-1] == 3:
        return item
    raise ValueError(f"images arrays must be [H, W], [B, H, W], [H, W, 3] or [B, H, W, 3], got {item.shape}")


def images_to_tensor(images: Any) -> Tensor:
    """Convert PIL image(s) or uint8 array(s) to a float tensor [B, 3, H, W] in [-1, 1].

    Accepts a PIL image, a uint8 array [H, W, 3] / [B, H, W, 3] / grayscale [H, W] / [B, H, W]
    (a 3-D array whose last axis is 3 is read as RGB, one whose last axis is 4 is rejected as RGBA),
    or a list of PIL images / arrays of one size.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images must not be empty")
        arrays = [_to_uint8_array(item) for item in images]
        arrays = [a[None] if a.ndim == 3 else a for a in arrays]
        if len({a.shape[1:] for a in arrays}) != 1:
            sizes = sorted({a.shape[1:3] for a in arrays})
            raise ValueError(f"images must all have the same size, got {sizes}")
        array = np.concatenate(arrays)
    else:
        array = _to_uint8_array(images)
        if array.ndim == 3:
            array = array[None]
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # e.g. np.asarray(pil_image); torch wants writable memory
        array = array.copy()
    x = torch.from_numpy(array).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def tensor_to_uint8(x: Tensor) -> np.ndarray:
    """Map a float tensor [B, 3, H, W] in [-1, 1] to a uint8 array [B, H, W, 3] (clamped, rounded)."""
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor of shape [B, 3, H, W], got {shape}")
    y = ((x.detach().float() + 1.0) * 127.5).round().clamp(0, 255)
    return y.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def tensor_to_pil(x: Tensor) -> list[Any]:
    """Convert a float tensor [B, 3, H, W] in [-1, 1] to a list of B RGB PIL images."""
    from PIL import Image

    return [Image.fromarray(a) for a in tensor_to_uint8(x)]
