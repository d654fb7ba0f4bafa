"""llama: Llama 2 and 3 (the `llama3` RoPE frequency factors come as the rope_freqs tensor),
SmolLM2, Mistral (a sliding window on every layer when the file gives one). llama.cpp's converter
permutes the q/k rows so that its RoPE rotates adjacent pairs; the loader undoes it."""


def configure(m) -> dict:
    return dict(permuted_qk=True)
