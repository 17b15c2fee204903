#!/usr/bin/env bash
# Install everything and run the whole test suite (unit tests on tiny models + SmolLM2 integration tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export HF_HUB_OFFLINE=1
python3 -m ruff check src tests bench   # lint + import order (pyproject [tool.ruff])
python3 -m pytest -q "$@"
