"""The low-bit state format of :mod:`ftmlopt.lowbit` (NumPy): the maps, encoding, packing, random bits, bytes.

Expected values are written from the format's definition here in the test (Python floats and ints),
not taken from the module under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ftmlopt import lowbit, rule

OPS = lowbit.ops_for(np.zeros(1))


def spec_table(bits: int) -> np.ndarray:
    """x(q) = 2^((q >> M) - (2^E - 1)) * (1 + (q & (2^M - 1)) / 2^M), written out from the format."""
    e, m = {8: (4, 4), 4: (3, 1)}[bits]
    return np.array([2.0 ** ((q >> m) - (2**e - 1)) * (1 + (q % 2**m) / 2**m) for q in range(2 ** (e + m))])


def spec_mix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) % 2**32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) % 2**32
    return h ^ (h >> 16)


@pytest.mark.parametrize("bits, smallest, top", [(8, 2.0**-15, 1.9375), (4, 2.0**-7, 1.5)])
def test_code_map_has_no_zero_and_increases(bits: int, smallest: float, top: float) -> None:
    table = np.array(lowbit.code_values(bits))
    assert table.shape == (2**bits,)
    assert np.array_equal(table, spec_table(bits))
    assert np.all(np.diff(table) > 0)
    assert table[0] == smallest > 0 and table[-1] == top == lowbit.top(bits)


@pytest.mark.parametrize("bits", [8, 4])
def test_decode_every_code(bits: int) -> None:
    """A block whose scale is 1 decodes code q to v = x(q)^2, every code (both storages)."""
    n = 2 * lowbit.BLOCK
    q = np.arange(n) % 2**bits
    codes = q.astype(np.uint8) if bits == 8 else (q[0::2] | (q[1::2] << 4)).astype(np.uint8)
    v = lowbit.decode(codes, np.ones(2, np.float32), n, bits)
    expected = (spec_table(bits)[q].astype(np.float32)) ** 2
    assert v.dtype == np.float32 and np.array_equal(v, expected)


@pytest.mark.parametrize("bits", [8, 4])
def test_nearest_rounding_is_the_nearest_code(bits: int) -> None:
    """Round-to-nearest picks the code nearest to u / scale (brute force over the table), ties aside."""
    rng = np.random.default_rng(0)
    table = spec_table(bits)
    u = np.concatenate([[table[-1]], rng.uniform(table[0], table[-1], 5000)]).astype(np.float32)
    codes, scales = lowbit.quantize(u * u, bits, rounding="nearest")
    assert scales.dtype == np.float32
    q = codes.astype(np.int64) if bits == 8 else np.stack([codes & 15, codes >> 4], -1).reshape(-1)[: u.size]
    x = u.astype(np.float64) / scales.repeat(lowbit.BLOCK)[: u.size]
    nearest = np.abs(x[:, None] - table[None, :]).argmin(axis=1)
    # in the binade below a code the gap is half the gap above it: the nearest code is decided in the float bits
    # (linear within a binade), which equals the true nearest code except exactly at a binade edge
    gap = np.abs(np.abs(x - table[q]) - np.abs(x - table[nearest]))
    assert np.all((q == nearest) | (gap < 1e-12))


def test_below_the_smallest_code_is_code_zero_not_zero() -> None:
    """Values below the map's smallest code (and exact zeros next to a nonzero) decode to the smallest code."""
    v = np.zeros(256, np.float32)
    v[0] = 1.0
    v[1] = 1e-20
    codes, scales = lowbit.quantize(v, 8, rounding="nearest")
    back = lowbit.decode(codes, scales, 256, 8)
    assert codes[1] == 0 and codes[2] == 0
    assert back[1] > 0 and back[2] > 0
    assert back[1] == pytest.approx((2.0**-15 * float(scales[0])) ** 2, rel=1e-6)
    assert scales[1] == 0 and np.all(back[128:] == 0)  # an all-zero block decodes to exactly 0


@pytest.mark.parametrize("bits", [8, 4])
def test_block_top_is_exact(bits: int) -> None:
    """The largest u of every block decodes back to itself (to float32 rounding)."""
    rng = np.random.default_rng(1)
    v = (rng.lognormal(0, 3, 1000) ** 2).astype(np.float32)
    for rounding in ("nearest", "stochastic"):
        codes, scales = lowbit.quantize(v, bits, rounding=rounding, seed=3, step=7)
        back = lowbit.decode(codes, scales, v.size, bits)
        for b in range(lowbit.n_blocks(v.size)):
            blk = slice(b * 128, (b + 1) * 128)
            i = np.argmax(v[blk])
            assert back[blk][i] == pytest.approx(v[blk][i], rel=2e-6)


