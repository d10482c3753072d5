#include "tests/fuzz/fuzz_util.h"

#include <stdlib.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"

namespace deltaserve {
namespace fuzz {
namespace {

void RemoveScratchDir() {
  std::error_code ignored;
  std::filesystem::remove_all(ScratchDir(), ignored);
}

}  // namespace

void CheckFailed(const char* file, int line, const char* condition) {
  std::fprintf(stderr, "%s:%d: FUZZ_CHECK failed: %s\n", file, line, condition);
  std::abort();
}

const std::string& ScratchDir() {
  static const std::string* dir = [] {
    const char* tmp = std::getenv("TMPDIR");
    std::string templ = absl::StrCat(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp", "/ds_fuzz.XXXXXX");
    if (::mkdtemp(templ.data()) == nullptr) {
      std::fprintf(stderr, "fuzz harness: mkdtemp %s: %s\n", templ.c_str(), std::strerror(errno));
      std::abort();
    }
    auto* path = new std::string(templ);
    std::atexit(RemoveScratchDir);
    return path;
  }();
  return *dir;
}

void WriteScratchFile(const std::string& path, absl::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) {
    std::fprintf(stderr, "fuzz harness: cannot write %s\n", path.c_str());
    std::abort();
  }
}

}  // namespace fuzz
}  // namespace deltaserve
