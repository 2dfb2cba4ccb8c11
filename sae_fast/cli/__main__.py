"""`python -m sae_fast.cli`: the sae-fast command."""

import sys

from .main import main

sys.exit(main())
