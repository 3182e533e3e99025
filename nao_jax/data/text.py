"""Word-level language-model data: PTB and WikiText-2 (NAO_SPEC §6.8).

Mirrors the AWD-LSTM / DARTS `data.py` Corpus: every line becomes
`line.split() + ['<eos>']` (blank lines give a lone `<eos>`), and the
vocabulary assigns ids in first-seen order over train, then valid, then test.
`batchify`, `get_batch` and `sample_seq_len` reproduce the streams, the
(input, target) windows and the variable-length BPTT of that recipe on numpy
arrays, ready to be fed to a jitted step.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import numpy as np

EOS = '<eos>'
SPLITS: tuple[str, ...] = ('train', 'valid', 'test')
# File-name patterns, tried in this order: Mikolov's PTB, the tokenised
# WikiText files as distributed with AWD-LSTM/DARTS, the WikiText release.
FILE_PATTERNS: tuple[str, ...] = ('ptb.{}.txt', '{}.txt', 'wiki.{}.tokens')


class Corpus(NamedTuple):
    """A tokenised corpus.

    Attributes:
      train: int32[N_train] token ids, `<eos>` after every line.
      valid: int32[N_valid].
      test: int32[N_test].
      idx2word: the vocabulary; id i is idx2word[i].
    """
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    idx2word: tuple[str, ...]

    @property
    def vocab_size(self) -> int:
        return len(self.idx2word)

    def word2idx(self) -> dict[str, int]:
        """Returns the inverse of `idx2word`."""
        return {w: i for i, w in enumerate(self.idx2word)}


def find_split_files(data_dir: str | os.PathLike) -> dict[str, str]:
    """Finds the train / valid / test files of a corpus directory.

    Args:
      data_dir: folder with `ptb.{train,valid,test}.txt`, `{train,valid,test}.txt`
        or `wiki.{train,valid,test}.tokens`.

    Returns:
      {'train': path, 'valid': path, 'test': path}.

    Raises:
      FileNotFoundError: no naming scheme has all three files.
    """
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f'Corpus directory not found: {data_dir}')
    for pattern in FILE_PATTERNS:
        paths = {s: os.path.join(data_dir, pattern.format(s)) for s in SPLITS}
        if all(os.path.isfile(p) for p in paths.values()):
            return paths
    names = ', '.join(pattern.format('{train,valid,test}')
                      for pattern in FILE_PATTERNS)
    raise FileNotFoundError(
        f'{data_dir} has no complete set of corpus files; looked for {names}. '
        f'Found: {sorted(os.listdir(data_dir))[:10]}.')


def tokenize_file(path: str | os.PathLike, word2idx: dict[str, int]) -> np.ndarray:
    """Reads one file into ids, adding unseen words to `word2idx` in place.

    Args:
      path: text file, one sentence per line.
      word2idx: vocabulary, grown in first-seen order.

    Returns:
      int32[num_tokens], one `<eos>` id after every line.
    """
    ids: list[int] = []
    with open(path, encoding='utf-8') as f:
        for line in f:
            for word in line.split() + [EOS]:
                idx = word2idx.get(word)
                if idx is None:
                    idx = word2idx[word] = len(word2idx)
                ids.append(idx)
    return np.array(ids, dtype=np.int32)


def load_corpus(data_dir: str | os.PathLike) -> Corpus:
    """Loads PTB or WikiText-2 from a directory (file naming auto-detected).

    Args:
      data_dir: see `find_split_files`.

    Returns:
      The corpus, with the vocabulary built over train, valid, test in turn.
    """
    paths = find_split_files(data_dir)
    word2idx: dict[str, int] = {}
    ids = {s: tokenize_file(paths[s], word2idx) for s in SPLITS}
    if len(ids['train']) == 0:
        raise ValueError(f'{paths["train"]} is empty.')
    return Corpus(ids['train'], ids['valid'], ids['test'], tuple(word2idx))


def batchify(ids: np.ndarray, batch_size: int) -> np.ndarray:
    """Cuts a token stream into `batch_size` parallel streams.

    Like `data.narrow(0, 0, nbatch * bsz).view(bsz, -1).t()`: the tail that does
    not fill a row is dropped and column j is the j-th contiguous chunk.

    Args:
      ids: int[N] token stream.
      batch_size: number of streams B.

    Returns:
      int32[N // B, B].
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f'Expected a 1-D token stream, got shape {ids.shape}.')
    if batch_size <= 0:
        raise ValueError(f'batch_size must be positive, got {batch_size}.')
    rows = len(ids) // batch_size
    if rows == 0:
        raise ValueError(
            f'{len(ids)} tokens cannot fill one row of batch size {batch_size}.')
    return np.ascontiguousarray(
        ids[:rows * batch_size].reshape(batch_size, rows).T, dtype=np.int32)


