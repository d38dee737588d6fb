#!/usr/bin/env bash
# Builds lutra's libFuzzer harnesses (tests/fuzz/) and runs each one.
#
#   bash cmake/fuzz.sh [SECONDS] [HARNESS...]   # default 60 s, every harness
#
# Harnesses: gguf llama2c tokenizer gguf_model lora lutra (tests/fuzz/*.cc).
# Exits non-zero when any harness finds a crash, sanitizer report, leak,
# out-of-memory or timeout; the input that caused it is saved under
# build-fuzz/artifacts/<harness>/ and the log in build-fuzz/logs/<harness>.log.
#
# - clang and its libFuzzer runtime come from Debian (apt, with the machine's
#   configured sources); cmake/setup.sh supplies cmake, ninja and Highway.
# - Everything lives in build-fuzz/ (LUTRA_FUZZ_DIR): the build, the seeds
#   (made afresh each run: tests/fuzz/make_seeds.cc writes small files with
#   the project's writers, plus ../shared/models and ../shared/vocab), the
#   corpora libFuzzer grows (kept between runs, so a later run starts from
#   what an earlier one found), artifacts and logs.
# - FUZZ_BUILD=0 skips building and seeding (to run harnesses of one build
#   in several processes at once); FUZZ_PARALLEL=N runs N harnesses at a time
#   (default 1: each harness uses one core).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SECS=${1:-60}
[ $# -gt 0 ] && shift
ALL=(gguf llama2c tokenizer gguf_model lora lutra)
HARNESSES=("$@")
[ ${#HARNESSES[@]} -gt 0 ] || HARNESSES=("${ALL[@]}")
OUT=${LUTRA_FUZZ_DIR:-$ROOT/build-fuzz}
SHARED=${LUTRA_SHARED_MODELS_DIR:-$ROOT/../shared/models}
VOCAB=$(dirname "$SHARED")/vocab
JOBS=${JOBS:-$(nproc)}
PARALLEL=${FUZZ_PARALLEL:-1}
log() { echo "[fuzz] $*" >&2; }

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# --- clang and libFuzzer ---------------------------------------------------
# A program built with -fsanitize=fuzzer links only when clang's runtime
# (libclang_rt.fuzzer) is there; Debian ships it in libclang-rt-<major>-dev,
# which `clang` does not always pull in.
fuzzer_links() {
  local d; d=$(mktemp -d)
  printf 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }\n' > "$d/t.cc"
  clang++ -fsanitize=fuzzer,address,undefined "$d/t.cc" -o "$d/t" >/dev/null 2>&1
  local rc=$?
  rm -rf "$d"
  return $rc
}
apt_install() {
  $SUDO apt-get -o DPkg::Lock::Timeout=300 update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -qq "$@" >/dev/null
}
if ! command -v clang++ >/dev/null; then
  log "installing clang"
  apt_install clang
fi
if ! fuzzer_links; then
  major=$(clang++ -dumpversion | cut -d. -f1)
  log "installing libclang-rt-$major-dev (libFuzzer runtime)"
  apt_install "libclang-rt-$major-dev"
  fuzzer_links || { log "clang++ cannot link -fsanitize=fuzzer programs"; exit 1; }
fi

# --- build and seeds ---------------------------------------------------------
if [ "${FUZZ_BUILD:-1}" != 0 ]; then
  HWY_PREFIX=$(bash cmake/setup.sh | sed -n 's/^LUTRA_HWY_PREFIX=//p')
  # Coverage instrumentation everywhere (fuzzer-no-link); tests/fuzz/
  # CMakeLists.txt links libFuzzer's main into the harnesses only.
  # HWY_COMPILE_ONLY_STATIC: the baseline SIMD target only (SSE2 on x86).
  # The readers have no SIMD code and the kernels are tested per target by
  # the unit tests, while every extra target would double the compile time
  # of the engine that the .lutra harness links.
  # -O1 -g1: libFuzzer's usual speed/readability trade-off.
  flags="-O1 -g1 -fno-omit-frame-pointer -fsanitize=fuzzer-no-link,address,undefined"
  flags="$flags -fno-sanitize-recover=all -DHWY_COMPILE_ONLY_STATIC=1"
  cmake -S tests/fuzz -B "$OUT" -G Ninja -DCMAKE_BUILD_TYPE= \
    -DCMAKE_CXX_COMPILER=clang++ "-DCMAKE_CXX_FLAGS=$flags" \
    "-DCMAKE_EXE_LINKER_FLAGS=-fsanitize=address,undefined" \
    ${HWY_PREFIX:+"-DCMAKE_PREFIX_PATH=$HWY_PREFIX"} >/dev/null
  targets=(make_seeds)
  for h in "${HARNESSES[@]}"; do targets+=("${h}_fuzz"); done
  cmake --build "$OUT" -j "$JOBS" --target "${targets[@]}"

  # Seeds: rebuilt each run so they follow the writers; read-only inputs to
  # libFuzzer (it adds what it finds to corpus/<harness> instead).
  rm -rf "$OUT/seeds"
  mkdir -p "$OUT/seeds"
  vocab_arg=()
  [ -d "$VOCAB" ] && vocab_arg=("$VOCAB")
  ASAN_OPTIONS=detect_leaks=0 "$OUT/make_seeds" "$OUT/seeds" "$SHARED" "${vocab_arg[@]}"
  S=$OUT/seeds
  cp "$S"/lora/*.gguf "$S"/gguf/
  cp "$S"/lutra/*.lutra "$S"/gguf/ 2>/dev/null || true
  cp "$S"/gguf/types.gguf "$S"/gguf_model/
  if [ -d "$SHARED" ]; then
    # (cp without the mode: the shared files are read-only.)
    copy() { [ -f "$SHARED/$1" ] && cp --no-preserve=mode "$SHARED/$1" "$S/$2/" || true; }
    copy stories260K.gguf gguf
    copy stories260K.gguf gguf_model
    copy stories260K.bin llama2c
    copy tok512.bin tokenizer
  else
    log "no $SHARED: seeds come from the project's writers only"
  fi
  # The vocabularies (make_seeds cuts ../shared/vocab/*.gguf down to ~30 KB)
  # exercise Tokenizer::FromGguf's SentencePiece and byte-level BPE paths
  # and every pre-tokenizer they name.
fi

# --- runs ----------------------------------------------------------------------
# -rss_limit_mb (and the malloc limit, which defaults to it): an input that
# makes the library allocate more is a finding (issue 18: limits are checked
# before allocating). -timeout: seconds one input may take.
RSS_MB=${FUZZ_RSS_MB:-2048}
TIMEOUT=${FUZZ_TIMEOUT:-20}
run_one() {  # harness
  local h=$1
  local args=(-max_total_time="$SECS" -rss_limit_mb="$RSS_MB" -timeout="$TIMEOUT"
              -print_final_stats=1 -artifact_prefix="$OUT/artifacts/$h/")
  case "$h" in
    gguf|gguf_model|lora|lutra) args+=(-dict="$ROOT/tests/fuzz/gguf.dict") ;;
  esac
  mkdir -p "$OUT/corpus/$h" "$OUT/artifacts/$h" "$OUT/logs"
  # The lutra harness writes its input to a file for the engine's loader.
  TMPDIR="$OUT/tmp" UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$OUT/${h}_fuzz" "${args[@]}" "$OUT/corpus/$h" "$OUT/seeds/$h" \
    > "$OUT/logs/$h.log" 2>&1
}
summary() {  # harness rc
  local h=$1 rc=$2 last execs
  last=$(grep -E '^#[0-9]+.*(DONE|pulse|NEW|REDUCE|INITED)' "$OUT/logs/$h.log" | tail -n1 || true)
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$OUT/logs/$h.log" | tail -n1)
  if [ "$rc" = 0 ]; then
    echo "[fuzz] $h: ok, ${execs:-?} execs in ${SECS} s; ${last}"
  else
    echo "[fuzz] $h: FAILED (exit $rc); ${last}"
    grep -E 'ERROR: |SUMMARY: |LUTRA_FUZZ_CHECK|Test unit written' "$OUT/logs/$h.log" | head -n 8 | sed 's/^/    /'
  fi
}
mkdir -p "$OUT/tmp"
failed=0
pids=()
names=()
wait_one() {  # waits for the oldest running harness
  local rc=0
  wait "${pids[0]}" || rc=$?
  summary "${names[0]}" "$rc"
  [ "$rc" = 0 ] || failed=1
  pids=("${pids[@]:1}")
  names=("${names[@]:1}")
}
log "running ${HARNESSES[*]} for $SECS s each, $PARALLEL at a time (logs: $OUT/logs)"
for h in "${HARNESSES[@]}"; do
  [ -x "$OUT/${h}_fuzz" ] || { log "no harness '$h' (built: ${ALL[*]})"; exit 2; }
  run_one "$h" &
  pids+=($!)
  names+=("$h")
  [ ${#pids[@]} -lt "$PARALLEL" ] || wait_one
done
while [ ${#pids[@]} -gt 0 ]; do wait_one; done
exit $failed
