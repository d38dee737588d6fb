include(${PROJECT_SOURCE_DIR}/cmake/link_engine.cmake)  # links examples/engine
