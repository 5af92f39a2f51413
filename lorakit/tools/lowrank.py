"""The one place for low-rank math shared by extract, resize and merge_svd: how many singular values to keep
(rank-selection modes) and how to get the top singular triplets (randomized range finder or exact SVD).

Rank-selection modes, with S the singular values in descending order (`select_rank`):

| mode | param | kept rank k |
| --- | --- | --- |
| `fixed` | the rank | param |
| `threshold` | an absolute singular value | #{S_i > param} (LyCORIS) |
| `ratio` | 0..1 | #{S_i > param * S_0} (LyCORIS) |
| `quantile` | 0..1, on **singular values** | smallest k with sum(S[:k]) >= param * sum(S) (= kohya's `sv_cumulative`) |
| `quantile_energy` | 0..1, on **energy** (S^2) | smallest k with sum(S[:k]^2) >= param * sum(S^2) |
| `sv_ratio` | >= 1 | #{S_i > S_0 / param} (kohya resize) |
| `sv_fro` | 0..1, a fraction of the Frobenius norm | smallest k with sqrt(sum(S[:k]^2) / sum(S^2)) >= param (kohya resize) |
| `sv_cumulative` | 0..1 | as `quantile` (kohya resize) |

k is then clamped to [1, max_rank]. LyCORIS' own `quantile` counts the prefixes *below* the target and so keeps one
component fewer than `quantile` here; lorakit keeps the smallest rank that reaches the target (kohya's rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .rank_modes import FIXED_MODES, MODES

__all__ = ["MODES", "FIXED_MODES", "select_rank", "check_mode", "top_svd", "svd_of_product", "split_factors",
           "retained", "LowRank", "low_rank"]

SVD_METHODS = ("auto", "randomized", "exact")


def check_mode(mode: str, param: float | int | None, option: str = "mode") -> None:
    """Raise a ValueError naming `option` when mode/param are not a valid pair."""
    if mode not in MODES:
        raise ValueError(f"{option}: unknown rank-selection mode {mode!r}; expected one of {', '.join(MODES)}")
    if param is None:
        raise ValueError(f"{option}: mode {mode!r} needs a parameter")
    p = float(param)
    if not math.isfinite(p):
        raise ValueError(f"{option}: parameter of mode {mode!r} must be finite, got {param!r}")
    if mode == "fixed" and (p < 1 or p != int(p)):
        raise ValueError(f"{option}: mode 'fixed' needs a whole rank >= 1, got {param!r}")
    if mode == "threshold" and p < 0:
        raise ValueError(f"{option}: mode 'threshold' needs a singular value >= 0, got {param!r}")
    if mode in ("ratio", "quantile", "quantile_energy", "sv_fro", "sv_cumulative") and not 0 <= p <= 1:
        raise ValueError(f"{option}: mode {mode!r} needs a fraction in [0, 1], got {param!r}")
    if mode == "sv_ratio" and p < 1:
        raise ValueError(f"{option}: mode 'sv_ratio' needs a ratio >= 1 (keep S > S_max / ratio), got {param!r}")


def _first_reaching(cum: torch.Tensor, target: float) -> int:
    # smallest k with cum[k-1] >= target; a tiny relative slack so that exact fractions (1.0) are reached
    return int(torch.searchsorted(cum, torch.tensor(target * (1 - 1e-12), dtype=cum.dtype))) + 1


def select_rank(S: torch.Tensor, mode: str, param: float, max_rank: int | None = None) -> int:
    """The rank `mode` keeps for the singular values S (descending), clamped to [1, max_rank or len(S)]."""
    check_mode(mode, param)
    S = S.detach().to(torch.float64).cpu()
    n = S.numel()
    cap = n if max_rank is None else min(n, int(max_rank))
    if mode == "fixed":
        k = int(param)
    elif n == 0 or S[0] <= 0:
        k = 1  # a zero matrix: nothing to keep, one component of zeros
    elif mode == "threshold":
        k = int((S > param).sum())
    elif mode == "ratio":
        k = int((S > param * S[0]).sum())
    elif mode == "sv_ratio":
        k = int((S > S[0] / param).sum())
    elif mode in ("quantile", "sv_cumulative"):
        k = _first_reaching(torch.cumsum(S, 0) / S.sum(), float(param))
    else:  # energy: quantile_energy (fraction of sum S^2) and sv_fro (fraction of sqrt(sum S^2))
        target = float(param) if mode == "quantile_energy" else float(param) ** 2
        e = S.square()
        k = _first_reaching(torch.cumsum(e, 0) / e.sum(), target)
    return max(1, min(k, cap))


def _exact(A: torch.Tensor, k: int):
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return U[:, :k], S[:k], Vh[:k]


def _randomized(A: torch.Tensor, k: int, niter: int, oversample: int, generator: torch.Generator | None):
    """Halko-Martinsson-Tropp range finder with `niter` QR-normalised power iterations, then the SVD of the small
    projected matrix Q^T A. Costs (2 niter + 2) products of A with an (n x (k + p)) block."""
    m, n = A.shape
    width = min(k + oversample, m, n)
    omega = torch.randn(n, width, generator=generator, dtype=A.dtype, device="cpu").to(A.device)
    Q = torch.linalg.qr(A @ omega).Q
    for _ in range(niter):
        Q = torch.linalg.qr(A.mT @ Q).Q
        Q = torch.linalg.qr(A @ Q).Q
    Ub, S, Vh = torch.linalg.svd(Q.mT @ A, full_matrices=False)
    return (Q @ Ub[:, :k]), S[:k], Vh[:k]


def top_svd(A: torch.Tensor, k: int, method: str = "randomized", niter: int = 2, oversample: int | None = None,
            generator: torch.Generator | None = None):
    """(U, S, Vh) of the top-k singular triplets of a 2-d A (k clamped to min(A.shape)). `method`: "randomized" or
    "exact"; randomized falls back to exact where the sketch would be at least half the matrix (no gain there)."""
    if method not in ("randomized", "exact"):
        raise ValueError(f"svd method must be 'randomized' or 'exact', got {method!r}")
    k = max(1, min(int(k), *A.shape))
    p = oversample if oversample is not None else max(8, k // 4)
    if method == "exact" or 2 * (k + p) >= min(A.shape):
        return _exact(A, k)
    return _randomized(A, k, niter, p, generator)


def svd_of_product(up: torch.Tensor, down: torch.Tensor):
    """Thin SVD (U, S, Vh) of up @ down, up (m x r), down (r x n), without forming the m x n product: QR of both
    factors, then the SVD of the r x r core Ru Rd^T. Exact; the rank is at most r."""
    Qu, Ru = torch.linalg.qr(up)
    Qd, Rd = torch.linalg.qr(down.mT)
    Uc, S, Vch = torch.linalg.svd(Ru @ Rd.mT)
    return Qu @ Uc, S, Vch @ Qd.mT


def split_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int):
    """(up, down) = (U[:, :k] sqrt(S), sqrt(S) Vh[:k]): the product is the rank-k truncation; the square root
    balances the two factors' magnitudes (loaders only see the product, fp16 keeps more of both)."""
    r = S[:k].clamp_min(0).sqrt()
    return U[:, :k] * r, r[:, None] * Vh[:k]


