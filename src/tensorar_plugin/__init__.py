"""tensorar-plugin: next-tensor prediction (TensorAR) for causal image-token transformers.

    from tensorar_plugin import TensorARWrapper
    model = TensorARWrapper(my_ar_model, window=4)
    out = model(tokens, class_ids)          # training: out.loss, out.logits [B, T, k, V]
    images_tokens = model.generate(class_ids, cfg_scale=2.0)
"""

from .adapters import BackboneAdapter, HFCausalLMAdapter, LlamaGenAdapter, ModuleAdapter, find_adapter, register_adapter
from .generation import GenerationOutput, sample_plain
from .noise import SCHEDULES, discrete_tensor_noise, noise_schedule
from .wrapper import TensorARConfig, TensorAROutput, TensorARWrapper

__version__ = "0.1.0.dev0"

__all__ = [
    "TensorARWrapper",
    "TensorARConfig",
    "TensorAROutput",
    "GenerationOutput",
    "sample_plain",
    "noise_schedule",
    "discrete_tensor_noise",
    "SCHEDULES",
    "BackboneAdapter",
    "LlamaGenAdapter",
    "HFCausalLMAdapter",
    "ModuleAdapter",
    "find_adapter",
    "register_adapter",
    "__version__",
]
