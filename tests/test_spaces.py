"""Search spaces: built-ins, token round trips, masks, augmentation and bad input."""

import itertools

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from nao_jax import spaces
from nao_jax.spaces import cnn, nb201, rnn

ALL_SPACES = list(spaces.SPACES.values())


# -- built-in architectures ----------------------------------------------------------------------

@pytest.mark.parametrize('name', list(spaces.BUILTINS))
def test_builtin_round_trips_exactly(name):
  space, arch = spaces.get_builtin(name)
  assert space.format(arch) == spaces.BUILTINS[name].text
  tokens = space.to_tokens(arch)
  assert tokens.shape == (space.seq_len,)
  np.testing.assert_array_equal(space.from_tokens(tokens), arch)
  np.testing.assert_array_equal(space.parse(space.format(arch)), arch)
  assert space.to_string(arch)


def test_naonet_a_normal_cell_matches_tf_token_sequence():
  # The spec quotes the TF-NAO-CNN tokens of the NAONet normal cell (spec §2.2).
  space, arch = spaces.get_builtin('NAONet-A')
  expected = '1 9 16 2 11 17 3 9 19 2 9 16 1 9 14 2 9 16 1 9 19 5 9 16 2 7 14 1 9 16'
  assert ' '.join(map(str, space.to_tokens(arch)[:30])) == expected


def test_naonet_a_variants_differ_only_in_reduction_node_4():
  _, tf_arch = spaces.get_builtin('NAONet-A')
  _, pt_arch = spaces.get_builtin('NAONet-A-PT')
  diff = np.argwhere(tf_arch != pt_arch)
  assert {tuple(d[:2]) for d in diff} == {(1, 2)}
  assert tf_arch[1, 2].tolist() == [1, 4, 0, 5]  # conv1x7+7x1(h1) + maxpool2x2(h0)
  assert pt_arch[1, 2].tolist() == [0, 4, 1, 5]


def test_builtin_cells_read_as_the_spec_says():
  space, arch = spaces.get_builtin('NAONet-WS')
  assert space.to_string(arch).splitlines()[0] == (
      'normal: n2 = sep_conv_5x5(h0) + identity(h0); n3 = avg_pool_3x3(n2) + max_pool_3x3(h1); '
      'n4 = sep_conv_3x3(h1) + sep_conv_3x3(n2); n5 = max_pool_3x3(n2) + max_pool_3x3(h1); '
      'n6 = avg_pool_3x3(h1) + identity(h0); out = concat(n3, n4, n5, n6)')
  space, arch = spaces.get_builtin('NAONet-B')
  assert spaces.loose_ends(arch[0]) == [3, 5, 6]
  assert spaces.loose_ends(arch[1]) == [4, 5, 6]


def test_rnn_builtins_use_their_own_activation_mapping():
  space, arch = spaces.get_builtin('NAONet-PTB')
  assert space.activation_mapping == 'nao'
  assert space.activation_names(arch) == ['relu', 'relu', 'relu', 'tanh', 'relu', 'relu', 'relu',
                                          'relu', 'relu', 'relu', 'identity']
  space, arch = spaces.get_builtin('NAONet-WS-PTB')
  assert space.activation_mapping == 'nao_ws'
  assert space.activation_names(arch) == ['relu', 'relu', 'sigmoid', 'sigmoid', 'relu', 'relu',
                                          'relu', 'relu', 'sigmoid', 'tanh', 'relu']
  # The same ids decode to different networks under the two mappings (spec §12.1).
  assert spaces.RNN_NAO_SPACE.activation_names(arch) != space.activation_names(arch)


def test_space_sizes_match_the_spec():
  assert (spaces.WS_SPACE.seq_len, spaces.WS_SPACE.vocab_size) == (40, 12)
  assert (spaces.NAO_SPACE.seq_len, spaces.NAO_SPACE.vocab_size) == (60, 21)
  assert (spaces.RNN_WS_SPACE.seq_len, spaces.RNN_WS_SPACE.vocab_size) == (22, 16)
  assert spaces.WS_SPACE.encoder_length == 20 and spaces.NAO_SPACE.encoder_length == 20
  assert spaces.RNN_WS_SPACE.encoder_length == 11


# -- round trips, masks and augmentation ---------------------------------------------------------

@pytest.mark.parametrize('space', ALL_SPACES, ids=lambda s: s.name)
@hypothesis.given(seed=st.integers(0, 2**32 - 1))
def test_random_architectures_round_trip(space, seed):
  archs = space.sample(np.random.default_rng(seed), 8)
  tokens = space.to_tokens(archs)
  assert tokens.shape == (8, space.seq_len)
  table = space.decoder_mask_table()
  for arch, seq in zip(archs, tokens):
    np.testing.assert_array_equal(space.from_tokens(seq), arch)
    np.testing.assert_array_equal(space.parse(space.format(arch)), arch)
    prev = np.concatenate([[0], seq[:-1]])
    assert table[np.arange(space.seq_len), prev, seq].all()  # real archs are never masked out


