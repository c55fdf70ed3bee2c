"""Text streaming: the pieces a request's tokens are released as are whole characters, never past a stop
string, and together they are exactly the generated text."""

from phase5_production.src.text_streaming import TextAssembler


class _Bytes:
    """A served model stand-in whose tokens are UTF-8 bytes: an incomplete character decodes as U+FFFD,
    as a byte-level BPE's does."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_a_character_split_over_tokens_is_released_whole():
    text = "né 日本 ok"
    assembler = TextAssembler(_Bytes())
    pieces = [assembler.add(byte) for byte in text.encode("utf-8")]
    assert "".join(pieces) + assembler.flush() == text
    assert all("\ufffd" not in piece for piece in pieces)  # never half a character
    assert pieces[1:3] == ["", "é"] and pieces[4:7] == ["", "", "日"]  # held until its last byte


def test_a_stop_string_ends_the_text_and_its_start_is_held_back_until_it_fails():
    assembler = TextAssembler(_Bytes(), ("END",))
    pieces = [assembler.add(byte) for byte in b"abEN"]
    assert pieces == ["a", "b", "", ""]  # "E", "EN" may begin the stop string
    assert assembler.add(ord("d")) == "ENd"  # it did not: released at once
    pieces = [assembler.add(byte) for byte in b"xEND more"]
    assert "".join(pieces) == "x" and assembler.stopped and assembler.text == "abENdx"
    assert assembler.flush() == ""
