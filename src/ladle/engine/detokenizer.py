"""Incremental detokenization with stop strings.

Text grows one token at a time. A character split over several tokens (UTF-8 bytes of an emoji
or a CJK character) is emitted only once whole. Stop strings are matched on the text, so they are
found even when they span token boundaries; the text handed out never includes a stop string
(unless asked) and never shows the start of one that might still complete: that tail is held back
until it either completes a stop string or stops being a possible start of one.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from ladle.sample.params import SamplingParams


class IncrementalDetokenizer:
    def __init__(self, backend, params: SamplingParams):
        self.backend = backend  # tokenizers.Tokenizer
        self.stream = DecodeStream(skip_special_tokens=params.skip_special_tokens)
        self.stops = params.stop
        self.include_stop = params.include_stop_str_in_output
        self.max_stop_len = max((len(s) for s in self.stops), default=0)
        self.text = ""  # all text decoded so far (stop string cut off once matched)
        self.num_emitted = 0  # characters of `text` already handed out
        self.stop_reason: str | None = None  # the stop string that matched

    def add_token(self, token_id: int, check_stops: bool = True) -> bool:
        """Decode one more token. Returns True when a stop string completed."""
        piece = self.stream.step(self.backend, token_id)
        if not piece:
            return False
        start = len(self.text)
        self.text += piece
        if check_stops and self.stops:
            return self._find_stop(start)
        return False

    def _find_stop(self, new_text_start: int) -> bool:
        # a stop string that completes now starts at most max_stop_len - 1 characters before the new text
        search_from = max(0, new_text_start - self.max_stop_len + 1)
        best = None
        for stop in self.stops:
            at = self.text.find(stop, search_from)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return False
        at, stop = best
        self.text = self.text[: at + len(stop)] if self.include_stop else self.text[:at]
        self.stop_reason = stop
        return True

    def take_delta(self, finished: bool) -> str:
        """Text not handed out yet. While running, a tail that could begin a stop string waits."""
        end = len(self.text)
        if not finished and self.stops:
            end -= self._held_back()
        end = max(end, self.num_emitted)
        delta = self.text[self.num_emitted : end]
        self.num_emitted = end
        return delta

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        tail = self.text[-(self.max_stop_len - 1) :] if self.max_stop_len > 1 else ""
        for length in range(len(tail), 0, -1):
            suffix = tail[-length:]
            if any(stop.startswith(suffix) for stop in self.stops):
                return length
        return 0
