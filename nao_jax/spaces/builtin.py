"""Published NAO architectures, by name, in the official integer strings (spec §8).

Each entry keeps the string exactly as the official scripts write it; ``get_builtin`` parses it
with the space it belongs to, so a round trip ``space.format(arch) == text`` holds exactly.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from nao_jax.spaces import cnn, rnn
from nao_jax.spaces.base import SearchSpace


@dataclasses.dataclass(frozen=True)
class BuiltinArch:
  """A published architecture: its space, official string and provenance."""
  space: SearchSpace
  text: str
  note: str


# NAONet-A reduction cell, node 4: the TF dict (behind the paper's 2.10-2.11 %) reads
# conv1x7+7x1(h1) + maxpool2x2(h0); the PT-V1 scripts (behind 2.48 % / 1.93 %) swap the inputs.
_NAONET_A_NORMAL = '0 7 1 15 2 8 1 7 0 6 1 7 0 8 4 7 1 5 0 7'
_NAONET_A_PT_REDUCTION = '0 7 1 13 0 6 0 14 0 9 1 10 0 14 2 6 1 11 0 7'
_NAONET_A_TF_REDUCTION = '0 7 1 13 0 6 0 14 1 9 0 10 0 14 2 6 1 11 0 7'

BUILTINS: dict[str, BuiltinArch] = {
    'NAONet-A': BuiltinArch(
        cnn.NAO_SPACE, f'{_NAONET_A_NORMAL} {_NAONET_A_TF_REDUCTION}',
        'NAO (11 ops), TF reduction cell (NAO/cnn/dag.py NAONet): paper 2.11 % / README 2.10 %'),
    'NAONet-A-PT': BuiltinArch(
        cnn.NAO_SPACE, f'{_NAONET_A_NORMAL} {_NAONET_A_PT_REDUCTION}',
        'NAO (11 ops), PT-V1 string (train_NAONet_A_*.sh): README 2.48 % (F=36) / 1.93 % (F=128)'),
    'NAONet-B': BuiltinArch(
        cnn.WS_SPACE,
        '0 1 0 2 0 1 2 2 1 3 0 2 4 0 1 3 2 1 0 3 1 1 1 0 2 1 2 4 1 0 2 3 3 1 2 2 0 2 0 2',
        'PT-V1 NAO-WS result (train_NAONet_B_36_cifar10.sh): README 2.93 %'),
    'NAONet-WS': BuiltinArch(
        cnn.WS_SPACE,
        '0 1 0 4 2 2 1 3 1 0 2 0 2 3 1 3 1 2 0 4 1 1 0 3 2 3 2 3 1 0 0 1 0 4 2 4 2 3 2 3',
        'TF NAO-WS result (NAO-WS/cnn/train_final.sh): paper 3.53 % / README 3.50 %'),
    'NAONet-V2': BuiltinArch(
        cnn.WS_SPACE,
        '1 1 0 1 2 4 0 0 0 0 2 1 0 0 0 2 0 3 0 0 0 2 0 2 2 2 1 0 0 0 0 1 0 0 0 3 0 0 0 1',
        'Balanced NAO (NAO_V2/train_NAONet_V2_36_cifar10.sh): README 2.57 %'),
    'NAONet-PTB': BuiltinArch(
        rnn.RNN_NAO_SPACE, '0 1 0 1 1 1 3 0 4 1 4 1 5 1 1 1 7 1 1 1 1 2',
        'NAO RNN cell (NAO/rnn/train_ptb_final.sh), NAO activation ids: PTB 56.0, WT2 67.0'),
    'NAONet-WS-PTB': BuiltinArch(
        rnn.RNN_WS_SPACE, '0 1 1 1 2 2 1 2 4 1 4 1 4 1 7 1 8 2 1 0 4 1',
        'NAO-WS RNN cell (NAO-WS/rnn/train_final.sh), NAO-WS activation ids: PTB 56.6'),
}


def get_builtin(name: str) -> tuple[SearchSpace, np.ndarray]:
  """Returns ``(space, arch)`` of a published architecture.

  Raises:
    ValueError: for an unknown name (the message lists the known ones).
  """
  if name not in BUILTINS:
    raise ValueError(f'unknown built-in architecture {name!r}; known: {", ".join(BUILTINS)}')
  entry = BUILTINS[name]
  return entry.space, entry.space.parse(entry.text)
