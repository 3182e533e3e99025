"""CIFAR-10 / CIFAR-100 loading into host memory.

Every source ends in the same place: a `CifarData` whose images are
`uint8[N, 32, 32, 3]` (NHWC, RGB) and whose labels are `int32[N]`. Augmentation
and normalisation happen later, on device (`nao_jax.data.augment`).

Sources (`load_cifar(..., source=...)`):

* ``'tfds'``: tensorflow-datasets (``cifar10`` / ``cifar100``, fine labels).
  TensorFlow is imported lazily, only on this path.
* ``'python'``: the original pickle archives, ``cifar-10-python.tar.gz`` /
  ``cifar-10-batches-py/`` and ``cifar-100-python.tar.gz`` /
  ``cifar-100-python/``, read from the archive without extracting it.
* ``'folder'``: image trees ``{train,test}/<class>/<stem>.{png,jpg}``, either an
  extracted directory or a ``.tar(.gz)`` read in place (for example
  ``cifar10/cifar10_jpeg.tar.gz`` of the shared data folder).
* ``'npz'``: an ``.npz`` with ``x_train, y_train, x_test, y_test``.
* ``'auto'``: the first local file found under ``data_dir`` (python archive,
  then image folder, then image tar), else tensorflow-datasets.

Nothing is ever written next to the data; decoded image trees are cached only in
an explicit ``cache_dir``.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import os
import pickle
import re
import tarfile
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from absl import logging

CIFAR10_CLASSES: tuple[str, ...] = (
    'airplane', 'automobile', 'bird', 'cat', 'deer',
    'dog', 'frog', 'horse', 'ship', 'truck',
)
NUM_CLASSES: dict[str, int] = {'cifar10': 10, 'cifar100': 100}
IMAGE_SHAPE: tuple[int, int, int] = (32, 32, 3)
SPLITS: tuple[str, ...] = ('train', 'test')
IMAGE_SUFFIXES: tuple[str, ...] = ('.png', '.jpg', '.jpeg')

_PYTHON_ARCHIVES = {
    'cifar10': ('cifar-10-python.tar.gz', 'cifar-10-batches-py'),
    'cifar100': ('cifar-100-python.tar.gz', 'cifar-100-python'),
}
_PYTHON_MEMBERS = {
    'cifar10': {
        'train': tuple(f'data_batch_{i}' for i in range(1, 6)),
        'test': ('test_batch',),
        'meta': 'batches.meta',
    },
    'cifar100': {'train': ('train',), 'test': ('test',), 'meta': 'meta'},
}
_TFDS_PIP_HINT = 'pip install tensorflow-cpu tensorflow-datasets'
# Decoded images are handed to the pool in chunks: one task per image would
# cost more in scheduling than a 32x32 JPEG costs to decode.
_DECODE_CHUNK = 512


class CifarData(NamedTuple):
    """A CIFAR dataset in host memory.

    Attributes:
      x_train: uint8[N_train, 32, 32, 3], RGB, NHWC.
      y_train: int32[N_train], class index in [0, num_classes).
      x_test: uint8[N_test, 32, 32, 3].
      y_test: int32[N_test].
      num_classes: 10 or 100.
      class_names: name of each class index, or () when the source has none.
    """
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    class_names: tuple[str, ...] = ()


# --------------------------------------------------------------------------
# Entry point.
# --------------------------------------------------------------------------


def load_cifar(
    name: str,
    source: str = 'auto',
    data_dir: str | os.PathLike | None = None,
    *,
    tfds_data_dir: str | None = None,
    tfds_manual_dir: str | None = None,
    class_names: Sequence[str] | None = None,
    limit_per_class: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    num_workers: int | None = None,
) -> CifarData:
    """Loads CIFAR-10 or CIFAR-100 into host memory.

    Args:
      name: 'cifar10' or 'cifar100'.
      source: 'auto', 'tfds', 'python', 'folder' or 'npz' (see module doc).
      data_dir: where local files live: the archive / tar / .npz itself, or a
        folder holding it directly or under `<data_dir>/<name>/` (python
        archive under its release name; image tree as `train/` + `test/`;
        image tar as `<name>_*.tar.gz`, `<name>.tgz` or `<name>.tar(.gz)`).
      tfds_data_dir: tensorflow-datasets `data_dir` (default: its own).
      tfds_manual_dir: tensorflow-datasets manual download directory.
      class_names: class order for image folders (default: the standard
        CIFAR-10 order for 'cifar10', sorted folder names for 'cifar100').
      limit_per_class: image folders only: keep the first k images of each
        class in each split (by numeric file stem), e.g. for fast tests.
      cache_dir: image folders only: where decoded arrays are cached as .npz.
      num_workers: decoding threads for image folders (default: CPU count,
        at most 4).

    Returns:
      The dataset; images uint8[N, 32, 32, 3], labels int32[N].

    Raises:
      ValueError: unknown name or source, malformed data.
      FileNotFoundError: a local source was requested but not found.
      ImportError: tensorflow-datasets is needed but missing.
    """
    _check_name(name)
    if source == 'auto':
        source, path = _auto_source(name, data_dir)
    elif source == 'tfds':
        path = None
    elif source in ('python', 'folder', 'npz'):
        if data_dir is None:
            raise ValueError(f'source={source!r} needs data_dir.')
        data_dir = os.fspath(data_dir)
        # A file named explicitly is taken at its word; folders are searched.
        path = data_dir if os.path.isfile(data_dir) else _find_local(
            name, source, data_dir)
        if path is None:
            raise FileNotFoundError(
                f'No {source!r} CIFAR source for {name!r} under {data_dir}.')
    else:
        raise ValueError(
            f'Unknown source {source!r}; expected auto, tfds, python, folder or '
            'npz.')
    logging.info('Loading %s from %s (%s).', name, path or 'tfds', source)
    if source == 'tfds':
        return load_tfds(name, tfds_data_dir, manual_dir=tfds_manual_dir)
    if source == 'python':
        return load_python_archive(name, path)
    if source == 'npz':
        return load_npz(name, path)
    if class_names is None and name == 'cifar10':
        class_names = CIFAR10_CLASSES
    return load_image_folder(
        name, path, class_names=class_names, limit_per_class=limit_per_class,
        cache_dir=cache_dir, num_workers=num_workers)


def dev_split(
    x: np.ndarray,
    y: np.ndarray,
    num_dev: int = 5000,
    seed: int = 0,
    shuffle: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Holds out a dev split of the training set (NAO search: 45k / 5k).

    Args:
      x: [N, ...] training images.
      y: [N] training labels.
      num_dev: size of the dev split, 0 < num_dev < N.
      seed: seed of the random choice.
      shuffle: if False, take the last `num_dev` examples (the TF-WS
        convention; only sensible when the data is in the original CIFAR
        order, which image folders are not: they are sorted by class).

    Returns:
      (x_train, y_train, x_dev, y_dev), each part kept in its original relative
      order; x_train has N - num_dev rows, x_dev num_dev rows.
    """
    n = len(x)
    if len(y) != n:
        raise ValueError(f'x has {n} rows but y has {len(y)}.')
    if not 0 < num_dev < n:
        raise ValueError(f'num_dev must be in (0, {n}), got {num_dev}.')
    if shuffle:
        perm = np.random.default_rng(seed).permutation(n)
        dev_idx, train_idx = np.sort(perm[:num_dev]), np.sort(perm[num_dev:])
    else:
        train_idx, dev_idx = np.arange(n - num_dev), np.arange(n - num_dev, n)
    return x[train_idx], y[train_idx], x[dev_idx], y[dev_idx]


