"""Draws the cells of an architecture like the NAO/DARTS figures (PNG and SVG by default).

  python -m experiments.draw_arch NAONet-A --out=/tmp/cells
  python -m experiments.draw_arch --space=rnn_ws --out=/tmp/cells \
      --arch='0 1 1 1 2 2 1 2 4 1 4 1 4 1 7 1 8 2 1 0 4 1'
  python -m experiments.draw_arch --space=nb201 --out=/tmp/cells --name=best --renderer=matplotlib \
      --arch='|nor_conv_3x3~0|+|none~0|avg_pool_3x3~1|+|skip_connect~0|none~1|skip_connect~2|'

The positional argument is a built-in name (NAONet-A, NAONet-A-PT, NAONet-B, NAONet-WS, NAONet-V2,
NAONet-PTB, NAONet-WS-PTB); otherwise --space and --arch (the official string) give the cell.
Uses graphviz's `dot` when it is on PATH, else matplotlib (--renderer chooses). Prints the paths.
"""

import sys

from absl import app
from absl import flags

from nao_jax import spaces
from nao_jax import viz

_OUT = flags.DEFINE_string('out', None, 'Directory for the drawings (created).')
_SPACE = flags.DEFINE_enum('space', None, list(spaces.SPACES), 'Search space of --arch.')
_ARCH = flags.DEFINE_string('arch', None, 'Architecture in the official string form of --space.')
_NAME = flags.DEFINE_string('name', None,
                            'File-name prefix (default: the built-in name, or "arch").')
_FORMATS = flags.DEFINE_list('formats', ['png', 'svg'], f'Any of {", ".join(viz.FORMATS)}.')
_RENDERER = flags.DEFINE_enum('renderer', 'auto', list(viz.RENDERERS),
                              'auto: graphviz if `dot` is on PATH, else matplotlib.')
_DPI = flags.DEFINE_integer('dpi', 150, 'PNG resolution.')
flags.mark_flag_as_required('out')


def main(argv):
  names = argv[1:]
  try:
    if names and (_SPACE.value or _ARCH.value):
      raise ValueError('give either a built-in name or --space and --arch, not both')
    if len(names) > 1:
      raise ValueError(f'expected one built-in name, got {" ".join(names)}')
    if names:
      space, arch = spaces.get_builtin(names[0])
    elif _SPACE.value and _ARCH.value is not None:
      space = spaces.get_space(_SPACE.value)
      arch = space.parse(_ARCH.value)
    else:
      raise ValueError(f'give a built-in name ({", ".join(spaces.BUILTINS)}) '
                       'or --space and --arch')
    name = _NAME.value or (names[0] if names else 'arch')
    paths = viz.draw_arch(space, arch, _OUT.value, name=name, formats=_FORMATS.value,
                          renderer=_RENDERER.value, dpi=_DPI.value)
  except (ValueError, RuntimeError, OSError) as e:
    sys.exit(f'error: {e}')
  print('\n'.join(paths))


def parse_flags(argv):
  """absl flag parsing with a one-line error instead of the usage text."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = str(e).strip().splitlines() or [type(e).__name__]
    sys.exit(f'error: {lines[0]}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
