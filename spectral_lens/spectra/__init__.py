"""Pure tensor math: shifted moments and their merge, eigen-solves, power-law fits, effective ranks.

Nothing here holds state, registers hooks or touches files; every function is testable against a
float64 reference in isolation.
"""

from .eigen import eigenvalues_descending, gram_eigenvalues, trace_normalize
from .fit import PAPER_WINDOWS, AlphaFit, CrossoverFit, band_alpha, estimate_crossover, tail_window
from .moments import PRECISIONS, chunk_moments, covariance_from_moments, reshift
from .ranks import participation_ratio, rankme, stable_rank

__all__ = [
    "PAPER_WINDOWS",
    "PRECISIONS",
    "AlphaFit",
    "CrossoverFit",
    "band_alpha",
    "chunk_moments",
    "covariance_from_moments",
    "eigenvalues_descending",
    "estimate_crossover",
    "gram_eigenvalues",
    "participation_ratio",
    "rankme",
    "reshift",
    "stable_rank",
    "tail_window",
    "trace_normalize",
]
