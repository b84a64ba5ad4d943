"""Incremental detokenization: the engine's text output and its stop strings.

Decoding token by token breaks characters that span several byte-level tokens
(emoji, CJK) and drops leading spaces of SentencePiece pieces. ``Detokenizer``
keeps two offsets into the token list (the vLLM scheme): it decodes a short
window ``ids[prefix:]`` and emits only the text beyond ``ids[prefix:read]``,
and holds everything back while the window ends in an incomplete character
(U+FFFD). With stop strings, the last ``max(len(stop)) - 1`` characters are
also held back, since they may be the start of a stop string; the text is cut
before the first stop string found. The engine owns one per request
(``Sequence.detok``) and ends the request at the token that completes a stop
string, so text and stop strings are handled in one place.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"


class Detokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int] | None = None, stop: list[str] | None = None,
                 context: int = 5):
        self.tokenizer = tokenizer
        # A few prompt tokens give the first output token its left context (spaces, merges).
        self.ids: list[int] = list(prompt_ids[-context:]) if prompt_ids else []
        self.prefix = 0
        self.read = len(self.ids)
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # all decoded text so far (possibly ending in held-back characters)
        self.sent = 0  # characters of self.text already emitted
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_ids: list[int]) -> str:
        """Feed new tokens; returns the text that is now safe to emit (maybe '')."""
        if self.stopped:
            return ""
        self.ids.extend(token_ids)
        before = self._decode(self.ids[self.prefix:self.read])
        window = self._decode(self.ids[self.prefix:])
        if len(window) > len(before) and not window.endswith(REPLACEMENT):
            self.text += window[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return self._emit(final=False)

    def _emit(self, final: bool) -> str:
        if self.stop:
            # Search from just before the unsent text, so a stop string split across chunks is found.
            start = max(0, self.sent - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[:min(hits)], True
                final = True
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:end], end
        return out

    @property
    def emitted(self) -> str:
        """All text emitted so far."""
        return self.text[:self.sent]

    def finish(self) -> str:
        """The remaining text when the request ends (held-back characters, a trailing partial character)."""
        if not self.stopped:
            tail = self._decode(self.ids[self.prefix:])
            before = self._decode(self.ids[self.prefix:self.read])
            if len(tail) > len(before):
                self.text += tail[len(before):]
                self.prefix = self.read = len(self.ids)
        return self._emit(final=True)