def get_batch(
    source: np.ndarray, i: int, seq_len: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns the window starting at row i and its next-token targets.

    Args:
      source: int32[T, B] from `batchify`.
      i: first row, 0 <= i < T - 1.
      seq_len: wanted length; shortened at the end of the stream.

    Returns:
      (inputs int32[L, B], targets int32[L, B]) with L = min(seq_len, T - 1 - i)
      and targets[t] = source[i + t + 1].
    """
    if not 0 <= i < len(source) - 1:
        raise ValueError(f'Row {i} leaves no target in a stream of {len(source)} rows.')
    if seq_len <= 0:
        raise ValueError(f'seq_len must be positive, got {seq_len}.')
    length = min(seq_len, len(source) - 1 - i)
    return source[i:i + length], source[i + 1:i + 1 + length]


def sample_seq_len(
    rng: np.random.Generator,
    bptt: int = 35,
    *,
    max_delta: int = 20,
    std: float = 5.0,
    min_len: int = 5,
    p_full: float = 0.95,
) -> tuple[int, float]:
    """Samples a BPTT length as in the DARTS / NAO RNN training loop.

    base = bptt with probability `p_full`, else bptt / 2;
    seq_len = min(max(min_len, int(Normal(base, std))), bptt + max_delta).
    `std=0` gives the search-phase variant without jitter (35 or int(17.5)).

    Args:
      rng: numpy Generator; the result is a function of its state.
      bptt: nominal length (35).
      max_delta: cap above bptt (seq_len <= 55 for 35).
      std: standard deviation of the jitter.
      min_len: floor.
      p_full: probability of the full base length.

    Returns:
      (seq_len, lr_scale) where lr_scale = seq_len / bptt multiplies the
      learning rate for this step.
    """
    base = bptt if rng.random() < p_full else bptt / 2
    jittered = rng.normal(base, std) if std > 0 else base
    seq_len = min(max(min_len, int(jittered)), bptt + max_delta)
    return seq_len, seq_len / bptt


def iterate_bptt(
    num_rows: int,
    rng: np.random.Generator | None,
    bptt: int = 35,
    **sampler_kwargs: float,
) -> Iterator[tuple[int, int, float]]:
    """Walks one epoch of a batchified stream.

    Args:
      num_rows: T, rows of the `batchify` output.
      rng: Generator for variable lengths (training); None for fixed `bptt`
        windows (evaluation).
      bptt: nominal window length.
      **sampler_kwargs: forwarded to `sample_seq_len`.

    Yields:
      (i, seq_len, lr_scale): pass `i, seq_len` to `get_batch`; the last window
      may be shorter than seq_len (`get_batch` clips it). As in the reference
      loop, the start advances by the sampled length, and training stops one
      row earlier than evaluation.
    """
    i = 0
    stop = num_rows - 2 if rng is not None else num_rows - 1
    while i < stop:
        if rng is None:
            seq_len, lr_scale = bptt, 1.0
        else:
            seq_len, lr_scale = sample_seq_len(rng, bptt, **sampler_kwargs)
        yield i, seq_len, lr_scale
        i += seq_len


def token_counts(corpus: Corpus) -> Mapping[str, int]:
    """Number of tokens per split (with `<eos>`), for logging and checks."""
    return {s: int(len(getattr(corpus, s))) for s in SPLITS}
