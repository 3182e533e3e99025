"""The ENAS/DARTS recurrent-cell space of NAO (spec §2.4).

An architecture is ``int32[STEPS, 2]``: row ``i`` (node ``s_{i+1}``) holds ``[pred, act]`` with
``pred`` in ``[0, i]`` (``s_0`` .. ``s_i``) and ``act`` an activation id. The two official code
bases number the activations differently, so a space instance carries its mapping:

* ``'nao'`` (NAO without weight sharing, ``NAO/rnn``): 0 tanh, 1 relu, 2 identity, 3 sigmoid;
* ``'nao_ws'`` (NAO-WS, ``NAO-WS/rnn``): 0 tanh, 1 relu, 2 sigmoid, 3 identity.

Tokens (both): per node ``[pred+1, act+12]``, 22 tokens, vocabulary 16 (0 SOS, 1..11
predecessors, 12..15 activations). The WS-RNN controller reads one node (2 tokens) per step.
"""

from __future__ import annotations

import numpy as np

from nao_jax.spaces.base import SearchSpace, check_shape, parse_int_string

STEPS = 11
ACTIVATION_MAPPINGS = {
    'nao': ('tanh', 'relu', 'identity', 'sigmoid'),
    'nao_ws': ('tanh', 'relu', 'sigmoid', 'identity'),
}
_ACT_OFFSET = 1 + STEPS  # 12


class RnnSpace(SearchSpace):
  """The 11-node recurrent cell space with a named activation-id mapping."""

  def __init__(self, name: str, activation_mapping: str, tokens_per_step: int = 2):
    if activation_mapping not in ACTIVATION_MAPPINGS:
      raise ValueError(f'activation_mapping must be one of {sorted(ACTIVATION_MAPPINGS)}, '
                       f'got {activation_mapping!r}')
    self.name = name
    self.activation_mapping = activation_mapping
    self.activations = ACTIVATION_MAPPINGS[activation_mapping]
    self.steps = STEPS
    self.arch_shape = (STEPS, 2)
    self.seq_len = 2 * STEPS
    self.vocab_size = _ACT_OFFSET + len(self.activations)
    self.tokens_per_step = tokens_per_step
    self.official_format = (f'{2 * STEPS} integers: pred_1 act_1 ... pred_11 act_11 '
                            f'(activations {"/".join(self.activations)} = 0..3)')
    table = np.zeros((self.seq_len, self.vocab_size, self.vocab_size), bool)
    for t in range(self.seq_len):
      if t % 2 == 0:
        table[t, :, 1:t // 2 + 2] = True  # node i may read s_0..s_i (tokens 1..i+1)
      else:
        table[t, :, _ACT_OFFSET:] = True
    self._mask_table = table

  def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
    archs = np.empty((n, STEPS, 2), np.int32)
    for i in range(STEPS):
      archs[:, i, 0] = rng.integers(0, i + 1, n)
      archs[:, i, 1] = rng.integers(0, len(self.activations), n)
    return archs

  def validate(self, arch) -> np.ndarray:
    arch = check_shape(arch, self.arch_shape, self.name)
    for i in range(STEPS):
      pred, act = int(arch[i, 0]), int(arch[i, 1])
      if not 0 <= pred <= i:
        what = 'itself or a later node' if pred > i else 'a negative index'
        raise ValueError(f'{self.name}: node s{i + 1} pred = {pred} reads {what}; '
                         f'allowed 0..{i}')
      if not 0 <= act < len(self.activations):
        raise ValueError(f'{self.name}: node s{i + 1} act = {act} is not an activation id '
                         f'0..{len(self.activations) - 1}')
    return arch

  def _field_choices(self) -> np.ndarray:
    return np.stack([np.arange(STEPS) + 1, np.full(STEPS, len(self.activations))], 1).reshape(-1)

  def to_tokens(self, archs: np.ndarray) -> np.ndarray:
    archs = np.asarray(archs, np.int32)
    tokens = np.stack([archs[..., 0] + 1, archs[..., 1] + _ACT_OFFSET], -1)
    return tokens.reshape(archs.shape[:-2] + (self.seq_len,)).astype(np.int32)

  def _tokens_to_arch(self, tokens: np.ndarray) -> np.ndarray:
    pairs = tokens.reshape(STEPS, 2)
    return np.stack([pairs[:, 0] - 1, pairs[:, 1] - _ACT_OFFSET], -1).astype(np.int32)

  def decoder_mask_table(self) -> np.ndarray:
    return self._mask_table

  def activation_names(self, arch) -> list[str]:
    """Activation names of the 11 nodes under this space's mapping."""
    return [self.activations[a] for a in self.validate(arch)[:, 1].tolist()]

  def to_string(self, arch) -> str:
    arch = self.validate(arch)
    nodes = [f's{i + 1} = {self.activations[a]}(s{p})' for i, (p, a) in enumerate(arch.tolist())]
    return '; '.join(nodes) + '; h = mean(s1..s11)'

  def parse(self, text: str) -> np.ndarray:
    return self.validate(parse_int_string(text, 2 * STEPS, self.name).reshape(STEPS, 2))

  def format(self, arch) -> str:
    return ' '.join(str(v) for v in self.validate(arch).reshape(-1).tolist())


RNN_NAO_SPACE = RnnSpace('rnn_nao', 'nao')
RNN_WS_SPACE = RnnSpace('rnn_ws', 'nao_ws')
