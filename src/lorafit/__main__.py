"""`python -m lorafit` and `python -m torch.distributed.run ... src/lorafit/__main__.py run ...`.

Run by path, this file has no package context, so it imports the installed package absolutely.
"""

import sys

from lorafit.cli import entry

if __name__ == "__main__":
    sys.exit(entry())
