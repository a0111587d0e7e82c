#!/usr/bin/env bash
# One call on the GPU machine: build, GPU tests, memcheck, benchmarks.
# Usage: bash benchmarks/run_gpu.sh [build] [test] [memcheck] [bench] [profile] [ncu] [bench-quick]
# BENCH="quest sparq" picks the benchmark scripts (bench_<name>.py); MEMCHECK_TESTS the memcheck files.
# Logs go to $OUT (or ./out when OUT is unset).
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
stages=${*:-build test memcheck bench}
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv; python3 -c "import torch,sys;print(sys.version);print('torch',torch.__version__,torch.version.cuda)"; nvcc --version | tail -1; } 2>&1 | tee "$OUT/env.log"
for s in $stages; do
  case $s in
  build)
    t0=$(date +%s)
    # the image's default g++ wrapper links its own libstdc++ statically into _C.so,
    # which breaks torch's error formatting: build with the system compiler
    CC=/usr/bin/gcc CXX=/usr/bin/g++ KVSPARSE_CUDA=1 KVSPARSE_CUDA_ARCH=${KVSPARSE_CUDA_ARCH:-90} MAX_JOBS=16 \
      python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
      || { tail -60 "$OUT/build.log"; echo BUILD FAILED; exit 1; }
    python3 -c "import kvsparse; print('kvsparse cuda:', kvsparse.has_cuda())"
    echo "build: $(( $(date +%s) - t0 )) s" ;;
  test)
    python3 -m pytest -q ${TESTS:-tests} -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25 ;;
  memcheck)
    timeout ${MEMCHECK_TIMEOUT:-400} compute-sanitizer --tool memcheck --error-exitcode 9 \
      python3 -m pytest -q -m gpu ${MEMCHECK_TESTS:-tests/test_quest.py tests/test_sparq.py} -p no:cacheprovider >"$OUT/memcheck.log" 2>&1
    echo "memcheck exit: $?"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck.log" | tail -5 ;;
  bench)
    for b in ${BENCH:-quest sparq}; do
      python3 benchmarks/bench_$b.py --out "$OUT" 2>&1 | tee "$OUT/bench_$b.log" | grep -v "^|" | tail -40
    done ;;
  profile)
    for b in ${BENCH:-quest sparq}; do
      python3 benchmarks/profile_$b.py 2>&1 | tee "$OUT/profile_$b.log" | tail -12
    done ;;
  ncu)
    # kernel-level counters of the SparQ decode op's kernels
    ncu --clock-control none --kernel-name regex:"sparse_attn|select_|logits|normalize" \
      --section SpeedOfLight --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis \
      python3 benchmarks/profile_sparq.py --ncu >"$OUT/ncu_sparq.txt" 2>&1
    grep -E "_kernel|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Waves Per SM|Cluster" "$OUT/ncu_sparq.txt" | head -80 ;;
  ncu-detail)
    # stall reasons and hot instructions of one top-k selection launch (H_kv = 8)
    ncu --clock-control none --kernel-name regex:"select_" --launch-skip 3 --launch-count 1 --set full \
      python3 benchmarks/profile_sparq.py --ncu >"$OUT/ncu_detail.txt" 2>&1
    grep -A40 "Section: Warp State Statistics" "$OUT/ncu_detail.txt" | head -60
    grep -B2 -A30 "Section: Source Counters" "$OUT/ncu_detail.txt" | head -50 ;;
  bench-quick)
    for b in ${BENCH:-quest sparq}; do
      python3 benchmarks/bench_$b.py --quick --no-cpu --out "$OUT" 2>&1 | tee "$OUT/bench_$b.log" | tail -30
    done ;;
  esac
done
