"""Tests for nao_jax.data.cifar (fake archives always; real files if present)."""

import io
import os
import pickle
import re
import sys
import tarfile
import types

import numpy as np
import pytest
from PIL import Image

from nao_jax.data import cifar


def _data_dir() -> str:
    data_dir = os.environ.get('NAO_DATA_DIR')
    if not data_dir:
        pytest.skip('NAO_DATA_DIR not set; real-data test skipped')
    return data_dir


def _real_file(*parts: str) -> str:
    path = os.path.join(_data_dir(), *parts)
    if not os.path.exists(path):
        pytest.skip(f'{path} missing; real-data test skipped')
    return path


def _fixtures(dataset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lossless PNG fixtures: (test indices, uint8[20, 32, 32, 3], labels)."""
    folder = _real_file('cifar10', 'lossless_png')
    rows = []
    for f in os.listdir(folder):
        m = re.fullmatch(rf'{dataset}_(\d+)_(\d+)\.png', f)
        if m:
            with Image.open(os.path.join(folder, f)) as im:
                rows.append((int(m[1]), np.asarray(im.convert('RGB')), int(m[2])))
    rows.sort(key=lambda r: r[0])
    idx, x, y = zip(*rows)
    return np.array(idx), np.stack(x), np.array(y)


def _rng_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(
        0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / mse)


# --------------------------------------------------------------------------
# Python pickle archives.
# --------------------------------------------------------------------------


def _batch_blob(x: np.ndarray, labels: np.ndarray, label_key: bytes) -> bytes:
    """A batch laid out like the original release (bytes keys, CHW rows)."""
    data = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
    return pickle.dumps({b'batch_label': b'fake', label_key: labels.tolist(),
                         b'data': data, b'filenames': [b'f'] * len(x)},
                        protocol=2)


def _write_python_archive(root, name, splits, meta=None, as_tar=True,
                          skip=()):
    """Writes a fake CIFAR python release; returns its path."""
    folder = 'cifar-10-batches-py' if name == 'cifar10' else 'cifar-100-python'
    label_key = b'labels' if name == 'cifar10' else b'fine_labels'
    members = {n: _batch_blob(x, y, label_key) for n, (x, y) in splits.items()
               if n not in skip}
    if meta is not None:
        members['batches.meta' if name == 'cifar10' else 'meta'] = (
            pickle.dumps(meta, protocol=2))
    if not as_tar:
        os.makedirs(root / folder)
        for n, blob in members.items():
            (root / folder / n).write_bytes(blob)
        return root / folder
    path = root / ('cifar-10-python.tar.gz' if name == 'cifar10'
                   else 'cifar-100-python.tar.gz')
    with tarfile.open(path, 'w:gz') as tar:
        for n, blob in members.items():
            info = tarfile.TarInfo(f'{folder}/{n}')
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def _cifar10_splits(n_per_batch=3):
    rng = np.random.default_rng(1)
    splits = {}
    for i, n in enumerate([f'data_batch_{k}' for k in range(1, 6)] +
                          ['test_batch']):
        splits[n] = (_rng_images(n_per_batch, seed=i),
                     rng.integers(0, 10, n_per_batch))
    return splits


@pytest.mark.parametrize('as_tar', [True, False])
def test_python_archive_cifar10_round_trip(tmp_path, as_tar):
    splits = _cifar10_splits()
    meta = {b'label_names': [c.encode() for c in cifar.CIFAR10_CLASSES]}
    _write_python_archive(tmp_path, 'cifar10', splits, meta, as_tar=as_tar)
    data = cifar.load_cifar('cifar10', 'python', tmp_path)
    train = [splits[f'data_batch_{k}'] for k in range(1, 6)]
    np.testing.assert_array_equal(data.x_train,
                                  np.concatenate([x for x, _ in train]))
    np.testing.assert_array_equal(data.y_train,
                                  np.concatenate([y for _, y in train]))
    np.testing.assert_array_equal(data.x_test, splits['test_batch'][0])
    np.testing.assert_array_equal(data.y_test, splits['test_batch'][1])
    assert data.x_train.dtype == np.uint8 and data.y_train.dtype == np.int32
    assert data.num_classes == 10
    assert data.class_names == cifar.CIFAR10_CLASSES
    # 'auto' finds the same archive.
    auto = cifar.load_cifar('cifar10', 'auto', tmp_path)
    np.testing.assert_array_equal(auto.x_test, data.x_test)


def test_python_archive_cifar100_uses_fine_labels(tmp_path):
    x, fine = _rng_images(4), np.array([0, 99, 42, 7])
    blob = pickle.dumps({b'data': x.transpose(0, 3, 1, 2).reshape(4, -1),
                         b'fine_labels': fine.tolist(),
                         b'coarse_labels': [19, 0, 3, 1]}, protocol=2)
    folder = tmp_path / 'cifar100' / 'cifar-100-python'
    folder.mkdir(parents=True)
    (folder / 'train').write_bytes(blob)
    (folder / 'test').write_bytes(blob)
    data = cifar.load_cifar('cifar100', 'auto', tmp_path)  # <dir>/cifar100/.
    np.testing.assert_array_equal(data.x_test, x)
    np.testing.assert_array_equal(data.y_test, fine)
    assert data.num_classes == 100 and data.class_names == ()


def test_python_archive_missing_batch(tmp_path):
    _write_python_archive(tmp_path, 'cifar10', _cifar10_splits(),
                          skip=('data_batch_3',))
    with pytest.raises(FileNotFoundError, match='data_batch_3'):
        cifar.load_cifar('cifar10', 'python', tmp_path)


def test_python_archive_wrong_shape(tmp_path):
    splits = _cifar10_splits()
    folder = _write_python_archive(tmp_path, 'cifar10', splits, as_tar=False)
    bad = pickle.dumps({b'data': np.zeros((2, 100), np.uint8),
                        b'labels': [0, 1]}, protocol=2)
    (folder / 'test_batch').write_bytes(bad)
    with pytest.raises(ValueError, match=r'test_batch.*\(2, 100\)'):
        cifar.load_cifar('cifar10', 'python', folder)


def test_python_archive_refuses_code(tmp_path):
    splits = _cifar10_splits()
    folder = _write_python_archive(tmp_path, 'cifar10', splits, as_tar=False)
    (folder / 'test_batch').write_bytes(pickle.dumps(os.getcwd, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match='only numpy'):
        cifar.load_cifar('cifar10', 'python', folder)


def test_python_archive_real_fixture_pixels(tmp_path):
    """Real test images through the CHW pickle layout come back exactly."""
    _, x10, y10 = _fixtures('cifar10')
    _, x100, y100 = _fixtures('cifar100')
    splits = {n: (x10, y10) for n in
              [f'data_batch_{k}' for k in range(1, 6)] + ['test_batch']}
    _write_python_archive(tmp_path, 'cifar10', splits)
    _write_python_archive(tmp_path, 'cifar100',
                          {'train': (x100, y100), 'test': (x100, y100)})
    for name, x, y in (('cifar10', x10, y10), ('cifar100', x100, y100)):
        data = cifar.load_cifar(name, 'python', tmp_path)
        np.testing.assert_array_equal(data.x_test, x)
        np.testing.assert_array_equal(data.y_test, y)


# --------------------------------------------------------------------------
# Image folders and tars.
# --------------------------------------------------------------------------


def _write_tree(root, images: dict[tuple[str, str, str], np.ndarray],
                suffix='.png'):
    for (split, cls, stem), img in images.items():
        os.makedirs(root / split / cls, exist_ok=True)
        Image.fromarray(img).save(root / split / cls / f'{stem}{suffix}')


def _toy_tree(classes=cifar.CIFAR10_CLASSES, stems=('0', '2', '10')):
    """(split, class, stem) -> image, 3 images per class and split."""
    x = _rng_images(2 * len(classes) * len(stems))
    keys = [(s, c, t) for s in ('train', 'test') for c in classes for t in stems]
    return dict(zip(keys, x))


def _expected(tree, split, classes, stems=('0', '2', '10')):
    x = np.stack([tree[(split, c, t)] for c in classes for t in stems])
    y = np.repeat(np.arange(len(classes)), len(stems))
    return x, y


def test_image_folder_round_trip_numeric_order(tmp_path):
    tree = _toy_tree()
    _write_tree(tmp_path, tree)
    data = cifar.load_cifar('cifar10', 'folder', tmp_path)
    for split, x, y in (('train', data.x_train, data.y_train),
                        ('test', data.x_test, data.y_test)):
        want_x, want_y = _expected(tree, split, cifar.CIFAR10_CLASSES)
        np.testing.assert_array_equal(x, want_x)  # '2' before '10'.
        np.testing.assert_array_equal(y, want_y)
    assert data.class_names == cifar.CIFAR10_CLASSES


def test_image_tar_with_prefix_matches_folder(tmp_path):
    tree = _toy_tree()
    _write_tree(tmp_path / 'src' / 'cifar10', tree)
    tar_path = tmp_path / 'cifar10_png.tar.gz'
    with tarfile.open(tar_path, 'w:gz') as tar:
        tar.add(tmp_path / 'src' / 'cifar10', arcname='cifar10')
    folder = cifar.load_cifar('cifar10', 'folder', tmp_path / 'src' / 'cifar10')
    tarred = cifar.load_cifar('cifar10', 'folder', tar_path, num_workers=2)
    for a, b in zip(folder[:4], tarred[:4]):
        np.testing.assert_array_equal(a, b)
    limited = cifar.load_image_folder('cifar10', tar_path, limit_per_class=2)
    want_x, _ = _expected(tree, 'test', cifar.CIFAR10_CLASSES, ('0', '2'))
    np.testing.assert_array_equal(limited.x_test, want_x)
    for where in (tmp_path, tar_path):  # Finds the tar / takes it as given.
        auto = cifar.load_cifar('cifar10', 'auto', where)
        np.testing.assert_array_equal(auto.x_test, folder.x_test)


def test_image_folder_sorted_or_explicit_classes(tmp_path):
    classes = [f'c{i:03d}' for i in range(100)]
    tree = _toy_tree(classes[::-1], stems=('0',))
    _write_tree(tmp_path, tree)
    data = cifar.load_image_folder('cifar100', tmp_path)  # Sorted order.
    np.testing.assert_array_equal(data.x_test[5], tree[('test', 'c005', '0')])
    assert data.y_test[5] == 5 and data.class_names[5] == 'c005'
    explicit = cifar.load_image_folder('cifar100', tmp_path,
                                       class_names=classes[::-1])
    np.testing.assert_array_equal(explicit.x_test[5],
                                  tree[('test', 'c094', '0')])


def test_image_folder_errors(tmp_path):
    tree = _toy_tree(stems=('0',))
    _write_tree(tmp_path, tree)
    os.rename(tmp_path / 'test' / 'frog', tmp_path / 'test' / 'toad')
    with pytest.raises(FileNotFoundError, match=r"test/ lacks.*'frog'"):
        cifar.load_cifar('cifar10', 'folder', tmp_path)
    os.remove(tmp_path / 'test' / 'toad' / '0.png')
    with pytest.raises(ValueError, match='toad has no images'):
        cifar.load_cifar('cifar10', 'folder', tmp_path)
    os.rmdir(tmp_path / 'test' / 'toad')
    _write_tree(tmp_path, {('test', 'frog', '0'): np.zeros((32, 30, 3), np.uint8)})
    with pytest.raises(ValueError, match=r'frog/0\.png has shape \(32, 30, 3\)'):
        cifar.load_cifar('cifar10', 'folder', tmp_path)
    _write_tree(tmp_path, {('test', 'frog', '0'): np.zeros((32, 32, 3), np.uint8),
                           ('train', 'zebra', '0'): np.zeros((32, 32, 3), np.uint8)})
    with pytest.raises(ValueError, match='zebra'):
        cifar.load_cifar('cifar10', 'folder', tmp_path)


def test_image_folder_cache(tmp_path, monkeypatch):
    tree = _toy_tree(stems=('0',))
    _write_tree(tmp_path / 'data', tree)
    cache = tmp_path / 'cache'
    first = cifar.load_cifar('cifar10', 'folder', tmp_path / 'data',
                             cache_dir=cache)
    assert len(os.listdir(cache)) == 1

    def no_decode(*args):
        raise AssertionError('decoded again despite the cache')

    monkeypatch.setattr(cifar, '_decode_chunk', no_decode)
    second = cifar.load_cifar('cifar10', 'folder', tmp_path / 'data',
                              cache_dir=cache)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    (cache_file,) = cache.iterdir()
    from_npz = cifar.load_cifar('cifar10', 'npz', cache_file)
    np.testing.assert_array_equal(from_npz.x_train, first.x_train)
    assert from_npz.class_names == cifar.CIFAR10_CLASSES


def test_jpeg_fast_path_matches_pillow():
    img = _rng_images(1)[0] // 4 * 4
    for kwargs in ({}, {'progressive': True}):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, 'JPEG', quality=90, **kwargs)
        blob = buf.getvalue()
        assert cifar._is_plain_rgb_jpeg(blob)
        with Image.open(io.BytesIO(blob)) as im:
            np.testing.assert_array_equal(cifar._decode_one('x', blob),
                                          np.asarray(im))
    buf = io.BytesIO()
    Image.fromarray(img[:, :16]).save(buf, 'JPEG')
    assert not cifar._is_plain_rgb_jpeg(buf.getvalue())
    with pytest.raises(ValueError, match='shape'):
        cifar._decode_one('small.jpg', buf.getvalue())


# --------------------------------------------------------------------------
# Entry point, tfds, dev split.
# --------------------------------------------------------------------------


def test_bad_names_and_paths(tmp_path):
    with pytest.raises(ValueError, match="Unknown dataset 'mnist'"):
        cifar.load_cifar('mnist')
    with pytest.raises(ValueError, match="Unknown source 'hdf5'"):
        cifar.load_cifar('cifar10', 'hdf5', tmp_path)
    with pytest.raises(FileNotFoundError, match="No 'python'"):
        cifar.load_cifar('cifar10', 'python', tmp_path)
    with pytest.raises(FileNotFoundError, match='not found'):
        cifar.load_image_folder('cifar10', tmp_path / 'nope')


def test_tfds_missing_names_packages(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'tensorflow', None)
    monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)
    with pytest.raises(ImportError, match='tensorflow-cpu and tensorflow-datasets'):
        cifar.load_cifar('cifar10', 'auto', tmp_path)  # Nothing local.


def test_tfds_path_with_fake_module(monkeypatch):
    x, y = _rng_images(4), np.array([1, 2, 3, 99])
    calls = {}

    def load(name, **kwargs):
        calls.update(kwargs, name=name)
        return [(x[:2], y[:2]), (x[2:], y[2:])]

    tf = types.SimpleNamespace(config=types.SimpleNamespace(
        set_visible_devices=lambda devices, kind: calls.update(hidden=kind)))
    tfds = types.SimpleNamespace(
        load=load, as_numpy=lambda t: t,
        download=types.SimpleNamespace(DownloadConfig=lambda manual_dir: manual_dir))
    monkeypatch.setitem(sys.modules, 'tensorflow', tf)
    monkeypatch.setitem(sys.modules, 'tensorflow_datasets', tfds)
    data = cifar.load_cifar('cifar100', 'tfds', tfds_data_dir='/d',
                            tfds_manual_dir='/m')
    np.testing.assert_array_equal(data.x_test, x[2:])
    np.testing.assert_array_equal(data.y_test, y[2:])
    assert calls['name'] == 'cifar100' and calls['data_dir'] == '/d'
    assert calls['split'] == ['train', 'test'] and calls['batch_size'] == -1
    assert calls['as_supervised'] and calls['hidden'] == 'GPU'
    assert calls['download_and_prepare_kwargs'] == {'download_config': '/m'}


def test_make_data_rejects_bad_arrays():
    x, y = _rng_images(2), np.array([0, 1])
    with pytest.raises(ValueError, match='shape'):
        cifar._make_data('cifar10', x[:, :16], y, x, y)
    with pytest.raises(ValueError, match='uint8'):
        cifar._make_data('cifar10', x.astype(np.float32), y, x, y)
    with pytest.raises(ValueError, match=r'outside \[0, 10\)'):
        cifar._make_data('cifar10', x, y, x, np.array([0, 10]))
    with pytest.raises(ValueError, match='labels have shape'):
        cifar._make_data('cifar10', x, y[:1], x, y)


def test_dev_split():
    x, y = np.arange(100)[:, None] * np.ones((1, 3)), np.arange(100) % 10
    xt, yt, xd, yd = cifar.dev_split(x, y, num_dev=20, seed=3)
    assert len(xt) == 80 and len(xd) == 20
    ids = np.concatenate([xt[:, 0], xd[:, 0]])
    np.testing.assert_array_equal(np.sort(ids), np.arange(100))
    np.testing.assert_array_equal(yd, xd[:, 0] % 10)
    again = cifar.dev_split(x, y, num_dev=20, seed=3)
    np.testing.assert_array_equal(again[2], xd)
    assert not np.array_equal(cifar.dev_split(x, y, 20, seed=4)[2], xd)
    assert not np.array_equal(xd[:, 0], np.arange(80, 100))  # Random.
    last = cifar.dev_split(x, y, 20, shuffle=False)
    np.testing.assert_array_equal(last[2][:, 0], np.arange(80, 100))
    with pytest.raises(ValueError, match='num_dev'):
        cifar.dev_split(x, y, num_dev=100)


# --------------------------------------------------------------------------
# Real files.
# --------------------------------------------------------------------------


def test_png_tree_of_real_fixtures(tmp_path):
    """The fixtures, laid out as test/<class>/<rank>.png, come back exactly."""
    _, x, y = _fixtures('cifar10')
    subset = np.load(_real_file('cifar10', 'cifar10_subset_uint8.npz'))
    tree = {}
    for c, cls in enumerate(cifar.CIFAR10_CLASSES):
        tree[('train', cls, '0')] = subset['x_train'][c * 100]
        if c not in y:  # Not among the first 20 test images.
            tree[('test', cls, '0')] = subset['x_test'][c * 50]
    rank = [int(np.sum(y[:i] == y[i])) for i in range(len(y))]
    for img, label, r in zip(x, y, rank):
        tree[('test', cifar.CIFAR10_CLASSES[label], str(r))] = img
    _write_tree(tmp_path, tree)
    data = cifar.load_cifar('cifar10', 'folder', tmp_path)
    for img, label, r in zip(x, y, rank):
        row = int(np.searchsorted(data.y_test, label)) + r
        assert data.y_test[row] == label
        np.testing.assert_array_equal(data.x_test[row], img)
    np.testing.assert_array_equal(data.x_train, subset['x_train'][::100])


@pytest.fixture(scope='module')
def jpeg_head():
    """The first 100 train / 50 test images per class of the real JPEG tar."""
    _real_file('cifar10', 'cifar10_jpeg.tar.gz')
    return cifar.load_cifar('cifar10', 'auto', _data_dir(),
                            limit_per_class=100)


def test_jpeg_tar_matches_decoded_subset(jpeg_head):
    subset = np.load(_real_file('cifar10', 'cifar10_subset_uint8.npz'))
    np.testing.assert_array_equal(jpeg_head.x_train, subset['x_train'])
    np.testing.assert_array_equal(jpeg_head.y_train, subset['y_train'])
    first_50 = (np.arange(1000) % 100) < 50
    np.testing.assert_array_equal(jpeg_head.x_test[first_50], subset['x_test'])
    np.testing.assert_array_equal(jpeg_head.y_test[first_50], subset['y_test'])


def test_jpeg_tar_test_images_close_to_lossless(jpeg_head):
    idx, x, y = _fixtures('cifar10')
    np.testing.assert_array_equal(idx, np.arange(20))
    psnr = []
    for i in idx:
        rank = int(np.sum(y[:i] == y[i]))  # k-th test image of its class.
        jpeg = jpeg_head.x_test[100 * y[i] + rank]
        psnr.append(_psnr(jpeg, x[i]))
        # Any other candidate of the same class is far worse: the mapping
        # picked the right file, not just a plausible one.
        other = jpeg_head.x_test[100 * y[i] + (rank + 1) % 100]
        assert _psnr(other, x[i]) < psnr[-1] - 5
    assert min(psnr) > 25, psnr
    assert 26 < np.mean(psnr) < 36, psnr