def _walk_mask(space, choices):
  """Follows the mask table, choosing allowed tokens by ``choices``; returns the sequence."""
  table, prev, seq = space.decoder_mask_table(), 0, []
  for t, choice in enumerate(choices):
    allowed = np.flatnonzero(table[t, prev])
    prev = int(allowed[choice % len(allowed)])
    seq.append(prev)
  return np.asarray(seq)


@pytest.mark.parametrize('space', ALL_SPACES, ids=lambda s: s.name)
@hypothesis.given(data=st.data())
def test_every_sequence_the_mask_allows_is_a_valid_architecture(space, data):
  choices = data.draw(st.lists(st.integers(0, 100), min_size=space.seq_len,
                               max_size=space.seq_len))
  seq = _walk_mask(space, choices)
  arch = space.from_tokens(seq)
  np.testing.assert_array_equal(space.to_tokens(arch), seq)


def test_mask_reaches_every_op_and_input():
  for space in (spaces.WS_SPACE, spaces.NAO_SPACE):
    rng = np.random.default_rng(0)
    archs = [space.from_tokens(_walk_mask(space, rng.integers(0, 100, space.seq_len)))
             for _ in range(300)]
    assert {int(a[0, 4, 1]) for a in archs} == set(range(space.num_ops))
    assert {int(a[0, 4, 0]) for a in archs} == set(range(6))


def test_nao_space_mask_only_allows_valid_type_size_pairs():
  table = spaces.NAO_SPACE.decoder_mask_table()
  pairs = {(int(t), int(s)) for t in range(21) for s in np.flatnonzero(table[2, t])}
  assert pairs == {tuple(p) for p in cnn.NAO_OP_TOKENS.tolist()}
  assert not table[2, 0].any()  # no size token can follow a non-type token
  with pytest.raises(ValueError, match='not allowed at position 2'):
    bad = spaces.NAO_SPACE.to_tokens(spaces.NAO_SPACE.sample(np.random.default_rng(0), 1))[0]
    bad[1:3] = [9, 15]  # conv 2x2 is not one of the 11 ops
    spaces.NAO_SPACE.from_tokens(bad)


@pytest.mark.parametrize('space', [spaces.WS_SPACE, spaces.NAO_SPACE], ids=lambda s: s.name)
def test_branch_swaps_preserve_the_network(space):
  swaps = space.swap_permutations()
  assert swaps.shape == (25, space.seq_len)
  archs = space.sample(np.random.default_rng(1), 20)
  for arch in archs:
    tokens = space.to_tokens(arch)
    for perm in swaps:
      swapped = space.from_tokens(tokens[perm])
      assert space.canonical_key(swapped) == space.canonical_key(arch)
      # Exactly one node per cell changed (unless its branches were identical).
      changed = {tuple(i[:2]) for i in np.argwhere(swapped != arch)}
      assert len({c for c, _ in changed}) == len(changed) <= 2
    assert sorted(map(tuple, swaps.tolist()))[0] != tuple(range(space.seq_len))


def test_canonical_key_ignores_branch_order_only():
  space = spaces.WS_SPACE
  arch = space.parse('0 1 0 4 2 2 1 3 1 0 2 0 2 3 1 3 1 2 0 4 1 1 0 3 2 3 2 3 1 0 0 1 0 4 2 4 2 3 2 3')
  swapped = arch.copy()
  swapped[0, 1] = arch[0, 1][[2, 3, 0, 1]]
  assert space.canonical_key(swapped) == space.canonical_key(arch)
  other = arch.copy()
  other[0, 1, 1] = (arch[0, 1, 1] + 1) % 5
  assert space.canonical_key(other) != space.canonical_key(arch)


def test_sampling_is_uniform_and_valid():
  archs = spaces.WS_SPACE.sample(np.random.default_rng(0), 5000)
  for arch in archs[:200]:
    spaces.WS_SPACE.validate(arch)
  counts = np.bincount(archs[:, :, 4, 0].ravel(), minlength=6) / archs[:, :, 4, 0].size
  np.testing.assert_allclose(counts, 1 / 6, atol=0.02)
  nb = spaces.NB201_SPACE.sample(np.random.default_rng(0), 1000)
  assert nb.min() == 0 and nb.max() == 4


