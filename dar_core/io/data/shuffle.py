"""Shuffling without memory: a keyed bijection of ``[0, n)`` and per-position coin flips.

A training stream needs, for every epoch, a permutation of the examples that is a pure
function of ``(seed, epoch)``. Materialising it (``default_rng(...).permutation(n)``) costs
``8 n`` bytes and ``O(n)`` time at every epoch start; at ImageNet scale that is fine, but it
makes the loader's memory grow with the dataset. Here the permutation is *computed* for just
the positions a batch needs:

* a Feistel network on the ``bits`` bits that hold ``n - 1`` (so the domain ``2^bits`` is
  below ``2 n``) with a splitmix64-style round function and ``ROUNDS`` independent 64-bit
  keys drawn from the seed: a bijection of ``[0, 2^bits)`` for any keys;
* cycle walking: a value that lands outside ``[0, n)`` is encrypted again until it lands
  inside, which restricts the bijection to ``[0, n)`` (fewer than 2 passes on average).

Memory is ``O(batch)`` and the cost ``O(batch)`` per batch, whatever ``n`` is.
"""

from __future__ import annotations

import numpy as np

ROUNDS = 6
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def mix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on ``uint64`` arrays (wrapping arithmetic)."""
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def keys(seed_words: list[int], count: int = ROUNDS) -> np.ndarray:
    """``count`` 64-bit keys drawn from ``default_rng(seed_words)``."""
    return np.random.default_rng(seed_words).integers(0, 2**64, size=count, dtype=np.uint64)


class Permutation:
    """A bijection of ``[0, n)`` selected by ``round_keys``; call it on an index array.

    The Feistel network is unbalanced when ``bits`` (the fewest that hold ``n - 1``, at
    least 2) is odd: the halves have ``bits // 2`` and ``bits - bits // 2`` bits and trade
    places every round (an even number of rounds brings them back), so the domain
    ``2^bits`` is below ``2 n`` and cycle walking takes fewer than 2 rounds on average.
    """

    def __init__(self, n: int, round_keys: np.ndarray) -> None:
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self._keys = np.asarray(round_keys, dtype=np.uint64)
        if self._keys.size % 2:
            raise ValueError(f"an even number of round keys is needed, got {self._keys.size}")
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        self._hi, self._lo = bits // 2, bits - bits // 2

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        hi, lo = self._hi, self._lo
        left, right = x >> np.uint64(lo), x & np.uint64((1 << lo) - 1)
        for k in self._keys:  # (left: hi bits, right: lo bits) -> (right, left ^ F(right))
            left, right = right, left ^ (mix64(right ^ k) & np.uint64((1 << hi) - 1))
            hi, lo = lo, hi
        return (left << np.uint64(lo)) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        x = np.asarray(index, dtype=np.uint64)
        if x.size and int(x.max()) >= self.n:
            raise ValueError(f"index {int(x.max())} is outside [0, {self.n})")
        x = self._encrypt(x)
        outside = np.flatnonzero(x >= self.n)
        while outside.size:  # cycle walking; ends because the start lies inside [0, n)
            x[outside] = self._encrypt(x[outside])
            outside = outside[x[outside] >= self.n]
        return x.astype(np.int64)


def coin_flips(key: np.uint64, positions: np.ndarray) -> np.ndarray:
    """One fair, independent-looking bit per stream position: ``bool`` like ``positions``."""
    p = np.asarray(positions, dtype=np.uint64)
    return (mix64(p ^ np.uint64(key)) >> np.uint64(63)).astype(bool)
