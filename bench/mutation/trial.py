"""
trial, as a mutation run's test command: hypothesis tests keep their
strategies but run at most MUTATION_MAX_EXAMPLES examples (default 50; 0
keeps each test's own count) and skip shrinking, since a mutant only needs
one failing example, not the smallest.  Arguments are trial's.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from hypothesis import Phase, settings


def _cap_examples(cap: int) -> None:
    original = settings.__init__

    def capped(self: settings, parent: settings | None = None, **kwargs: Any) -> None:
        if cap and kwargs.get("max_examples", 0) > cap:
            kwargs["max_examples"] = cap
        original(self, parent, **kwargs)

    settings.__init__ = capped  # type: ignore[method-assign]


def main() -> None:
    cap = int(os.environ.get("MUTATION_MAX_EXAMPLES", "50"))
    settings.register_profile("mutation", deadline=None,
                              phases=[Phase.explicit, Phase.reuse, Phase.generate],
                              max_examples=min(cap, 100) if cap else 100)
    settings.load_profile("mutation")
    _cap_examples(cap)
    from twisted.scripts.trial import run

    sys.argv[0] = "trial"
    run()


if __name__ == "__main__":
    main()
