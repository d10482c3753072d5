// Helpers shared by the fuzz targets in tests/fuzz (docs/SECURITY.md, "Fuzzing"): a check that aborts the run, and a
// per-process scratch directory. No LibTorch (tiny_model.h has the model the delta targets bind to).
//
// A fuzz target is a function LLVMFuzzerTestOneInput(data, size) that must return normally for every input: a
// parser's error status is the expected answer to bad bytes; a crash, a sanitizer report, a leak or a broken
// invariant (FUZZ_CHECK) is a bug. The same source builds as a libFuzzer binary (DS_BUILD_FUZZERS=ON, clang) and
// as a replay binary (replay_main.cc) that ctest runs over the checked-in corpus.
//
// Not thread-safe: a fuzz target runs one input at a time on one thread.
#ifndef DELTASERVE_TESTS_FUZZ_FUZZ_UTIL_H_
#define DELTASERVE_TESTS_FUZZ_FUZZ_UTIL_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"

// Aborts with a message when `cond` is false: a broken invariant is reported like a crash (libFuzzer keeps the
// input as crash-<sha1>).
#define FUZZ_CHECK(cond)                                                 \
  do {                                                                   \
    if (!(cond)) ::deltaserve::fuzz::CheckFailed(__FILE__, __LINE__, #cond); \
  } while (false)

namespace deltaserve {
namespace fuzz {

[[noreturn]] void CheckFailed(const char* file, int line, const char* condition);

// The fuzzer's input as bytes.
inline absl::string_view AsView(const uint8_t* data, size_t size) {
  return absl::string_view(reinterpret_cast<const char*>(data), size);
}

// A directory private to this process (created on first use under $TMPDIR or /tmp, removed at exit).
const std::string& ScratchDir();

// Writes `bytes` to `path` (truncating; no fsync: scratch files only). Aborts on an I/O error.
void WriteScratchFile(const std::string& path, absl::string_view bytes);

}  // namespace fuzz
}  // namespace deltaserve

#endif  // DELTASERVE_TESTS_FUZZ_FUZZ_UTIL_H_
