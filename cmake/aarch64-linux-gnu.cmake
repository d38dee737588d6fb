# CMake toolchain file: cross-compile for 64-bit Arm Linux (aarch64) with
# Debian's cross compilers (packages g++-aarch64-linux-gnu, qemu-user).
#
#   cmake -S . -B build-aarch64 -G Ninja \
#     -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake \
#     -DCMAKE_FIND_ROOT_PATH="<hwy-aarch64 prefix>;<catch2-aarch64 root>"
#
# Dependencies built or unpacked for aarch64 are found only through
# CMAKE_FIND_ROOT_PATH (this machine's x86 packages in /usr are never picked
# up): pass their install prefixes there, as cmake/test-aarch64.sh does.
#
# Tests run under qemu user-mode emulation through
# CMAKE_CROSSCOMPILING_EMULATOR, so `ctest` works unchanged. The emulated CPU
# comes from the QEMU_CPU environment variable, e.g.
#   QEMU_CPU=max,sve=off      NEON only (a phone without SVE)
#   QEMU_CPU=max,sve128=on    SVE/SVE2 with 128-bit vectors (SVE2 phones)
#   QEMU_CPU=max,sve256=on    SVE/SVE2 with 256-bit vectors (Neoverse V1)
#
# The compiler's default -march (armv8-a) is kept on purpose: Highway then
# compiles NEON, SVE and SVE2 code paths and picks one at run time. For a
# phone-only binary pass e.g. -DCMAKE_CXX_FLAGS=-march=armv8.2-a+dotprod+fp16
# (static dispatch, see docs/mobile.md).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(LUTRA_CROSS_TRIPLE aarch64-linux-gnu)
# GCC by default. For clang (what the Android NDK and Xcode use), pass
#   -DCMAKE_C_COMPILER=clang-19 -DCMAKE_CXX_COMPILER=clang++-19
# and the target triple is added here; clang then uses the GCC cross
# toolchain's sysroot, libstdc++ and linker.
if(NOT CMAKE_C_COMPILER)
  set(CMAKE_C_COMPILER ${LUTRA_CROSS_TRIPLE}-gcc)
endif()
if(NOT CMAKE_CXX_COMPILER)
  set(CMAKE_CXX_COMPILER ${LUTRA_CROSS_TRIPLE}-g++)
endif()
if(CMAKE_CXX_COMPILER MATCHES "clang")
  set(CMAKE_C_COMPILER_TARGET ${LUTRA_CROSS_TRIPLE})
  set(CMAKE_CXX_COMPILER_TARGET ${LUTRA_CROSS_TRIPLE})
endif()

# The cross compiler's own sysroot (libstdc++, glibc) plus whatever prefixes
# the caller passed with -DCMAKE_FIND_ROOT_PATH=... .
list(APPEND CMAKE_FIND_ROOT_PATH /usr/${LUTRA_CROSS_TRIPLE})
list(REMOVE_DUPLICATES CMAKE_FIND_ROOT_PATH)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)  # build tools run on the host
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# qemu needs the target's dynamic loader and libraries: -L points it at the
# cross sysroot (Debian's libc6-arm64-cross installs them there).
find_program(LUTRA_QEMU_AARCH64 qemu-aarch64)
if(LUTRA_QEMU_AARCH64)
  set(CMAKE_CROSSCOMPILING_EMULATOR
      "${LUTRA_QEMU_AARCH64};-L;/usr/${LUTRA_CROSS_TRIPLE}")
endif()