# --------------------------------------------------------------------------
# Finding local files.
# --------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if name not in NUM_CLASSES:
        raise ValueError(
            f'Unknown dataset {name!r}; expected one of {sorted(NUM_CLASSES)}.')


def _auto_source(
    name: str, data_dir: str | os.PathLike | None,
) -> tuple[str, str | None]:
    """Returns (source, path): the first local source found, else tfds."""
    if data_dir is not None and os.path.isfile(data_dir):
        data_dir = os.fspath(data_dir)
        base = os.path.basename(data_dir)
        if base.endswith('.npz'):
            return 'npz', data_dir
        if _is_tar(base):
            return ('python' if 'python' in base else 'folder'), data_dir
        raise ValueError(f'Cannot tell what kind of CIFAR file {data_dir} is.')
    if data_dir is not None:
        for source in ('python', 'folder'):
            path = _find_local(name, source, data_dir)
            if path is not None:
                return source, path
        logging.info('No local %s under %s; using tensorflow-datasets.', name,
                     data_dir)
    return 'tfds', None


def _find_local(
    name: str, source: str, data_dir: str | os.PathLike,
) -> str | None:
    """Searches folder `data_dir` and `data_dir/<name>` for a local source.

    Returns:
      The archive, folder or file of kind `source`, or None.
    """
    data_dir = os.fspath(data_dir)
    roots = [data_dir, os.path.join(data_dir, name)]
    if source == 'npz':
        candidates = [os.path.join(r, f'{name}.npz') for r in roots]
        return next((c for c in candidates if os.path.isfile(c)), None)
    if source == 'python':
        archive, folder = _PYTHON_ARCHIVES[name]
        first_member = os.path.join(folder, _PYTHON_MEMBERS[name]['test'][0])
        if os.path.isfile(os.path.join(data_dir, _PYTHON_MEMBERS[name]['test'][0])):
            return data_dir  # data_dir is the extracted folder itself.
        for root in roots:
            if os.path.isfile(os.path.join(root, first_member)):
                return os.path.join(root, folder)
            if os.path.isfile(os.path.join(root, archive)):
                return os.path.join(root, archive)
        return None
    if source == 'folder':
        for root in roots:
            if all(os.path.isdir(os.path.join(root, s)) for s in SPLITS):
                return root
        for root in roots:
            tars = sorted(
                os.path.join(root, f) for f in _listdir(root)
                if _is_tar(f) and (f.startswith(f'{name}_') or
                                   f.split('.', 1)[0] == name))
            if tars:
                return tars[0]
        return None
    raise ValueError(f'Unknown local source {source!r}.')


