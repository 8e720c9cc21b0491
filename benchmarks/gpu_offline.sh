#!/usr/bin/env bash
# bench.py --device gpu on an offline CUDA machine (this workplace's lent GPU machine: no package index, and at
# most 64 MiB may travel per call), from wheels carried in two calls that must land on the same warm machine:
#
#   .whl/   NeMo 3.0 and the dependencies the machine's image lacks, lightning 2.4.0 (NeMo's pin), and the
#           first 44 MB of the mlx-cuda-13 wheel (mlx_cuda_13.whl.part-aa)
#   .whl2/  mlx (cp312), the rest of mlx-cuda-13 (part-ab) and the whole wheel's sha256
#
# Preparing them (here, with pip's index): `pip download --no-deps --only-binary=:all: --python-version 3.12
# --implementation cp --platform manylinux_2_28_x86_64 ... -d .whl nemo-toolkit==3.0.0 lightning==2.4.0 ...`
# for each distribution a NeMo restore + transcribe imports that the image lacks (antlr4-python3-runtime 4.9.3
# has no wheel: `pip wheel` builds one), `pip download mlx==0.32.4 mlx-cuda-13==0.32.4` likewise, then
# `head -c 44000000` / `tail -c +44000001` of the mlx-cuda-13 wheel and `sha256sum` of the whole into .whl2/.
#
#   stage1: install NeMo's wheels, stash part-aa, build the random-weight NeMo models (bench's own cache)
#   stage2: join, check and install mlx + mlx-cuda-13, then run bench.py per model (1b first); the markdown
#           tables, JSON results and logs go to $OUT
#
# The machine's image provides python3 3.12 with torch (CUDA 13), numpy, sentencepiece, safetensors and CUDA's
# own pip libraries, which mlx-cuda-13's RPATH ($ORIGIN/../../nvidia/...) finds through a symlink.
set -euo pipefail
stage=${1:?usage: gpu_offline.sh stage1|stage2 [bench.py args]}
shift
STASH=/root/mlx-canary-gpu
OUT=${OUT:-/tmp/out}
mkdir -p "$STASH" "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$STASH/site:$STASH/mlx"

case "$stage" in
stage1)
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    cp .whl/mlx_cuda_13.whl.part-aa "$STASH/"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$STASH/site" .whl/*.whl
    python3 -c "import torch, nemo; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'nemo', nemo.__version__)"
    for m in 1b 180m; do
        OMP_NUM_THREADS=16 python3 benchmarks/nemo_models.py build --model "$m" | tail -c 300
        echo
    done
    ;;
stage2)
    whl="$STASH/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl"
    cat "$STASH/mlx_cuda_13.whl.part-aa" .whl2/mlx_cuda_13.whl.part-ab > "$whl"
    [ "$(sha256sum "$whl" | cut -d' ' -f1)" = "$(cut -d' ' -f1 .whl2/mlx_cuda_13.sha256)" ] || { echo "mlx-cuda-13 wheel corrupt"; exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$STASH/mlx" \
        .whl2/mlx-*.whl "$whl"
    site=$(python3 -c "import torch, pathlib; print(pathlib.Path(torch.__file__).parent.parent)")
    ln -sfn "$site/nvidia" "$STASH/mlx/nvidia"
    export MLX_PTX_CACHE_DIR="$STASH/ptx"
    python3 -c "import mlx.core as mx; a = mx.ones((256, 256)); print('mlx', mx.__version__, mx.default_device(), (a @ a).sum().item())"
    for m in 1b 180m; do
        python3 benchmarks/bench.py --device gpu --models "$m" --threads 8 --wait-idle 0 --retries 0 \
            --results "$OUT" "$@" 2>&1 | tee "$OUT/bench-$m.log" || echo "bench.py --models $m failed"
    done
    ;;
*) echo "unknown stage $stage"; exit 2 ;;
esac
