"""RLE against hand-checked strings and the classic Kaggle encoder; malformed strings; post-processing."""

from __future__ import annotations

import numpy as np
import pytest

from kaggle_tta.config.errors import DataError, KaggleTTAError
from kaggle_tta.ops.rle import RLEError, mask_to_rle, remove_small_components, rle_to_mask, threshold_mask

RNG = np.random.default_rng(0)
SHAPES = [(1, 1), (3, 5), (7, 2), (101, 37), (1, 9), (9, 1)]
CONVENTIONS = [("F", True), ("F", False), ("C", True), ("C", False)]


# ---- independent oracles: the well-known Kaggle kernel code -----------------------------------


def classic_encode(mask: np.ndarray) -> str:
    """The classic Kaggle encoder: column-major, 1-indexed."""
    pixels = mask.T.flatten()
    pixels = np.concatenate([[0], pixels, [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def classic_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """The classic Kaggle decoder: a loop over runs, column-major, 1-indexed."""
    s = rle.split()
    starts, lengths = [np.asarray(x, dtype=int) for x in (s[0:][::2], s[1:][::2])]
    starts -= 1
    img = np.zeros(shape[0] * shape[1], dtype=np.uint8)
    for lo, hi in zip(starts, starts + lengths):
        img[lo:hi] = 1
    return img.reshape(shape, order="F")


def random_mask(shape: tuple[int, int], p: float) -> np.ndarray:
    return RNG.random(shape) < p


# ---- hand-checked strings -----------------------------------------------------------------

# [[0 1 1]
#  [0 1 0]
#  [1 0 0]]
# column-major: 0 0 1 | 1 1 0 | 1 0 0  -> pixels 3..5 and 7 (1-indexed)
# row-major:    0 1 1 | 0 1 0 | 1 0 0  -> pixels 2..3, 5 and 7
MASK_3X3 = np.array([[0, 1, 1], [0, 1, 0], [1, 0, 0]], dtype=bool)
# [[1 0 1]
#  [1 1 0]]   non-square, so a transposition bug cannot hide
# column-major: 1 1 | 0 1 | 1 0  -> pixels 1..2 and 4..5
# row-major:    1 0 1 | 1 1 0    -> pixel 1 and pixels 3..5
MASK_2X3 = np.array([[1, 0, 1], [1, 1, 0]], dtype=bool)


@pytest.mark.parametrize(
    "mask,order,one_indexed,expected",
    [
        (MASK_3X3, "F", True, "3 3 7 1"),
        (MASK_3X3, "F", False, "2 3 6 1"),
        (MASK_3X3, "C", True, "2 2 5 1 7 1"),
        (MASK_3X3, "C", False, "1 2 4 1 6 1"),
        (MASK_2X3, "F", True, "1 2 4 2"),
        (MASK_2X3, "C", True, "1 1 3 3"),
        (MASK_2X3, "C", False, "0 1 2 3"),
    ],
)
def test_hand_checked_strings(mask, order, one_indexed, expected):
    assert mask_to_rle(mask, order=order, one_indexed=one_indexed) == expected
    np.testing.assert_array_equal(rle_to_mask(expected, mask.shape, order=order, one_indexed=one_indexed), mask)


# ---- round trips and the oracle -------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("order,one_indexed", CONVENTIONS)
@pytest.mark.parametrize("p", [0.05, 0.5, 0.95])
def test_round_trip(shape, order, one_indexed, p):
    mask = random_mask(shape, p)
    rle = mask_to_rle(mask, order=order, one_indexed=one_indexed)
    out = rle_to_mask(rle, shape, order=order, one_indexed=one_indexed)
    assert out.dtype == np.bool_ and out.shape == shape and out.flags.c_contiguous
    np.testing.assert_array_equal(out, mask)


@pytest.mark.parametrize("shape", SHAPES + [(64, 48)])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_agrees_with_the_classic_kaggle_code(shape, p):
    mask = random_mask(shape, p)
    expected = classic_encode(mask.astype(np.uint8))
    if expected:  # the classic encoder writes '' for an empty mask, as our default
        assert mask_to_rle(mask) == expected
        np.testing.assert_array_equal(rle_to_mask(expected, shape), classic_decode(expected, shape).astype(bool))
    # row-major is the classic encoder applied to the transposed mask
    assert mask_to_rle(mask, order="C") == classic_encode(mask.T.astype(np.uint8))


def test_large_mask_round_trip():
    # blobs (few runs) and noise (~500k runs), 1024 x 1024
    blobs = np.zeros((1024, 1024), dtype=bool)
    blobs[100:400, 200:700] = True
    blobs[900:, 1000:] = True
    for mask in (blobs, random_mask((1024, 1024), 0.5)):
        rle = mask_to_rle(mask)
        assert rle == classic_encode(mask.astype(np.uint8))
        np.testing.assert_array_equal(rle_to_mask(rle, mask.shape), mask)


@pytest.mark.parametrize("empty", ["", "-1", "-"])
@pytest.mark.parametrize("order,one_indexed", CONVENTIONS)
def test_empty_mask_with_each_token(empty, order, one_indexed):
    mask = np.zeros((7, 2), dtype=bool)
    assert mask_to_rle(mask, order=order, one_indexed=one_indexed, empty=empty) == empty
    for rle in (empty, "", "  ", f" {empty} "):
        out = rle_to_mask(rle, (7, 2), order=order, one_indexed=one_indexed, empty=empty)
        assert out.shape == (7, 2) and not out.any()


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (101, 37)])
@pytest.mark.parametrize("order", ["F", "C"])
def test_full_mask(shape, order):
    n = shape[0] * shape[1]
    mask = np.ones(shape, dtype=bool)
    assert mask_to_rle(mask, order=order) == f"1 {n}"
    assert mask_to_rle(mask, order=order, one_indexed=False) == f"0 {n}"
    assert rle_to_mask(f"1 {n}", shape, order=order).all()


def test_integer_masks_nonzero_is_foreground():
    mask = random_mask((5, 7), 0.5)
    for m in (mask.astype(np.uint8), mask.astype(np.uint8) * 255, mask.astype(np.int64)):
        assert mask_to_rle(m) == mask_to_rle(mask)


def test_the_input_mask_is_not_mutated():
    mask = random_mask((5, 7), 0.5)
    before = mask.copy()
    mask_to_rle(mask)
    np.testing.assert_array_equal(mask, before)


def test_tolerant_whitespace_and_touching_runs():
    expected = rle_to_mask("1 2 5 1", (3, 3))
    for rle in ("  1 2  5 1 ", "1\t2\n5 1", "1 2\r\n5 1\n"):
        np.testing.assert_array_equal(rle_to_mask(rle, (3, 3)), expected)
    # runs that touch are unambiguous and decode as one
    np.testing.assert_array_equal(rle_to_mask("1 2 3 2", (3, 3)), rle_to_mask("1 4", (3, 3)))


# ---- malformed input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rle,match",
    [
        ("1 2 3", r"odd number of values \(3\)"),
        ("1 x", r"token 'x' is not a non-negative integer"),
        ("1 2.5", r"token '2.5' is not"),
        ("1 -2", r"token '-2' is not"),
        ("-1", r"token '-1' is not"),  # '-1' is only empty when empty='-1'
        ("0 2", r"pair 1: start 0 is before the first pixel.*one_indexed=False"),
        ("1 2 4 0", r"pair 2: length 0 must be positive"),
        ("8 3", r"pair 1: run of 3 pixels from 8 is out of bounds for a mask of 9 pixels"),
        ("10 1", r"out of bounds"),
        ("1 99999999999999999999", r"out of bounds"),
        ("5 2 1 1", r"pair 2: run starting at 1 comes before the previous run \(5..6\)"),
        ("1 3 2 1", r"pair 2: run starting at 2 overlaps the previous run \(1..3\)"),
        ("1 1\t99999999999999999999 1", r"too large"),
    ],
)
def test_malformed_strings_raise_rle_error(rle, match):
    with pytest.raises(RLEError, match=match) as e:
        rle_to_mask(rle, (3, 3))
    assert isinstance(e.value, DataError) and isinstance(e.value, KaggleTTAError)


