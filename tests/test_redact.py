"""The output masker: secrets and patterns masked however the output is cut into reads."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from remoterun.redact import LINE_HOLD_BYTES, LINE_HOLD_S, Redactor

ALPHABET = "ab-\n s3"  # few letters: secrets overlap, repeat and straddle reads often


def run(masker, chunks, stream="stdout"):
    """Feed the chunks to the masker, then flush it; the bytes it let out, joined."""
    out = [masker.feed(stream, chunk) for chunk in chunks]
    out += [data for _, data in masker.flush()]
    return b"".join(out)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """`data` split at the given offsets."""
    bounds = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@settings(max_examples=300, deadline=None)
@given(secrets=st.lists(st.text(ALPHABET, min_size=4, max_size=9), min_size=1, max_size=3),
       parts=st.lists(st.text(ALPHABET, max_size=12), max_size=8),
       points=st.lists(st.integers(0, 400), max_size=10), use=st.data())
def test_no_secret_survives_any_cut(secrets, parts, points, use):
    """Whatever the reads' boundaries, no secret value is in what the masker lets out, and the
    result is the same as masking the whole output at once."""
    text = "".join(p + use.draw(st.sampled_from(["", *secrets])) for p in parts).encode()
    redactor = Redactor()
    whole = run(redactor.masker(secrets), [text])
    chunked = run(redactor.masker(secrets), cut(text, points))
    assert chunked == whole
    for secret in secrets:
        assert secret.encode() not in whole.replace(b"***", b"\0")


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(st.sampled_from(["tok=AKIA0123456789ABCDEF", "x", "\n", " ", "y z"]),
                      max_size=20),
       points=st.lists(st.integers(0, 400), max_size=10))
def test_patterns_within_lines_survive_any_cut(parts, points):
    """A pattern inside a line is masked whatever the reads' boundaries (no time passes)."""
    text = "".join(parts).encode()
    redactor = Redactor(["AKIA[0-9A-Z]{16}"])
    chunked = run(redactor.masker([]), cut(text, points))
    assert b"AKIA" not in chunked
    assert chunked == run(redactor.masker([]), [text])


def test_streams_are_masked_apart():
    """A secret's halves on two different streams are two streams' bytes, each held apart."""
    masker = Redactor().masker(["s3cret-value"])
    assert masker.feed("stdout", b"a s3cr") == b"a "
    assert masker.feed("stderr", b"b s3cr") == b"b "
    assert masker.feed("stdout", b"et-value\n") == b"***\n"
    assert masker.flush() == [("stderr", b"s3cr")]


def test_nothing_to_mask_is_no_masker():
    """No secret long enough and no pattern: no Masker, so the output path is unchanged."""
    assert Redactor().masker(["abc", ""]) is None
    assert Redactor(["x+"]).masker([]) is not None


def test_an_incomplete_line_is_released_after_its_hold():
    """An incomplete line waits for its end at most LINE_HOLD_S, then goes as it stands (masked);
    a line longer than LINE_HOLD_BYTES is not held."""
    masker = Redactor(["k=[0-9]+"]).masker([])
    assert masker.feed("pty", b"done\nk=12 prompt> ") == b"done\n"
    assert masker.holding_lines
    assert masker.release_lines(now=0.0) == []  # it began waiting just now (monotonic time)
    delay = masker.next_release(now=0.0)
    assert delay is not None
    later = LINE_HOLD_S + 1e9  # far in the future of any monotonic clock
    assert masker.release_lines(now=later) == [("pty", b"*** prompt> ")]
    assert not masker.holding_lines
    long = b"k=1 " + b"x" * LINE_HOLD_BYTES
    assert masker.feed("pty", long) == b"*** " + b"x" * LINE_HOLD_BYTES
