#!/usr/bin/env bash
# Main job: installs dependencies, builds lutra-generate and generates text.
#   bash cmake/generate.sh [lutra-generate options]
# Without options it runs on ../shared/models/stories260K.bin + tok512.bin when
# present, otherwise on a small synthetic model.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
HWY_PREFIX=$(bash cmake/setup.sh | sed -n 's/^LUTRA_HWY_PREFIX=//p')
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release \
  ${HWY_PREFIX:+-DCMAKE_PREFIX_PATH="$HWY_PREFIX"} >/dev/null
cmake --build build -j "$(nproc)" --target lutra-generate >/dev/null
exec ./build/examples/lutra-generate "$@"