def _listdir(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []


def _is_tar(path: str) -> bool:
    return path.endswith(('.tar', '.tar.gz', '.tgz'))


# --------------------------------------------------------------------------
# tensorflow-datasets.
# --------------------------------------------------------------------------


def load_tfds(
    name: str,
    data_dir: str | None = None,
    *,
    manual_dir: str | None = None,
    download: bool = True,
) -> CifarData:
    """Loads CIFAR through tensorflow-datasets (CIFAR-100: fine labels).

    Args:
      name: 'cifar10' or 'cifar100' (the tfds names).
      data_dir: tfds data directory (None: tfds default).
      manual_dir: tfds manual download directory, for offline preparation.
      download: whether tfds may download and prepare the data.

    Returns:
      The dataset with images uint8[N, 32, 32, 3] and labels int32[N].

    Raises:
      ImportError: tensorflow or tensorflow-datasets is not installed.
    """
    _check_name(name)
    try:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise ImportError(
            f'Loading {name} from tensorflow-datasets needs the packages '
            f'tensorflow-cpu and tensorflow-datasets ({_TFDS_PIP_HINT}); '
            'alternatively pass data_dir with the CIFAR python archive or an '
            'image folder.') from e
    # TF would otherwise reserve GPU memory that JAX needs.
    tf.config.set_visible_devices([], 'GPU')
    kwargs = {}
    if manual_dir is not None:
        kwargs['download_and_prepare_kwargs'] = {
            'download_config': tfds.download.DownloadConfig(
                manual_dir=manual_dir)}
    train, test = tfds.as_numpy(tfds.load(
        name, split=['train', 'test'], batch_size=-1, as_supervised=True,
        data_dir=data_dir, download=download, **kwargs))
    return _make_data(name, train[0], train[1], test[0], test[1])


# --------------------------------------------------------------------------
# npz.
# --------------------------------------------------------------------------


def load_npz(name: str, path: str | os.PathLike) -> CifarData:
    """Loads an .npz with arrays x_train, y_train, x_test, y_test.

    Args:
      name: 'cifar10' or 'cifar100'.
      path: the .npz file.

    Returns:
      The dataset.
    """
    _check_name(name)
    keys = ('x_train', 'y_train', 'x_test', 'y_test')
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in keys if k not in f.files]
        if missing:
            raise ValueError(f'{path} lacks arrays {missing}; has {f.files}.')
        arrays = [f[k] for k in keys]
        names = tuple(str(c) for c in f['class_names']) if (
            'class_names' in f.files) else ()
    return _make_data(name, *arrays, class_names=names)


