"""Exact Hadamard and seeded random orthogonal matrices for rotating a model.

A Hadamard matrix ``H`` of order ``n`` has entries ±1 and ``H Hᵀ = n I``; ``H / √n`` is
orthogonal and spreads every coordinate evenly over all others, which is what flattens
activation outliers (QuaRot). Hadamard matrices are built here from integers, exactly:

* **Sylvester**: order 2^m (``H_{2k} = [[H, H], [H, -H]]``);
* **Paley I**: order ``q + 1`` for a prime power ``q ≡ 3 (mod 4)``;
* **Paley II**: order ``2 (q + 1)`` for a prime power ``q ≡ 1 (mod 4)``;
* **Kronecker products** ``H_K ⊗ H_{2^m}`` of the above.

So an order ``n = K · 2^m`` is constructible when ``K`` is 1, 2 or a Paley order. The base
orders K (Sylvester or Paley) up to 200 are 4, 8, 12, 20, 24, 28, 32, 36, 44, 48, 52, 60, 68,
72, 76, 80, 84, 100, 104, 108, 124, 128, 132, 140, 148, 152, 164, 168, 180, 192, 196, 200,
which covers every
``K`` the mllm convertor ships (12, 20, 28, 36, 40 = 20·2, 52, 60, 108, 140) except 156 and
172 (Williamson constructions, not built here); the multiples of 4 up to 200 that are *not*
reached are 92, 116, 156, 172, 184, 188. Hidden sizes of real models
therefore work: 576 = 36·16, 896 = 28·32, 1536 = 12·128, 1280 = 20·64, 2048, 3584 = 28·128.
Orders ``n ≡ 2 (mod 4)`` (n > 2) or odd (n > 1) have no Hadamard matrix at all; for those,
and for the few multiples of 4 none of these constructions reach (92, 116, 156, 172, …),
:func:`random_hadamard` fails and points at ``rotate_mode=orthogonal``.

Randomness comes only from an explicit seed (numpy's PCG64 through ``SeedSequence``), so a
rotation is a pure function of ``(n, mode, seed)`` and can be recorded in a manifest.
"""

from __future__ import annotations

import itertools
from functools import cache

import numpy as np

from common.core.errors import EdgeforgeError

ROTATE_MODES = ("hadamard", "orthogonal")


# --------------------------------------------------------------------------------------
# Finite fields GF(p^k), just enough for the quadratic character of Paley's construction


def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, k)`` with ``q = p^k`` for a prime ``p``, or None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    k, rest = 0, q
    while rest % p == 0:
        rest //= p
        k += 1
    return (p, k) if rest == 1 else None


def _poly_mulmod(
    a: tuple[int, ...], b: tuple[int, ...], tail: tuple[int, ...], p: int
) -> tuple[int, ...]:
    """Product of two GF(p^k) elements (coefficient tuples, lowest degree first) modulo the
    monic polynomial ``x^k + tail`` (``tail`` holds its k lower coefficients)."""
    k = len(tail)
    prod = [0] * (2 * k - 1)
    for i, ai in enumerate(a):
        if ai:
            for j, bj in enumerate(b):
                prod[i + j] = (prod[i + j] + ai * bj) % p
    for deg in range(2 * k - 2, k - 1, -1):  # x^k = -tail
        coef = prod[deg]
        if coef:
            prod[deg] = 0
            for i, ti in enumerate(tail):
                prod[deg - k + i] = (prod[deg - k + i] - coef * ti) % p
    return tuple(prod[:k])


def _is_field(tail: tuple[int, ...], p: int, elements: list[tuple[int, ...]]) -> bool:
    """Whether GF(p)[x]/(x^k + tail) is a field: every nonzero e has e^(q-1) = 1 (a
    reducible modulus gives zero divisors or idempotents, whose powers never reach 1)."""
    k = len(tail)
    one = (1, *([0] * (k - 1)))
    for e in elements[1:]:
        power, base, exp = one, e, len(elements) - 1
        while exp:
            if exp & 1:
                power = _poly_mulmod(power, base, tail, p)
            base = _poly_mulmod(base, base, tail, p)
            exp >>= 1
        if power != one:
            return False
    return True


def _field(q: int) -> tuple[list[tuple[int, ...]], dict[tuple[int, ...], int]]:
    """Elements of GF(q) (coefficient tuples; the first is zero) and the quadratic
    character χ of each (0 for zero, +1 for nonzero squares, −1 otherwise)."""
    p, k = _prime_power(q)  # type: ignore[misc]
    elements = [tuple(reversed(e)) for e in itertools.product(range(p), repeat=k)]
    tail = next(t for t in elements if t[0] != 0 and _is_field(t, p, elements))
    squares = {_poly_mulmod(e, e, tail, p) for e in elements[1:]}
    chi = {e: (1 if e in squares else -1) for e in elements[1:]}
    chi[elements[0]] = 0
    return elements, chi


