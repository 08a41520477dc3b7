#!/usr/bin/env bash
# llama.cpp's llama-perplexity, built from the llama.cpp sources that the installed llama-cpp-python vendors
# (the code the gate's llama.cpp backend runs), for benchmarks/peers.py. Prints the binary's path.
#   bash benchmarks/build_llama_perplexity.sh OUT_DIR
set -euo pipefail
out=${1:?usage: build_llama_perplexity.sh OUT_DIR}
version=$(python -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))")
binary="$out/build/bin/llama-perplexity"
if [ ! -x "$binary" ]; then
    mkdir -p "$out"
    python -m pip download "llama-cpp-python==$version" --no-binary :all: --no-deps -d "$out" -q >&2
    tar xzf "$out/llama_cpp_python-$version.tar.gz" -C "$out"
    # the library's own build options otherwise (native CPU kernels), so that both run the same kernels
    cmake -S "$out/llama_cpp_python-$version/vendor/llama.cpp" -B "$out/build" -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_CURL=OFF >&2
    cmake --build "$out/build" --target llama-perplexity -j"$(nproc)" >&2
fi
echo "$binary"
