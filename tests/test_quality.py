"""`mypy --strict popservice` and `ruff check` are part of the test suite."""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


class Quality(unittest.TestCase):
    def test_mypy_strict(self) -> None:
        result = run("mypy", "--strict", "popservice")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_ruff(self) -> None:
        result = run("ruff", "check", "popservice", "tests", "twisted", "bench")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_no_init_in_twisted_plugins(self) -> None:
        self.assertFalse(os.path.exists(os.path.join(ROOT, "twisted", "plugins", "__init__.py")))
        self.assertFalse(os.path.exists(os.path.join(ROOT, "twisted", "__init__.py")))

    def test_wire_and_states_import_no_twisted(self) -> None:
        code = ("import sys; import popservice.wire, popservice.states; "
                "bad = [m for m in sys.modules if m.startswith('twisted') or m.startswith('zope')]; "
                "print(bad); sys.exit(1 if bad else 0)")
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
