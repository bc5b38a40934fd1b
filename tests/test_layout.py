"""
The walls of the package (``[tool.importlinter]`` in pyproject.toml), checked
with import-linter: no import cycles at any depth, a pure wire core, stores,
auth and SASL below the protocols, server and client apart, interfaces
without implementation, and no mailbox reachable from the login code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINT_IMPORTS = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def lint(cwd: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=cwd)
    return subprocess.run([LINT_IMPORTS, "--no-cache", "pyproject.toml"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


class Walls(unittest.TestCase):
    skip = (None if os.path.exists(LINT_IMPORTS)
            else "import-linter is not installed (pip install -e '.[test]')")

    def test_contracts_kept(self) -> None:
        result = lint(ROOT)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("9 kept, 0 broken", result.stdout)

    def copy(self) -> str:
        work = tempfile.mkdtemp(prefix="popservice-layout-")
        self.addCleanup(shutil.rmtree, work, True)
        shutil.copytree(os.path.join(ROOT, "popservice"), os.path.join(work, "popservice"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(os.path.join(ROOT, "pyproject.toml"), work)
        return work

    def add_import(self, work: str, module: str, line: str) -> None:
        with open(os.path.join(work, *module.split(".")) + ".py", "a") as f:
            f.write("\n" + line + "\n")

    def test_a_forbidden_import_breaks_the_wall(self) -> None:
        """The check can fail: the login code importing the session code is refused."""
        work = self.copy()
        self.add_import(work, "popservice.server.login", "import popservice.server.transaction  # noqa")
        result = lint(work)
        self.assertNotEqual(result.returncode, 0, result.stdout)
        self.assertIn("popservice.server.login is not allowed to import popservice.server.transaction",
                      result.stdout)

    def test_a_cycle_breaks_the_wall(self) -> None:
        work = self.copy()
        self.add_import(work, "popservice.states", "import popservice.wire  # noqa")
        result = lint(work)
        self.assertNotEqual(result.returncode, 0, result.stdout)
        self.assertIn("No cycles are allowed in popservice", result.stdout)

    def test_server_importing_the_client_breaks_the_wall(self) -> None:
        work = self.copy()
        self.add_import(work, "popservice.server.capa", "import popservice.client.url  # noqa")
        result = lint(work)
        self.assertNotEqual(result.returncode, 0, result.stdout)
        self.assertIn("popservice.server is not allowed to import popservice.client", result.stdout)
