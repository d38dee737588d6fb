#!/usr/bin/env bash
# lutra's test runner: installs dependencies (cmake/setup.sh), builds and runs.
#
#   bash cmake/test.sh            # Release build, every test on every CPU target
#   bash cmake/test.sh asan       # Debug build with ASan+UBSan, every test
#   bash cmake/test.sh headers    # every public header under -Werror -fno-exceptions -fno-rtti
#   bash cmake/test.sh consume    # find_package and add_subdirectory consumers
#   bash cmake/test.sh aarch64    # cross-built for aarch64, run under qemu (NEON, SVE, SVE2)
#   bash cmake/test.sh tsan       # ThreadSanitizer build of the threaded tests
#   bash cmake/test.sh fuzz       # each libFuzzer harness for 25 s (cmake/fuzz.sh)
#   bash cmake/test.sh all        # all of the above (what .ci/run does)
#
# Build trees: build/ (Release), build-asan/, build-tsan/, build-fuzz/. Extra ctest args via CTEST_ARGS.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
MODE=${1:-release}
JOBS=${JOBS:-$(nproc)}

HWY_PREFIX=$(bash cmake/setup.sh | sed -n 's/^LUTRA_HWY_PREFIX=//p')
PREFIX_ARGS=()
[ -n "$HWY_PREFIX" ] && PREFIX_ARGS=("-DCMAKE_PREFIX_PATH=$HWY_PREFIX")

configure_and_test() {  # build_dir, extra cmake args...
  local dir=$1; shift
  cmake -S . -B "$dir" -G Ninja "${PREFIX_ARGS[@]}" "$@" >/dev/null
  cmake --build "$dir" -j "$JOBS"
  # -V shows each test's per-target lines ([targets] ...) and Catch2 summary.
  (cd "$dir" && ctest -V -j1 ${CTEST_ARGS:-} 2>&1 | grep -E '^[0-9]+: (\[targets\]|All tests passed|test cases:|assertions:|Skipped|.*SKIPPED|.*FAILED|.*failed)|^ *[0-9]+/[0-9]+ Test|tests passed|tests failed|Total Test time|Errors while|The following tests' ; exit "${PIPESTATUS[0]}")
}

