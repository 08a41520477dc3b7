# Included at the end of each project() call in llama-cpp-python's build: run.sh and tox pass it as
# -DCMAKE_PROJECT_INCLUDE in CMAKE_ARGS. llama-cpp-python forces LLAMA_BUILD_COMMON on, which compiles
# llama.cpp's "common" library (argument parsing, chat templates, JSON schemas: the code of llama.cpp's own
# tools, which the Python bindings never load) -- 150 s of a 278 s compile on 2 cores. A normal variable set in
# llama.cpp's own scope hides that cache entry, so only libllama and the ggml libraries are built and installed.
if(PROJECT_NAME STREQUAL "llama.cpp")
  set(LLAMA_BUILD_COMMON OFF)
endif()
