"""`python -m sae_fast` (and `torchrun -m sae_fast`): the sae-fast command."""

import sys

from .cli import main

sys.exit(main())
