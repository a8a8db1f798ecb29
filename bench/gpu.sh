#!/usr/bin/env bash
# The GPU checks and benchmarks of docs/training.md ("Speed and several GPUs") in one script,
# for whoever has a CUDA GPU; about 7 minutes on one H100 or H200:
#
#   1. the CUDA tests (pytest -m cuda, and test_augment's CUDA comparisons), among them a
#      compiled and an eager run of 200 iterations against the noise of two seeds;
#   2. the three stages at the paper's sizes on a 192 x 192 phantom: 200-iteration runs, the
#      10,000 iterations extrapolated from the timed ones after the warm-up, compiled and not,
#      with peak memory and the ratio to the paper's Titan X times; the full step against the
#      network-only step, and each speed option switched off on its own;
#   3. the fixed per-iteration overhead at 32 x 32;
#   4. the full demo, timed;
#   5. the loss and augmentation benchmarks.
#
# Each step writes its rows to BENCHMARKS.md (this machine's rows are replaced); commit them.
# Needs python3 with PyTorch (CUDA) and contraseg's dependencies; nibabel and MONAI can come as
# wheels in bench/wheels/ (bench/wheels/README.md). Run from anywhere: bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
START=$SECONDS
step() { echo "== bench/gpu.sh: $1 (at $((SECONDS - START)) s)"; }

site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
export PYTHONPATH="$PWD/src:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# module -> the package that provides it
missing() {
    "$PYTHON" - <<'EOF'
import importlib.util
needed = {
    "torch": "torch", "numpy": "numpy", "scipy": "scipy", "nibabel": "nibabel",
    "monai": "monai", "yaml": "pyyaml", "tqdm": "tqdm", "safetensors": "safetensors",
    "tensorboard": "tensorboard", "matplotlib": "matplotlib", "PIL": "pillow",
    "pytest": "pytest", "xdist": "pytest-xdist", "hypothesis": "hypothesis",
}
print(" ".join(p for m, p in needed.items() if importlib.util.find_spec(m) is None))
EOF
}

step "dependencies"
absent=$(missing)
wheels=()
for package in $absent; do  # only the missing ones: a wheel would shadow an installed version
    for wheel in bench/wheels/"${package//-/_}"-*.whl; do
        [ -e "$wheel" ] && wheels+=("$wheel")
    done
done
if [ ${#wheels[@]} -gt 0 ]; then
    "$PYTHON" -m pip install -q --root-user-action=ignore --no-index --no-deps --no-compile \
        --target "$site" "${wheels[@]}"
    export PYTHONPATH="$PYTHONPATH:$site"
    absent=$(missing)
fi
if [ -n "$absent" ]; then
    echo "bench/gpu.sh: missing Python packages: $absent (put their wheels in bench/wheels/, see bench/wheels/README.md)" >&2
    exit 2
fi
if ! "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "bench/gpu.sh: PyTorch $("$PYTHON" -c 'import torch; print(torch.__version__)') sees no CUDA device" >&2
    exit 2
fi
"$PYTHON" -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"

step "CUDA tests"
"$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests
"$PYTHON" -m pytest -q -p no:cacheprovider -k cuda tests/data/test_augment.py

step "stages at the paper's sizes: runs, compiled and not"
"$PYTHON" bench/bench_train.py --device cuda --sizes paper --variants default no-compile \
    --run-iterations 200 --warm-up 20 --write

step "each speed option switched off (steps only)"
"$PYTHON" bench/bench_train.py --device cuda --sizes paper \
    --variants fp32 no-channels-last no-fused-adam --rounds 2 --steps 20 --write

step "fixed per-iteration overhead at 32 x 32"
"$PYTHON" bench/bench_train.py --device cuda --sizes tiny --variants no-compile --write

step "demo"
"$PYTHON" bench/bench_demo.py --device cuda --write

step "loss and augmentation benchmarks"
"$PYTHON" bench/bench_losses.py --device cuda --repeats 10
"$PYTHON" bench/bench_augment.py --device cuda --repeats 5

step "done; commit the new rows of BENCHMARKS.md"
