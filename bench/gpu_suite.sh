#!/usr/bin/env bash
# On the lent GPU machine (see bench/GPU.md): install the wheels carried in .whl/ (made here by
# bench/fetch_wheels.sh), check the imports, then run the suite into $OUT, logging there too.
# Arguments go to the suite, e.g. `bash bench/gpu_suite.sh --stages 2 --budget 150`.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench-results}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: installing .whl/*.whl failed: run bench/fetch_wheels.sh here and carry .whl" >&2; exit 1; }
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
# Everything the suite and train.py import, at once: a missing package fails here in seconds.
python3 -c "import diffusers, ftfy, regex, safetensors, yaml, tqdm, PIL, transformers, torch, minidream.models.tokenizer; \
print('diffusers', diffusers.__version__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())" || exit 1
python3 -m bench.gpu_suite --out "$out" --scratch /tmp/gpu-suite "$@" 2>&1 | tee "$out/gpu_suite.log"
