#!/usr/bin/env bash
# Cross-builds lutra's test suite for aarch64 and runs every test under qemu
# user-mode emulation, once per emulated CPU, so that every Highway target
# lutra ships for Arm (NEON_WITHOUT_AES, NEON, SVE, SVE2, SVE_256, SVE2_128)
# runs every kernel test. Installs what it needs first (cmake/setup.sh
# --arch aarch64: cross g++, qemu-user, Catch2 and Highway for aarch64).
#
#   bash cmake/test-aarch64.sh                    # everything (see CPUS below)
#   bash cmake/test-aarch64.sh --tests 'dot|gemv' # only tests whose name matches
#   bash cmake/test-aarch64.sh --cpus 'max,sve=off max,sve256=on'
#   bash cmake/test-aarch64.sh --build-only       # cross-build, run nothing
#   bash cmake/test-aarch64.sh --keep-going       # build what compiles, test that
#   bash cmake/test-aarch64.sh --size             # code size per dispatch mode
#   bash cmake/test-aarch64.sh --compiler clang-19  # clang (as in the NDK/Xcode)
#                                  instead of GCC 12; also compiles and runs NEON_BF16
#
# Build tree: build-aarch64/ (Release, tests only). Each CPU run checks that
# the [targets] line of every test case names the targets that CPU must
# exercise, so a qemu or Highway change that silently drops SVE fails here.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# Emulated CPUs (qemu -cpu strings) and the Highway targets each must run.
#  - SVE off: an Armv8 phone without SVE; NEON (AES) and NEON_WITHOUT_AES.
#  - 128-bit SVE2: today's SVE2 phones (Cortex-X2/A710 and later); selects
#    the SVE2_128 target, plus generic SVE and SVE2 at 128 bits.
#  - 256-bit SVE: Neoverse V1 style; selects SVE_256, and SVE/SVE2 at 256
#    bits, so code that assumes 4 f32 lanes per vector breaks here.
#  - 2048-bit SVE: the architectural maximum (64 f32 lanes per vector) for
#    the generic SVE/SVE2 targets; catches lane-count and tail assumptions.
#    (qemu-user starts processes with 512-bit vectors unless told otherwise:
#    `sve2048=on` alone only raises the limit, the default length is in bytes.)
CPUS_DEFAULT='max,sve=off max,sve128=on max,sve256=on max,sve-default-vector-length=256'
CPUS=$CPUS_DEFAULT
TESTS=''
BUILD_ONLY=0
KEEP_GOING=0
SIZE_ONLY=0
COMPILER=gcc
JOBS=${JOBS:-$(nproc)}
while [ $# -gt 0 ]; do
  case "$1" in
    --tests) TESTS="$2"; shift 2 ;;
    --cpus) CPUS="$2"; shift 2 ;;
    --build-only) BUILD_ONLY=1; shift ;;
    --keep-going) KEEP_GOING=1; shift ;;
    --size) SIZE_ONLY=1; shift ;;
    --compiler) COMPILER="$2"; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "test-aarch64.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
done

# Compiler: GCC 12 (Debian's cross g++), or clang-N with the GCC cross
# toolchain's sysroot and libstdc++. Highway 1.2 compiles NEON_BF16 only with
# clang >= 17 or GCC >= 13.2, so only the clang build runs it.
BUILD=build-aarch64
CMAKE_CC=()
CXX_CMD=(aarch64-linux-gnu-g++)
BF16=""
case "$COMPILER" in
  gcc) ;;
  clang-*)
    v=${COMPILER#clang-}
    if ! command -v "clang++-$v" >/dev/null; then
      echo "== installing clang-$v" >&2
      SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=300 \
        install -y -qq --no-install-recommends "clang-$v" >/dev/null
    fi
    BUILD=build-aarch64-clang
    CMAKE_CC=(-DCMAKE_C_COMPILER="clang-$v" -DCMAKE_CXX_COMPILER="clang++-$v")
    CXX_CMD=("clang++-$v" --target=aarch64-linux-gnu)
    [ "$v" -ge 17 ] && BF16=" NEON_BF16"  # qemu's max CPU has FEAT_BF16
    ;;
  *) echo "test-aarch64.sh: --compiler gcc or clang-N" >&2; exit 2 ;;
esac

expected_targets() {  # qemu -cpu string -> Highway targets that must run
  case "$1" in
    *sve=off*) echo "NEON_WITHOUT_AES NEON$BF16" ;;
    *sve128=on*) echo "NEON_WITHOUT_AES NEON$BF16 SVE SVE2 SVE2_128" ;;
    *sve256=on*) echo "NEON_WITHOUT_AES NEON$BF16 SVE SVE2 SVE_256" ;;
    *) echo "NEON_WITHOUT_AES NEON$BF16 SVE SVE2" ;;
  esac
}