# The 512-bit x86 targets on a host that cannot run them: the tests skip
# them (tests/CMakeLists.txt says why); empty where the CPU has AVX-512.
no_avx512() {
  if [ "$(uname -m)" = x86_64 ] && ! grep -qw avx512f /proc/cpuinfo; then
    echo "HWY_AVX3|HWY_AVX3_ZEN4|HWY_AVX3_SPR"
  fi
}
run_release() {
  echo "== Release tests"
  # The kernel benchmarks skip the targets the host cannot run, as the tests
  # do (bench/CMakeLists.txt): configure build/ with
  # -DLUTRA_BENCH_DISABLED_TARGETS= to time AVX-512 on another machine.
  configure_and_test build -DCMAKE_BUILD_TYPE=Release -DLUTRA_BUILD_BENCH=ON \
    "-DLUTRA_TEST_DISABLED_TARGETS=$(no_avx512)" "-DLUTRA_BENCH_DISABLED_TARGETS=$(no_avx512)"
}
run_asan() {
  echo "== ASan+UBSan tests"
  # Bench is skipped under sanitizers (timings are meaningless there). To fit
  # CI's time, the sanitizer build compiles one target per vector width on
  # x86 (SSE2, AVX2, AVX3_ZEN4/SPR where the CPU runs them); the Release run
  # covers every target.
  # -O0: with the sanitizers' instrumentation, -O1 made GCC spend 40x
  # longer on the kernel tests (kv_cache_test, one target: 247 s vs 5 s),
  # about half of CI's time, while the tests run only ~8x slower at -O0.
  # -g1 (line tables) keeps sanitizer stack traces readable at a fraction of
  # the compile time of full debug info.
  local disabled=""
  case "$(uname -m)" in x86_64) disabled="HWY_SSSE3|HWY_SSE4|HWY_AVX3" ;; esac
  # A target this CPU cannot run gets no sanitizer coverage here, only
  # compile time (half of it on a host without AVX-512): skip the 512-bit
  # ones there. The Release run still compiles every target.
  [ -n "$(no_avx512)" ] && disabled="$disabled|HWY_AVX3_ZEN4|HWY_AVX3_SPR"
  # The dispatch layer of the examples is built once, by the Release run
  # (the top-level CMakeLists.txt says why), when that run came first.
  local prebuilt=("-DLUTRA_PREBUILT_DISPATCH=")
  [ -f build/src/liblutra_dispatch.a ] &&
    prebuilt=("-DLUTRA_PREBUILT_DISPATCH=$ROOT/build/src/liblutra_dispatch.a")
  # LUTRA_TEST_QUICK: tests may skip quality figures the Release run checks.
  ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 LUTRA_TEST_QUICK=1 \
    configure_and_test build-asan -DCMAKE_BUILD_TYPE=Debug -DLUTRA_SANITIZE=ON \
      -DLUTRA_BUILD_BENCH=OFF -DCMAKE_CXX_FLAGS_DEBUG="-O0 -g1" \
      "-DLUTRA_DISABLED_TARGETS=$disabled" "${prebuilt[@]}"
}
run_tsan() {
  echo "== TSan: the threaded tests"
  # The tests that run work on several threads: the pool itself, the adapter
  # manager (loads and evictions racing lookups), GEMV/GEMM split over a
  # ThreadPool of 2-3 threads (the tests fix the counts), and two sessions
  # generating from one model when that test exists.
  local tests=(thread_pool_test lora_manager_test gemv_test gemm_test)
  [ -f tests/sessions_test.cc ] && tests+=(sessions_test)
  # One SIMD target, the baseline (HWY_COMPILE_ONLY_STATIC: SSE2 on x86,
  # NEON on Arm): the threading is the same on every target, and each extra
  # target adds the kernel tests' compile time once more (SSE2 + AVX2 took
  # 4.5 min to build and 43 s to run here, the baseline alone 1.6 min and
  # 28 s).
  # Engine tests link the Release run's dispatch layer when there is one,
  # as the ASan run does (its kernels are covered by their own tests here).
  local prebuilt=("-DLUTRA_PREBUILT_DISPATCH=")
  [ -f build/src/liblutra_dispatch.a ] &&
    prebuilt=("-DLUTRA_PREBUILT_DISPATCH=$ROOT/build/src/liblutra_dispatch.a")
  # -O1: TSan's usual setting (at -O0 the instrumented kernels run many
  # times slower); -g1 gives race reports file:line stacks.
  cmake -S . -B build-tsan -G Ninja "${PREFIX_ARGS[@]}" -DCMAKE_BUILD_TYPE=Debug \
    -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g1" \
    -DCMAKE_CXX_FLAGS="-fsanitize=thread -DHWY_COMPILE_ONLY_STATIC=1" \
    -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=thread" -DLUTRA_BUILD_BENCH=OFF \
    -DLUTRA_DISABLED_TARGETS= "${prebuilt[@]}" >/dev/null
  cmake --build build-tsan -j "$JOBS" --target "${tests[@]}"
  local regex
  regex="^($(IFS='|'; echo "${tests[*]}"))\$"
  # halt_on_error: the first race fails its test (ctest sees the exit code).
  # The pool's stress case runs its full 10^6 calls here (issue 17).
  (cd build-tsan &&
   TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" LUTRA_TEST_QUICK=1 \
   LUTRA_POOL_STRESS_CALLS=1000000 \
     ctest -V -j1 -R "$regex" ${CTEST_ARGS:-} 2>&1 |
   grep -E '^[0-9]+: (\[targets\]|All tests passed|test cases:|assertions:|Skipped|.*SKIPPED|.*FAILED|.*failed|WARNING: ThreadSanitizer|SUMMARY: ThreadSanitizer)|^ *[0-9]+/[0-9]+ Test|tests passed|tests failed|Total Test time|Errors while|The following tests'
   exit "${PIPESTATUS[0]}")
}
run_fuzz() {
  echo "== libFuzzer harnesses, ${FUZZ_SECONDS:-25} s each"
  # One harness per core: each libFuzzer process is single-threaded.
  FUZZ_PARALLEL=${FUZZ_PARALLEL:-$JOBS} bash cmake/fuzz.sh "${FUZZ_SECONDS:-25}"
}
run_headers() {
  echo "== Public headers under -Wall -Wextra -Werror -fno-exceptions -fno-rtti"
  bash cmake/check-headers.sh ${HWY_PREFIX:+"$HWY_PREFIX"}
}
run_consume() {
  echo "== Consumers: find_package and add_subdirectory"
  bash tests/consume/run.sh ${HWY_PREFIX:+"$HWY_PREFIX"}
}

case "$MODE" in
  release) run_release ;;
  asan) run_asan ;;
  headers) run_headers ;;
  consume) run_consume ;;
  tsan) run_tsan ;;
  fuzz) run_fuzz ;;
  aarch64)
    # One CPU, 128-bit SVE2: it runs every test on NEON_WITHOUT_AES, NEON,
    # SVE, SVE2 and SVE2_128 (test-aarch64.sh checks each test's [targets]),
    # so a second run without SVE (5-6 min of qemu) only re-ran NEON.
    echo "== aarch64 under qemu: NEON and SVE/SVE2 (128-bit SVE)"
    bash cmake/test-aarch64.sh --cpus 'max,sve128=on' ;;
  all) run_headers; run_release; run_asan; run_tsan; run_fuzz; run_consume
       bash "$0" aarch64 ;;
  *) echo "usage: bash cmake/test.sh [release|asan|headers|consume|aarch64|tsan|fuzz|all]" >&2; exit 2 ;;
esac
