# Links lutra-generate's engine (examples/engine.h) into ${name}, the test or
# bench being configured (generate_test, e2e_bench). When the examples are not
# configured, the engine sources are compiled into ${name} instead.
if(LUTRA_BUILD_EXAMPLES)
  target_link_libraries(${name} PRIVATE lutra_engine)
else()
  target_sources(${name} PRIVATE
    ${PROJECT_SOURCE_DIR}/examples/dispatch.cc
    ${PROJECT_SOURCE_DIR}/examples/engine.cc
    ${PROJECT_SOURCE_DIR}/examples/model.cc)
endif()