def _jacobsthal(q: int) -> np.ndarray:
    """``Q[i, j] = χ(a_i − a_j)`` over GF(q): antisymmetric for q ≡ 3, symmetric for q ≡ 1."""
    elements, chi = _field(q)
    p = _prime_power(q)[0]  # type: ignore[index]
    return np.array(
        [
            [chi[tuple((x - y) % p for x, y in zip(a, b, strict=True))] for b in elements]
            for a in elements
        ],
        dtype=np.int64,
    )


def _paley_core(q: int) -> np.ndarray:
    """The (q+1)×(q+1) conference-type matrix ``[[0, 1ᵀ], [±1, Q]]`` both constructions use."""
    jac = _jacobsthal(q)
    core = np.zeros((q + 1, q + 1), dtype=np.int64)
    core[0, 1:] = 1
    core[1:, 0] = -1 if q % 4 == 3 else 1
    core[1:, 1:] = jac
    return core


def _paley(order: int) -> np.ndarray | None:
    """A Hadamard matrix of ``order`` from Paley I or II, or None when neither applies."""
    q = order - 1
    if _prime_power(q) and q % 4 == 3:
        return _paley_core(q) + np.eye(order, dtype=np.int64)
    if order % 2 == 0:
        q = order // 2 - 1
        if _prime_power(q) and q % 4 == 1:
            core = _paley_core(q)
            zero_block = np.array([[1, -1], [-1, -1]], dtype=np.int64)
            sign_block = np.array([[1, 1], [1, -1]], dtype=np.int64)
            return np.kron(core, sign_block) + np.kron(np.eye(q + 1, dtype=np.int64), zero_block)
    return None


def _sylvester(order: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.int64)
    while h.shape[0] < order:
        h = np.block([[h, h], [h, -h]])
    return h


@cache
def _base_order_matrix(order: int) -> np.ndarray | None:
    if order in (1, 2):
        return _sylvester(order)
    if order % 4:
        return None
    return _paley(order)


def hadamard_factorization(n: int) -> tuple[int, int] | None:
    """``(K, 2^m)`` with ``n = K · 2^m`` and ``K`` constructible (smallest such K), or None."""
    if n < 1:
        return None
    power = 1
    while n % (power * 2) == 0:
        power *= 2
    odd = n // power
    k = odd
    while k <= n:
        if _base_order_matrix(k) is not None:
            return k, n // k
        k *= 2
    return None


@cache
def hadamard_matrix(n: int) -> np.ndarray:
    """An exact ±1 Hadamard matrix of order ``n`` (int64, ``H Hᵀ = n I``), read-only.

    Raises :class:`EdgeforgeError` when ``n`` is not reachable by the constructions in the
    module docstring, suggesting ``rotate_mode=orthogonal``.
    """
    factors = hadamard_factorization(n)
    if factors is None:
        raise EdgeforgeError(
            f"no Hadamard matrix of order {n} can be built here (supported: K·2^m with K = 1, 2 "
            f"or a Paley order such as 12, 20, 28, 36, 52, 60, 108, 140); use "
            f"rotate_mode=orthogonal (ROTATE_MODE=orthogonal) for this size"
        )
    k, power = factors
    h = np.kron(_base_order_matrix(k), _sylvester(power))
    h.setflags(write=False)
    return h


def _rng(seed: int, stream: int) -> np.random.Generator:
    """An independent generator for ``(seed, stream)``: matrix ``stream`` of one rotation
    does not depend on how many others were drawn before it."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise EdgeforgeError(f"seed: expected a non-negative integer, got {seed!r}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stream])))


def random_hadamard(n: int, seed: int, stream: int = 0) -> np.ndarray:
    """``diag(s) · H / √n`` with random signs ``s``: orthogonal, float64, seeded."""
    h = hadamard_matrix(n).astype(np.float64)
    signs = _rng(seed, stream).choice(np.array([-1.0, 1.0]), size=n)
    return (signs[:, None] * h) / np.sqrt(n)


def random_orthogonal(n: int, seed: int, stream: int = 0) -> np.ndarray:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed by diag(R)), float64."""
    if n < 1:
        raise EdgeforgeError(f"random_orthogonal: size must be positive, got {n}")
    gauss = _rng(seed, stream).standard_normal((n, n))
    q, r = np.linalg.qr(gauss)
    return q * np.sign(np.diag(r))[None, :]


def random_rotation(n: int, mode: str, seed: int, stream: int = 0) -> np.ndarray:
    """An ``n × n`` orthogonal float64 matrix of ``mode`` (``hadamard`` or ``orthogonal``)."""
    if mode == "hadamard":
        return random_hadamard(n, seed, stream)
    if mode == "orthogonal":
        return random_orthogonal(n, seed, stream)
    raise EdgeforgeError(f"rotate_mode: {mode!r} is not one of {', '.join(ROTATE_MODES)}")
