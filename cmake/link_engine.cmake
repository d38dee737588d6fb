# Links lutra-generate's engine (examples/engine.h) into ${name}, the test or
# bench being configured (generate_test, ktest_test, e2e_bench, ...). When the
# examples are not configured (the aarch64 cross-build), the engine sources
# are compiled once into a static library that every such target links:
# compiling the kernels into each of them took minutes of CI time per test.
# The kernels come from lutra::dispatch (src/dispatch.cc) either way.
if(LUTRA_BUILD_EXAMPLES)
  target_link_libraries(${name} PRIVATE lutra_engine)
else()
  if(NOT TARGET lutra_engine_sources)
    add_library(lutra_engine_sources STATIC
      ${PROJECT_SOURCE_DIR}/examples/engine.cc
      ${PROJECT_SOURCE_DIR}/examples/model.cc
      ${PROJECT_SOURCE_DIR}/examples/tune.cc)
    target_link_libraries(lutra_engine_sources PUBLIC lutra::dispatch)
    target_include_directories(lutra_engine_sources PUBLIC ${PROJECT_SOURCE_DIR})
    target_compile_options(lutra_engine_sources PRIVATE -Wall -Wextra)
  endif()
  target_link_libraries(${name} PRIVATE lutra_engine_sources)
endif()
