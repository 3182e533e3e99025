"""The search-space interface shared by every NAO space.

An architecture is always a small ``int32`` numpy array whose shape is fixed per space
(``space.arch_shape``); the controller sees it as a token sequence of ``space.seq_len`` ids in
``[0, space.vocab_size)``, where id 0 is the start/end symbol and never appears inside a sequence.

Every space provides, in numpy, vectorised over leading batch axes where it matters:

* ``sample(rng, n)``: ``n`` uniformly random architectures, as the official ``generate_arch``.
* ``validate(arch)``: the array as ``int32``, or a ``ValueError`` naming the field and the value.
* ``mutate(arch, rng)``: a random one-field neighbour (regularized evolution).
* ``to_tokens`` / ``from_tokens``: the exact, invertible tokenisation of the reference code.
* ``decoder_mask_table()``: ``bool[L, V, V]``; entry ``[t, prev, v]`` says whether the decoder may
  emit token ``v`` at position ``t`` after emitting ``prev`` at ``t - 1``. Masks of the official
  decoders depend on the position only; the 11-op space also needs the previous token so that an
  op-size token always fits its op-type token. Greedy decoding under this table can only produce
  valid architectures (property-tested in ``tests/test_spaces.py``).
* ``swap_permutations()``: ``int32[P, L]`` token-position permutations implementing branch-swap
  augmentation (spec §2.6): augmentation draws one row uniformly per sample and epoch. In the CNN
  spaces each row swaps the two branches of one node in the normal and one node in the reduction
  cell (5 x 5 rows, as PT-V1); spaces without a branch symmetry return only the identity.
* ``canonical_key(arch)``: a hashable key equal for architectures that are the same network
  (branch order inside a node does not matter in the CNN spaces).
* ``to_string`` (readable) and ``parse`` / ``format`` (the official integer strings).
"""

from __future__ import annotations

import abc
import re
from typing import Hashable, Sequence

import numpy as np

SOS = 0  # Start symbol of every decoder; the official code also uses it as end-of-sequence.


