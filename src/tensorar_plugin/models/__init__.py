"""Backbones and tokenizers that load LlamaGen's released weights unchanged."""
