# e2e_bench links lutra-generate's engine (examples/engine.h). When the
# examples are not configured, compile the engine sources into the test.
if(LUTRA_BUILD_EXAMPLES)
  target_link_libraries(${name} PRIVATE lutra_engine)
else()
  target_sources(${name} PRIVATE
    ${PROJECT_SOURCE_DIR}/examples/dispatch.cc
    ${PROJECT_SOURCE_DIR}/examples/engine.cc
    ${PROJECT_SOURCE_DIR}/examples/model.cc)
endif()
