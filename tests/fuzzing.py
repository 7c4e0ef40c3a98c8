"""Shared pieces of the property-based tests: Hypothesis settings and hostile strategies."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# 5,000 digits: more than Python's int() converts by default (4,300), so any parser that
# calls int() on a client's digits without a length check raises ValueError (issue 10).
HUGE = "9" * 5000

# No example database: tests write nothing into the checkout, and what fuzzing finds is
# kept on purpose, as @example cases and in tests/corpus/. No deadline: the machine is
# shared, and a slow example is not a wrong one.
PARSERS = settings(max_examples=300, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow])
# Against a real server every example is an HTTP round trip: fewer of them, and fewer
# still per Schemathesis operation (about 40 of them), so tests/test_fuzz_api.py stays
# well under a minute on two shared cores.
SERVER = settings(max_examples=100, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow,
                                         HealthCheck.function_scoped_fixture])
OPERATION = settings(SERVER, max_examples=25)

# Characters that break naive parsers: separators of the grammars, quotes, escapes,
# controls, non-ASCII digits and spaces, right-to-left marks, astral characters.
NASTY = [",", ".", "(", ")", '"', "'", "\\", "*", "%", "&", "=", ";", ":", "/", " ", "\t",
         "\r", "\n", "\x00", "\x7f", "\u00a0", "\u00b2", "\u0661", "\u2028", "\u202e",
         "\ufeff", "\U0001f600", "\u00e9", "e\u0301", "-", "+", "e", "E", "_", "0", "9"]


def hostile_text(max_size: int = 30) -> st.SearchStrategy[str]:
    """Short text biased towards characters that matter to the parsers."""
    return st.one_of(
        st.text(max_size=max_size),
        st.lists(st.sampled_from(NASTY), max_size=max_size).map("".join),
        st.text(alphabet=st.characters(codec="ascii"), max_size=max_size),
    )


def huge_numbers() -> st.SearchStrategy[str]:
    """Numbers as text, from ordinary to far beyond 64 bits, signs and exponents included."""
    return st.one_of(
        st.integers(min_value=-(2**64), max_value=2**64).map(str),
        st.integers(min_value=19, max_value=6000).map(lambda n: "9" * n),
        st.sampled_from(["1e999999", "-1e-999999", "NaN", "Infinity", "-0", "0x10", "1_000",
                         "\u00b2", "\u0661\u0662", " 1", "1 ", "+1", "00000000000000000001",
                         "9223372036854775807", "9223372036854775808", "1.5", "1e3"]),
    )


# Pieces of a query string as they travel, percent-encoded: controls, NUL, C1 controls and
# line separators in UTF-8, bytes that are not UTF-8 (a lone continuation, an over-long
# '.', a surrogate, a sequence cut short, beyond U+10FFFF), double encoding, '%' without
# hex digits, and the separators.
ODD_ENCODINGS = ["%00", "%01", "%09", "%0a", "%0D", "%1b", "%1B[31m", "%7f", "%c2%9b",
                 "%C2%85", "%e2%80%a8", "%E2%80%AE", "%ef%bb%bf", "%ff", "%80", "%c0%ae",
                 "%ed%a0%80", "%e2%82", "%f4%90%80%80", "%2500", "%", "%zz", "%7E", "%7e",
                 "+", "%20", "%26", "%3D", "=", "&", "~", "@operator", "%40operator"]
_PLAIN = st.text(alphabet=st.sampled_from("abcAZ09._-"), max_size=4)


def odd_encoded(max_size: int = 12) -> st.SearchStrategy[str]:
    """Text as it appears in a raw query string, biased towards odd encodings; now and then
    far longer than any name."""
    return st.one_of(
        st.lists(st.one_of(st.sampled_from(ODD_ENCODINGS), _PLAIN), max_size=max_size)
        .map("".join),
        st.integers(60, 5000).map(lambda n: "x" * n),
    )


def spellings(name: str) -> st.SearchStrategy[str]:
    """`name` with any of its characters percent-encoded, in either case of hex digit."""
    def spell(flags: list[int]) -> str:
        return "".join(c if f == 0 else (f"%{ord(c):02X}" if f == 1 else f"%{ord(c):02x}")
                       for c, f in zip(name, flags, strict=True))
    return st.lists(st.sampled_from([0, 0, 1, 2]), min_size=len(name),
                    max_size=len(name)).map(spell)
