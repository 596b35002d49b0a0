#!/usr/bin/env bash
# The GPU rehearsal on the `device` tool's machine (one H200; see /work/.library/device/README.md).
#
#   bash scripts/device_rehearsal.sh prepare          # here: put the missing packages in .carry/site
#   device run, carry [".carry"], command:
#     bash scripts/device_rehearsal.sh run colab-t4   # there: rehearse, table and JSON into $OUT
#
# The machine has Python 3.12 with torch (CUDA), transformers, peft, accelerate, tokenizers,
# sentence-transformers, pyyaml, psutil and httpx, and no network. `prepare` copies what it lacks
# from this checkout's .venv: trl, datasets (+ dill, multiprocess), peft at the course's pin, and
# bitsandbytes with only its CUDA 13 library (the whole package is 125 MB; the carry limit is 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
case "$mode" in
  prepare)
    site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >> "$(git rev-parse --git-common-dir)/info/exclude"
    rm -rf .carry && mkdir -p .carry/site
    for pkg in trl datasets dill multiprocess peft; do
      cp -r "$site/$pkg" .carry/site/
      cp -r "$site"/$pkg-*.dist-info .carry/site/ 2>/dev/null || true
    done
    cp -r "$site/bitsandbytes" .carry/site/
    find .carry/site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name 'libbitsandbytes_cuda130.so' \
      ! -name 'libbitsandbytes_cpu.so' -delete
    cp -r "$site"/bitsandbytes-*.dist-info .carry/site/
    find .carry -name __pycache__ -prune -exec rm -rf {} +
    du -sh .carry
    ;;
  run)
    profile=${2:-colab-t4}
    export PYTHONPATH="$PWD/.carry/site:$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
    out=${OUT:-/tmp/rehearsal-out}
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
    python3 -c "import torch, transformers, trl, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)" | tee -a "$out/gpu.txt"
    set +e
    python3 -m medkit.rehearse --profile "$profile" --workdir /tmp/rehearsal 2>&1 | tee "$out/rehearsal-$profile.log"
    code=${PIPESTATUS[0]}
    cp /tmp/rehearsal/"$profile"/rehearsal.json "$out/rehearsal-$profile.json" 2>/dev/null
    exit "$code"
    ;;
  *)
    echo "usage: $0 prepare | run [colab-t4|gpu-24gb]" >&2
    exit 2
    ;;
esac