# --------------------------------------------------------------------------
# Original python pickle archives.
# --------------------------------------------------------------------------


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays: the archives are data, and
    arbitrary pickles could run code."""

    _ALLOWED = {
        ('numpy.core.multiarray', '_reconstruct'),
        ('numpy._core.multiarray', '_reconstruct'),
        ('numpy.core.numeric', '_frombuffer'),  # Protocol 5 arrays.
        ('numpy._core.numeric', '_frombuffer'),
        ('numpy', 'ndarray'),
        ('numpy', 'dtype'),
        # Python 3 writes bytes as _codecs.encode(str, 'latin1') in protocol 2.
        ('_codecs', 'encode'),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f'CIFAR archive refers to {module}.{name}; only numpy arrays '
                'are allowed.')
        if module.startswith('numpy.core.'):
            # numpy>=2 moved it; avoid the numpy.core deprecation shim.
            module = 'numpy._core.' + module[len('numpy.core.'):]
        return super().find_class(module, name)


def _unpickle(blob: bytes) -> dict[str, object]:
    """Unpickles one CIFAR batch; keys become str whatever the writer used."""
    obj = _NumpyOnlyUnpickler(io.BytesIO(blob), encoding='bytes').load()
    if not isinstance(obj, dict):
        raise ValueError(f'Expected a dict in a CIFAR batch, got {type(obj)}.')
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_members(path: str, names: Sequence[str]) -> dict[str, bytes]:
    """Reads the named files (by base name) from a tar archive or folder."""
    wanted = set(names)
    found: dict[str, bytes] = {}
    if os.path.isdir(path):
        for n in names:
            p = os.path.join(path, n)
            if os.path.isfile(p):
                with open(p, 'rb') as f:
                    found[n] = f.read()
    else:
        with tarfile.open(path, 'r:*') as tar:
            for m in tar:
                base = m.name.rsplit('/', 1)[-1]
                if m.isfile() and base in wanted and base not in found:
                    found[base] = tar.extractfile(m).read()
    return found


def load_python_archive(name: str, path: str | os.PathLike) -> CifarData:
    """Loads the original CIFAR python-pickle release.

    Args:
      name: 'cifar10' (data_batch_1..5, test_batch, labels) or 'cifar100'
        (train, test, fine_labels).
      path: the .tar.gz archive or its extracted folder
        (`cifar-10-batches-py/`, `cifar-100-python/`).

    Returns:
      The dataset, in the original order.
    """
    _check_name(name)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f'CIFAR python archive not found: {path}')
    spec = _PYTHON_MEMBERS[name]
    wanted = (*spec['train'], *spec['test'], spec['meta'])
    blobs = _read_members(path, wanted)
    missing = [n for n in (*spec['train'], *spec['test']) if n not in blobs]
    if missing:
        raise FileNotFoundError(f'{path} lacks the {name} batches {missing}.')
    label_key = 'labels' if name == 'cifar10' else 'fine_labels'
    parts = {}
    for split in SPLITS:
        xs, ys = zip(*(_decode_batch(_unpickle(blobs[n]), label_key, n)
                       for n in spec[split]))
        parts[split] = np.concatenate(xs), np.concatenate(ys)
    names = ()
    if spec['meta'] in blobs:
        meta = _unpickle(blobs[spec['meta']])
        raw = meta.get('label_names' if name == 'cifar10' else
                       'fine_label_names', ())
        names = tuple(n.decode() if isinstance(n, bytes) else str(n)
                      for n in raw)
    return _make_data(name, *parts['train'], *parts['test'], class_names=names)


def _decode_batch(
    batch: dict[str, object], label_key: str, member: str,
) -> tuple[np.ndarray, np.ndarray]:
    """uint8[N, 3072] channel-major rows -> (uint8[N, 32, 32, 3], int32[N])."""
    if 'data' not in batch or label_key not in batch:
        raise ValueError(
            f'CIFAR batch {member} lacks "data" or "{label_key}"; keys: '
            f'{sorted(batch)}.')
    data = np.asarray(batch['data'])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f'CIFAR batch {member}: data has shape {data.shape}, expected '
            '[N, 3072].')
    if len(labels) != len(data):
        raise ValueError(
            f'CIFAR batch {member}: {len(data)} images but {len(labels)} labels.')
    x = data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x), labels.astype(np.int32)


# --------------------------------------------------------------------------
# Image folders and image tars.
# --------------------------------------------------------------------------


class _Entry(NamedTuple):
    """One image file found in a tree: its split, class folder, and location
    (a path, or the member name inside a tar)."""
    split: str
    cls: str
    stem: str
    where: str


def natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders digit runs numerically ('2' < '10' < '0011')."""
    return tuple((0, int(t)) if t.isdigit() else (1, t)
                 for t in re.split(r'(\d+)', text) if t)


