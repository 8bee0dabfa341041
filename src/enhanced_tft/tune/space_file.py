"""The search space shipped inside the package (an installed wheel finds it too): `etft tune` without --space."""
from pathlib import Path

DEFAULT_SPACE = Path(__file__).resolve().parent / "space.yaml"
