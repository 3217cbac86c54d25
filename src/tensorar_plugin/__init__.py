"""tensorar-plugin: next-tensor prediction (TensorAR) for causal image-token transformers."""

__version__ = "0.1.0.dev0"
