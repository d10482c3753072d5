// A small stderr logger (Abseil 20220623 in Debian 12 has no absl::log).
//
//   DS_LOG(INFO) << "listening on " << addr;
//
// Each statement writes one line, "I1129 10:15:02.123456 12345 file.cc:42] message", under a global mutex so
// that lines from different threads never interleave. Thread-safe. DS_LOG(FATAL) aborts after writing.
#ifndef DELTASERVE_SERVER_COMMON_LOGGING_H_
#define DELTASERVE_SERVER_COMMON_LOGGING_H_

#include <sstream>

namespace deltaserve {

enum class LogSeverity { kInfo = 0, kWarning = 1, kError = 2, kFatal = 3 };

// Lines below this severity are dropped. Default: kInfo. Set once from main.
void SetMinLogSeverity(LogSeverity severity);

class LogMessage {
 public:
  LogMessage(const char* file, int line, LogSeverity severity);
  ~LogMessage();
  LogMessage(const LogMessage&) = delete;
  LogMessage& operator=(const LogMessage&) = delete;
  std::ostream& stream() { return stream_; }

 private:
  const char* file_;
  int line_;
  LogSeverity severity_;
  std::ostringstream stream_;
};

}  // namespace deltaserve

#define DS_LOG_SEVERITY_INFO ::deltaserve::LogSeverity::kInfo
#define DS_LOG_SEVERITY_WARNING ::deltaserve::LogSeverity::kWarning
#define DS_LOG_SEVERITY_ERROR ::deltaserve::LogSeverity::kError
#define DS_LOG_SEVERITY_FATAL ::deltaserve::LogSeverity::kFatal
#define DS_LOG(severity) ::deltaserve::LogMessage(__FILE__, __LINE__, DS_LOG_SEVERITY_##severity).stream()

#endif  // DELTASERVE_SERVER_COMMON_LOGGING_H_