def _parse_image_path(rel: str) -> tuple[str, _Entry] | None:
    """Splits '<prefix>/<split>/<class>/<stem>.<ext>' into (prefix, entry)."""
    parts = rel.replace(os.sep, '/').split('/')
    if len(parts) < 3 or not parts[-1].lower().endswith(IMAGE_SUFFIXES):
        return None
    split, cls, fname = parts[-3:]
    if split not in SPLITS or fname.startswith('.'):
        return None
    stem = fname.rsplit('.', 1)[0]
    return '/'.join(parts[:-3]), _Entry(split, cls, stem, rel)


def _list_folder(root: str) -> list[_Entry]:
    """Image files of an extracted tree root/{train,test}/<class>/*."""
    entries = []
    for split in SPLITS:
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            raise FileNotFoundError(f'Image folder {root} has no {split}/ folder.')
        for cls in sorted(os.listdir(split_dir)):
            cls_dir = os.path.join(split_dir, cls)
            if not os.path.isdir(cls_dir):
                continue
            files = [f for f in os.listdir(cls_dir)
                     if f.lower().endswith(IMAGE_SUFFIXES)]
            if not files:
                raise ValueError(f'Class folder {cls_dir} has no images.')
            for f in files:
                entries.append(_Entry(split, cls, f.rsplit('.', 1)[0],
                                      os.path.join(cls_dir, f)))
    return entries


def _stream_tar(
    path: str, on_blob: Callable[[_Entry, bytes], None],
) -> None:
    """Streams a tar once, handing the bytes of every image to `on_blob`.

    All images must share one prefix before `{train,test}/` (e.g. a top-level
    `cifar10/` folder), so that two trees in one tar cannot silently mix.
    """
    prefix = None
    with tarfile.open(path, 'r|*') as tar:
        for m in tar:
            if not m.isfile():
                continue
            parsed = _parse_image_path(m.name)
            if parsed is None:
                continue
            p, entry = parsed
            if prefix is None:
                prefix = p
            elif p != prefix:
                raise ValueError(
                    f'{path} holds image trees under two prefixes, {prefix!r} '
                    f'and {p!r}.')
            on_blob(entry, tar.extractfile(m).read())


