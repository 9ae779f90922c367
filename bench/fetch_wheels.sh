#!/usr/bin/env bash
# Run HERE (where PyPI answers), before a device call: downloads into .whl/ (git-ignored) the
# wheels that bench/gpu_suite.sh installs on the lent GPU machine, which reaches no registry.
#
# That machine's image (/work/.library/device/KINDS.md, Python 3.12, torch 2.11) already holds
# torch, numpy, pillow, pyyaml, tqdm, safetensors 0.8.0, huggingface-hub 1.33, filelock,
# requests, packaging, transformers 5.17 and accelerate: all diffusers 0.42.1 needs on Python
# 3.12 (its importlib_metadata requirement is for Python < 3.8 only) but diffusers itself.
# Missing there: diffusers, and ftfy (+ its wcwidth) for minidream's tokenizer. regex is
# listed there too, but the tokenizer cannot run without it, so its cp312 wheel travels as
# insurance (< 1 MB). One version of each (two would stop the whole install); the versions
# the tests ran with here.
set -euo pipefail
cd "$(dirname "$0")/.."
PINS=(diffusers==0.42.1 ftfy==6.3.1 wcwidth==0.9.4 regex==2026.11.19)

rm -rf .whl
mkdir .whl
# --no-deps: each needed package is named above. diffusers and ftfy are pure Python; regex and
# wcwidth are compiled, so the device's CPython 3.12 on x86-64 manylinux is named.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${PINS[@]}"

count=$(ls .whl/*.whl | wc -l)
if [ "$count" -ne "${#PINS[@]}" ]; then
    echo "error: expected ${#PINS[@]} wheels in .whl/, found $count" >&2
    exit 1
fi
ls -l .whl
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
echo "wheels: $((total / 1024)) KiB; working tree that travels with them: $(((total + tree) / 1024)) KiB of the 65536 KiB carry limit"