start=$(date +%s)
SETUP=$(bash cmake/setup.sh --arch aarch64)
HWY_PREFIX=$(sed -n 's/^LUTRA_HWY_PREFIX=//p' <<<"$SETUP")
CATCH2_PREFIX=$(sed -n 's/^LUTRA_CATCH2_PREFIX=//p' <<<"$SETUP")
QEMU=$(command -v qemu-aarch64 || command -v qemu-aarch64-static)

cmake -S . -B "$BUILD" -G Ninja "${CMAKE_CC[@]}" \
  -DCMAKE_TOOLCHAIN_FILE="$ROOT/cmake/aarch64-linux-gnu.cmake" \
  -DCMAKE_FIND_ROOT_PATH="$HWY_PREFIX;$CATCH2_PREFIX" \
  -DCMAKE_BUILD_TYPE=Release -DLUTRA_BUILD_TESTS=ON -DLUTRA_BUILD_BENCH=OFF \
  -DLUTRA_BUILD_EXAMPLES=OFF -DLUTRA_INSTALL=OFF >/dev/null

# Code size of lutra's kernels per way of dispatching on Arm (docs/mobile.md):
# src/dispatch.cc instantiates every kernel an engine calls, so its .text
# is what lutra adds to an app (plus libhwy.a's, printed last).
size_report() {
  local dir="$BUILD/size" mode name flags text
  mkdir -p "$dir"
  printf '%-66s %10s\n' "src/dispatch.cc, ${CXX_CMD[*]} -O2" ".text bytes"
  while IFS='|' read -r name flags; do
    # shellcheck disable=SC2086  # $flags is a list of compiler flags
    "${CXX_CMD[@]}" -std=c++17 -O2 -fno-exceptions -fno-rtti -I include -I . \
      -isystem "$HWY_PREFIX/include" $flags -c src/dispatch.cc -o "$dir/dispatch.o"
    text=$(aarch64-linux-gnu-size -A "$dir/dispatch.o" |
           awk '$1 ~ /^\.text/ {t += $2} END {print t}')
    printf '%-66s %10s\n' "$name" "$text"
  done <<'MODES'
dynamic, 6 targets (NEON_WITHOUT_AES NEON SVE SVE2 SVE_256 SVE2_128)|-march=armv8-a
dynamic, phone set (NEON SVE2_128)|-march=armv8-a+crypto -DHWY_DISABLED_TARGETS=(HWY_SVE|HWY_SVE2|HWY_SVE_256)
static NEON (-march=armv8.2-a+crypto+fp16+dotprod)|-march=armv8.2-a+crypto+fp16+dotprod -DHWY_COMPILE_ONLY_STATIC=1
static SVE2_128 (-march=armv9-a -msve-vector-bits=128)|-march=armv9-a -msve-vector-bits=128 -DHWY_COMPILE_ONLY_STATIC=1
MODES
  printf '%-66s %10s\n' "libhwy.a (target detection, abort, print; linked once)" \
    "$(aarch64-linux-gnu-size -t "$HWY_PREFIX/lib/libhwy.a" | awk 'END {print $1}')"
}
if [ $SIZE_ONLY = 1 ]; then size_report; exit 0; fi

# Public headers under the flags of a phone build (-Werror -fno-exceptions
# -fno-rtti), once per way an app may compile lutra for Arm:
#  - default armv8-a with foreach_target: every Arm target lutra ships
#    (sizeless SVE vector types reject sizeof, arrays and class members);
#  - static dispatch for an Armv8.2 phone (NEON with fp16/dotprod baseline);
#  - static dispatch for an Armv9 phone (SVE2 baseline, 128-bit vectors).
check_headers() {
  local dir="$BUILD/headers" tu h
  mkdir -p "$dir"
  tu="$dir/all_headers.cc"
  # Every header under include/lutra/, relative to it (e.g. kernels/gemv-inl.h).
  local headers
  headers=$(cd include/lutra && find . -name '*.h' | sed 's#^\./##' | sort)
  {
    echo '// Generated by cmake/test-aarch64.sh: every public lutra header.'
    for h in $headers; do
      case "$h" in *-inl.h) ;; *) echo "#include \"lutra/$h\"" ;; esac
    done
    echo '#ifndef HWY_COMPILE_ONLY_STATIC'
    echo '#undef HWY_TARGET_INCLUDE'
    echo "#define HWY_TARGET_INCLUDE \"$ROOT/$tu\""
    echo '#include "hwy/foreach_target.h"  // IWYU pragma: keep'
    echo '#endif'
    echo '#include "hwy/highway.h"'
    for h in $headers; do case "$h" in *-inl.h) echo "#include \"lutra/$h\"" ;; esac; done
    echo '#if HWY_ONCE'
    echo 'int main() { return 0; }'
    echo '#endif'
  } >"$tu"
  local flags=(-std=c++17 -O2 -Wall -Wextra -Werror -fno-exceptions -fno-rtti
               -I include -I / -isystem "$HWY_PREFIX/include")
  local march
  for march in "armv8-a" "armv8.2-a+fp16+dotprod -DHWY_COMPILE_ONLY_STATIC=1" \
               "armv9-a -msve-vector-bits=128 -DHWY_COMPILE_ONLY_STATIC=1"; do
    # shellcheck disable=SC2086  # $march holds the -march value and its flags
    if ! "${CXX_CMD[@]}" "${flags[@]}" -march=$march -c "$tu" -o "$dir/all_headers.o"; then
      echo "!! public headers fail to compile for aarch64 with -march=$march"
      [ $KEEP_GOING = 1 ] && { status=1; return 0; }
      exit 1
    fi
  done
  echo "== headers OK for aarch64: $(echo "$headers" | wc -l) public headers under" \
       "-Werror -fno-exceptions -fno-rtti (armv8-a all targets; armv8.2-a, armv9-a static)"
}
status=0
check_headers

