target_link_libraries(${name} PRIVATE lutra::dispatch)  # lutra/linear.h runs through it
