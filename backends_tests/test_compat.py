"""The namespace layer's own helpers (pure Python: no backend involved)."""

import pytest

from fastrpb._compat import int_arg, next_fast_len


def _is_5_smooth(n: int) -> bool:
    for p in (2, 3, 5):
        while n % p == 0:
            n //= p
    return n == 1


def test_next_fast_len_is_the_smallest_5_smooth_length():
    for n in range(1, 3000):
        m = next_fast_len(n)
        assert m >= n and _is_5_smooth(m), n
        assert not any(_is_5_smooth(k) for k in range(n, m)), n


@pytest.mark.parametrize("L, expected", [(784, 1600), (4096, 8192), (4097, 8640), (65536, 131072)])
def test_fft_length_for_sequence(L, expected):
    # 2L - 1 = 1567 for L = 784 is prime: the FFT uses 1600, never 1567.
    assert next_fast_len(2 * L - 1) == expected


def test_int_arg():
    assert int_arg("n", 3, minimum=1) == 3
    with pytest.raises(TypeError, match="n must be an int, got bool"):
        int_arg("n", True, minimum=0)
    with pytest.raises(TypeError, match="n must be an int, got float"):
        int_arg("n", 2.0, minimum=0)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        int_arg("n", 0, minimum=1)
