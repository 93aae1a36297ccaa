"""Token ids → text as it is produced, one row at a time, with stop strings.

`tokenizers`' `DecodeStream` holds back a token that ends inside a multi-byte UTF-8 character (byte-level
BPE splits characters across tokens) and emits the character once complete. On top of it, `TextStream` holds
back any tail of the text that could still grow into a stop string, so that a stop string is never shown, and
cuts the text where the first stop string begins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers.decoders import DecodeStream

# Prompt tokens handed to the decoder as context: enough for a character split across the prompt boundary
# (≤ 4 bytes) and for decoders whose output depends on the previous token (a leading-space rule).
_CONTEXT_TOKENS = 8


class TextStream:
    """Incremental text of one generated row.

    `push(token_id)` returns the text that became final with this token ('' when none did); `finish()`
    returns what was still held back. `stopped` turns True once a stop string appears; `text` is then the
    text before it. Special tokens (EOS, pad) are not shown.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), prompt_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._decoder = DecodeStream(list(prompt_ids[-_CONTEXT_TOKENS:]), skip_special_tokens=True)
        self._stop = [s for s in stop if s]
        self._text = ""  # all text decoded so far (cut at a stop string once one is found)
        self._emitted = 0  # characters of `_text` already returned
        self.stopped = False

    @property
    def text(self) -> str:
        return self._text

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        piece = self._decoder.step(self._tokenizer, token_id)
        if not piece:
            return ""
        start = len(self._text)
        self._text += piece
        self._cut_at_stop(start)
        end = len(self._text) if self.stopped else len(self._text) - self._held_back()
        return self._emit(end)

    def finish(self) -> str:
        return self._emit(len(self._text))

    def _emit(self, end: int) -> str:
        out = self._text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return out

    def _cut_at_stop(self, new_from: int) -> None:
        # a stop string can straddle the old text and the new piece: search from len(stop) - 1 back
        hits = [i for s in self._stop if (i := self._text.find(s, max(new_from - len(s) + 1, 0))) >= 0]
        if hits:
            self._text = self._text[: min(hits)]
            self.stopped = True

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._text)), longest, -1):
                if self._text.endswith(s[:n]):
                    longest = n
                    break
        return longest
