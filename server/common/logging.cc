#include "server/common/logging.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace deltaserve {
namespace {
std::atomic<int> g_min_severity{0};
absl::Mutex g_log_mu;
}  // namespace

void SetMinLogSeverity(LogSeverity severity) { g_min_severity.store(static_cast<int>(severity)); }

LogMessage::LogMessage(const char* file, int line, LogSeverity severity)
    : file_(file), line_(line), severity_(severity) {}

LogMessage::~LogMessage() {
  if (static_cast<int>(severity_) >= g_min_severity.load() || severity_ == LogSeverity::kFatal) {
    static const char kLetters[] = "IWEF";
    const char* base = std::strrchr(file_, '/');
    base = base ? base + 1 : file_;
    std::string when = absl::FormatTime("%m%d %H:%M:%E6S", absl::Now(), absl::UTCTimeZone());
    std::string text = stream_.str();
    absl::MutexLock lock(&g_log_mu);
    std::fprintf(stderr, "%c%s %ld %s:%d] %s\n", kLetters[static_cast<int>(severity_)], when.c_str(),
                 static_cast<long>(::syscall(SYS_gettid)), base, line_, text.c_str());
    std::fflush(stderr);
  }
  if (severity_ == LogSeverity::kFatal) std::abort();
}

}  // namespace deltaserve
