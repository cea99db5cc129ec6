"""`python -m fenwick_llm.server serve ...`, the same as the `fenwick` console script."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
