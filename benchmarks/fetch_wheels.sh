#!/usr/bin/env bash
# Fills benchmarks/wheels/ (git-ignored, ~16 MB) with what pipeline_bench.py needs on a
# GPU machine that has jax, flax and numpy but no TensorFlow, no internet and
# transformers 5 (no Flax): transformers 4.57.6 and the versions of its hub and
# tokenizers it accepts, and ml_collections. Run it here, then carry benchmarks/wheels.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p wheels
pip download --no-deps --only-binary=:all: -d wheels \
  transformers==4.57.6 "huggingface_hub>=0.34,<1.0" "tokenizers>=0.22,<=0.23" \
  ml_collections
ls -la wheels
