#!/usr/bin/env bash
# The C++ getting-started guide, checked (ctest -L consumer; registered by tests/CMakeLists.txt):
#  1. the example files that docs/getting-started-cpp.md shows are examples/consumer's, byte for byte;
#  2. examples/consumer builds against this build tree's fastdcp installed into a temporary prefix
#     (find_package), and runs;
#  3. it builds with fastdcp's source tree as a subdirectory (add_subdirectory), and runs.
#
#   run_consumer_test.sh SOURCE_DIR BUILD_DIR [CMAKE [GENERATOR [CXX_COMPILER [BUILD_TYPE]]]]
set -euo pipefail

src="$(cd "$1" && pwd)"
build="$(cd "$2" && pwd)"
cmake="${3:-cmake}"
generator="${4:-}"
cxx="${5:-}"
build_type="${6:-Release}"
doc="$src/docs/getting-started-cpp.md"
example="$src/examples/consumer"

fail() {
  echo "consumer test: FAIL: $*" >&2
  exit 1
}

# ---- 1. the doc shows the example files as they are ----------------------------------------------
# The fenced block (```LANG) after the line "<!-- example-file: FILE -->" in the doc.
doc_block() {
  awk -v marker="<!-- example-file: $1 -->" -v fence="\`\`\`$2" '
    state == 0 && $0 == marker { state = 1; next }
    state == 1 && $0 == "" { next }
    state == 1 && $0 == fence { state = 2; next }
    state == 1 { exit 1 }
    state == 2 && $0 == "```" { state = 3; exit }
    state == 2 { print }
    END { if (state != 3) exit 1 }' "$doc"
}
check_doc_block() {  # check_doc_block FILE LANG
  local shown
  shown="$(mktemp)"
  if ! doc_block "$1" "$2" >"$shown"; then
    rm -f "$shown"
    fail "docs/getting-started-cpp.md has no \`\`\`$2 block after '<!-- example-file: $1 -->'"
  fi
  if ! diff -u --label "$1 (docs/getting-started-cpp.md)" --label "$1" "$shown" "$src/$1"; then
    rm -f "$shown"
    fail "docs/getting-started-cpp.md shows $1 differently from the file (diff above)"
  fi
  rm -f "$shown"
  echo "consumer test: docs/getting-started-cpp.md shows $1 as it is"
}
check_doc_block examples/consumer/CMakeLists.txt cmake
check_doc_block examples/consumer/main.cpp cpp

# ---- 2 and 3: build and run the example both ways ----------------------------------------------------
work="$(mktemp -d "${TMPDIR:-/tmp}/fastdcp_consumer.XXXXXX")"
trap 'rm -rf "$work"' EXIT
configure_args=(-DCMAKE_BUILD_TYPE="$build_type")
[ -n "$generator" ] && configure_args+=(-G "$generator")
[ -n "$cxx" ] && configure_args+=(-DCMAKE_CXX_COMPILER="$cxx")

build_and_run() {  # build_and_run NAME CMAKE_ARGS...: configures, builds and runs the example
  local name="$1"
  shift
  echo "=== consumer test: $name ==="
  "$cmake" -S "$example" -B "$work/$name" "${configure_args[@]}" "$@" >"$work/$name.log" 2>&1 ||
    { cat "$work/$name.log"; fail "$name: configuring examples/consumer failed"; }
  "$cmake" --build "$work/$name" --config "$build_type" -j 2 >>"$work/$name.log" 2>&1 ||
    { cat "$work/$name.log"; fail "$name: building examples/consumer failed"; }
  local program="$work/$name/consumer"
  [ -x "$program" ] || program="$work/$name/$build_type/consumer"  # multi-config generators
  "$program" "$work/$name-checkpoint" || fail "$name: the consumer program failed"
}

echo "=== consumer test: installing $build into a temporary prefix ==="
"$cmake" --install "$build" --config "$build_type" --prefix "$work/prefix" >"$work/install.log" 2>&1 ||
  { cat "$work/install.log"; fail "cmake --install $build failed"; }
build_and_run find_package -DCMAKE_PREFIX_PATH="$work/prefix"
build_and_run add_subdirectory -DFASTDCP_SOURCE_DIR="$src"
echo "consumer test: PASS"
