"""The tokenizer a GGUF file carries, built with `tokenizers` (no hub, no network).

- `gpt2` vocabularies (byte-level BPE): vocab + merges from the file, the pre-tokenizer chosen by
  `tokenizer.ggml.pre` with the same regexes llama.cpp uses for that name.
- `llama` vocabularies (SentencePiece): pieces and scores from the file, as a BPE with byte
  fallback whose merges are ranked by the merged piece's score (how transformers converts
  SentencePiece models), "▁" for spaces.
Control and user-defined tokens are special: they are matched whole in the text. The chat
template from the metadata is rendered in jinja2's sandbox, with bounds (model/template.py).
Token ids from the metadata are checked against the vocabulary, and anything the tokenizers
library refuses is one ModelError naming the file.
"""

import logging

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from ..errors import ModelError
from .gguf_file import field

log = logging.getLogger(__name__)

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), by tokenizer.ggml.pre
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
           r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
          r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(pre: str):
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("gpt2", "default", "gpt-2"):
        return gpt2
    if pre == "smollm":  # digits one by one, then GPT-2's regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    regex = {"llama-bpe": _LLAMA3, "llama3": _LLAMA3, "qwen2": _QWEN2}.get(pre)
    if regex is None:
        return None
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


MAX_MERGED_PIECE = 1024  # characters; real vocabularies' longest pieces are ~100


def _spm_merges(pieces, scores):
    """Merges for a SentencePiece vocabulary, best-scoring merged piece first. A piece longer
    than MAX_MERGED_PIECE is not split (each cut copies the piece: a hostile file's one huge
    piece would cost its length squared)."""
    index = {p: i for i, p in enumerate(pieces)}
    merges = []
    for piece, score in zip(pieces, scores):
        if len(piece) > MAX_MERGED_PIECE:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in index and right in index:
                merges.append((score, index[left], index[right], left, right))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    return [(m[3], m[4]) for m in merges]


def _token_id(reader, path, key, n_pieces, default=None):
    """tokenizer.ggml.<key> as a token id of the vocabulary, or ModelError naming the key."""
    value = field(reader, f"tokenizer.ggml.{key}", default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_pieces:
        raise ModelError(f"{path}: tokenizer.ggml.{key} = {value!r} is not a token id of its "
                         f"{n_pieces:,}-entry vocabulary")
    return value


class Tokenizer:
    def __init__(self, tok: HFTokenizer, bos_id, eos_id, add_bos, chat_template, pieces,
                 path=None):
        self.tok, self.bos_id, self.eos_id, self.add_bos = tok, bos_id, eos_id, add_bos
        self.chat_template = chat_template
        self.pieces = pieces  # token id -> the string the file stores
        self.path = path

    @classmethod
    def from_gguf(cls, reader, path) -> "Tokenizer":
        try:
            return cls._from_gguf(reader, path)
        except ModelError:
            raise
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises bare Exceptions
            raise ModelError(f"{path}: the tokenizer cannot be built from the file: "
                             f"{' '.join(str(e).split()) or type(e).__name__}") from e

    @classmethod
    def _from_gguf(cls, reader, path) -> "Tokenizer":
        kind = field(reader, "tokenizer.ggml.model", None)
        pieces = field(reader, "tokenizer.ggml.tokens", None)
        if kind is None or pieces is None:
            raise ModelError(f"{path}: the file carries no tokenizer (tokenizer.ggml.*)")
        pieces = [str(p) for p in pieces]
        types = list(field(reader, "tokenizer.ggml.token_type", [1] * len(pieces)))
        if kind == "gpt2":
            pre = str(field(reader, "tokenizer.ggml.pre", "default"))
            pre_tok = _byte_level(pre)
            if pre_tok is None:
                raise ModelError(f"{path}: pre-tokenizer {pre!r} is not supported "
                                 "(gpt2, default, smollm, llama-bpe, qwen2)")
            merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
            tok = HFTokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)},
                                        merges=merges, ignore_merges=pre in ("llama-bpe",
                                                                             "llama3")))
            tok.pre_tokenizer = pre_tok
            tok.decoder = decoders.ByteLevel()
        elif kind == "llama":
            scores = list(field(reader, "tokenizer.ggml.scores", [0.0] * len(pieces)))
            unk = _token_id(reader, path, "unknown_token_id", len(pieces), 0)
            tok = HFTokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)},
                                        merges=_spm_merges(pieces, scores),
                                        unk_token=pieces[unk], byte_fallback=True,
                                        fuse_unk=True))
            steps = [normalizers.Replace(" ", "▁")]
            if field(reader, "tokenizer.ggml.add_space_prefix", True):
                steps.insert(0, normalizers.Prepend("▁"))
            tok.normalizer = normalizers.Sequence(steps)
            tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                             decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        else:
            raise ModelError(f"{path}: tokenizer model {kind!r} is not supported (gpt2, llama)")
        # control (3) and user-defined (4) tokens are matched whole, never split
        special = [AddedToken(p, special=True, normalized=False)
                   for p, t in zip(pieces, types) if t in (3, 4) and p]
        tok.add_special_tokens(special)
        bos = _token_id(reader, path, "bos_token_id", len(pieces))
        eos = _token_id(reader, path, "eos_token_id", len(pieces))
        add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", kind == "llama"))
        template = field(reader, "tokenizer.chat_template", None)
        return cls(tok, bos, eos, add_bos, None if template is None else str(template), pieces,
                   path)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            if not ids or ids[0] != self.bos_id:
                ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_texts(self, ids) -> list[str]:
        """Each token's own text (special tokens included; a token holding part of a multi-byte
        character shows U+FFFD)."""
        return [self.tok.decode([int(i)], skip_special_tokens=False) for i in ids]

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """messages through the file's chat template (model/template.py: sandboxed, bounded)."""
        from .template import render

        if not self.chat_template:
            raise ModelError(f"{self.path}: the file has no chat template "
                             "(tokenizer.chat_template)")
        piece = lambda i: self.pieces[i] if i is not None else ""  # noqa: E731
        return render(self.chat_template, self.path, messages=messages,
                      add_generation_prompt=add_generation_prompt, bos_token=piece(self.bos_id),
                      eos_token=piece(self.eos_id))


class StreamDecoder:
    """Turns token ids, one at a time, into text pieces, holding back an incomplete UTF-8
    character: tokenizers' DecodeStream, which decodes only the last few ids each step (decoding
    every id so far each step made the n-th token of an answer cost O(n))."""

    def __init__(self, tokenizer: Tokenizer):
        from tokenizers.decoders import DecodeStream

        self.tokenizer = tokenizer
        self.stream = DecodeStream(skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        return self.stream.step(self.tokenizer.tok, int(token_id)) or ""
