#!/usr/bin/env bash
# The GPU checks and benchmarks of docs/training.md ("Speed and several GPUs") in one script,
# for whoever has a CUDA GPU; at most 8 minutes by default. Steps, most important first:
#
#   tests     the whole test suite on the CUDA machine (the CUDA-only tests included, among
#             them a compiled and an eager run of 200 iterations against the noise of two seeds);
#   stages    the three stages at the paper's sizes on a 192 x 192 phantom: 200-iteration runs,
#             the 10,000 iterations extrapolated from the timed ones after the warm-up, eager and
#             compiled, with peak memory and the ratio to the paper's Titan X times; the full
#             step against the network-only step;
#   demo      the full demo, timed;
#   options   each speed option switched off on its own, the pool left on the host and
#             cuDNN's benchmark mode switched on (steps only);
#   kernels   the loss and augmentation benchmarks (the augmentation eager and compiled);
#   profile   where each stage's step spends its time at the paper's size, eager and compiled:
#             host against device time, kernels per step, the busiest kernels;
#   overhead  the fixed per-iteration overhead at 32 x 32.
#
# Each step writes its rows to BENCHMARKS.md as it measures them (this machine's rows are
# replaced); commit them. A failing step does not stop the others; the summary at the end names
# it and the exit status is 1. GPU_BUDGET=SECONDS caps the whole script (default 470: under 8
# minutes; every step's own limit adds up to 990): each step gets at most its own limit and what
# is left, and a step that would get under 20 s is skipped, so the last steps are the first to
# go. Name the steps to run only those.
#
# Needs python3 with PyTorch (CUDA) and contraseg's dependencies; nibabel and MONAI can come as
# wheels in bench/wheels/ (bench/wheels/README.md). Run from anywhere: bench/gpu.sh [STEP...]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
START=$SECONDS
BUDGET=${GPU_BUDGET:-470}
ALL_STEPS=(tests stages demo options kernels profile overhead)
STEPS=("${@:-${ALL_STEPS[@]}}")
for name in "${STEPS[@]}"; do
    if [[ " ${ALL_STEPS[*]} " != *" $name "* ]]; then
        echo "bench/gpu.sh: no step '$name'; the steps are: ${ALL_STEPS[*]}" >&2
        exit 2
    fi
done
summary=()
failed=0

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

echo "== bench/gpu.sh: dependencies"
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

# step NAME LIMIT COMMAND...: run COMMAND when NAME was asked for, under the smaller of LIMIT
# and what is left of the budget; record how it ended.
step() {
    local name=$1 limit=$2
    shift 2
    [[ " ${STEPS[*]} " == *" $name "* ]] || return 0
    local left=$((BUDGET - (SECONDS - START)))
    ((limit > left)) && limit=$left
    if ((limit < 20)); then
        summary+=("$name: skipped, the budget was spent")
        failed=1
        return 0
    fi
    echo "== bench/gpu.sh: $name (at $((SECONDS - START)) s, at most $limit s)"
    local begin=$SECONDS status=0
    timeout --kill-after=10 "$limit" "$@" || status=$?
    local took=$((SECONDS - begin))
    if ((status == 0)); then
        summary+=("$name: ok, $took s")
    elif ((status == 124 || status == 137)); then
        summary+=("$name: stopped at its limit of $limit s (rows measured so far are written)")
        failed=1
    else
        summary+=("$name: FAILED (exit $status) after $took s")
        failed=1
    fi
}

# -vv: one line per test as it ends (addopts has -q), so a log cut off at the limit still
# names every failure so far
step tests 240 "$PYTHON" -m pytest -vv -p no:cacheprovider -n 8 tests
step stages 230 "$PYTHON" bench/bench_train.py --device cuda --sizes paper \
    --variants no-compile default --run-iterations 200 --warm-up 20 --write
step demo 120 "$PYTHON" bench/bench_demo.py --device cuda --write
step options 130 "$PYTHON" bench/bench_train.py --device cuda --sizes paper \
    --variants fp32 no-channels-last no-fused-adam host-pool cudnn-benchmark --rounds 2 \
    --steps 20 --write
step kernels 90 bash -c "'$PYTHON' bench/bench_losses.py --device cuda --repeats 10 --write &&
    '$PYTHON' bench/bench_augment.py --device cuda --repeats 5 --write"
step profile 120 "$PYTHON" bench/bench_profile.py --device cuda --size paper \
    --variants no-compile default --write
step overhead 60 "$PYTHON" bench/bench_train.py --device cuda --sizes tiny \
    --variants no-compile --write

echo "== bench/gpu.sh: done after $((SECONDS - START)) s; commit the new rows of BENCHMARKS.md"
printf '   %s\n' "${summary[@]}"
exit $failed
