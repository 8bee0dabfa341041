#!/usr/bin/env bash
# Create .venv (once) and install Enhanced TFT into it with torch pinned by constraints.txt.
# Safe to run again: an existing .venv is reused and pip only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "setup: Enhanced TFT needs Python >= 3.11; '$python' is $("$python" --version 2>&1 || echo missing)." >&2
    echo "setup: set PYTHON=/path/to/python3.11 and run again." >&2
    exit 2
fi
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $("$python" --version)"
    "$python" -m venv .venv
fi
echo "setup: installing enhanced-tft and its dependencies into .venv (torch pinned by constraints.txt)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
.venv/bin/python -c 'import enhanced_tft, torch; print(f"setup: ready (torch {torch.__version__})")'
