"""`python -m enhanced_tft ...` = `etft ...` (what `torchrun ... -m enhanced_tft train ...` runs)."""
import sys

from .cli import main

sys.exit(main())
