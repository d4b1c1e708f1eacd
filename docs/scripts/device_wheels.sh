#!/usr/bin/env bash
# Fetch, here, the pure-Python wheels that the device machine (an H200 with PyTorch, JAX,
# CuPy, NumPy, pytest and einops already installed, and no network) lacks for
# docs/scripts/device_run.sh: favorcore's own dependency, the test dependencies, and
# performer-pytorch with its dependencies. They land in .whl/ (ignored by git), which the
# device run carries.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform any -d .whl \
    "array-api-compat==1.16.0" "array-api-strict==2.6.1" "array-api-extra==0.11.5" \
    "performer-pytorch==1.1.4" "local-attention==1.11.2" "axial-positional-embedding==0.3.12" \
    "hyper-connections==0.4.11"
ls .whl