# lutra vendored the way docs/mobile.md tells a phone app to: Highway's and
# lutra's source trees added with add_subdirectory, static dispatch with a
# phone's -march, -fno-exceptions -fno-rtti; built and run under qemu.
check_vendored() {
  local dir="$BUILD/vendor" src
  src=$(ls -d "$ROOT"/build/deps/src/highway 2>/dev/null || true)
  [ -f "$src/CMakeLists.txt" ] || { echo "!! no Highway source tree in build/deps/src"; status=1; return 0; }
  mkdir -p "$dir/app"
  cat >"$dir/app/CMakeLists.txt" <<'CMAKE'
cmake_minimum_required(VERSION 3.16)
project(phone_app CXX)
set(CMAKE_CXX_STANDARD 17)
# docs/mobile.md, "Vendoring": Highway first, then lutra.
set(HWY_ENABLE_TESTS OFF CACHE BOOL "" FORCE)
set(HWY_ENABLE_CONTRIB OFF CACHE BOOL "" FORCE)
set(HWY_ENABLE_EXAMPLES OFF CACHE BOOL "" FORCE)
set(HWY_ENABLE_INSTALL OFF CACHE BOOL "" FORCE)
add_subdirectory(${HWY_SOURCE_DIR} highway EXCLUDE_FROM_ALL)
if(NOT TARGET hwy::hwy)
  add_library(hwy::hwy ALIAS hwy)  # Highway's own CMake only exports it
endif()
add_subdirectory(${LUTRA_SOURCE_DIR} lutra EXCLUDE_FROM_ALL)
add_executable(app main.cc)
target_compile_options(app PRIVATE -march=armv8.2-a+crypto+fp16+dotprod
                       -fno-exceptions -fno-rtti -Wall -Wextra -Werror)
target_link_libraries(app PRIVATE lutra::lutra)
CMAKE
  cat >"$dir/app/main.cc" <<'CC'
// Static dispatch: only the target of the app's -march is compiled.
#include <stdio.h>

#include <vector>

#include "hwy/highway.h"
#include "lutra/kernels/dot-inl.h"

int main() {
  std::vector<float> a(1001), b(1001);
  double ref = 0.0, norm = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    a[i] = 0.001f * static_cast<float>(i);
    b[i] = 1.0f - 0.0005f * static_cast<float>(i);
    ref += double(a[i]) * b[i];
    norm += double(a[i]) * a[i] + double(b[i]) * b[i];
  }
  const float dot = lutra::HWY_NAMESPACE::Dot(a.data(), b.data(), a.size());
  const double err = dot - ref;
  printf("vendored app, static target %s: Dot %f, reference %f\n",
         hwy::TargetName(HWY_STATIC_TARGET), dot, ref);
  return (err < 0 ? -err : err) <= 1e-5 * norm ? 0 : 1;
}
CC
  if cmake -S "$dir/app" -B "$dir/build" -G Ninja -DCMAKE_BUILD_TYPE=Release "${CMAKE_CC[@]}" \
       -DCMAKE_TOOLCHAIN_FILE="$ROOT/cmake/aarch64-linux-gnu.cmake" \
       -DHWY_SOURCE_DIR="$src" -DLUTRA_SOURCE_DIR="$ROOT" >"$dir/build.log" 2>&1 &&
     cmake --build "$dir/build" -j "$JOBS" >>"$dir/build.log" 2>&1 &&
     QEMU_CPU=max,sve=off "$QEMU" -L /usr/aarch64-linux-gnu "$dir/build/app"; then
    echo "== vendored (add_subdirectory) static-dispatch app OK"
  else
    echo "!! vendored app failed (see $dir/build.log)"; status=1
  fi
}
check_vendored

