#!/usr/bin/env bash
# Every speed benchmark on one CUDA device in bf16, in one go (about 10 minutes on one GPU), so that the first session
# lent a GPU measures everything in one call. Writes one JSON per benchmark into OUT_DIR (default benchmarks/gpu):
#   quantizer.json         benchmarks/quantizer.py: residual search at paper size, bf16 autocast (the search stays fp32)
#   encode_decode.json     benchmarks/encode_precision.py: encode modes, pixel decode and semantic features, paper size;
#                          code agreement too when TOKENIZER names a trained tokenizer folder (`make demo` writes one)
#   generation.json        benchmarks/generation.py: image generation at paper-ratio sizes, bf16, against the
#                          authors' loop, with the static cache + compiled step as variant (c), and images/s at 1, 4,
#                          16 and 64 images per call
#
#   bash benchmarks/run_gpu.sh [OUT_DIR]
#   DEVICE=cpu SMOKE=1 bash benchmarks/run_gpu.sh /tmp/out   # tiny sizes on a CPU: checks the script (tests do this)
#
# Not here yet: a fused nearest-code kernel (Triton, online argmin over codebook blocks); it needs a GPU to be written
# and checked against, and no session has had one (benchmarks/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-benchmarks/gpu}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT_DIR"

if [ "${SMOKE:-0}" = 1 ]; then
    quantizer_args=(--vectors 64 --depth 3 --codebook-size 512 --dim 8 --repeats 1)
    encode_args=(--repeats 1 --paper-preset evotok-tiny)
    generation_args=(--sizes tiny --repeats 1 --head-batches 1 --head-repeats 1 --curve-batches 1,2)
else
    quantizer_args=(--repeats 5)
    encode_args=(--repeats 5 --paper-size-timing)
    generation_args=(--sizes paper-ratio --repeats 3 --batch 1 --curve-batches 1,4,16,64 --curve-repeats 2)
fi
if [ -n "${TOKENIZER:-}" ]; then
    encode_args+=(--tokenizer "$TOKENIZER")
else
    encode_args+=(--paper-size-timing)
fi

if [ "$DEVICE" = cuda ]; then
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: set DEVICE=cpu')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT_DIR/device.txt" || true
fi

start=$(date +%s)
echo "== quantizer"
"$PYTHON" benchmarks/quantizer.py --device "$DEVICE" --autocast bf16 "${quantizer_args[@]}" --json "$OUT_DIR/quantizer.json"
echo "== encode / decode"
"$PYTHON" benchmarks/encode_precision.py --device "$DEVICE" "${encode_args[@]}" --json "$OUT_DIR/encode_decode.json"
echo "== generation"
"$PYTHON" benchmarks/generation.py --device "$DEVICE" --dtype bfloat16 "${generation_args[@]}" \
    --json "$OUT_DIR/generation.json"
echo "all benchmarks written to $OUT_DIR in $(( $(date +%s) - start )) s"
