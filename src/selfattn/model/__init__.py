"""A llama-family GGUF model on selfattn's attention: config, weights, tokenizer, forward, generation."""

from .config import ModelArgs
from .default import default_model_path
from .generate import GenerationStats, Sampler, generate, prefill
from .llama import Llama, Timings
from .tokenizer import StreamDecoder, Tokenizer

__all__ = ["ModelArgs", "Llama", "Timings", "Tokenizer", "StreamDecoder", "Sampler", "generate",
           "prefill", "GenerationStats", "default_model_path"]