# Test executables to build: all tests/<name>_test.cc, or those matching --tests.
NAMES=()
for src in tests/*_test.cc; do
  name=$(basename "$src" .cc)
  if [ -z "$TESTS" ] || grep -Eq -- "$TESTS" <<<"$name"; then NAMES+=("$name"); fi
done
[ ${#NAMES[@]} -gt 0 ] || { echo "no test matches '$TESTS'" >&2; exit 2; }
echo "== aarch64 cross-build of ${#NAMES[@]} tests: ${NAMES[*]}"
if [ $KEEP_GOING = 1 ]; then
  cmake --build "$BUILD" -j "$JOBS" --target "${NAMES[@]}" -- -k 0 >"$BUILD/build.log" 2>&1 || true
  BUILT=()
  for n in "${NAMES[@]}"; do
    if [ -x "$BUILD/tests/$n" ] && ! grep -q "^FAILED: .*CMakeFiles/$n.dir/" "$BUILD/build.log"; then
      BUILT+=("$n")
    else
      echo "!! does not compile: $n (see $BUILD/build.log)"; status=1
    fi
  done
  NAMES=("${BUILT[@]}")
  [ ${#NAMES[@]} -gt 0 ] || exit 1
else
  cmake --build "$BUILD" -j "$JOBS" --target "${NAMES[@]}"
fi
echo "== built in $(( $(date +%s) - start )) s"
[ $BUILD_ONLY = 1 ] && exit $status

# Vector-length probe, so each log states what the emulated CPU offers.
PROBE="$BUILD/sve_vl_probe"
printf '%s\n' '#include <stdio.h>' '#include <sys/prctl.h>' \
  'int main(void) { int vl = prctl(PR_SVE_GET_VL);' \
  '  if (vl < 0) printf("no SVE\n"); else printf("SVE %d-bit vectors\n", 8 * (vl & PR_SVE_VL_LEN_MASK));' \
  '  return 0; }' >"$PROBE.c"
aarch64-linux-gnu-gcc -O2 "$PROBE.c" -o "$PROBE"

# ctest runs each test through CMAKE_CROSSCOMPILING_EMULATOR (qemu-aarch64 -L
# <sysroot>); qemu reads the CPU model from QEMU_CPU.
REGEX="^($(IFS='|'; echo "${NAMES[*]}"))\$"
for cpu in $CPUS; do
  t0=$(date +%s)
  echo "== qemu-aarch64 -cpu $cpu: $(QEMU_CPU=$cpu "$QEMU" -L /usr/aarch64-linux-gnu "$PROBE")"
  log="$BUILD/ctest-${cpu//[^a-z0-9]/_}.log"
  rc=0
  # LUTRA_TEST_QUICK: tests may skip quality figures the Release run checks.
  (cd "$BUILD" && QEMU_CPU=$cpu LUTRA_TEST_QUICK=1 ctest -V -j "$JOBS" -R "$REGEX" \
     >"$ROOT/$log" 2>&1) || rc=$?
  # Per-target lines, Catch2 summaries, per-test times; at most 40 failure lines.
  grep -E '^[0-9]+: (\[targets\]|All tests passed|test cases:|.*SKIPPED|.*FAILED|.*failed)|^ *[0-9]+/[0-9]+ Test|tests passed|tests failed|Errors while|The following tests|^\s+[0-9]+ - ' "$log" |
    awk '/FAILED:/ { if (++failed > 40) next } { print } END { if (failed > 40) print "   ... " failed " FAILED lines in all" }' || true
  # Every per-target test case must have run on every target this CPU offers.
  lines=$(grep -E '^[0-9]+: \[targets\]' "$log" || true)
  if [ -z "$lines" ]; then
    echo "   (no per-target test cases among the tests run)"
  fi
  for t in $(expected_targets "$cpu"); do
    missing=$(grep -v -E ":( [A-Z0-9_]+)* $t( |\$)" <<<"$lines" || true)
    if [ -n "$lines" ] && [ -n "$missing" ]; then
      echo "!! target $t did not run under -cpu $cpu in:"; echo "$missing"; status=1
    fi
  done
  if [ "$cpu" != "${cpu/sve=off/}" ] && grep -q ' SVE' <<<"$lines"; then
    echo "!! an SVE target ran with SVE off"; status=1
  fi
  [ $rc = 0 ] || status=1
  echo "== -cpu $cpu: ctest rc=$rc in $(( $(date +%s) - t0 )) s (log: $log)"
done
echo "== aarch64 done in $(( $(date +%s) - start )) s, status $status"
exit $status
