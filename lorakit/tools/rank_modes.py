"""The names of the rank-selection modes (lowrank.py says what each keeps), without torch: the command line's
parsers offer them as choices before any tensor work is imported."""

from __future__ import annotations

MODES = ("fixed", "threshold", "ratio", "quantile", "quantile_energy", "sv_ratio", "sv_fro", "sv_cumulative")
FIXED_MODES = ("fixed",)  # modes that need only the top singular values (so a randomized SVD serves)