def test_zero_indexed_bounds():
    assert rle_to_mask("0 1", (3, 3), one_indexed=False)[0, 0]
    assert rle_to_mask("8 1", (3, 3), one_indexed=False)[2, 2]
    with pytest.raises(RLEError, match="out of bounds"):
        rle_to_mask("9 1", (3, 3), one_indexed=False)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: mask_to_rle(np.zeros((2, 2, 1), bool)), r"2-D \[H, W\]"),
        (lambda: mask_to_rle(np.zeros((2, 2), np.float32)), r"threshold probabilities first"),
        (lambda: mask_to_rle(np.zeros((2, 2), bool), order="A"), r"'F' \(column-major\) or 'C'"),
        (lambda: rle_to_mask("1 1", (0, 3)), r"shape must be positive"),
        (lambda: rle_to_mask("1 1", (3,)), r"shape must be \(H, W\)"),
        (lambda: rle_to_mask(None, (3, 3)), r"must be a string, got NoneType"),
    ],
)
def test_bad_arguments_raise_rle_error(call, match):
    with pytest.raises(RLEError, match=match):
        call()


# ---- post-processing ------------------------------------------------------------------------


def test_threshold_mask():
    probs = np.array([[0.2, 0.5], [0.51, 0.9]], dtype=np.float32)
    np.testing.assert_array_equal(threshold_mask(probs, 0.5), [[False, True], [True, True]])
    np.testing.assert_array_equal(threshold_mask(probs, 0.6), [[False, False], [False, True]])
    with pytest.raises(RLEError, match="NaN"):
        threshold_mask(np.array([[np.nan, 0.1]]), 0.5)


def test_remove_small_components():
    m = np.zeros((10, 12), dtype=np.uint8)
    m[0, 0] = 1  # area 1
    m[2:4, 2:4] = 1  # area 4
    m[6:9, 6:9] = 1  # area 9
    m[0, 10] = m[1, 11] = 1  # two pixels touching diagonally: area 2 with 8-connectivity
    before = m.copy()

    out = remove_small_components(m, min_area=4)
    assert out.dtype == np.bool_
    expected = np.zeros_like(m, dtype=bool)
    expected[2:4, 2:4] = expected[6:9, 6:9] = True
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(m, before)  # not mutated

    # diagonal neighbours: one component of 2 with 8-connectivity, two of 1 with 4
    assert remove_small_components(m, 2)[0, 10] and remove_small_components(m, 2)[1, 11]
    assert not remove_small_components(m, 2, connectivity=4)[0, 10]
    np.testing.assert_array_equal(remove_small_components(m, 10), np.zeros_like(m, dtype=bool))
    np.testing.assert_array_equal(remove_small_components(m, 1), m.astype(bool))
    assert not remove_small_components(np.zeros((4, 5), bool), 3).any()
