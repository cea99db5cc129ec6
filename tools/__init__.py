"""Training recipe and model utilities (not part of the installed package; run from the repo root)."""