def test_nb201_official_string_round_trip():
  text = '|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|'
  arch = spaces.NB201_SPACE.parse(text)
  assert arch.tolist() == [3, 3, 3, 1, 3, 3]
  assert spaces.NB201_SPACE.format(arch) == text
  every = list(itertools.product(range(5), repeat=6))
  assert len({spaces.NB201_SPACE.format(a) for a in every}) == 15625


# -- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize('space, text, match', [
    (spaces.WS_SPACE, '0 1 0', 'expected 40 integers, got 3'),
    (spaces.WS_SPACE, ' '.join(['0'] * 39 + ['x']), "field 39 is 'x'"),
    (spaces.WS_SPACE, '2 0 0 0 ' + ' '.join(['0'] * 36), 'normal cell node 2 x_id = 2 reads itself'),
    (spaces.WS_SPACE, '0 0 0 0 ' * 4 + '0 0 0 5 ' + '0 0 0 0 ' * 5, 'op id 5'),
    (spaces.NAO_SPACE, '0 4 1 7 ' * 10, 'op id 4 .* outside the official range 5..15'),
    (spaces.NAO_SPACE, ' '.join(['0 5 0 16'] * 10), 'op id 16'),
    (spaces.RNN_NAO_SPACE, '1 0 ' + '0 0 ' * 10, 'node s1 pred = 1 reads itself or a later node'),
    (spaces.RNN_WS_SPACE, '0 4 ' + '0 0 ' * 10, 'node s1 act = 4'),
    (spaces.NB201_SPACE, '|conv~0|+|none~0|none~1|+|none~0|none~1|none~2|', "unknown op 'conv'"),
    (spaces.NB201_SPACE, '|none~0|+|none~0|+|none~0|none~1|none~2|', 'node 2 .* has 1 edges'),
    (spaces.NB201_SPACE, 'none', 'is not of the form'),
])
def test_parse_rejects_malformed_strings(space, text, match):
  with pytest.raises(ValueError, match=match):
    space.parse(text)


def test_validate_and_from_tokens_name_the_problem():
  with pytest.raises(ValueError, match=r'shape \(2, 5, 4\)'):
    spaces.WS_SPACE.validate(np.zeros((3, 4), np.int32))
  with pytest.raises(ValueError, match='expected integers'):
    spaces.WS_SPACE.validate(np.full((2, 5, 4), 0.5))
  with pytest.raises(ValueError, match='reads a negative index'):
    arch = np.zeros((2, 5, 4), np.int32)
    arch[1, 3, 2] = -1
    spaces.WS_SPACE.validate(arch)
  with pytest.raises(ValueError, match=r'tokens must have shape \(6,\)'):
    spaces.NB201_SPACE.from_tokens([1, 2, 3])
  with pytest.raises(ValueError, match='token 0 at position 2 is outside'):
    spaces.NB201_SPACE.from_tokens([1, 1, 0, 1, 1, 1])
  with pytest.raises(ValueError, match='not allowed at position 0'):
    spaces.WS_SPACE.from_tokens(np.full(40, 7))
  with pytest.raises(ValueError, match='edge 1->2 op = 7'):
    spaces.NB201_SPACE.validate([0, 0, 7, 0, 0, 0])
  with pytest.raises(ValueError, match="unknown search space 'cnn'"):
    spaces.get_space('cnn')
  with pytest.raises(ValueError, match="unknown built-in architecture 'NAONet-C'"):
    spaces.get_builtin('NAONet-C')
  with pytest.raises(ValueError, match='activation_mapping'):
    rnn.RnnSpace('x', 'enas')
  assert nb201.NB201_SPACE.validate(np.array([4, 4, 4, 4, 4, 4.0])).dtype == np.int32


@pytest.mark.parametrize('space', ALL_SPACES, ids=lambda s: s.name)
def test_mutation_changes_exactly_one_field_to_a_valid_value(space):
  rng = np.random.default_rng(0)
  for arch in space.sample(rng, 50):
    child = space.mutate(arch, rng)
    space.validate(child)
    assert np.sum(child != arch) == 1


@pytest.mark.parametrize('space', ALL_SPACES, ids=lambda s: s.name)
def test_neighbours_are_every_single_field_change(space):
  """``neighbours`` lists exactly the architectures ``mutate`` can return, each once."""
  rng = np.random.default_rng(1)
  for arch in space.sample(rng, 5):
    found = space.neighbours(arch)
    assert found.shape == (int(np.sum(space._field_choices() - 1)), *space.arch_shape)
    assert found.dtype == np.int32
    assert all(np.sum(n != arch) == 1 for n in found)
    for neighbour in found:
      space.validate(neighbour)
    keys = {n.tobytes() for n in found}
    assert len(keys) == len(found)
    assert all(space.mutate(arch, rng).tobytes() in keys for _ in range(20))
