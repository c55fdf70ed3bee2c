"""StopMatcher (Knuth-Morris-Pratt) agrees with the plain definition on random text fed in random pieces."""

import random

from phase5_production.src.stop_strings import StopMatcher


def _naive(text: str, stop: str) -> tuple[int | None, int]:
    """Where `stop` first occurs in `text` (or None), and the longest prefix of `stop` ending `text`."""
    found = text.find(stop)
    hold = max((k for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
    return (None if found == -1 else found), hold


def test_matches_the_plain_definition_on_random_text():
    rng = random.Random(0)
    for _ in range(5000):
        stop = "".join(rng.choice("ab") for _ in range(rng.randint(1, 9)))  # "aabaaab": nested borders
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 40)))
        matcher, fed, found = StopMatcher(stop), 0, None
        while fed < len(text) and found is None:  # feed in pieces of 1-4 characters, like tokens
            piece = text[fed : fed + rng.randint(1, 4)]
            found = matcher.feed(piece, fed)
            fed += len(piece)
        expected, hold = _naive(text[:fed], stop)
        assert found == expected, (stop, text[:fed])
        if found is None:
            assert matcher.state == hold, (stop, text[:fed])
