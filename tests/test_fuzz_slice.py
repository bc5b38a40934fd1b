"""
A short, fixed-seed slice of the fuzz targets in C{fuzz/}, for CI.

Without atheris's engine: each target gets its seed corpus
(C{fuzz/corpus/<target>/}), every saved crash reproducer for it
(C{fuzz/crashes/<target>-*}) and C{SLICE_INPUTS} mutations of those drawn
from C{random.Random(1234)} (bit flips, byte edits, insertions of the
target's dictionary tokens, splices, truncations), so every run feeds the
same inputs and a failure names its input.  The real coverage-guided runs are
C{fuzz/run.py}; C{test_atheris_engine} checks that the engine runs where
atheris is installed.

The regression tests at the end (named after what broke) are the defects the
fuzzers found; each is fixed in product code.
"""

from __future__ import annotations

import importlib
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

from twisted.trial import unittest

from fuzz import TARGETS
from popservice import wire
from popservice.server.i18n import localise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = os.path.join(ROOT, "fuzz")
SLICE_INPUTS = int(os.environ.get("POPSERVICE_FUZZ_SLICE", "2000"))
SEED = 1234
MAX_LEN = 1024

_INTERESTING = (b"\x00", b"\xff", b"\r\n", b"\n", b"\r", b".", b"\r\n.\r\n", b" ", b"0", b"9" * 11, b"\x01")


def read_dictionary(target: str) -> list[bytes]:
    """The tokens of C{fuzz/dict/<target>.dict} (libFuzzer's C{name="..."} lines, C{\\xNN} escapes)."""
    path = os.path.join(FUZZ, "dict", target + ".dict")
    if not os.path.exists(path):
        return []
    tokens = []
    with open(path, encoding="ascii") as f:
        for line in f:
            m = re.match(r'\s*\w*\s*=?\s*"(.*)"\s*$', line)
            if m:
                tokens.append(re.sub(rb"\\x([0-9a-fA-F]{2})|\\(.)",
                                     lambda g: bytes([int(g.group(1), 16)]) if g.group(1) else g.group(2),
                                     m.group(1).encode("ascii")))
    return tokens


def _files(directory: str, prefix: str = "") -> list[bytes]:
    if not os.path.isdir(directory):
        return []
    out = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.startswith(prefix) and os.path.isfile(path):
            with open(path, "rb") as f:
                out.append(f.read())
    return out


def corpus(target: str) -> list[bytes]:
    return _files(os.path.join(FUZZ, "corpus", target))


def reproducers(target: str) -> list[bytes]:
    return _files(os.path.join(FUZZ, "crashes"), target + "-")


def mutate(rng: random.Random, data: bytes, pool: list[bytes], tokens: list[bytes]) -> bytes:
    """One to four random edits of C{data}, libFuzzer style."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(9)
        pos = rng.randint(0, len(out))
        if op == 0 and out:
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif op == 1 and out:
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif op == 2:
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and out:
            del out[pos:pos + rng.randint(1, 16)]
        elif op == 4 and out:
            start = rng.randrange(len(out))
            out[pos:pos] = out[start:start + rng.randint(1, 32)]
        elif op == 5 and tokens:
            out[pos:pos] = rng.choice(tokens)
        elif op == 6 and pool:
            other = rng.choice(pool)
            out = out[:pos] + other[rng.randint(0, len(other)):]
        elif op == 7:
            del out[pos:]
        else:
            out[pos:pos] = rng.choice(_INTERESTING) * rng.randint(1, 3)
    return bytes(out[:MAX_LEN])


def slice_inputs(target: str, count: int = SLICE_INPUTS) -> Iterator[bytes]:
    """The corpus, the reproducers, then C{count} mutations (some of mutations), all from one seed."""
    seeds = corpus(target) + reproducers(target)
    yield from seeds
    rng = random.Random(SEED)
    tokens = read_dictionary(target)
    pool = list(seeds) or [b""]
    for i in range(count):
        data = mutate(rng, rng.choice(pool), pool, tokens)
        if i % 8 == 0:
            pool.append(data)
        yield data


def target_function(target: str) -> Callable[[bytes], None]:
    function: Callable[[bytes], None] = importlib.import_module("fuzz." + target).TestOneInput
    return function


class FuzzSlice(unittest.TestCase):
    """Every target on its fixed slice: no exception, no broken invariant."""

    def run_slice(self, target: str) -> None:
        self.assertTrue(corpus(target), "no seed corpus in fuzz/corpus/%s" % (target,))
        test_one_input = target_function(target)
        for n, data in enumerate(slice_inputs(target)):
            try:
                test_one_input(data)
            except Exception as e:
                self.fail("fuzz target %s failed on input #%d %r: %s: %s"
                          % (target, n, data, type(e).__name__, e))

    for _target in TARGETS:
        locals()["test_" + _target] = (lambda t: lambda self: self.run_slice(t))(_target)
    del _target

    def test_slice_is_deterministic(self) -> None:
        self.assertEqual(list(slice_inputs("command", 50)), list(slice_inputs("command", 50)))

    def test_every_target_has_a_dictionary_and_corpus(self) -> None:
        for target in TARGETS:
            self.assertTrue(read_dictionary(target), target)
            self.assertGreaterEqual(len(corpus(target)), 3, target)


class AtherisEngine(unittest.TestCase):
    """The coverage-guided engine itself, briefly, where atheris is installed."""

    def test_atheris_engine(self) -> None:
        try:
            import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]  # noqa: F401
        except ImportError:
            raise unittest.SkipTest(
                "atheris is not installed (pip install atheris: a manylinux wheel for CPython 3.11 on "
                "x86-64, else a build that needs clang with libFuzzer); the fixed slice above still ran")
        start = time.monotonic()
        scratch = os.path.abspath(self.mktemp())
        result = subprocess.run([sys.executable, os.path.join(FUZZ, "run.py"), "line_reader", "--runs", "500",
                                 "--quiet", "--work", os.path.join(scratch, "work"),
                                 "--crashes", os.path.join(scratch, "crashes")],
                                cwd=ROOT, capture_output=True, text=True, timeout=300)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertRegex(result.stdout, r"line_reader\s+500\s")
        self.assertLess(time.monotonic() - start, 120)


# --------------------------------------------------------------------------
# Regressions: what the fuzzers found (each fixed in product code)

_LONG_TEXT = "x" * 505 + "\u00e9"  # the cut at 510 octets falls inside the two octets of the last character


class StatusLineCut(unittest.TestCase):
    """
    Found by the C{response} target (C{fuzz/crashes/response-status-line-cut-mid-utf8}):
    a status text longer than RFC 2449's 512 octets was cut inside a UTF-8
    character, and the German localisation then made the line longer than 512.
    No server text is that long, so clients could not trigger it; fixed in
    wire._status_line (the cut never splits a character).
    """

    def test_status_line_cut_keeps_utf8_whole(self) -> None:
        line = wire.ok(_LONG_TEXT)
        self.assertLessEqual(len(line), wire.MAX_RESPONSE_LINE)
        line[:-2].decode("utf-8")  # was b"...x\xc3": half of U+00E9


    def test_localised_status_line_stays_within_512_octets(self) -> None:
        line = localise(wire.ok(_LONG_TEXT), "de")
        self.assertLessEqual(len(line), wire.MAX_RESPONSE_LINE, line[-8:])  # was 514: U+FFFD for the half


    def test_response_reproducer_with_the_known_defect_checked(self) -> None:
        response = importlib.import_module("fuzz.response")
        self.assertFalse(response.SKIP_KNOWN_DEFECTS)
        for data in reproducers("response"):
            response.TestOneInput(data)

