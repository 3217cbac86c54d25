"""`TensorARWrapper`: next-tensor prediction around a pretrained causal image-token transformer.

`TensorARWrapper(model, window=k)` keeps the base model untouched and adds two residual parts:
a `TensorEncoder` that folds each input window into the embedding of its first token, and a
`TensorDecoder` that expands each hidden state into `k` slot hidden states read by the base head.
With the new parts at their initial values the wrapped model computes exactly what the base computes
(slot 0 always is the base head's output). Training adds discrete tensor noise to the drafts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard, ModelHubMixin
from torch import nn
from torch.utils.checkpoint import checkpoint

from .adapters import BackboneAdapter, find_adapter
from .adapters.base import NULL_CONDITION_HINT
from .checks import is_integer
from .generation import GenerationOutput, check_cond_mask, evaluating, generate_windows
from .heads import TensorDecoder, TensorEncoder
from .noise import ADAPTIVE, SCHEDULES, clean_first_slot, replace_slots
from .noise import noise_schedule as schedule_betas  # the argument `noise_schedule` names the schedule
from .sampling import sample_tokens
from .windows import IGNORE_INDEX, input_windows, target_windows

__all__ = ["TensorARConfig", "TensorAROutput", "TensorARWrapper", "CONFIG_NAME", "WEIGHTS_NAME", "ADAPTER_NAME",
           "BACKBONE_CONFIG_NAME"]

CONFIG_NAME = "tensorar_config.json"
WEIGHTS_NAME = "model.safetensors"
ADAPTER_NAME = "tensorar_adapter.safetensors"
BACKBONE_CONFIG_NAME = "backbone_config.json"  # the base model's own config, when it has a `to_dict()` config
FORMAT_VERSION = 1


@dataclass
class TensorARConfig:
    """Everything that defines the TensorAR parts; saved as JSON next to the weights."""

    window: int = 4
    encoder_depth: int = 1
    decoder_depth: int = 1
    hidden_dim: int | None = None  # inner width of the query transformers; default: half the model width
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    noise_schedule: str = "exponential"  # or "adaptive": beta(j) = 1 - running accuracy of slot-j drafts
    max_noise: float = 1.0
    adaptive_momentum: float = 0.99  # EMA momentum of the draft accuracy behind the "adaptive" schedule
    slot_weights: list[float] | None = None  # loss weight per slot; default uniform
    label_dropout: bool = True  # keep the base model's condition dropout in training (for CFG)
    draft_source: str = "noise"  # "model": drafts sampled from a no-grad pass of the model itself (ours)
    base_hidden_size: int | None = None  # recorded to refuse loading into a different backbone
    base_vocab_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("window", "encoder_depth", "decoder_depth", "hidden_dim", "num_heads"):
            value = getattr(self, name)
            if value is None and name in ("hidden_dim", "num_heads"):
                continue
            if not is_integer(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
            setattr(self, name, int(value))  # numpy integers become ints: the config is saved as JSON
        if self.num_heads is not None and self.hidden_dim is not None and self.hidden_dim % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide hidden_dim ({self.hidden_dim})")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if self.noise_schedule not in (*SCHEDULES, ADAPTIVE, "custom"):
            raise ValueError(f"noise_schedule must be one of {', '.join((*SCHEDULES, ADAPTIVE))}, "
                             f"got {self.noise_schedule!r}")
        if self.draft_source not in ("noise", "model"):
            raise ValueError(f"draft_source must be 'noise' or 'model', got {self.draft_source!r}")
        if not 0.0 <= self.adaptive_momentum < 1.0:
            raise ValueError(f"adaptive_momentum must be in [0, 1), got {self.adaptive_momentum!r}")
        if not 0.0 <= self.max_noise <= 1.0:
            raise ValueError(f"max_noise must be in [0, 1], got {self.max_noise!r}")
        if self.slot_weights is not None:
            self.slot_weights = [float(w) for w in self.slot_weights]
            if len(self.slot_weights) != self.window or any(w < 0 for w in self.slot_weights) \
                    or sum(self.slot_weights) <= 0:
                raise ValueError(f"slot_weights must be {self.window} non-negative numbers with a positive sum, "
                                 f"got {self.slot_weights!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorARConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"format_version"})
        if unknown:
            raise ValueError(f"unknown TensorARConfig field(s): {', '.join(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class TensorAROutput:
    """Training-forward result. `logits` `[B, T, k, V]` (float32; None with `return_logits=False`),
    `targets` `[B, T, k]` (-100 = no loss)."""

    loss: torch.Tensor
    logits: torch.Tensor | None
    targets: torch.Tensor
    slot_losses: torch.Tensor  # mean cross-entropy of each slot `[k]`, detached, for logging


def _refusing_settings_beside_config(init: Callable) -> Callable:
    """Wrap `__init__` so that a TensorAR setting passed beside `config=` is an error, even at its default
    value: the config defines every setting, and `window=4` beside a window-2 config must not silently lose."""
    signature = inspect.signature(init)
    settings = [f.name for f in fields(TensorARConfig) if f.name in signature.parameters]

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        try:
            given = signature.bind(self, *args, **kwargs).arguments
        except TypeError:  # a malformed call: Python's own error, from the call itself
            given = {}
        clashes = [name for name in settings if name in given] if given.get("config") is not None else []
        if clashes:
            raise ValueError(f"pass either config= or the settings it holds, not both: {', '.join(clashes)} "
                             f"{'was' if len(clashes) == 1 else 'were'} also given")
        init(self, *args, **kwargs)

    return __init__


class TensorARWrapper(nn.Module, ModelHubMixin, library_name="tensorar-plugin",
                      tags=["tensorar", "autoregressive-image-generation"],
                      repo_url="https://pypi.org/project/tensorar-plugin/"):
    """Turn a causal image-token transformer into a next-tensor (window of `window` tokens) predictor.

    Args:
        model: the base model; any model an adapter accepts (LlamaGen-style GPTs out of the box).
        window: tokens per predicted tensor (`k`); 1 reproduces the base model exactly.
        adapter: a `BackboneAdapter` for models no registered adapter recognises.
        encoder_depth / decoder_depth / hidden_dim / num_heads / mlp_ratio: query-transformer shape.
        noise_schedule: "exponential" (default), "linear", "sine", "sqrt", "adaptive" (noise follows the
            model's own draft accuracy), or a callable `u -> beta`.
        max_noise: replacement probability of the last slot (the schedule is scaled to it).
        slot_weights: per-slot loss weights (uniform by default).
        freeze_backbone: train only the new parts.
        label_dropout: keep the base model's condition dropout in training (needed for CFG).
        adaptive_momentum: EMA momentum of the draft accuracy behind `noise_schedule="adaptive"`.
        draft_source: "noise" (the paper: drafts are noised clean tokens) or "model" (ours: drafts are
            sampled from a gradient-free pass of the model over the noised windows, as generation makes them).
    """

    @_refusing_settings_beside_config
    def __init__(self, model: nn.Module, window: int = 4, *, adapter: BackboneAdapter | None = None,
                 encoder_depth: int = 1, decoder_depth: int = 1, hidden_dim: int | None = None,
                 num_heads: int | None = None, mlp_ratio: float = 4.0, noise_schedule="exponential",
                 max_noise: float = 1.0, slot_weights=None, freeze_backbone: bool = False,
                 label_dropout: bool = True, adaptive_momentum: float = 0.99, draft_source: str = "noise",
                 config: TensorARConfig | None = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if adapter is not None and getattr(adapter, "model", None) is not model:
            raise ValueError("adapter was built on another model than the one wrapped: the wrapper would train, "
                             "freeze and save `model` but run the adapter's; build the adapter on `model`")
        self.adapter = adapter if adapter is not None else find_adapter(model)
        self._schedule = noise_schedule
        if config is None:
            config = TensorARConfig(
                window=window, encoder_depth=encoder_depth, decoder_depth=decoder_depth, hidden_dim=hidden_dim,
                num_heads=num_heads, mlp_ratio=mlp_ratio,
                noise_schedule=noise_schedule if isinstance(noise_schedule, str) else "custom",
                max_noise=max_noise, slot_weights=slot_weights, label_dropout=label_dropout,
                adaptive_momentum=adaptive_momentum, draft_source=draft_source,
            )
        else:  # no setting was passed beside it (`_refusing_settings_beside_config`)
            config = dataclasses.replace(config)  # filled in below: the caller's object stays as it was
            self._schedule = config.noise_schedule
        dim = self.adapter.hidden_size
        if config.base_hidden_size is not None and config.base_hidden_size != dim:
            raise ValueError(f"this TensorAR config was made for a backbone of width {config.base_hidden_size}, "
                             f"but the model has width {dim}")
        if config.base_vocab_size is not None and config.base_vocab_size != self.adapter.vocab_size:
            raise ValueError(f"this TensorAR config was made for a codebook of {config.base_vocab_size} tokens, "
                             f"but the model has {self.adapter.vocab_size}")
        tokens = self.adapter.max_image_tokens
        if config.window > tokens:
            raise ValueError(f"window ({config.window}) must be at most the number of image tokens the model "
                             f"generates ({tokens}): slots past the last token would never be trained or used")
        config.base_hidden_size, config.base_vocab_size = dim, self.adapter.vocab_size
        if config.hidden_dim is None:
            config.hidden_dim = max(dim // 2, 1)
        self.config = config
        self.base_model = model

        self.encoder: TensorEncoder | None = None
        self.decoder: TensorDecoder | None = None
        if config.window > 1:
            shape = dict(dim=dim, window=config.window, hidden_dim=config.hidden_dim, num_heads=config.num_heads,
                         mlp_ratio=config.mlp_ratio)
            ref = self.adapter.embedding_weight
            self.encoder = TensorEncoder(depth=config.encoder_depth, **shape).to(ref.device, ref.dtype)
            self.decoder = TensorDecoder(depth=config.decoder_depth, **shape).to(ref.device, ref.dtype)
            if config.noise_schedule == ADAPTIVE:  # saved with the encoder, so resuming keeps the noise level
                self.encoder.register_buffer("draft_accuracy", torch.zeros(config.window, device=ref.device))
        # buffers derived from the config, float32: kept exactly on the CPU too, and put back after every move
        # or cast (`_apply`), so `.to(torch.bfloat16)` cannot round them and `to_empty()` cannot leave them empty
        weights = config.slot_weights or [1.0] * config.window
        self._exact_buffers = {"slot_weights": torch.tensor(weights, dtype=torch.float32, device="cpu")}
        self.register_buffer("slot_weights", None, persistent=False)
        self.register_buffer("noise_beta", None, persistent=False)
        self._set_noise_schedule(self._schedule)
        self.set_backbone_frozen(freeze_backbone)
        # The hub mixin would write the constructor arguments to config.json; ours is tensorar_config.json.
        self._hub_mixin_config = None
        #: hold the draft accuracy of training forwards until `update_draft_accuracy()` (see there)
        self.defer_draft_accuracy = False
        self._pending_accuracy: torch.Tensor | None = None
        # start in the mode of the model wrapped (an eval-mode checkpoint gives an eval-mode wrapper), not in
        # nn.Module's default training mode: half a model in training mode would noise drafts without dropout
        self.training = model.training
        for module in self.new_modules().values():
            module.train(model.training)

    def _set_noise_schedule(self, schedule) -> None:
        """Noise training windows with `schedule` (a name or a callable). A fixed schedule's `beta` is computed,
        and a custom one checked, here, once: checks in every training step would read values back from the
        device. Kept float32 wherever the model goes (`noise_beta`; None for "adaptive" and an unsaved custom one)."""
        self._schedule = schedule
        beta = None
        if not (isinstance(schedule, str) and schedule in (ADAPTIVE, "custom")):
            # on the CPU: a model built on the meta device has no values to check
            beta = schedule_betas(self.config.window, schedule, max_noise=self.config.max_noise, device="cpu")
        self._exact_buffers["noise_beta"] = beta
        self._place_exact_buffers(self.adapter.embedding_weight.device)

    def _place_exact_buffers(self, device: torch.device) -> None:
        """Set the config-derived buffers (`slot_weights`, `noise_beta`) from their exact float32 values."""
        for name, value in self._exact_buffers.items():
            self._buffers[name] = None if value is None else value.to(device)

    # -- introspection -------------------------------------------------------------------------
    @property
    def window(self) -> int:
        return self.config.window

    @property
    def vocab_size(self) -> int:
        return self.adapter.vocab_size

    def new_modules(self) -> dict[str, nn.Module]:
        """The parts TensorAR adds (empty for `window=1`)."""
        return {name: m for name, m in (("encoder", self.encoder), ("decoder", self.decoder)) if m is not None}

    def num_new_parameters(self) -> int:
        return sum(p.numel() for m in self.new_modules().values() for p in m.parameters())

    def train(self, mode: bool = True) -> TensorARWrapper:
        """`nn.Module.train`; entering training mode also frees the KV caches `generate` keeps for its next
        call (batch x length x layers of keys and values, of no use to a training forward), except when
        `generate` itself gives a training-mode wrapper its mode back (sampling between training chunks
        keeps its caches, and a compiled step its CUDA graphs, until training starts again)."""
        if mode and not self.__dict__.get("_restoring_mode", False):
            self.clear_caches()
        return super().train(mode)

    @contextlib.contextmanager
    def _mode_restored_without_freeing_caches(self) -> Iterator[None]:
        self.__dict__["_restoring_mode"] = True  # read by `train` when `evaluating` gives the mode back
        try:
            yield
        finally:
            self.__dict__["_restoring_mode"] = False

    def clear_caches(self) -> None:
        """Free the KV caches left by `generate` (the next call sets them up again)."""
        self.adapter.clear_caches()

    def set_backbone_frozen(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) every base-model parameter; the new parts stay trainable."""
        if not isinstance(frozen, (bool, np.bool_)):  # "no" would freeze
            raise ValueError(f"freeze_backbone must be True or False, got {frozen!r}")
        frozen = bool(frozen)
        for param in self.base_model.parameters():
            param.requires_grad_(not frozen)
        self.backbone_frozen = frozen

    # -- pieces shared by training and generation ----------------------------------------------
    def embed_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """Input windows `[..., k]` (`PAD_ID` past the end) -> one embedding per window `[..., d]`."""
        if self.encoder is None:
            return self.adapter.embed_tokens(windows[..., 0])
        slots = self.adapter.embed_tokens(windows.clamp(min=0))  # slot 0 is never padding
        return slots[..., 0, :] + self.encoder(slots, pad_mask=windows < 0).to(slots.dtype)

    def window_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states `[..., d]` -> float32 logits `[..., k, V]`; slot 0 is the base head's output."""
        base = self.adapter.head(hidden).unsqueeze(-2)
        if self.decoder is None:
            return base
        slots = self.decoder(hidden)[..., 1:, :]
        return torch.cat([base, self.adapter.head(slots)], dim=-2)

    def sampling_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`window_logits` for sampling: one head call over all `k` slot states, so a decode step reads
        the head's weights once, not twice (up to ~10% of a LlamaGen's weight traffic per token).

        Slot 0 is the base head on `hidden` itself; the matmul's rounding may differ in the last bit
        from `window_logits`, which keeps slot 0 bit-identical to the base model for training.
        """
        if self.decoder is None:
            return self.adapter.head(hidden).unsqueeze(-2)
        return self.adapter.head(self.decoder(hidden))

    # -- training forward ------------------------------------------------------------------------
    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            raise ValueError(f"tokens must be a [batch, length] tensor of image-token ids, got "
                             f"{getattr(tokens, 'shape', type(tokens).__name__)}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must hold integer ids, got dtype {tokens.dtype}")
        if tokens.shape[0] == 0:
            raise ValueError("tokens holds an empty batch (shape [0, length])")
        limit = self.adapter.max_image_tokens
        if not 1 <= tokens.shape[1] <= limit:
            raise ValueError(f"tokens has length {tokens.shape[1]}, but the model's block_size allows 1..{limit}")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.vocab_size:
            raise ValueError(f"tokens holds ids outside the codebook [0, {self.vocab_size - 1}] "
                             f"(min {low}, max {high})")

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor, *, force_drop_ids: torch.Tensor | None = None,
                generator: torch.Generator | None = None, cond_mask: torch.Tensor | None = None,
                validate: bool = True, return_logits: bool = True) -> TensorAROutput:
        """Teacher-forced next-tensor prediction over the image tokens `[B, T]` given `cond`.

        In training mode draft slots are noised (`generator` makes it reproducible) and the base
        model's condition dropout applies; in eval mode inputs are clean. `cond_mask` `[B, n_cond]`
        hides padded condition tokens (text conditions). `validate=False` skips the id-range checks,
        which read values back from the device (the trainer's datasets check ids when loading).
        `return_logits=False` computes the same loss without ever holding the `[B, T, k, V]` logits
        (`k` times the base model's): one slot at a time, the head's logits recomputed in the backward
        pass (one more forward of the head); `logits` is then None.
        """
        if validate:  # the condition first: it fixes the prompt length that bounds the image length
            rows = tokens.shape[0] if isinstance(tokens, torch.Tensor) and tokens.dim() == 2 else None
            self.adapter.check_condition(cond, rows)
            self._check_tokens(tokens)
        tokens = tokens.long()  # int32 / uint8 codes: the loss's targets must be int64 (no copy when they are)
        if force_drop_ids is not None:
            if not self.adapter.has_null_condition:
                raise ValueError(f"force_drop_ids needs a null condition to drop to, but this model has none "
                                 f"({NULL_CONDITION_HINT})")
            force_drop_ids = torch.as_tensor(force_drop_ids, device=tokens.device)
            if tuple(force_drop_ids.shape) != (tokens.shape[0],):
                raise ValueError(f"force_drop_ids must hold one 0/1 flag per batch item, shape ({tokens.shape[0]},), "
                                 f"got {tuple(force_drop_ids.shape)}")
        k = self.window
        train_cond = self.base_model.training and self.config.label_dropout
        cond_embeddings = self.adapter.embed_condition(cond, train=train_cond, force_drop_ids=force_drop_ids)
        mask_kwargs = {}
        if cond_mask is not None:
            mask_kwargs["cond_mask"] = check_cond_mask(cond_mask, self.adapter, tokens.shape[0], guided=False,
                                                       check_values=validate)
        windows = None
        if tokens.shape[1] > 1:
            windows = input_windows(tokens, k)
            if self.training and k > 1:
                beta = self._training_beta().to(windows.device)  # no copy when already there (the usual case)
                windows, _ = replace_slots(windows, beta, self.vocab_size, generator)
                if self.config.draft_source == "model":
                    with torch.no_grad():
                        hidden = self._window_hidden(cond_embeddings.detach(), windows, mask_kwargs)
                        slot_states = self.decoder(hidden[:, : windows.shape[1]])
                        windows = self._model_drafts(windows, lambda j: self.adapter.head(slot_states[..., j, :]),
                                                     generator)
        targets = target_windows(tokens, k)
        if return_logits:
            logits = self._window_forward(cond_embeddings, windows, mask_kwargs)
            loss, slot_losses, per_token = self._loss(logits, targets)
        else:
            logits = None
            loss, slot_losses, per_token = self._recomputed_loss(self._window_hidden(cond_embeddings, windows,
                                                                                     mask_kwargs), targets)
        if self.training and self.adaptive_beta() is not None:
            self._track_draft_accuracy(per_token, targets)
        return TensorAROutput(loss=loss, logits=logits, targets=targets, slot_losses=slot_losses)

    def _window_hidden(self, cond_embeddings: torch.Tensor, windows: torch.Tensor | None,
                       mask_kwargs: dict) -> torch.Tensor:
        """Condition + input windows -> backbone hidden states `[B, T, d]` (output 0 is the last condition token)."""
        embeddings = cond_embeddings
        if windows is not None:
            embeddings = torch.cat([cond_embeddings, self.embed_windows(windows)], dim=1)
        return self.adapter.forward_hidden(embeddings, **mask_kwargs)[:, self.adapter.num_cond_tokens - 1:]

    def _window_forward(self, cond_embeddings: torch.Tensor, windows: torch.Tensor | None,
                        mask_kwargs: dict) -> torch.Tensor:
        """Condition + input windows -> window logits `[B, T, k, V]`."""
        return self.window_logits(self._window_hidden(cond_embeddings, windows, mask_kwargs))

    @staticmethod
    def _model_drafts(windows: torch.Tensor, slot_logits: Callable[[int], torch.Tensor],
                      generator: torch.Generator | None) -> torch.Tensor:
        """Replace the draft slots of `windows` `[B, T-1, k]` by tokens sampled from the model's own predictions.

        Output `t` predicts positions `t .. t+k-1`, so slot `j` of the window fed at position `t` takes a
        sample of output `t`'s slot `j`, the draft generation feeds back (drawn at temperature 1 without top-k or
        top-p, i.e. as generation does with its default settings); padding stays padding. `slot_logits(j)` gives
        slot `j`'s logits `[B, >= T-1, V]` at every output: one slot at a time, so this no-grad pass holds one
        slot's logits and sampling buffers, not all `k`.
        """
        length = windows.shape[1]
        sampled = torch.stack([sample_tokens(slot_logits(j)[:, :length], generator=generator)
                               for j in range(1, windows.shape[-1])], dim=-1)
        drafts = torch.where(windows[..., 1:] >= 0, sampled.to(windows.dtype), windows[..., 1:])
        return torch.cat([windows[..., :1], drafts], dim=-1)

    def _training_beta(self) -> torch.Tensor:
        """Replacement probability of each slot `[k]` for this training step (slot 0: never)."""
        if self.noise_beta is not None:
            return self.noise_beta
        adaptive = self.adaptive_beta()
        if adaptive is None:
            raise ValueError("this wrapper's config names a custom noise schedule, which cannot be saved: pass the "
                             "callable, as TensorARWrapper(model, noise_schedule=fn, ...) without config=, or as "
                             "from_pretrained(..., noise_schedule=fn)")
        return clean_first_slot(adaptive)

    def adaptive_beta(self) -> torch.Tensor | None:
        """Current per-slot noise of the "adaptive" schedule (`1 - draft accuracy`, scaled), else None."""
        accuracy = getattr(self.encoder, "draft_accuracy", None)
        if accuracy is None:
            return None
        return (1.0 - accuracy).clamp(0.0, 1.0) * self.config.max_noise

    @torch.no_grad()
    def _track_draft_accuracy(self, per_token_ce: torch.Tensor, targets: torch.Tensor) -> None:
        """EMA of the probability that a draft sampled from slot `j` is the true token (`E[p(target)]`).

        Updated on every training forward, or, with `defer_draft_accuracy = True` (as during `Trainer.train()`),
        summed until `update_draft_accuracy()` folds one optimizer step's worth in, over every process.
        """
        valid = targets != IGNORE_INDEX
        sums = torch.stack([(torch.exp(-per_token_ce.float()) * valid).sum(dim=(0, 1)), valid.sum(dim=(0, 1))])
        self._pending_accuracy = sums if self._pending_accuracy is None else self._pending_accuracy + sums
        if not self.defer_draft_accuracy:
            self.update_draft_accuracy(process_group=False)

    @torch.no_grad()
    def update_draft_accuracy(self, process_group=None) -> None:
        """Fold the draft accuracy gathered since the last call into the `adaptive` schedule's EMA.

        Under `torch.distributed` the sums of all processes of `process_group` (default: the world) are
        added first, so every process holds the same estimate, whatever the number of processes or
        micro-batches; `process_group=False` uses this process's sums alone.
        """
        pending, self._pending_accuracy = self._pending_accuracy, None
        accuracy = getattr(self.encoder, "draft_accuracy", None)
        if pending is None or accuracy is None:
            return
        if process_group is not False and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(pending, group=process_group)
        hit = pending[0] / pending[1].clamp_min(1)
        momentum = self.config.adaptive_momentum
        accuracy.mul_(momentum).add_(hit.to(accuracy), alpha=1 - momentum)

    def _apply(self, fn, recurse: bool = True):
        # `.to(torch.bfloat16)` would cast the draft-accuracy EMA too, and a momentum-0.99 average
        # cannot move in bfloat16: it stays float32 wherever the model goes
        super()._apply(fn, recurse)
        encoder = self.encoder
        if encoder is not None and "draft_accuracy" in encoder._buffers:
            encoder._buffers["draft_accuracy"] = encoder._buffers["draft_accuracy"].float()
        if "_exact_buffers" in self.__dict__:  # the config's buffers: exact values on the new device
            self._place_exact_buffers(self.slot_weights.device)
        return self

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor):
        if self.window == 1:  # exactly the base model's loss
            loss = _cross_entropy(logits, targets, reduction="mean")
            return loss, loss.detach().reshape(1), None
        return self._weighted_loss(_cross_entropy(logits, targets), targets)

    def _recomputed_loss(self, hidden: torch.Tensor, targets: torch.Tensor):
        """`_loss(window_logits(hidden), targets)` one slot at a time, each slot's logits recomputed in the
        backward pass (activation checkpointing): only `[B, T]` losses per slot are kept, never logits."""
        head = self.adapter.head
        if self.window == 1:
            loss = checkpoint(_head_cross_entropy, head, hidden, targets[..., 0], "mean", use_reentrant=False)
            return loss, loss.detach().reshape(1), None
        slot_states = self.decoder(hidden)  # slot 0 is `hidden` itself, as in `window_logits`
        per_token = torch.stack([
            checkpoint(_head_cross_entropy, head, hidden if j == 0 else slot_states[..., j, :], targets[..., j],
                       use_reentrant=False)
            for j in range(self.window)
        ], dim=-1)
        return self._weighted_loss(per_token, targets)

    def _weighted_loss(self, per_token: torch.Tensor, targets: torch.Tensor):
        """Per-token cross-entropy `[B, T, k]` -> (slot-weighted mean loss, per-slot means, detached per-token)."""
        valid = (targets != IGNORE_INDEX).float()
        weights = self.slot_weights.to(per_token.device) * valid
        loss = (per_token * weights).sum() / weights.sum().clamp_min(1e-12)
        slot_losses = (per_token * valid).sum(dim=(0, 1)) / valid.sum(dim=(0, 1)).clamp_min(1)
        return loss, slot_losses.detach(), per_token.detach()

    # -- generation --------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, cond: torch.Tensor, num_tokens: int | None = None, *, cfg_scale: float = 1.0,
                 cfg_interval: int = -1, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 greedy: bool = False, draft: str = "sample", generator: torch.Generator | None = None,
                 use_cache: bool = True, return_history: bool = False, progress: bool = False,
                 compile: bool | dict = False, cond_mask: torch.Tensor | None = None):
        """Sample image tokens `[B, T]` the TensorAR way (see `generation.generate_windows`).

        `draft` picks how draft slots are chosen ("sample" like the final token, or "argmax");
        with `return_history=True` a `GenerationOutput(tokens, history)` is returned, where
        `history[b, t]` lists the `k` predictions of position `t` from coarsest draft to final.
        `compile=True` (or `torch.compile` options) compiles the decode step.
        """
        with self._mode_restored_without_freeing_caches(), evaluating(self):
            out: GenerationOutput = generate_windows(
                self.adapter, cond, window=self.window, embed_window=self.embed_windows,
                window_logits=self.sampling_logits, num_tokens=num_tokens, cfg_scale=cfg_scale,
                cfg_interval=cfg_interval, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                draft=draft, generator=generator, use_cache=use_cache, return_history=return_history,
                progress=progress, compile=compile, cond_mask=cond_mask,
            )
        return out if return_history else out.tokens

    # -- checkpoints -------------------------------------------------------------------------------
    def tensorar_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the new parts' weights (keys `encoder.*`, `decoder.*`)."""
        return {f"{name}.{key}": value for name, module in self.new_modules().items()
                for key, value in module.state_dict().items()}

    def save_pretrained(self, save_directory: str | Path, *, save_backbone: bool | None = None,
                        state_dict: dict[str, torch.Tensor] | None = None, **hub_kwargs) -> Path:
        """Write `tensorar_config.json`, safetensors weights and a model card (README.md) into `save_directory`.

        `save_backbone=None` saves the whole model unless the backbone is frozen (then only the new
        parts, adapter-style, into `tensorar_adapter.safetensors`). `state_dict` saves other tensors
        than the live ones (EMA weights, a gathered FSDP state) under the same keys. `hub_kwargs` go to
        huggingface_hub's `ModelHubMixin.save_pretrained` (`push_to_hub=True`, `repo_id`, ...).
        """
        if save_backbone is None:
            save_backbone = self.__dict__.get("_push_save_backbone")
        self.__dict__["_save_options"] = {"save_backbone": save_backbone, "state_dict": state_dict}
        try:
            ModelHubMixin.save_pretrained(self, save_directory, **hub_kwargs)
        finally:
            self.__dict__.pop("_save_options", None)
        return Path(save_directory)

    def _save_pretrained(self, save_directory: Path) -> None:
        from .checkpoint import save_wrapper

        save_wrapper(self, save_directory, **self.__dict__.get("_save_options", {}))

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """The README written next to the weights: what they are and how to load them."""
        from .checkpoint import model_card

        save_backbone = self.__dict__.get("_save_options", {}).get("save_backbone")
        includes_backbone = (not self.backbone_frozen) if save_backbone is None else bool(save_backbone)
        return ModelCard(model_card(self, kwargs.get("repo_id", "TensorAR model"), includes_backbone))

    @classmethod
    def from_pretrained(cls, pretrained: str | Path, model: nn.Module, *, adapter: BackboneAdapter | None = None,
                        window: int | None = None, noise_schedule=None, **hub_kwargs) -> TensorARWrapper:
        """Rebuild a wrapper saved by `save_pretrained` around `model` (a local folder or a Hub repo id).

        `window`, if given, must match the saved one; `noise_schedule` supplies a custom callable that
        could not be saved; `hub_kwargs` (revision, cache_dir, token, local_files_only) go to the Hub.
        """
        from .checkpoint import load_wrapper

        return load_wrapper(cls, pretrained, model, adapter=adapter, window=window, noise_schedule=noise_schedule,
                            **hub_kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None = None, cache_dir=None,
                         force_download: bool = False, local_files_only: bool = False, token=None,
                         model: nn.Module | None = None, adapter: BackboneAdapter | None = None,
                         window: int | None = None, noise_schedule=None, **_ignored) -> TensorARWrapper:
        # reached through ModelHubMixin.from_pretrained(repo, model=...): the base model is required
        if model is None:
            raise ValueError("loading a TensorAR model needs the base model: from_pretrained(repo_or_dir, model)")
        hub_kwargs = {k: v for k, v in dict(revision=revision, cache_dir=cache_dir, force_download=force_download,
                                              local_files_only=local_files_only, token=token).items() if v}
        return cls.from_pretrained(model_id, model, adapter=adapter, window=window, noise_schedule=noise_schedule,
                                   **hub_kwargs)

    def push_to_hub(self, repo_id: str, *, save_backbone: bool | None = None, private: bool | None = None,
                    token: str | None = None, commit_message: str = "Upload TensorAR model", **hub_kwargs) -> str:
        """Save (safetensors + config + model card) and upload through huggingface_hub's `ModelHubMixin`;
        returns the commit URL. `hub_kwargs` (branch, create_pr, ...) go to the mixin."""
        self.__dict__["_push_save_backbone"] = save_backbone
        hub_kwargs.setdefault("model_card_kwargs", {"repo_id": repo_id})
        try:
            info = ModelHubMixin.push_to_hub(self, repo_id, private=private, token=token,
                                             commit_message=commit_message, **hub_kwargs)
        finally:
            self.__dict__.pop("_push_save_backbone", None)
        return str(getattr(info, "commit_url", info))

    def extra_repr(self) -> str:
        return (f"window={self.window}, new_parameters={self.num_new_parameters():,}, "
                f"noise_schedule={self.config.noise_schedule!r}, backbone_frozen={self.backbone_frozen}")


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """Cross-entropy of `logits` `[..., V]` against `targets` `[...]`: per token (`IGNORE_INDEX` gives 0),
    or with `reduction="mean"` the mean over the other tokens, as the base model computes its loss."""
    loss = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction)
    return loss.view_as(targets) if reduction == "none" else loss


def _head_cross_entropy(head, states: torch.Tensor, targets: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """`_cross_entropy(head(states), targets)`: the unit `_recomputed_loss` checkpoints."""
    return _cross_entropy(head(states), targets, reduction)
