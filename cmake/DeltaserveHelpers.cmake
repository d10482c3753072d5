# Small helpers in the spirit of absl_cc_library / absl_cc_test.
#
#   ds_cc_library(NAME model SRCS a.cc HDRS a.h DEPS absl::status PUBLIC_DEPS ...)
#     -> target `ds_model` with alias `deltaserve::model`
#   ds_cc_binary(NAME deltaserve SRCS main.cc DEPS deltaserve::server)
#   ds_cc_test(NAME safetensors_test SRCS safetensors_test.cc DEPS deltaserve::model)
#     -> a gtest binary linked with gmock_main, registered with ctest via gtest_discover_tests.
#
# Tests link the library targets; they never recompile a library's sources.
include(CMakeParseArguments)

function(ds_cc_library)
  cmake_parse_arguments(DS "" "NAME" "SRCS;HDRS;DEPS;PUBLIC_DEPS" ${ARGN})
  set(_target "ds_${DS_NAME}")
  if(DS_SRCS)
    add_library(${_target} STATIC ${DS_SRCS} ${DS_HDRS})
    target_include_directories(${_target} PUBLIC ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR})
    target_link_libraries(${_target} PUBLIC ${DS_PUBLIC_DEPS} ${DS_DEPS})
  else()
    add_library(${_target} INTERFACE)
    target_include_directories(${_target} INTERFACE ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR})
    target_link_libraries(${_target} INTERFACE ${DS_PUBLIC_DEPS} ${DS_DEPS})
  endif()
  add_library(deltaserve::${DS_NAME} ALIAS ${_target})
endfunction()

function(ds_cc_binary)
  cmake_parse_arguments(DS "" "NAME" "SRCS;DEPS" ${ARGN})
  add_executable(${DS_NAME} ${DS_SRCS})
  target_link_libraries(${DS_NAME} PRIVATE ${DS_DEPS})
endfunction()

# LABELS: "unit" (default) or "integration"; integration tests start real processes.
function(ds_cc_test)
  cmake_parse_arguments(DS "" "NAME" "SRCS;DEPS;LABELS" ${ARGN})
  if(NOT DS_LABELS)
    set(DS_LABELS unit)
  endif()
  add_executable(${DS_NAME} ${DS_SRCS})
  target_link_libraries(${DS_NAME} PRIVATE ${DS_DEPS} GTest::gmock GTest::gtest_main)
  target_compile_definitions(${DS_NAME} PRIVATE
    DS_SOURCE_DIR="${PROJECT_SOURCE_DIR}" DS_BINARY_DIR="${PROJECT_BINARY_DIR}")
  gtest_discover_tests(${DS_NAME}
    DISCOVERY_TIMEOUT 120
    PROPERTIES LABELS "${DS_LABELS}"
    ENVIRONMENT "DS_SOURCE_DIR=${PROJECT_SOURCE_DIR};DS_BINARY_DIR=${PROJECT_BINARY_DIR}")
endfunction()