@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_error_is_within_one_code(bits: int) -> None:
    rng = np.random.default_rng(2)
    v = (rng.lognormal(-8, 1.5, 3001) ** 2).astype(np.float32)
    rel_gap = 2.0 ** -format_m(bits)
    for rounding in ("nearest", "stochastic"):
        codes, scales = lowbit.quantize(v, bits, rounding=rounding, seed=1, step=1)
        u = np.sqrt(lowbit.decode(codes, scales, v.size, bits).astype(np.float64))
        ref = np.sqrt(v.astype(np.float64))
        smallest = (2.0 ** -(2 ** format_e(bits) - 1)) * scales.repeat(128)[: v.size]
        big = ref >= smallest  # below the smallest code: over-estimated by design
        bound = (0.5 if rounding == "nearest" else 1.0) * rel_gap * ref + 1e-7 * ref
        assert np.all(np.abs(u - ref)[big] <= bound[big])
        assert np.all(u[~big] >= ref[~big])


def format_m(bits: int) -> int:
    return {8: 4, 4: 1}[bits]


def format_e(bits: int) -> int:
    return {8: 4, 4: 3}[bits]


@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_rounding_is_unbiased(bits: int) -> None:
    """Averaged over many steps' random bits, the decoded u is u (mean of a two-point distribution)."""
    table = spec_table(bits)
    x = np.float32(0.5 * (table[-3] + table[-2]) + 0.1 * (table[-2] - table[-3]))  # 60 % of the way up
    u = np.full(lowbit.BLOCK, x, np.float32)
    u[0] = table[-1]  # fixes the scale at 1
    total, n = np.zeros(lowbit.BLOCK), 400
    for step in range(1, n + 1):
        codes, scales = lowbit.quantize(u * u, bits, seed=5, step=step)
        total += np.sqrt(lowbit.decode(codes, scales, lowbit.BLOCK, bits))
    mean = total[1:].mean() / n
    # 127 elements x 400 steps of a Bernoulli(0.6) between two codes: the mean is x to ~0.3 % of the gap
    assert abs(mean - float(x)) < 0.02 * (table[-2] - table[-3])


def test_mix32_keys_and_random_bits_follow_the_format() -> None:
    assert lowbit.mix32_int(1) == spec_mix32(1) == 0x514E28B7  # MurmurHash3's 32-bit finalizer
    for seed, step in [(0, 1), (7, 3), (2**32 - 1, 10**6)]:
        assert lowbit.step_key(seed, step) == spec_mix32((seed * 0x9E3779B1 + step) % 2**32)
    key = lowbit.step_key(11, 5)
    for bits, m in [(8, 4), (4, 1)]:
        r = lowbit.random_bits(1000, key, bits, OPS)
        assert r.dtype == np.int32
        expected = [((i * 0x9E3779B1 + key) % 2**32) >> (32 - (23 - m)) for i in range(1000)]
        assert r.tolist() == expected
        assert r.min() >= 0 and r.max() < 2 ** (23 - m)


@pytest.mark.parametrize("bits", [8, 4])
def test_encoding_subtracts_the_bias_before_the_shift_as_the_plain_form_after(bits: int) -> None:
    # q = (bits + (r - bias << 23)) >> s equals ((bits + r) >> s) - (bias << M) for every u >= 0,
    # from 0 and the smallest subnormal to +inf, under any rounding addend r
    e, m = lowbit.format_of(bits)
    shift, bias = 23 - m, 127 - (2**e - 1)
    rng = np.random.default_rng(3)
    patterns = np.concatenate([np.arange(0, 4096), rng.integers(0, 0x7F800001, 200_000),
                               0x7F800000 - np.arange(4096)]).astype(np.int64)
    r = rng.integers(0, 2**shift, patterns.size).astype(np.int32)
    plain = np.clip(((patterns + r) >> shift) - (bias << m), 0, 2 ** (e + m) - 1)
    folded = np.clip((patterns + (r.astype(np.int64) - (bias << 23))) >> shift, 0, 2 ** (e + m) - 1)
    assert np.array_equal(plain, folded)
    v = np.ones(lowbit.BLOCK, np.float32)
    v[:4] = [0.0, -0.0, 1e-30, 1.0]  # -0.0 encodes as +0.0: the smallest code, not the top one
    codes, _ = lowbit.quantize(v, bits, step=1)
    q = (lowbit.unpack4(codes, lowbit.BLOCK, OPS) if bits == 4 else codes.astype(np.int32)).tolist()
    assert q[0] == q[1] == q[2] == 0 and q[3] == 2 ** (e + m) - 1


def test_random_bits_depend_on_seed_step_and_index_only() -> None:
    a = lowbit.random_bits(5000, lowbit.step_key(1, 2), 8, OPS)
    assert np.array_equal(a, lowbit.random_bits(5000, lowbit.step_key(1, 2), 8, OPS))
    assert np.array_equal(a[:100], lowbit.random_bits(100, lowbit.step_key(1, 2), 8, OPS))
    assert not np.array_equal(a, lowbit.random_bits(5000, lowbit.step_key(1, 3), 8, OPS))
    assert not np.array_equal(a, lowbit.random_bits(5000, lowbit.step_key(2, 2), 8, OPS))


