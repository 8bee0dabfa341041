#!/usr/bin/env python3
"""The seed's entry point, kept verbatim for its users:

    python train_universal_transformer_v2.py --test_mode --task classification_binary
    python train_universal_transformer_v2.py --task classification_binary --ensemble_size 1

It takes the same flags as `etft train` and hands them over unchanged.
"""
import sys
from pathlib import Path

try:
    from enhanced_tft.cli import main
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from enhanced_tft.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
