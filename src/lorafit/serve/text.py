"""Generated tokens to text as it streams: only text that is final goes out — never half of a
UTF-8 character, never the start of what may still become a stop string — and a stop string ends
the answer before it."""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.tokens: list[int] = []
        self.text = ""  # all text decoded so far (up to a stop string once one is met)
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False  # a stop string was met

    def add(self, token: int) -> str:
        """Feed one generated token; returns the text that became final."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        for stop in self.stops:
            at = text.find(stop, max(0, self.sent - len(stop)))
            if at != -1 and (not self.stopped or at < len(self.text)):
                self.text, self.stopped = text[:at], True
        if self.stopped:
            return self._release(len(self.text))
        self.text = text
        if text.endswith("\ufffd"):  # a character whose bytes have not all come yet
            return ""
        return self._release(len(text) - self._held_back(text))

    def finish(self) -> str:
        """The answer ended: whatever was held back is final now."""
        return self._release(len(self.text))

    def _held_back(self, text: str) -> int:
        """Characters at the end of `text` that begin some stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _release(self, upto: int) -> str:
        upto = max(upto, self.sent)
        delta = self.text[self.sent : upto]
        self.sent = upto
        return delta
