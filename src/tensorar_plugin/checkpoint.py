"""Saving and loading `TensorARWrapper` weights: safetensors plus a JSON config, locally or on the Hub.

Two layouts, told apart by the file present:

* `model.safetensors`: the whole wrapper (`base_model.*`, `encoder.*`, `decoder.*`);
* `tensorar_adapter.safetensors`: only the new parts, to be put back around the same base model
  (like a peft adapter).

Both come with `tensorar_config.json` and, when the backbone has a config with `to_dict()` (LlamaGen),
`backbone_config.json` so tools can rebuild it. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from .files import read_json, read_safetensors
from .noise import ADAPTIVE, SCHEDULES
from .state_dicts import describe_mismatch
from .wrapper import ADAPTER_NAME, BACKBONE_CONFIG_NAME, CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, TensorARConfig

if TYPE_CHECKING:
    from torch import nn

    from .adapters import BackboneAdapter
    from .wrapper import TensorARWrapper

__all__ = ["save_wrapper", "load_wrapper", "model_card"]


def _plain_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage: give every tensor its own copy
    return {key: value.detach().contiguous().clone() for key, value in state.items()}


def save_wrapper(wrapper: TensorARWrapper, save_directory: str | Path, *, save_backbone: bool | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write config + weights; `state_dict` (full-wrapper keys) replaces the live weights, e.g. EMA or
    FSDP-gathered tensors."""
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    includes_backbone = (not wrapper.backbone_frozen) if save_backbone is None else bool(save_backbone)
    name, stale = (WEIGHTS_NAME, ADAPTER_NAME) if includes_backbone else (ADAPTER_NAME, WEIGHTS_NAME)
    state = dict(state_dict) if state_dict is not None else wrapper.state_dict()
    if not includes_backbone:
        new_parts = tuple(f"{part}." for part in wrapper.new_modules())
        state = {key: value for key, value in state.items() if key.startswith(new_parts)}
    metadata = {"format": "pt", "tensorar_window": str(wrapper.window)}
    save_file(_plain_tensors(state), str(directory / name), metadata=metadata)
    (directory / stale).unlink(missing_ok=True)
    config = {"format_version": FORMAT_VERSION, "includes_backbone": includes_backbone, **wrapper.config.to_dict()}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    base_config = getattr(wrapper.base_model, "config", None)
    if hasattr(base_config, "to_dict"):  # lets tools rebuild the backbone without guessing its shape
        (directory / BACKBONE_CONFIG_NAME).write_text(json.dumps(base_config.to_dict(), indent=2, sort_keys=True,
                                                                 default=str) + "\n")
    return directory


def _resolve_directory(pretrained: str | Path, **hub_kwargs) -> Path:
    path = Path(pretrained)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"pretrained must be a directory written by save_pretrained or a Hub repo id, "
                         f"got the file {path}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(str(pretrained))
    except Exception:  # a path ("runs/b256/final", "/abs/dir"): no Hub repo id looks like that
        raise FileNotFoundError(f"no folder {pretrained}: pass the folder written by save_pretrained (a Hugging "
                                f"Face Hub repo id, the other choice, looks like 'owner/name')") from None
    try:
        local = snapshot_download(str(pretrained), allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, ADAPTER_NAME],
                                  **hub_kwargs)
    except Exception as exc:  # offline, unknown repo, no access: say what was looked for
        raise FileNotFoundError(
            f"{pretrained!r} is neither a local folder nor a Hugging Face Hub repo that could be fetched "
            f"({type(exc).__name__}: {exc}). Pass the folder written by save_pretrained, or download the repo "
            f"first (hf download {pretrained} --local-dir DIR) and pass DIR."
        ) from exc
    return Path(local)


def _check_shapes(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], config: TensorARConfig,
                  source: Path) -> None:
    report = describe_mismatch(expected, found)
    if report is not None:
        raise ValueError(f"{source} does not fit a TensorAR wrapper with window={config.window} around this "
                         f"model (width {config.base_hidden_size}): {report}")


