"""One small module per architecture: what it reads from the metadata beyond the shared keys
(model/config.py) and which variant of the shared transformer block it runs (model/transformer.py).
Each module has `configure(meta) -> dict` of ModelArgs fields."""

from . import gemma2, gemma3, llama, phi3, qwen2, qwen3

ARCHS = {"llama": llama, "qwen2": qwen2, "qwen3": qwen3, "gemma2": gemma2, "gemma3": gemma3,
         "phi3": phi3}
