"""`python -m server serve ...`, the same as the `fenwick` console script."""

from __future__ import annotations

import sys

from server.cli import main

sys.exit(main())
