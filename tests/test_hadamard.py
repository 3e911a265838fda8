"""Hadamard constructions are exact; random rotations are orthogonal and seeded."""

from __future__ import annotations

import numpy as np
import pytest

from common.core.errors import EdgeforgeError
from common.quant.hadamard import (
    hadamard_factorization,
    hadamard_matrix,
    random_hadamard,
    random_orthogonal,
    random_rotation,
)

#: Sylvester, Paley I (12, 20, 44, 60), Paley II (28, 36, 52 over GF(25), 100 over GF(49)),
#: and the hidden/head sizes of real models: SmolLM2 576 = 36·16, Qwen2-0.5B 896 = 28·32,
#: Qwen2-VL-2B 1536 = 12·128, ViT 1280 = 20·64, head dims 64 / 80 (= 20·4) / 128.
EXACT_ORDERS = [
    1,
    2,
    4,
    8,
    12,
    20,
    28,
    36,
    44,
    52,
    60,
    64,
    80,
    100,
    108,
    128,
    140,
    576,
    896,
    1280,
    1536,
]


@pytest.mark.parametrize("n", EXACT_ORDERS)
def test_hadamard_is_exact(n: int) -> None:
    h = hadamard_matrix(n)
    assert h.shape == (n, n)
    assert set(np.unique(h).tolist()) <= {-1, 1}
    hf = h.astype(np.float64)  # entries and products are small integers: float64 is exact
    np.testing.assert_array_equal(hf @ hf.T, n * np.eye(n))


@pytest.mark.parametrize(
    ("n", "factors"),
    [
        (576, (36, 16)),
        (1536, (12, 128)),
        (896, (28, 32)),
        (3584, (28, 128)),
        (1280, (20, 64)),
        (2048, (1, 2048)),
        (52, (52, 1)),
    ],
)
def test_factorization(n: int, factors: tuple[int, int]) -> None:
    assert hadamard_factorization(n) == factors


@pytest.mark.parametrize("n", [3, 6, 7, 18, 90, 92, 116, 7 * 3 * 2])
def test_unreachable_orders_suggest_orthogonal(n: int) -> None:
    assert hadamard_factorization(n) is None
    with pytest.raises(EdgeforgeError, match=f"order {n}.*rotate_mode=orthogonal"):
        random_hadamard(n, seed=0)


@pytest.mark.parametrize("mode", ["hadamard", "orthogonal"])
@pytest.mark.parametrize("n", [64, 576])
def test_random_rotation_is_orthogonal_and_seeded(mode: str, n: int) -> None:
    r = random_rotation(n, mode, seed=7)
    assert r.dtype == np.float64
    assert np.abs(r @ r.T - np.eye(n)).max() < 1e-12
    np.testing.assert_array_equal(r, random_rotation(n, mode, seed=7))
    assert not np.array_equal(r, random_rotation(n, mode, seed=8))
    assert not np.array_equal(r, random_rotation(n, mode, seed=7, stream=1))


def test_random_hadamard_is_signed_normalised_hadamard() -> None:
    r = random_hadamard(36, seed=1)
    scaled = r * 6.0  # √36
    np.testing.assert_array_equal(np.abs(scaled), np.ones((36, 36)))
    signs = scaled[:, :1] * hadamard_matrix(36)[:, :1]
    np.testing.assert_array_equal(scaled, signs * hadamard_matrix(36))


def test_orthogonal_any_size() -> None:
    q = random_orthogonal(7, seed=0)
    assert np.abs(q @ q.T - np.eye(7)).max() < 1e-12


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_bad_seed(bad: object) -> None:
    with pytest.raises(EdgeforgeError, match="seed"):
        random_rotation(4, "hadamard", seed=bad)  # type: ignore[arg-type]


def test_bad_mode() -> None:
    with pytest.raises(EdgeforgeError, match="rotate_mode: 'qr'"):
        random_rotation(4, "qr", seed=0)
