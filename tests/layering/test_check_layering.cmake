# ctest -R layering: cmake/check_layering.cmake refuses an include the wrong way, naming the file,
# the line and the rule, and accepts includes the right way (public and private headers).
#   cmake -DSOURCE=<fastdcp source dir> -DWORK=<scratch dir> -P test_check_layering.cmake
set(rules "common:|tensor:common|format:tensor|checkpoint:format")
file(REMOVE_RECURSE "${WORK}")

function(write_tree)
  file(WRITE "${WORK}/include/fastdcp/format/rank_file.h" "#pragma once\n#include \"fastdcp/tensor/tensor.h\"\n")
  file(WRITE "${WORK}/src/checkpoint/reader.cpp"
       "#include \"fastdcp/format/rank_file.h\"\n#include \"checkpoint/private.h\"\n#include \"fastdcp/common/error.h\"\n")
  file(WRITE "${WORK}/src/checkpoint/private.h" "#pragma once\n#include <vector>\n")
  file(WRITE "${WORK}/src/tensor/tensor.cpp" "#include \"fastdcp/tensor/tensor.h\"\n")
endfunction()

function(check expect_pass what)
  execute_process(COMMAND ${CMAKE_COMMAND} -DROOT=${WORK} "-DRULES=${rules}" -P ${SOURCE}/cmake/check_layering.cmake
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(expect_pass AND NOT rc EQUAL 0)
    message(FATAL_ERROR "${what}: refused a tree that keeps the layering:\n${err}")
  elseif(NOT expect_pass AND rc EQUAL 0)
    message(FATAL_ERROR "${what}: accepted an include the wrong way")
  endif()
  set(output "${err}" PARENT_SCOPE)
endfunction()

write_tree()
check(TRUE "a layered tree")

# Downward includes are fine; one upward (tensor -> format, through a public header) and one
# sideways-up private include (format -> checkpoint's src header) are not.
file(WRITE "${WORK}/src/tensor/sharded.cpp" "#include \"fastdcp/tensor/tensor.h\"\n  #  include \"fastdcp/format/rank_file.h\"\n")
file(WRITE "${WORK}/src/format/rank_file.cpp" "#include \"checkpoint/private.h\"\n")
check(FALSE "upward includes")
foreach(expected "src/tensor/sharded.cpp" "tensor may not use format" "src/format/rank_file.cpp"
                 "format may not use checkpoint" "format may use format, tensor, common")
  string(FIND "${output}" "${expected}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "the refusal does not say '${expected}':\n${output}")
  endif()
endforeach()
file(REMOVE_RECURSE "${WORK}")
