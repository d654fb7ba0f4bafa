"""English text already on the machine (Debian's license texts), cut into prompts by token count.

Benchmarks only; no download."""

from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")


def english_text() -> str:
    files = [LICENSES / "GPL-3", LICENSES / "Apache-2.0", LICENSES / "GFDL-1.3"]
    files = [f for f in files if f.is_file()] or sorted(p for p in LICENSES.glob("*") if p.is_file())
    if not files:
        raise SystemExit(f"no text found under {LICENSES}")
    return "\n\n".join(f.read_text(errors="replace") for f in files)


def prompt_ids(tokenizer, n_tokens: int) -> list[int]:
    """The first n_tokens tokens of the corpus (repeated if it is shorter)."""
    ids = tokenizer.encode(english_text())
    while len(ids) < n_tokens:
        ids = ids + ids
    return ids[:n_tokens]


PERPLEXITY_FILES = ["GPL-3", "Apache-2.0", "GFDL-1.3", "MPL-2.0", "LGPL-2.1", "GPL-2", "Artistic"]


def perplexity_text() -> str:
    """About 30k tokens of English prose (legal, but prose): Debian's license texts, each once."""
    files = [LICENSES / name for name in PERPLEXITY_FILES if (LICENSES / name).is_file()]
    if not files:
        raise SystemExit(f"no text found under {LICENSES}")
    return "\n\n".join(f.read_text(errors="replace") for f in files)