@pytest.mark.parametrize("n", [0, 1, 2, 127, 128, 129, 4097])
def test_pack4_round_trip(n: int) -> None:
    q = (np.arange(n) * 7 % 16).astype(np.int32)
    packed = lowbit.pack4(q, OPS)
    assert packed.dtype == np.uint8 and packed.shape == (math.ceil(n / 2),)
    if n >= 2:
        assert packed[0] == q[0] | (q[1] << 4)  # element 2k low nibble, 2k+1 high
    assert np.array_equal(lowbit.unpack4(packed, n, OPS), q)


@pytest.mark.parametrize("bits, limit", [(8, 1.05), (4, 0.55)])
def test_bytes_per_param_of_a_1m_tensor(bits: int, limit: float) -> None:
    n = 1 << 20
    codes, scales = lowbit.zeros_state(n, bits)
    per_param = (codes.nbytes + scales.nbytes) / n
    assert per_param == lowbit.state_bytes(n, bits) / n
    assert per_param <= limit
    assert per_param == pytest.approx({8: 1 + 4 / 128, 4: 0.5 + 4 / 128}[bits])


@pytest.mark.parametrize("n", [1, 5, 4095, 4096, 4097, 10_000])
@pytest.mark.parametrize("bits", [8, 4])
def test_odd_sizes_round_trip(n: int, bits: int) -> None:
    rng = np.random.default_rng(n)
    v = rng.uniform(0.1, 1.0, n).astype(np.float32)
    codes, scales = lowbit.quantize(v, bits, rounding="nearest")
    assert codes.shape == (lowbit.n_code_bytes(n, bits),) and scales.shape == (math.ceil(n / 128),)
    back = lowbit.decode(codes, scales, n, bits)
    assert back.shape == (n,)
    assert np.allclose(np.sqrt(back), np.sqrt(v), rtol=2.0 ** -format_m(bits))


def test_small_tensors_keep_float_state() -> None:
    assert not lowbit.is_quantized(4095, 8) and lowbit.is_quantized(4096, 8) and lowbit.is_quantized(4096, 4)
    assert not lowbit.is_quantized(0, 4) and not lowbit.is_quantized(10**6, 32)


def test_check_state_bits() -> None:
    assert [lowbit.check_state_bits(b) for b in (32, 8, 4)] == [32, 8, 4]
    with pytest.raises(ValueError, match=r"^Invalid state_bits: 5$"):
        lowbit.check_state_bits(5)
    with pytest.raises(TypeError, match="state_bits"):
        lowbit.check_state_bits(8.0)
    with pytest.raises(TypeError, match="state_bits"):
        lowbit.check_state_bits(True)
    with pytest.raises(ValueError, match="rounding"):
        lowbit.check_rounding("up")


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_step_is_the_rule_step_from_the_decoded_state(bits: int, dtype: type) -> None:
    """w_t is exactly rule.compact_step's from the decoded v_old; the new state is v_t quantized."""
    rng = np.random.default_rng(3)
    shape = (40, 130)  # 5200 elements: 41 blocks, the last partial
    w = rng.standard_normal(shape).astype(dtype)
    codes, scales = lowbit.zeros_state(w.size, bits)
    for t in range(1, 6):
        g = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 1, shape)).astype(dtype)
        c = rule.constants(0.01, t, 0.6, 0.999, 1e-8, weight_decay=0.01).cast(np.dtype(dtype).type)
        v_old = lowbit.decode(codes, scales, w.size, bits).reshape(shape).astype(dtype)
        ref_w, ref_v = rule.compact_step(w, g, v_old, c, sqrt=np.sqrt, clip=np.clip)
        w, codes, scales = lowbit.compact_step(w, g, codes, scales, c, bits=bits, seed=9, step=t)
        assert w.dtype == dtype and np.array_equal(w, ref_w)
        ref_codes, ref_scales = lowbit.quantize(ref_v, bits, seed=9, step=t)
        assert np.array_equal(codes, ref_codes) and np.array_equal(scales, ref_scales)
        blocks = np.pad(np.sqrt(ref_v.astype(np.float32)).reshape(-1), (0, 41 * 128 - w.size)).reshape(41, 128)
        assert np.array_equal(scales, blocks.max(axis=1) / np.float32(lowbit.top(bits)))


def test_non_contiguous_input_is_flattened_row_major() -> None:
    rng = np.random.default_rng(4)
    base = rng.uniform(0.01, 1, (130, 80)).astype(np.float32)
    v = base.T  # not contiguous
    codes, scales = lowbit.quantize(v, 8, seed=1, step=1)
    ref_codes, ref_scales = lowbit.quantize(np.ascontiguousarray(v), 8, seed=1, step=1)
    assert np.array_equal(codes, ref_codes) and np.array_equal(scales, ref_scales)
