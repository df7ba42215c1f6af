"""The coverage-first order of a best-of-N sweep: which candidates a `stop: on_hit` run makes first.

A sweep that stops at its first recognised candidate should not spend its early rounds on one corner
of the grid (the original's order is eta-major: all v of eta 1 first), so that a prompt stopped after a
few rounds has seen the range of settings. The order is the one in which the Halton sequence (base 2
on the outer sweep axis, base 3 on the inner one; van der Corput base 2 for a one-axis sweep) first
lands in each grid cell: point k = (radical_inverse_2(k), radical_inverse_3(k)) for k = 0, 1, 2, ...
falls in cell (floor(x * n_outer), floor(y * n_inner)), and a cell joins the order the first time a
point falls in it. Cells the first MAX_POINTS points miss (none for grids up to a few hundred cells)
follow in sweep order. The order depends on the grid's shape alone, never on seeds or images, so a
resumed or re-batched run makes the same candidates in the same order; each candidate's noise comes
from (seed, candidate) (engine.best_of_n), so it is the same image whenever it is made.
"""

from __future__ import annotations

from math import prod

BASES = (2, 3, 5, 7)  # one Halton base per sweep axis, outer axis first
MAX_POINTS = 1 << 16


def radical_inverse(k: int, base: int) -> float:
    """k's digits in `base` mirrored about the radix point: 6 = 110b -> 0.011b = 0.375."""
    inverse, scale = 0.0, 1.0 / base
    while k:
        k, digit = divmod(k, base)
        inverse += digit * scale
        scale /= base
    return inverse


def coverage_order(shape: tuple[int, ...]) -> list[int]:
    """Flat sweep indices (outer axis major, as a probe's `candidates()` lists them) in coverage order."""
    if not shape or any(n < 1 for n in shape):
        raise ValueError(f"a sweep grid needs at least one value per axis, got shape {shape}")
    if len(shape) > len(BASES):
        raise ValueError(f"coverage order is defined for up to {len(BASES)} sweep axes, got {len(shape)}")
    total = prod(shape)
    seen: dict[int, None] = {}  # insertion-ordered set
    for k in range(MAX_POINTS):
        if len(seen) == total:
            break
        flat = 0
        for n, base in zip(shape, BASES, strict=False):
            flat = flat * n + min(int(radical_inverse(k, base) * n), n - 1)
        seen.setdefault(flat, None)
    return [*seen, *(i for i in range(total) if i not in seen)]