def load_wrapper(cls, pretrained: str | Path, model: nn.Module, *, adapter: BackboneAdapter | None = None,
                 window: int | None = None, noise_schedule=None, **hub_kwargs) -> TensorARWrapper:
    directory = _resolve_directory(pretrained, **hub_kwargs)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: is {directory} a folder written by save_pretrained?")
    data = read_json(config_path)
    version = data.pop("format_version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise ValueError(f"{config_path} has format_version {version}; this tensorar-plugin reads up to "
                         f"{FORMAT_VERSION}: upgrade the package")
    data.pop("includes_backbone", None)
    config = TensorARConfig.from_dict(data)
    if window is not None and window != config.window:
        raise ValueError(f"window={window} was requested, but {directory} holds a TensorAR model saved with "
                         f"window={config.window}")
    requested = noise_schedule if noise_schedule is None or callable(noise_schedule) else str(noise_schedule)
    if isinstance(requested, str) and requested not in (*SCHEDULES, ADAPTIVE):
        raise ValueError(f"noise_schedule must be one of {', '.join((*SCHEDULES, ADAPTIVE))} or a callable, "
                         f"got {requested!r}")
    if requested is not None and ADAPTIVE in (config.noise_schedule, requested) and requested != config.noise_schedule:
        raise ValueError(f"{directory} was saved with noise_schedule={config.noise_schedule!r}; the adaptive "
                         f"schedule keeps state in the weights, so it cannot be switched on or off at load time "
                         f"(got noise_schedule={requested!r})")
    wrapper = cls(model, config=config, adapter=adapter)
    if requested is not None:
        wrapper.config.noise_schedule = requested if isinstance(requested, str) else "custom"
        wrapper._set_noise_schedule(requested)
    elif config.noise_schedule == "custom":
        warnings.warn(f"{directory} was trained with a custom noise schedule, which cannot be saved: training "
                      f"this wrapper uses the exponential schedule unless noise_schedule= passes the callable "
                      f"(sampling is unaffected)", stacklevel=3)
        wrapper._set_noise_schedule("exponential")

    full, partial = directory / WEIGHTS_NAME, directory / ADAPTER_NAME
    if full.is_file():
        state = read_safetensors(full)
        expected = wrapper.state_dict()
        _check_shapes(expected, state, config, full)
        wrapper.load_state_dict(state, strict=True)
    elif partial.is_file():
        state = read_safetensors(partial)
        _check_shapes(wrapper.tensorar_state_dict(), state, config, partial)
        for name, module in wrapper.new_modules().items():
            prefix = f"{name}."
            module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                                   strict=True)
        # saved from a frozen backbone: keep it frozen, or training it and saving again would quietly switch
        # to the whole-model format (set_backbone_frozen(False) trains it on purpose)
        wrapper.set_backbone_frozen(True)
    else:
        raise FileNotFoundError(f"{directory} has neither {WEIGHTS_NAME} nor {ADAPTER_NAME}")
    return wrapper


def model_card(wrapper: TensorARWrapper, repo_id: str, includes_backbone: bool) -> str:
    """A short README for the Hub: what the weights are and how to load them."""
    base = type(wrapper.base_model).__name__
    load = ("TensorARWrapper.from_pretrained(repo_id, base_model)" if includes_backbone
            else "TensorARWrapper.from_pretrained(repo_id, pretrained_base_model)")
    return f"""---
library_name: tensorar-plugin
tags:
- tensorar
- autoregressive-image-generation
---

# {repo_id}

TensorAR (next-tensor prediction, arXiv 2505.16324) weights made with
[tensorar-plugin](https://pypi.org/project/tensorar-plugin/) around a `{base}` backbone.

- window (tokens per predicted tensor): {wrapper.window}
- new parameters: {wrapper.num_new_parameters():,}
- noise schedule: {wrapper.config.noise_schedule}
- contents: {"the whole model (backbone included)" if includes_backbone else "only the TensorAR parts"}

```python
from tensorar_plugin import TensorARWrapper
model = {load}
tokens = model.generate(class_ids, cfg_scale=2.0)
```
"""
