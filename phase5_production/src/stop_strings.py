"""Stop strings matched as generated text grows, in time linear in the text (Knuth-Morris-Pratt).

matcher = StopMatcher("###")
matcher.feed("abc##", offset=0)   # None: not complete; matcher.state == 2 ("##" may begin it)
matcher.feed("#def", offset=5)    # 3: the stop string starts at character 3 of the whole text
"""

from __future__ import annotations


class StopMatcher:
    """Finds one stop string in text fed piece by piece, in time linear in the text (Knuth-Morris-Pratt).

    `state` is the length of the longest prefix of the stop string that ends the text fed so far: the
    tail to hold back from the stream. Searching the whole text again at every token, and trying every
    prefix of the stop string against its end, would grow with the square of both lengths.
    """

    def __init__(self, stop: str):
        self.stop, self.state = stop, 0
        self.fallback = [0] * len(stop)  # fallback[i]: longest proper border of stop[: i + 1]
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fallback[k - 1]
            k += stop[i] == stop[k]
            self.fallback[i] = k

    def feed(self, text: str, offset: int) -> int | None:
        """Feed `text` (which starts at character `offset` of the whole text); return where the first
        complete stop string in it starts, or None."""
        stop, state = self.stop, self.state
        for i, ch in enumerate(text):
            while state and ch != stop[state]:
                state = self.fallback[state - 1]
            state += ch == stop[state]
            if state == len(stop):
                self.state = state
                return offset + i + 1 - len(stop)
        self.state = state
        return None
