"""A SentencePiece-style (`llama`) vocabulary from GGUF metadata: merges by score, byte fallback."""

import numpy as np
from gguf import GGUFWriter

from selfattn.model import StreamDecoder, Tokenizer
from selfattn.model.gguf_file import open_gguf


def write_spm_vocab(path):
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    words = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "he", "ll", "▁he", "▁hel", "▁hell",
             "▁hello", "▁w", "or", "▁wor", "▁worl", "▁world", "lo"]
    pieces += words
    scores = [0.0] * 259 + [-float(i) for i in range(len(words))]
    scores[-len(words):] = [-10.0 - len(w) if len(w) == 1 else float(len(w)) for w in words]
    types = [2, 3, 3] + [6] * 256 + [1] * len(words)
    g = GGUFWriter(str(path), "llama")
    g.add_tokenizer_model("llama")
    g.add_token_list(pieces)
    g.add_token_scores(scores)
    g.add_token_types(types)
    g.add_bos_token_id(1)
    g.add_eos_token_id(2)
    g.add_unk_token_id(0)
    g.add_add_bos_token(True)
    g.add_tensor("dummy", np.zeros(4, np.float32))
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()
    return pieces


def test_spm_tokenizer(tmp_path):
    path = tmp_path / "spm.gguf"
    pieces = write_spm_vocab(path)
    tok = Tokenizer.from_gguf(open_gguf(path), path)
    ids = tok.encode("hello world")
    assert ids == [1, pieces.index("▁hello"), pieces.index("▁world")]  # bos, two whole words
    for text in ["hello world", "héllo wörld 東京", "  spaced  out ", "hello\nworld"]:
        assert tok.decode(tok.encode(text, add_bos=False)) == text
    # a character outside the vocabulary falls back to its UTF-8 bytes
    assert tok.encode("東", add_bos=False)[1:] == [3 + b for b in "東".encode()]


def test_spm_stream_decoder(tmp_path):
    """Token by token over a byte-fallback vocabulary: the pieces join to the whole decode
    (the first word's leading space dropped once, a character's bytes held back until whole)."""
    path = tmp_path / "spm.gguf"
    write_spm_vocab(path)
    tok = Tokenizer.from_gguf(open_gguf(path), path)
    for text in ["hello world", "héllo wörld 東京", "  spaced  out ", "hello\nworld"]:
        ids = tok.encode(text)
        stream = StreamDecoder(tok)
        assert "".join(stream.push(i) for i in ids) == tok.decode(ids, skip_special=True) == text
