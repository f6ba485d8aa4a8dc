#!/usr/bin/env bash
# The one device check: run on the lent GPU machine from the repository root, with
# benchmarks/wheels carried (fetch_wheels.sh). The carried wheels go into a private
# directory on PYTHONPATH, so the machine's own transformers 5 is left alone. Results
# land in $OUT (or benchmarks/results/device when $OUT is unset).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/device}"
mkdir -p "$out"
deps="$(mktemp -d)"
pip install -q --no-deps --no-index --target "$deps" benchmarks/wheels/*.whl
export PYTHONPATH="$deps:$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/gpu.txt" 2>&1 || true
python benchmarks/pipeline_bench.py --num_images 4096 --batch_size 256 \
  --concepts 20000 --sim_images 50000 --out "$out/pipeline_bench.json"
python benchmarks/similarity_bench.py --sizes 50000x20000x2048 \
  --functions soft_wpmi,wpmi --kernels --out "$out/similarity_bench.json"
python benchmarks/scale_bench.py --sizes 1000000 --no_check --out "$out/scale_bench.json"
