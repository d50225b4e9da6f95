"""Token ids to text as they stream, and stop strings that never leak into the output."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decoding each token alone breaks multi-byte characters and word-boundary spaces, and decoding
    everything each time is quadratic. Like other servers we decode a small window: the text of
    ``ids[prefix:]`` minus the text of ``ids[prefix:read]``, holding back a delta while it ends in
    an incomplete UTF-8 character.

    Special tokens are left out of the text, unless ``hidden`` is given: then only those ids are
    (the others, such as the tokens that mark a tool call, are part of the text a parser reads).
    """

    def __init__(self, tokenizer, hidden: frozenset[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.hidden = hidden
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def add(self, token: int) -> str:
        if self.hidden is not None and token in self.hidden:
            return ""
        self.ids.append(token)
        decode, skip = self.tokenizer.decode, self.hidden is None
        before = decode(self.ids[self.prefix:self.read], skip_special_tokens=skip)
        after = decode(self.ids[self.prefix:], skip_special_tokens=skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""


class StopMatcher:
    """Finds stop strings in streamed text; text that might begin a stop string is held back."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return the text that is safe to emit now, and whether a stop string was reached."""
        if not self.stops:
            return delta, False
        self.pending += delta
        hits = [(at, stop) for stop in self.stops if (at := self.pending.find(stop)) >= 0]
        if hits:
            at, self.matched = min(hits)
            out, self.pending = self.pending[:at], ""
            return out, True
        hold = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(stop[:size]):
                    hold = size
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TokenText:
    """The UTF-8 bytes and text of single tokens, for logprobs.

    Decoding one token alone loses what it really holds when it is part of a multi-byte character
    (it decodes to U+FFFD). Byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM) spell every
    byte as one character, and SentencePiece models spell stray bytes as ``<0xNN>``: both map back
    to the exact bytes. Other tokenizers fall back to decoding the token alone.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.byte_of_char: dict[str, int] | None = None
        if type(getattr(backend, "decoder", None)).__name__ == "ByteLevel":
            from transformers.convert_slow_tokenizer import bytes_to_unicode

            self.byte_of_char = {char: byte for byte, char in bytes_to_unicode().items()}
        self._cache: dict[int, bytes] = {}

    def bytes_of(self, token: int) -> bytes:
        cached = self._cache.get(token)
        if cached is None:
            cached = self._cache[token] = self._bytes(token)
        return cached

    def text_of(self, token: int) -> str:
        return self.bytes_of(token).decode("utf-8", "replace")

    def _bytes(self, token: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if isinstance(piece, str):
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                try:
                    return bytes([int(piece[3:5], 16)])
                except ValueError:
                    pass
            table = self.byte_of_char
            if table is not None and all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        return self.tokenizer.decode([token]).encode("utf-8")
