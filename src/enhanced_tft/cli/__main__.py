"""`python -m enhanced_tft.cli ...` = `etft ...`."""
import sys

from . import main

sys.exit(main())
