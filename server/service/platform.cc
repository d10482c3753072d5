#include "server/service/platform.h"

#include <ATen/Parallel.h>
#include <malloc.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <string>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "server/common/logging.h"

#ifndef DS_LIBRARY_ARCH_DIR
#define DS_LIBRARY_ARCH_DIR "/usr/lib/x86_64-linux-gnu"
#endif

namespace deltaserve {
namespace {
constexpr char kReexecMarker[] = "DELTASERVE_BLAS_SELECTED";
}  // namespace

absl::Status SelectBlas(const std::string& blas, char** argv) {
  std::string subdir;
  if (blas == "system") return absl::OkStatus();
  if (blas == "openblas") {
    subdir = "openblas-openmp";
  } else if (blas == "blis") {
    subdir = "blis-openmp";
  } else if (blas == "reference") {
    subdir = "blas";
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--blas=", blas, " is not one of openblas, blis, reference, system"));
  }
  const char* marker = std::getenv(kReexecMarker);
  if (marker != nullptr && blas == marker) return absl::OkStatus();  // already re-executed for this choice
  const std::string dir = absl::StrCat(DS_LIBRARY_ARCH_DIR, "/", subdir);
  if (::access((dir + "/libblas.so.3").c_str(), R_OK) != 0) {
    DS_LOG(WARNING) << "--blas=" << blas << ": " << dir << "/libblas.so.3 is not installed; keeping the system BLAS ("
                    << "install it with scripts/setup.sh)";
    return absl::OkStatus();
  }
  const char* old_path = std::getenv("LD_LIBRARY_PATH");
  const std::string path = old_path && *old_path ? absl::StrCat(dir, ":", old_path) : dir;
  ::setenv("LD_LIBRARY_PATH", path.c_str(), 1);
  ::setenv(kReexecMarker, blas.c_str(), 1);
  ::execv("/proc/self/exe", argv);
  DS_LOG(WARNING) << "--blas=" << blas << ": re-exec failed; keeping the system BLAS";
  return absl::OkStatus();
}

std::string LoadedBlas() {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    const size_t pos = line.find('/');
    if (pos == std::string::npos) continue;
    const std::string path = line.substr(pos);
    const std::string base = path.substr(path.rfind('/') + 1);
    if (!absl::StartsWith(base, "libblas.so")) continue;
    std::string real = path;
    if (char* resolved = ::realpath(path.c_str(), nullptr)) {
      real = resolved;
      std::free(resolved);
    }
    const std::string dir = real.substr(0, real.rfind('/'));
    const std::string name = dir.substr(dir.rfind('/') + 1);
    if (name == "blas") return "reference";
    return name;
  }
  return "none";
}

void ConfigureAllocator() {
  ::mallopt(M_MMAP_THRESHOLD, 1 << 30);
  ::mallopt(M_TRIM_THRESHOLD, 1 << 30);
}

int SetIntraOpThreads(int threads) {
  // 0: OMP_NUM_THREADS when it is set (the OpenMP convention; scripts/sanitize.sh tsan sets 1 because TSan cannot
  // see into Debian's libgomp), else every core.
  int from_env = 0;
  const char* omp = std::getenv("OMP_NUM_THREADS");
  if (threads <= 0 && omp != nullptr && absl::SimpleAtoi(omp, &from_env) && from_env > 0) threads = from_env;
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  at::set_num_threads(threads);
  return at::get_num_threads();
}

}  // namespace deltaserve
