#!/usr/bin/env bash
# One call on the GPU machine: build, GPU tests, memcheck, benchmarks.
# Usage: bash benchmarks/run_gpu.sh [build] [test] [memcheck] [bench] [profile] [ncu] [bench-quick] [e2e] [capacity]
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
    # kernel-level counters of one method's decode kernels (NCU_METHOD: sparq or qaq)
    m=${NCU_METHOD:-sparq}
    if [ "$m" = qaq ]; then kre="qa_attn|qa_pmax"; args=""; else kre="sparse_attn|select_|logits|normalize"; args="--ncu"; fi
    ncu --clock-control none --kernel-name regex:"$kre" \
      --section SpeedOfLight --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis \
      python3 benchmarks/profile_$m.py $args >"$OUT/ncu_$m.txt" 2>&1
    grep -E "_kernel|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Waves Per SM|Cluster|Executed Ipc" "$OUT/ncu_$m.txt" | head -80 ;;
  ncu-detail)
    # stall reasons and hot instructions of one top-k selection launch (H_kv = 8)
    if [ "${NCU_METHOD:-sparq}" = qaq ]; then
      ncu --clock-control none --kernel-name regex:"qa_attn" --launch-skip 1 --launch-count 1 --set full \
        -f -o "$OUT/qaq_detail" python3 benchmarks/profile_qaq.py >"$OUT/ncu_run.txt" 2>&1
      ncu -i "$OUT/qaq_detail.ncu-rep" --page details >"$OUT/ncu_detail.txt" 2>&1
      ncu -i "$OUT/qaq_detail.ncu-rep" --page source --print-source sass --csv >"$OUT/ncu_sass.csv" 2>&1
    else
      ncu --clock-control none --kernel-name regex:"select_" --launch-skip 3 --launch-count 1 --set full \
        python3 benchmarks/profile_sparq.py --ncu >"$OUT/ncu_detail.txt" 2>&1
    fi
    grep -E "Executed Instructions |Issued Instructions |Registers Per|Local Memory|Issue Slots Busy|Executed Ipc A" "$OUT/ncu_detail.txt" | head -12
    grep -A40 "Section: Warp State Statistics" "$OUT/ncu_detail.txt" | head -60
    grep -B2 -A30 "Section: Source Counters" "$OUT/ncu_detail.txt" | head -50 ;;
  sass-qaq)
    # instruction mix of the QAQ attention kernels (fp16, D=128) from the built extension
    so=$(python3 -c "import kvsparse._C as c; print(c.__file__)")
    cuobjdump -sass "$so" >"$OUT/sass_all.txt" 2>&1
    python3 - "$OUT/sass_all.txt" <<'PYEOF'
import re, sys, collections
txt = open(sys.argv[1]).read()
for fn in re.split(r"\n\s*Function : ", txt)[1:]:
    name = fn.split("\n", 1)[0]
    if "qa_attn_kernel" not in name or "__half" not in name and "6__half" not in name:
        continue
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", fn)
    c = collections.Counter(ops)
    print(name[:90], "instructions:", len(ops))
    print("  ", ", ".join(f"{k} {v}" for k, v in c.most_common(28)))
PYEOF
    ;;
  time-qaq)
    # the fused QAQ op per kernel variant (blocks per SM), B=1 H_kv=8 S=32k
    for nb in ${QA_BLOCKS_LIST:-4 3 2}; do KVSPARSE_QA_BLOCKS=$nb python3 benchmarks/profile_qaq.py --time 2>&1 | tail -3; done | tee "$OUT/time_qaq.log" ;;
  e2e)
    # end-to-end generate(): E2E="shape:mode:lens:methods[:batch] ..." (one bench_e2e.py call each)
    for spec in ${E2E:-llama3-8b:static:32768:dense,quest,sparq}; do
      IFS=: read -r shape mode lens methods batch <<<"$spec"
      timeout ${E2E_TIMEOUT:-560} python3 benchmarks/bench_e2e.py --shape "$shape" --mode "$mode" --lens "$lens" \
        --methods "$methods" --batch "${batch:-1}" ${E2E_ARGS:-} --out "$OUT" 2>&1 | tee -a "$OUT/e2e.log" | grep -E '^\{|OOM|Error|error' | tail -20
    done ;;
  capacity)
    # bench_capacity.py runs, ';'-separated argument lists (shell-quoted, e.g. --kwargs '{"uniform_bits": 4}')
    IFS=';' read -ra runs <<<"${CAPACITY:---batch 1 --len 1048576 --fill synthetic --new 16}"
    for a in "${runs[@]}"; do
      eval timeout ${CAP_TIMEOUT:-400} python3 benchmarks/bench_capacity.py $a --out "$OUT" 2>&1 | tee -a "$OUT/capacity.log" \
        | grep -E '^\{|OOM|Error|error' | tail -5
    done ;;
  bench-quick)
    for b in ${BENCH:-quest sparq}; do
      python3 benchmarks/bench_$b.py --quick --no-cpu --out "$OUT" 2>&1 | tee "$OUT/bench_$b.log" | tail -30
    done ;;
  esac
done
