"""A GGUF language model (llama, qwen2, qwen3, gemma2, gemma3, phi3) on selfattn's attention:
config, weights, tokenizer, forward, generation."""

from .config import ModelArgs
from .default import default_model_path
from .generate import GenerationStats, Sampler, generate, prefill
from .transformer import Timings, Transformer
from .tokenizer import StreamDecoder, Tokenizer

__all__ = ["ModelArgs", "Transformer", "Timings", "Tokenizer", "StreamDecoder", "Sampler",
           "generate", "prefill", "GenerationStats", "default_model_path"]
