"""Token-exact chunking at the compressor's segment length, preferring sentence ends.

Framework-free: the LlamaIndex node parser and the LangChain retriever both
use it, so a chunk means the same thing everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

SENTENCE_ENDS = (".", "!", "?", "\n", "。", "！", "？")


def check_text(text, what: str = "Text") -> str:
    """``text`` itself if it is a str that UTF-8 can encode; else a precise InputError.

    The tokenizer and the content hash both encode the text as UTF-8: bytes, None or a lone surrogate
    (left by decoding with errors='surrogateescape') would fail there with a message that names neither
    the text nor the cause, or be called "empty".
    """
    from .errors import InputError

    if not isinstance(text, str):
        hint = ("decode it first, e.g. data.decode('utf-8')" if isinstance(text, (bytes, bytearray))
                else "drop it, or pass its text")
        raise InputError(f"{what} is a {type(text).__name__}, not a str: {hint}.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(
            f"{what} contains a lone surrogate (U+{ord(text[exc.start]):04X} at character {exc.start}, near "
            f"{text[max(0, exc.start - 20):exc.start]!r}), which is not valid Unicode: it usually comes from "
            f"decoding bytes with errors='surrogateescape'. Decode the source with its real encoding, or replace "
            f"them: text.encode('utf-8', 'replace').decode('utf-8')."
        ) from None
    return text


@dataclass(frozen=True)
class Chunk:
    text: str
    start_char: int
    end_char: int
    n_tokens: int


def chunk_text(text: str, tokenizer, segment_length: int, *, lookback: float = 0.25) -> list[Chunk]:
    """Cut ``text`` into chunks of at most ``segment_length`` tokens.

    A chunk ends at the last sentence end within the final ``lookback`` share
    of its window when there is one, else at the token limit. Chunks cover the
    text without gaps or overlap (whitespace at the edges is kept with the chunk).
    """
    if not check_text(text).strip():
        return []
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    n = len(offsets)
    chunks: list[Chunk] = []
    start_tok = 0
    while start_tok < n:
        end_tok = min(start_tok + segment_length, n)
        if end_tok < n:
            floor = start_tok + max(1, int(segment_length * (1 - lookback)))
            for cut in range(end_tok, floor, -1):
                piece = text[offsets[cut - 1][0] : offsets[cut - 1][1]]
                if piece.rstrip(" ").endswith(SENTENCE_ENDS):
                    end_tok = cut
                    break
        start_char = offsets[start_tok][0] if start_tok else 0
        end_char = offsets[end_tok][0] if end_tok < n else len(text)
        piece_text = text[start_char:end_char]
        # Re-tokenising a piece can merge tokens differently at its edges: shrink until it fits.
        n_tokens = len(tokenizer(piece_text, add_special_tokens=False)["input_ids"])
        while n_tokens > segment_length and end_tok - start_tok > 1:
            end_tok -= 1
            end_char = offsets[end_tok][0]
            piece_text = text[start_char:end_char]
            n_tokens = len(tokenizer(piece_text, add_special_tokens=False)["input_ids"])
        if piece_text.strip():
            chunks.append(Chunk(piece_text, start_char, end_char, n_tokens))
        elif chunks:  # whitespace-only tail: keep it with the previous chunk's span
            last = chunks[-1]
            chunks[-1] = Chunk(last.text, last.start_char, end_char, last.n_tokens)
        start_tok = end_tok
    return chunks