# Start-of-frame markers (baseline, progressive, ...); they carry the size.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_APP14_ADOBE = 0xEE


def _is_plain_rgb_jpeg(blob: bytes) -> bool:
    """Whether `blob` is a 32x32, 3-channel JPEG without an Adobe marker.

    Such files can go straight to libjpeg (`_decode_jpeg_fast`), skipping
    Pillow's Python header parser, which costs as much as the decode itself for
    a 32x32 image. Anything else (other sizes, grey, CMYK, Adobe colour
    transforms) takes the general path.
    """
    if blob[:2] != b'\xff\xd8':
        return False
    i = 2
    while i + 9 < len(blob) and blob[i] == 0xFF:
        marker = blob[i + 1]
        if marker == _JPEG_APP14_ADOBE:
            return False
        if marker in _JPEG_SOF:
            height = int.from_bytes(blob[i + 5:i + 7], 'big')
            width = int.from_bytes(blob[i + 7:i + 9], 'big')
            return (height, width, blob[i + 9]) == IMAGE_SHAPE
        i += 2 + int.from_bytes(blob[i + 2:i + 4], 'big')
    return False


def _decode_one(where: str, blob: bytes | None) -> np.ndarray:
    """Decodes one image (bytes, or the file at `where`) to uint8[32, 32, 3]."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    try:
        if blob is not None and _is_plain_rgb_jpeg(blob):
            im = Image.frombytes('RGB', IMAGE_SHAPE[1::-1], blob, 'jpeg', 'RGB',
                                 '')
            return np.asarray(im)
        with Image.open(io.BytesIO(blob) if blob is not None else where) as im:
            if im.mode != 'RGB':
                im = im.convert('RGB')
            arr = np.asarray(im)
    except (OSError, ValueError) as e:
        raise ValueError(f'Cannot decode image {where}: {e}') from e
    if arr.shape != IMAGE_SHAPE:
        raise ValueError(
            f'Image {where} has shape {arr.shape}, expected {IMAGE_SHAPE}.')
    return arr


def _decode_chunk(items: Sequence[tuple[str, bytes | None]]) -> np.ndarray:
    """Decodes images given as (name, bytes) or (path, None).

    Returns:
      uint8[len(items), 32, 32, 3].
    """
    out = np.empty((len(items), *IMAGE_SHAPE), np.uint8)
    for i, (where, blob) in enumerate(items):
        out[i] = _decode_one(where, blob)
    return out


class _ChunkedDecoder:
    """Decodes images on a thread pool while the caller is still reading.

    libjpeg / zlib run without the GIL, so reading the tar and decoding overlap
    in part even on two cores. Use as a context manager: leaving it cancels
    any work still queued (e.g. after an error).
    """

    def __init__(self, num_workers: int):
        self._pool = concurrent.futures.ThreadPoolExecutor(num_workers)
        self._pending: list[tuple[str, bytes | None]] = []
        self._futures: list[concurrent.futures.Future] = []

    def __enter__(self) -> '_ChunkedDecoder':
        return self

    def __exit__(self, *exc_info) -> None:
        self._pool.shutdown(cancel_futures=True)

    def add(self, where: str, blob: bytes | None) -> None:
        self._pending.append((where, blob))
        if len(self._pending) >= _DECODE_CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._futures.append(self._pool.submit(_decode_chunk, self._pending))
            self._pending = []

    def result(self) -> np.ndarray:
        """Returns uint8[N, 32, 32, 3] in the order images were added."""
        self._flush()
        parts = [f.result() for f in self._futures]
        if not parts:
            return np.zeros((0, *IMAGE_SHAPE), np.uint8)
        return np.concatenate(parts)


def _default_workers(num_workers: int | None) -> int:
    return num_workers or min(4, os.cpu_count() or 1)


def load_image_folder(
    name: str,
    path: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    limit_per_class: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    num_workers: int | None = None,
) -> CifarData:
    """Loads an image tree `{train,test}/<class>/<stem>.{png,jpg}`.

    The tree is either an extracted folder or a .tar / .tar.gz read in place
    (members may sit under one common top-level folder). Class index is the
    position in `class_names`, or in the sorted class-folder names when it is
    None (for CIFAR-10 and CIFAR-100 the standard label order is alphabetical,
    so both agree when folders carry the official class names). Within a
    class, images are ordered by file stem, digit runs compared numerically, so
    `test/<class>/k.jpg` is row k of that class.

    Args:
      name: 'cifar10' or 'cifar100'.
      path: the folder or tar.
      class_names: explicit class order; every class must have a folder in both
        splits and no other class folder may exist.
      limit_per_class: keep only the first k images per class and split.
      cache_dir: if set, decoded arrays are cached there as an .npz keyed by
        the source path, size, mtime and arguments.
      num_workers: decoding threads.

    Returns:
      The dataset, sorted by class, then by file stem.
    """
    _check_name(name)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f'Image folder or tar not found: {path}')
    if limit_per_class is not None and limit_per_class <= 0:
        raise ValueError(f'limit_per_class must be positive, got {limit_per_class}.')
    cache_file = None
    if cache_dir is not None:
        cache_file = _cache_path(name, path, class_names, limit_per_class,
                                 cache_dir)
        if os.path.isfile(cache_file):
            logging.info('Reading decoded %s from cache %s.', name, cache_file)
            return load_npz(name, cache_file)

    with _ChunkedDecoder(_default_workers(num_workers)) as decoder:
        if os.path.isdir(path):
            entries = _list_folder(path)
            blobs: list[bytes | None] = [None] * len(entries)
            decode_early = False
        else:
            # Without a limit every image is needed, so decoding starts while
            # the tar is still being read; with one, only the selected few are.
            decode_early = limit_per_class is None
            entries, blobs = _read_tar(path, decoder if decode_early else None)
        class_to_idx = _class_index(name, path, entries, class_names)
        # Rows sorted by (split, class index, stem): train rows first.
        order = sorted(range(len(entries)), key=lambda i: (
            entries[i].split != 'train', class_to_idx[entries[i].cls],
            natural_key(entries[i].stem)))
        if limit_per_class is not None:
            order = _first_k_per_class(order, entries, limit_per_class)
        if decode_early:
            images = decoder.result()[np.array(order, np.int64)]
        else:
            for i in order:
                decoder.add(entries[i].where, blobs[i])
            images = decoder.result()
    labels = np.array([class_to_idx[entries[i].cls] for i in order], np.int32)
    n_train = sum(entries[i].split == 'train' for i in order)
    names = tuple(sorted(class_to_idx, key=class_to_idx.get))
    data = _make_data(name, images[:n_train], labels[:n_train],
                      images[n_train:], labels[n_train:], class_names=names)
    if cache_file is not None:
        _write_cache(cache_file, data)
    return data


def _read_tar(
    path: str, decoder: _ChunkedDecoder | None,
) -> tuple[list[_Entry], list[bytes | None]]:
    """Image entries of a tar in archive order, and their bytes.

    With a `decoder`, each image goes straight to it and its bytes are not
    kept (the returned list holds None).
    """
    entries: list[_Entry] = []
    blobs: list[bytes | None] = []

    def on_blob(entry: _Entry, blob: bytes) -> None:
        entries.append(entry)
        if decoder is None:
            blobs.append(blob)
        else:
            decoder.add(entry.where, blob)
            blobs.append(None)

    _stream_tar(path, on_blob)
    return entries, blobs


def _first_k_per_class(
    order: list[int], entries: Sequence[_Entry], k: int,
) -> list[int]:
    """Keeps the first k indices of each (split, class) group of `order`."""
    seen: dict[tuple[str, str], int] = {}
    kept = []
    for i in order:
        group = (entries[i].split, entries[i].cls)
        seen[group] = seen.get(group, 0) + 1
        if seen[group] <= k:
            kept.append(i)
    return kept


def _class_index(
    name: str,
    path: str,
    entries: Sequence[_Entry],
    class_names: Sequence[str] | None,
) -> dict[str, int]:
    """Maps class folder -> index, checking both splits hold every class."""
    if not entries:
        raise ValueError(f'{path} holds no {{train,test}}/<class>/ images.')
    found = {s: {e.cls for e in entries if e.split == s} for s in SPLITS}
    if class_names is None:
        class_names = sorted(found['train'] | found['test'])
    class_names = list(class_names)
    if len(set(class_names)) != len(class_names):
        raise ValueError(f'class_names has duplicates: {class_names}.')
    if len(class_names) != NUM_CLASSES[name]:
        raise ValueError(
            f'{name} has {NUM_CLASSES[name]} classes but {path} gives '
            f'{len(class_names)}: {class_names[:12]}.')
    for split in SPLITS:
        missing = [c for c in class_names if c not in found[split]]
        if missing:
            raise FileNotFoundError(
                f'{path}: {split}/ lacks class folders (or they are empty): '
                f'{missing}.')
        extra = sorted(found[split] - set(class_names))
        if extra:
            raise ValueError(
                f'{path}: {split}/ has class folders not in class_names: {extra}.')
    return {c: i for i, c in enumerate(class_names)}


def _cache_path(
    name: str,
    path: str,
    class_names: Sequence[str] | None,
    limit_per_class: int | None,
    cache_dir: str | os.PathLike,
) -> str:
    st = os.stat(path)
    key = repr((os.path.abspath(path), st.st_size, st.st_mtime_ns,
                tuple(class_names or ()), limit_per_class))
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return os.path.join(os.fspath(cache_dir), f'{name}_decoded_{digest}.npz')


def _write_cache(cache_file: str, data: CifarData) -> None:
    os.makedirs(os.path.dirname(cache_file), exist_ok=True)
    tmp = f'{cache_file}.tmp{os.getpid()}.npz'
    np.savez(tmp, x_train=data.x_train, y_train=data.y_train,
             x_test=data.x_test, y_test=data.y_test,
             class_names=np.array(data.class_names))
    # Rename last, so a reader never sees a half-written cache.
    os.replace(tmp, cache_file)
    logging.info('Cached decoded images at %s.', cache_file)


# --------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------


def _make_data(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    class_names: Sequence[str] = (),
) -> CifarData:
    """Checks shapes, dtypes and label ranges, and builds a CifarData."""
    num_classes = NUM_CLASSES[name]
    arrays = {}
    for split, x, y in (('train', x_train, y_train), ('test', x_test, y_test)):
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE:
            raise ValueError(
                f'{name} {split} images have shape {x.shape}, expected '
                f'[N, 32, 32, 3].')
        if x.dtype != np.uint8:
            raise ValueError(f'{name} {split} images are {x.dtype}, not uint8.')
        if y.shape != (len(x),):
            raise ValueError(
                f'{name} {split}: labels have shape {y.shape}, expected '
                f'({len(x)},).')
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(
                f'{name} {split} labels span [{y.min()}, {y.max()}], outside '
                f'[0, {num_classes}).')
        arrays[split] = (x, y.astype(np.int32))
    class_names = tuple(class_names)
    if class_names and len(class_names) != num_classes:
        raise ValueError(
            f'{name} has {num_classes} classes, got {len(class_names)} names.')
    return CifarData(*arrays['train'], *arrays['test'], num_classes, class_names)
