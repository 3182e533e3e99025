"""Tests for nao_jax.data.augment (tiny batches; CPU)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nao_jax.data import augment


def _images(b: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(
        0, 256, (b, 32, 32, 3), dtype=np.uint8)


def _np_per_image(x: np.ndarray) -> np.ndarray:
    """NumPy transcription of tf.image.per_image_standardization."""
    x = x.astype(np.float64)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    std = x.std(axis=(1, 2, 3), keepdims=True)
    return (x - mean) / np.maximum(std, 1 / np.sqrt(32 * 32 * 3))


@pytest.mark.parametrize('normalization,style', [('per_image', 'pytorch'),
                                                 ('mean_std', 'tf')])
def test_augment_train_shape_dtype_determinism(normalization, style):
    x = _images(4)
    key = jax.random.key(0)
    out = augment.augment_train(x, key, cutout_style=style,
                                normalization=normalization)
    assert out.shape == (4, 32, 32, 3) and out.dtype == jnp.float32
    again = augment.augment_train(x, key, cutout_style=style,
                                  normalization=normalization)
    np.testing.assert_array_equal(out, again)
    other = augment.augment_train(x, jax.random.key(1), cutout_style=style,
                                  normalization=normalization)
    assert not np.array_equal(out, other)

def test_augment_train_accepts_raw_keys():
    out = augment.augment_train(_images(4), jax.random.PRNGKey(0))
    assert out.shape == (4, 32, 32, 3)


def test_random_crop_is_a_window_of_the_padded_image():
    x = _images(16, seed=1)
    out = np.asarray(augment.random_crop(x, jax.random.key(2)))
    padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
    seen = set()
    for img, pad in zip(out, padded):
        hits = [(dy, dx) for dy, dx in itertools.product(range(9), repeat=2)
                if np.array_equal(img, pad[dy:dy + 32, dx:dx + 32])]
        assert len(hits) == 1
        seen.add(hits[0])
    assert len(seen) > 8  # Offsets differ per image.


def test_random_crop_border_of_constant_image():
    x = np.full((256, 32, 32, 3), 255, np.uint8)
    out = np.asarray(augment.random_crop(x, jax.random.key(3)))
    rows = (out == 0).all(axis=(2, 3))  # [B, H] fully zero rows.
    cols = (out == 0).all(axis=(1, 3))  # [B, W].
    offsets = set()
    for r, c in zip(rows, cols):
        for line in (r, c):
            n = line.sum()
            assert n <= 4  # Never more than the pad on one side.
            # Zeros only as one block at the top/left or bottom/right.
            assert line[:n].all() or line[len(line) - n:].all()
        offsets.add(4 - r[:4].sum() + r[28:].sum())
    assert offsets == set(range(9))  # All offsets 0..8 occur.
    assert set(np.unique(out)) == {0, 255}


def test_random_flip():
    x = _images(32, seed=4)
    out = np.asarray(augment.random_flip(x, jax.random.key(5)))
    flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, x)]
    kept = [np.array_equal(o, i) for o, i in zip(out, x)]
    assert all(f != k for f, k in zip(flipped, kept))
    assert 4 < sum(flipped) < 28


@pytest.mark.parametrize('style,min_side', [('pytorch', 8), ('tf', 1)])
def test_cutout_mask_bounds(style, min_side):
    mask = np.asarray(augment.cutout_mask(jax.random.key(6), 512, 32, 32, 16,
                                          style))
    assert mask.shape == (512, 32, 32, 1)
    assert set(np.unique(mask)) <= {0.0, 1.0}
    areas = []
    for m in mask[..., 0]:
        ys, xs = np.nonzero(m == 0)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert len(ys) == h * w  # A rectangle.
        assert min_side <= h <= 16 and min_side <= w <= 16
        if style == 'tf':  # Clipped only at the bottom / right.
            assert h == 16 or ys.max() == 31
            assert w == 16 or xs.max() == 31
        areas.append(h * w)
    assert min(areas) >= min_side ** 2 and max(areas) == 256
    # Clipping happens (a corner square of the image is not always full).
    assert min(areas) < 256


def test_per_image_standardization_matches_numpy():
    x = _images(3, seed=7)
    x[2] = 77  # Constant image: the std floor keeps it finite (all zeros).
    got = np.asarray(augment.per_image_standardization(x))
    np.testing.assert_allclose(got, _np_per_image(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[2], 0.0)


def test_mean_std_and_eval():
    x = _images(2, seed=8)
    want = (x / 255.0 - np.array(augment.CIFAR10_MEAN)) / np.array(
        augment.CIFAR10_STD)
    got = augment.preprocess_eval(x, normalization='mean_std')
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    mean, std = augment.channel_mean_std(x)
    np.testing.assert_allclose(mean, (x / 255.0).mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(std, (x / 255.0).std(axis=(0, 1, 2)), rtol=1e-5)
    custom = augment.preprocess_eval(x, 'mean_std', mean, std)
    np.testing.assert_allclose(np.asarray(custom).mean(axis=(0, 1, 2)), 0,
                               atol=1e-5)
    np.testing.assert_allclose(augment.preprocess_eval(x), _np_per_image(x),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='normalization'):
        augment.preprocess_eval(x, normalization='zca')


def test_order_standardise_then_cutout():
    """With the crop disabled, out = per_image(flip(x)) * mask, exactly 0
    inside the square: cutout comes after standardisation."""
    x = _images(8, seed=9)
    out = np.asarray(augment.augment_train(x, jax.random.key(10), pad=0,
                                           cutout_style='tf'))
    for o, img in zip(out, x):
        cut = (o == 0).all(axis=-1)
        assert 0 < cut.sum() <= 256
        candidates = [_np_per_image(img[None])[0],
                      _np_per_image(img[None, :, ::-1])[0]]
        assert any(np.allclose(o[~cut], c[~cut], atol=1e-5) for c in candidates)
    no_cut = np.asarray(augment.augment_train(x, jax.random.key(10), pad=0,
                                              cutout=0))
    assert not (no_cut == 0).all(axis=-1).any()
