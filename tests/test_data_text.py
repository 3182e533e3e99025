"""Tests for nao_jax.data.text (toy corpora always; real files if present)."""

import os

import numpy as np
import pytest

from nao_jax.data import text


def _real_dir(name: str) -> str:
    data_dir = os.environ.get('NAO_DATA_DIR')
    if not data_dir:
        pytest.skip('NAO_DATA_DIR not set; real-data test skipped')
    path = os.path.join(data_dir, name)
    if not os.path.isdir(path):
        pytest.skip(f'{path} missing; real-data test skipped')
    return path


@pytest.mark.parametrize('name,counts,vocab', [
    ('ptb', (929_589, 73_760, 82_430), 10_000),
    ('wikitext2', (2_088_628, 217_646, 245_569), 33_278),
])
def test_real_token_counts(name, counts, vocab):
    corpus = text.load_corpus(_real_dir(name))
    assert tuple(text.token_counts(corpus).values()) == counts
    assert corpus.vocab_size == vocab
    for split in (corpus.train, corpus.valid, corpus.test):
        assert split.dtype == np.int32
        assert 0 <= split.min() and split.max() < vocab
    eos = corpus.word2idx()['<eos>']
    assert corpus.train[-1] == corpus.valid[-1] == corpus.test[-1] == eos


def _write(folder, names, contents):
    folder.mkdir(exist_ok=True)
    for n, c in zip(names, contents):
        (folder / n).write_text(c, encoding='utf-8')


def test_toy_corpus_vocab_order_and_eos(tmp_path):
    _write(tmp_path, ['ptb.train.txt', 'ptb.valid.txt', 'ptb.test.txt'],
           [' a b\n\n b c \n', 'd a\n', 'e\n'])
    corpus = text.load_corpus(tmp_path)
    assert corpus.idx2word == ('a', 'b', '<eos>', 'c', 'd', 'e')
    np.testing.assert_array_equal(corpus.train, [0, 1, 2, 2, 1, 3, 2])
    np.testing.assert_array_equal(corpus.valid, [4, 0, 2])
    np.testing.assert_array_equal(corpus.test, [5, 2])


def test_file_naming_detection(tmp_path):
    contents = ['x\n', 'y\n', 'z\n']
    _write(tmp_path / 'plain', ['train.txt', 'valid.txt', 'test.txt'], contents)
    _write(tmp_path / 'raw', ['wiki.train.tokens', 'wiki.valid.tokens',
                              'wiki.test.tokens'], contents)
    for sub in ('plain', 'raw'):
        paths = text.find_split_files(tmp_path / sub)
        assert sorted(paths) == ['test', 'train', 'valid']
        assert text.load_corpus(tmp_path / sub).idx2word == ('x', '<eos>', 'y',
                                                             'z')
    _write(tmp_path / 'half', ['ptb.train.txt', 'ptb.valid.txt'], contents)
    with pytest.raises(FileNotFoundError, match='ptb.{train,valid,test}.txt'):
        text.find_split_files(tmp_path / 'half')
    with pytest.raises(FileNotFoundError, match='not found'):
        text.load_corpus(tmp_path / 'absent')


def test_batchify_column_major_and_trim():
    source = text.batchify(np.arange(26), 4)
    assert source.shape == (6, 4) and source.dtype == np.int32
    for j in range(4):  # Column j is the j-th contiguous chunk of the stream.
        np.testing.assert_array_equal(source[:, j], np.arange(6 * j, 6 * j + 6))
    with pytest.raises(ValueError, match='cannot fill'):
        text.batchify(np.arange(3), 4)


def test_get_batch_shift_and_clip():
    source = text.batchify(np.arange(40), 2)  # [20, 2].
    inputs, targets = text.get_batch(source, 3, 5)
    np.testing.assert_array_equal(inputs, source[3:8])
    np.testing.assert_array_equal(targets, source[4:9])
    inputs, targets = text.get_batch(source, 16, 35)  # Clipped at the end.
    assert inputs.shape == (3, 2)
    np.testing.assert_array_equal(targets[-1], source[-1])
    with pytest.raises(ValueError, match='no target'):
        text.get_batch(source, 19, 5)


def test_sample_seq_len_bounds_and_determinism():
    draws = [text.sample_seq_len(np.random.default_rng(0)) for _ in range(3)]
    assert draws[0] == draws[1] == draws[2]
    rng = np.random.default_rng(1)
    samples = [text.sample_seq_len(rng) for _ in range(4000)]
    lens = np.array([s for s, _ in samples])
    assert lens.min() >= 5 and lens.max() <= 55
    for seq_len, scale in samples[:50]:
        assert scale == pytest.approx(seq_len / 35)
    # P(len < 26) = 0.05 * P(N(17.5, 5) < 26) + 0.95 * P(N(35, 5) < 26) ~ 0.082.
    assert 0.06 < np.mean(lens < 26) < 0.11
    assert abs(np.median(lens) - 34.5) <= 1.5
    same = np.random.default_rng(1)
    assert [text.sample_seq_len(same) for _ in range(4000)] == samples
    # N(35, 5) almost never reaches 55, so a wide jitter exercises the cap.
    capped = [text.sample_seq_len(rng, std=100.0)[0] for _ in range(200)]
    assert max(capped) == 55 and min(capped) == 5
    fixed = np.array([text.sample_seq_len(rng, std=0.0)[0] for _ in range(2000)])
    assert set(fixed) == {35, 17}
    assert 0.03 < np.mean(fixed == 17) < 0.07  # The bptt / 2 branch: 5 %.


def test_iterate_bptt_covers_stream():
    windows = list(text.iterate_bptt(100, None, bptt=35))
    assert [i for i, _, _ in windows] == [0, 35, 70]
    rng = np.random.default_rng(0)
    starts = [i for i, _, _ in text.iterate_bptt(1000, rng)]
    assert starts[0] == 0 and starts[-1] < 998
    assert all(5 <= b - a <= 55 for a, b in zip(starts, starts[1:]))
