"""Search spaces: architectures as integer arrays, token sequences and official strings."""

from nao_jax.spaces.base import SOS, SearchSpace
from nao_jax.spaces.builtin import BUILTINS, get_builtin
from nao_jax.spaces.cnn import NAO_OPS, NAO_SPACE, WS_OPS, WS_SPACE, CnnSpace, loose_ends
from nao_jax.spaces.nb201 import NB201_OP_TOKENS_SPACE, NB201_OPS, NB201_SPACE, Nb201Space
from nao_jax.spaces.rnn import ACTIVATION_MAPPINGS, RNN_NAO_SPACE, RNN_WS_SPACE, RnnSpace

SPACES = {space.name: space for space in (WS_SPACE, NAO_SPACE, RNN_NAO_SPACE, RNN_WS_SPACE,
                                          NB201_SPACE, NB201_OP_TOKENS_SPACE)}


def get_space(name: str) -> SearchSpace:
  """Returns a search space by name (``cnn_ws``, ``cnn_nao``, ``rnn_nao``, ``rnn_ws``, ``nb201``)."""
  if name not in SPACES:
    raise ValueError(f'unknown search space {name!r}; known: {", ".join(SPACES)}')
  return SPACES[name]
