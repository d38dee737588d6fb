include(${PROJECT_SOURCE_DIR}/cmake/link_engine.cmake)  # links examples/engine
# One crafted file end to end through the lutra-generate binary when it is built.
if(LUTRA_BUILD_EXAMPLES)
  add_dependencies(${name} lutra-generate)
  target_compile_definitions(${name} PRIVATE LUTRA_GENERATE_BIN="$<TARGET_FILE:lutra-generate>")
endif()
