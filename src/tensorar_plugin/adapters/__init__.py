"""Backbone adapters: how `TensorARWrapper` talks to a particular model family."""

from __future__ import annotations

from torch import nn

from .base import BackboneAdapter
from .custom import KVCache, ModuleAdapter
from .hf import HFCausalLMAdapter
from .llamagen import LlamaGenAdapter

__all__ = ["BackboneAdapter", "LlamaGenAdapter", "HFCausalLMAdapter", "ModuleAdapter", "KVCache", "register_adapter",
           "find_adapter", "registered_adapters"]

# HFCausalLMAdapter recognises transformers models by class name, without importing transformers.
# ModuleAdapter is not registered: it needs the names of the model's parts.
_REGISTRY: list[type[BackboneAdapter]] = [LlamaGenAdapter, HFCausalLMAdapter]


def register_adapter(adapter_cls: type[BackboneAdapter], *, first: bool = True) -> type[BackboneAdapter]:
    """Make `TensorARWrapper` try `adapter_cls` when picking an adapter (usable as a class decorator)."""
    if not (isinstance(adapter_cls, type) and issubclass(adapter_cls, BackboneAdapter)):
        raise TypeError("register_adapter expects a BackboneAdapter subclass")
    if adapter_cls not in _REGISTRY:
        _REGISTRY.insert(0 if first else len(_REGISTRY), adapter_cls)
    return adapter_cls


def registered_adapters() -> tuple[type[BackboneAdapter], ...]:
    return tuple(_REGISTRY)


def find_adapter(model: nn.Module) -> BackboneAdapter:
    """The first registered adapter that accepts `model`; `TypeError` listing what each looked for."""
    if isinstance(model, BackboneAdapter):
        return model
    for adapter_cls in _REGISTRY:
        if adapter_cls.matches(model):
            return adapter_cls(model)
    tried = "; ".join(
        f"{cls.__name__} needs attributes {', '.join(cls.required_attributes)} "
        f"(missing: {', '.join(cls.missing_attributes(model)) or 'none'})"
        for cls in _REGISTRY
    )
    raise TypeError(f"no TensorAR adapter fits {type(model).__name__}. Tried: {tried}. Pass "
                    "TensorARWrapper(model, adapter=...) with a BackboneAdapter, or see docs/adapters.md.")
