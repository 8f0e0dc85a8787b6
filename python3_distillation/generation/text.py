"""Token ids → text that is safe to hand out: whole UTF-8 characters, stop strings cut and never leaked.

    python -c "import python3_distillation.generation.text as t; r = t.RowText(['bc']); print(r.add(b'ab'), r.finish())"

How: docs/design/generation.md.
"""

from __future__ import annotations

import codecs

from transformers.convert_slow_tokenizer import bytes_to_unicode


def token_byte_table(tokenizer, size: int) -> list[bytes]:
    """UTF-8 bytes of every token id, so text can be assembled token by token without half characters.

    Exact for byte-level BPE (GPT-2); for other tokenizers an approximation from decoding each id alone.
    """
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    n = min(size, len(tokenizer))
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    table = [b"" if piece is None else piece.encode("utf-8") if piece in special
             else bytes(byte_of[c] for c in piece) if all(c in byte_of for c in piece)
             else tokenizer.decode([i]).encode("utf-8") for i, piece in enumerate(pieces)]
    # Ids past the tokenizer (a model whose vocab was padded) have no text.
    return table + [b""] * (size - n)


class RowText:
    """Text of one row: token bytes → whole characters → stop-string cut → the part safe to hand out."""

    def __init__(self, stop: list[str]):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = stop
        self.longest_stop = max((len(s) for s in stop), default=0)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, data: bytes) -> str:
        """Feed one token's bytes; returns the newly safe text (maybe empty)."""
        return self._settle(self.decoder.decode(data))

    def finish(self) -> str:
        """The row ended: flush a dangling partial character (as U+FFFD, like ``decode``) and release held text."""
        return self._settle(self.decoder.decode(b"", final=True)) + self._emit(len(self.text))  # "" once stopped

    def _settle(self, new: str) -> str:
        if self.stopped:
            return ""
        old = len(self.text)
        self.text += new
        # A stop string first completed by this piece starts no earlier than this.
        start = max(0, old - self.longest_stop + 1)
        hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
            return self._emit(len(self.text))
        # Hold back the longest tail of the unsent text that is a proper prefix of a stop string. Only unsent
        # text can be held: the work per token is bounded by the stops' length (MAX_STOP_CHARS each).
        pending, hold = len(self.text) - self.emitted, 0
        for s in self.stop:
            hold = next((k for k in range(min(len(s) - 1, pending), hold, -1) if self.text.endswith(s[:k])), hold)
        return self._emit(len(self.text) - hold)

    def _emit(self, upto: int) -> str:
        out = self.text[self.emitted:upto]  # "" when nothing new is safe
        self.emitted = max(self.emitted, upto)
        return out
