# status_test is compiled without NDEBUG so that its hidden "[.trap]" case
# exercises the debug trap of StatusOr::value() on an error.
target_compile_options(${name} PRIVATE -UNDEBUG)
# status_trap: reading an error's value stops the process with the message.
add_test(NAME status_trap COMMAND sh -c
  "out=$(${CMAKE_CROSSCOMPILING_EMULATOR} \"$0\" '[.trap]' 2>&1); rc=$?; echo \"$out\"; \
   [ $rc -ne 0 ] && echo \"$out\" | grep -q 'value() of an error StatusOr: the reason'"
  $<TARGET_FILE:${name}>)
# status_nodiscard: a dropped Status fails to compile under -Werror (and the
# same file compiles when the results are used).
set(lutra_nodiscard_cmd ${CMAKE_CXX_COMPILER} -std=c++17 -fsyntax-only -Wall -Werror
    -I${PROJECT_SOURCE_DIR}/include ${CMAKE_CURRENT_SOURCE_DIR}/status_nodiscard.cc)
add_test(NAME status_nodiscard COMMAND ${lutra_nodiscard_cmd})
set_tests_properties(status_nodiscard PROPERTIES
  PASS_REGULAR_EXPRESSION "nodiscard")  # g++ and clang++ both name it
add_test(NAME status_nodiscard_control COMMAND ${lutra_nodiscard_cmd} -DLUTRA_NODISCARD_CONTROL)
set_tests_properties(status_trap status_nodiscard status_nodiscard_control PROPERTIES LABELS "unit")
