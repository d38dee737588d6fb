#!/usr/bin/env bash
# Consumption tests: lutra used the ways its users use it.
#  (a) cmake --install to a temporary prefix, then find_package(lutra CONFIG)
#      with no Highway prefix (the package config records Highway's location)
#  (b) the source tree vendored with add_subdirectory
# Each builds consumer.cc (static dispatch, lutra's headers) and
# consumer_dispatch.cc (dynamic dispatch: lutra::dispatch and plain headers).
# To keep CI fast the dispatch library is built for the 4-bit int8 kernels
# only (LUTRA_BITS=4, LUTRA_PRECISIONS=int8), which consumer_dispatch checks
# (a 3-bit matrix is refused with Unimplemented), and (b) also drops the
# AVX-512 targets (LUTRA_DISPATCH_DISABLED_TARGETS).
#   bash tests/consume/run.sh [HWY_PREFIX]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HWY_PREFIX=${1:-}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SMALL=(-DLUTRA_BITS=4 -DLUTRA_PRECISIONS=int8)
JOBS=${JOBS:-1}

# (a) install, then find_package
cmake -S "$ROOT" -B "$WORK/lutra-build" -G Ninja -DLUTRA_BUILD_TESTS=OFF \
  -DLUTRA_BUILD_BENCH=OFF -DLUTRA_BUILD_EXAMPLES=OFF -DLUTRA_INSTALL=ON \
  -DLUTRA_BUILD_DISPATCH=ON "${SMALL[@]}" \
  ${HWY_PREFIX:+-DCMAKE_PREFIX_PATH="$HWY_PREFIX"} >/dev/null
cmake --build "$WORK/lutra-build" -j "$JOBS" >/dev/null
cmake --install "$WORK/lutra-build" --prefix "$WORK/prefix" >/dev/null
cmake -S "$ROOT/tests/consume/find_package" -B "$WORK/fp" -G Ninja \
  -DCMAKE_PREFIX_PATH="$WORK/prefix" >/dev/null
cmake --build "$WORK/fp" -j "$JOBS" >/dev/null
"$WORK/fp/consumer"
"$WORK/fp/consumer_dispatch"

# (b) add_subdirectory
cmake -S "$ROOT/tests/consume/subdirectory" -B "$WORK/sub" -G Ninja \
  -DLUTRA_SOURCE_DIR="$ROOT" "${SMALL[@]}" \
  "-DLUTRA_DISPATCH_DISABLED_TARGETS=HWY_AVX3|HWY_AVX3_ZEN4|HWY_AVX3_SPR|HWY_AVX3_DL" \
  ${HWY_PREFIX:+-DCMAKE_PREFIX_PATH="$HWY_PREFIX"} >/dev/null
cmake --build "$WORK/sub" -j "$JOBS" >/dev/null
"$WORK/sub/consumer"
"$WORK/sub/consumer_dispatch"
echo "consume: 4 passed, 0 failed"