def retained(S: torch.Tensor, k: int, total_sq: float | None = None, total_sum: float | None = None) -> dict:
    """Per-layer report: the fraction of the Frobenius norm (`fro`), of the energy (`energy` = fro^2) and of the
    singular-value sum (`sum`, None when unknown) that rank k keeps, and S_0 / S_{k-1} (`max_ratio`). A zero
    matrix has no fraction to keep: fro, energy and sum are None there (kohya's resize gets NaN and leaves such
    modules out of its average)."""
    S = S.detach().to(torch.float64).cpu()
    sq = float(S.square().sum()) if total_sq is None else float(total_sq)
    kept_sq = float(S[:k].square().sum())
    energy = kept_sq / sq if sq > 0 else None
    ssum = float(S.sum()) if total_sum is None and total_sq is None else total_sum
    out = {"rank": k, "energy": energy, "fro": None if energy is None else math.sqrt(energy),
           "sum": float(S[:k].sum()) / ssum if ssum else None,
           "max_ratio": float(S[0] / S[k - 1]) if k >= 1 and S.numel() >= k and S[k - 1] > 0 else float("inf")}
    return out


@dataclass
class LowRank:
    """The kept factors of a matrix: up (m x k) @ down (k x n) ~= A, and the per-layer report."""

    up: torch.Tensor
    down: torch.Tensor
    rank: int
    report: dict


def low_rank(A: torch.Tensor, mode: str, param: float, max_rank: int | None = None, svd: str = "auto",
             niter: int = 2, oversample: int | None = None, generator: torch.Generator | None = None) -> LowRank:
    """Factor a 2-d A at the rank `mode`/`param` selects (capped at max_rank). svd "auto": randomized for `fixed`
    (only the top triplets are needed), exact for the modes that look at the whole spectrum."""
    if svd not in SVD_METHODS:
        raise ValueError(f"svd must be one of {', '.join(SVD_METHODS)}, got {svd!r}")
    cap = min(A.shape) if max_rank is None else min(int(max_rank), *A.shape)
    if mode in FIXED_MODES:
        k = min(int(param), cap)
        method = "exact" if svd == "exact" else "randomized"
        U, S, Vh = top_svd(A, k, method, niter, oversample, generator)
        total_sq = float(torch.linalg.vector_norm(A)) ** 2  # for the report: |A|^2 = the whole spectrum's energy
        report = retained(S, k, total_sq=total_sq)
    else:
        if svd == "randomized":
            raise ValueError(f"mode {mode!r} looks at the whole spectrum: use svd 'exact' or 'auto'")
        U, S, Vh = _exact(A, min(A.shape))
        k = select_rank(S, mode, param, cap)
        report = retained(S, k)
    up, down = split_factors(U, S, Vh, k)
    return LowRank(up, down, k, report)