class SearchSpace(abc.ABC):
  """Abstract base class of the NAO search spaces.

  Attributes:
    name: registry name of the space.
    arch_shape: shape of one architecture array.
    seq_len: tokens per architecture (the decoder's number of steps).
    vocab_size: number of token ids, including ``SOS``.
    tokens_per_step: tokens the encoder concatenates into one LSTM step (spec §2.5).
    official_format: one line describing the official integer string.
  """

  name: str
  arch_shape: tuple[int, ...]
  seq_len: int
  vocab_size: int
  tokens_per_step: int
  official_format: str

  @property
  def encoder_length(self) -> int:
    """Number of encoder LSTM steps."""
    return self.seq_len // self.tokens_per_step

  # -- sampling and validation ----------------------------------------------------------------

  @abc.abstractmethod
  def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
    """Returns ``int32[n, *arch_shape]`` uniformly random architectures."""

  @abc.abstractmethod
  def validate(self, arch) -> np.ndarray:
    """Returns ``arch`` as ``int32[*arch_shape]`` or raises ``ValueError`` naming the field."""

  def mutate(self, arch, rng: np.random.Generator) -> np.ndarray:
    """A random neighbour: one field of ``arch`` changed to another allowed value.

    Used by regularized evolution. Fields are drawn uniformly among those with an alternative.
    """
    arch = self.validate(arch).copy()
    flat = arch.reshape(-1)
    choices = self._field_choices()
    while True:
      field = int(rng.integers(flat.size))
      if choices[field] > 1:
        break
    new = int(rng.integers(choices[field] - 1))
    flat[field] = new if new < flat[field] else new + 1
    return arch

  def neighbours(self, arch) -> np.ndarray:
    """Every architecture one field away from ``arch``: ``int32[M, *arch_shape]``.

    The neighbourhood ``mutate`` draws from (one field changed to another allowed value), field
    by field in order, values ascending; M is the sum over fields of (choices - 1).
    """
    arch = self.validate(arch)
    flat = arch.reshape(-1)
    rows = []
    for field, choices in enumerate(self._field_choices()):
      for value in range(int(choices)):
        if value != flat[field]:
          row = flat.copy()
          row[field] = value
          rows.append(row)
    if not rows:
      return np.zeros((0, *self.arch_shape), np.int32)
    return np.stack(rows).reshape(-1, *self.arch_shape).astype(np.int32)

  @abc.abstractmethod
  def _field_choices(self) -> np.ndarray:
    """``int[prod(arch_shape)]``: number of allowed values of each field of the flat arch."""

  # -- tokens ---------------------------------------------------------------------------------

  @abc.abstractmethod
  def to_tokens(self, archs: np.ndarray) -> np.ndarray:
    """Maps ``int[..., *arch_shape]`` to ``int32[..., seq_len]`` (no validation; see ``validate``)."""

  @abc.abstractmethod
  def _tokens_to_arch(self, tokens: np.ndarray) -> np.ndarray:
    """Inverse of ``to_tokens`` for one well-formed sequence, before validation."""

  def from_tokens(self, tokens) -> np.ndarray:
    """Parses one token sequence ``int[seq_len]`` into a validated architecture.

    Raises:
      ValueError: wrong length, ids out of range, or a sequence that is not an architecture.
    """
    tokens = _as_int_array(tokens, 'tokens')
    if tokens.shape != (self.seq_len,):
      raise ValueError(f'{self.name}: tokens must have shape ({self.seq_len},), got {tokens.shape}')
    bad = np.flatnonzero((tokens < 1) | (tokens >= self.vocab_size))
    if bad.size:
      raise ValueError(f'{self.name}: token {int(tokens[bad[0]])} at position {int(bad[0])} is '
                       f'outside [1, {self.vocab_size})')
    table = self.decoder_mask_table()
    prev = np.concatenate([[SOS], tokens[:-1]])
    allowed = table[np.arange(self.seq_len), prev, tokens]
    if not allowed.all():
      t = int(np.flatnonzero(~allowed)[0])
      raise ValueError(f'{self.name}: token {int(tokens[t])} is not allowed at position {t} '
                       f'after token {int(prev[t])}')
    return self.validate(self._tokens_to_arch(tokens))

  @abc.abstractmethod
  def decoder_mask_table(self) -> np.ndarray:
    """Returns ``bool[seq_len, vocab_size, vocab_size]`` indexed by (position, previous, next)."""

  def swap_permutations(self) -> np.ndarray:
    """Returns ``int32[P, seq_len]`` branch-swap permutations (only the identity here)."""
    return np.arange(self.seq_len, dtype=np.int32)[None]

  # -- keys and strings -----------------------------------------------------------------------

  def canonical_key(self, arch) -> Hashable:
    """A hashable key; equal keys mean the same network."""
    return np.asarray(arch, np.int32).tobytes()

  @abc.abstractmethod
  def to_string(self, arch) -> str:
    """A human-readable description of ``arch``."""

  @abc.abstractmethod
  def parse(self, text: str) -> np.ndarray:
    """Parses the official string form (see ``official_format``) into a validated architecture."""

  @abc.abstractmethod
  def format(self, arch) -> str:
    """Formats ``arch`` in the official string form (inverse of ``parse``)."""

  def __repr__(self) -> str:
    return f'<{type(self).__name__} {self.name}: {self.seq_len} tokens, vocab {self.vocab_size}>'


# -- helpers shared by the spaces ---------------------------------------------------------------


def _as_int_array(value, field: str) -> np.ndarray:
  """Converts ``value`` to an int32 array, rejecting non-integers with a ``ValueError``."""
  try:
    array = np.asarray(value)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{field}: cannot read {value!r} as an integer array ({e})') from None
  if array.dtype == object or array.dtype.kind not in 'iuf b':
    raise ValueError(f'{field}: expected integers, got {array.dtype} values {value!r}')
  if array.dtype.kind == 'f':
    if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
      raise ValueError(f'{field}: expected integers, got {array.tolist()!r}')
  return array.astype(np.int32)


def check_shape(arch, shape: Sequence[int], space: str) -> np.ndarray:
  """Returns ``arch`` as int32 if it has ``shape``, else raises ``ValueError``."""
  array = _as_int_array(arch, f'{space} architecture')
  if array.shape != tuple(shape):
    if array.size == int(np.prod(shape)) and array.ndim == 1:
      return array.reshape(shape)
    raise ValueError(f'{space}: architecture must have shape {tuple(shape)} '
                     f'(or {int(np.prod(shape))} integers), got shape {array.shape}')
  return array


def parse_int_string(text: str, count: int, space: str) -> np.ndarray:
  """Reads ``count`` integers separated by whitespace, commas or ``|``.

  Raises:
    ValueError: if a field is not an integer or the count is wrong.
  """
  if not isinstance(text, str):
    raise ValueError(f'{space}: expected a string of {count} integers, got {type(text).__name__}')
  fields = [f for f in re.split(r'[\s,|]+', text.strip().strip('[]')) if f]
  values = []
  for position, field in enumerate(fields):
    try:
      values.append(int(field))
    except ValueError:
      raise ValueError(f'{space}: field {position} is {field!r}, not an integer') from None
  if len(values) != count:
    raise ValueError(f'{space}: expected {count} integers, got {len(values)} in {text!r}')
  return np.asarray(values, np.int32)
