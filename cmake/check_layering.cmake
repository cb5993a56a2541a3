# The layering check of Note [Component libraries] (CMakeLists.txt), run as a build step:
#   cmake -DROOT=<source dir> -DRULES="common:|tensor:common|format:tensor|..." -P check_layering.cmake
# RULES lists each component with the components it links to directly. A file of component C
# (src/C/... or include/fastdcp/C/...) may include the headers of C and of the components C
# reaches through its links, and no others. Every violation is listed, with its file and line.
if(NOT DEFINED ROOT OR NOT DEFINED RULES)
  message(FATAL_ERROR "check_layering.cmake: pass -DROOT=<source dir> and -DRULES=<component:deps|...>")
endif()

string(REPLACE "|" ";" rules "${RULES}")
set(components "")
foreach(rule IN LISTS rules)
  string(REPLACE ":" ";" parts "${rule}")
  list(GET parts 0 name)
  list(LENGTH parts n)
  set(direct_${name} "")
  if(n GREATER 1)
    list(GET parts 1 deps)
    string(REPLACE "," ";" direct_${name} "${deps}")
  endif()
  list(APPEND components ${name})
endforeach()

# What each component may use: itself and everything its links reach.
foreach(name IN LISTS components)
  set(reach ${name})
  set(queue ${direct_${name}})
  while(queue)
    list(POP_FRONT queue dep)
    if(NOT dep IN_LIST reach)
      if(NOT dep IN_LIST components)
        message(FATAL_ERROR "check_layering.cmake: '${name}' links to '${dep}', which is no component")
      endif()
      list(APPEND reach ${dep})
      list(APPEND queue ${direct_${dep}})
    endif()
  endwhile()
  set(allowed_${name} ${reach})
endforeach()

set(violations "")
foreach(name IN LISTS components)
  file(GLOB_RECURSE files "${ROOT}/src/${name}/*.h" "${ROOT}/src/${name}/*.cpp" "${ROOT}/include/fastdcp/${name}/*.h")
  foreach(file IN LISTS files)
    file(STRINGS "${file}" lines REGEX "^[ \t]*#[ \t]*include[ \t]*\"")
    file(RELATIVE_PATH shown "${ROOT}" "${file}")
    foreach(line IN LISTS lines)
      # "fastdcp/X/..." (a public header) or "X/..." (a private one under src/).
      if(line MATCHES "#[ \t]*include[ \t]*\"(fastdcp/)?([a-z_]+)/")
        set(used "${CMAKE_MATCH_2}")
        if(used IN_LIST components AND NOT used IN_LIST allowed_${name})
          string(STRIP "${line}" line)
          list(JOIN allowed_${name} ", " may)
          list(APPEND violations "  ${shown}: ${line}: ${name} may not use ${used} (${name} may use ${may})")
        endif()
      endif()
    endforeach()
  endforeach()
endforeach()

if(violations)
  list(JOIN violations "\n" text)
  message(FATAL_ERROR "Includes against the layering of Note [Component libraries] (CMakeLists.txt):\n${text}\n"
                      "Move the code to a component that may use what it needs, or pass it in through an interface "
                      "of the lower component.")
endif()
