#include "server/auth/audit_log.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <exception>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "nlohmann/json.hpp"
#include "server/common/logging.h"

namespace deltaserve {
namespace auth {
namespace {

// Write errors are logged at most this often (each one is counted).
constexpr absl::Duration kErrorLogInterval = absl::Minutes(1);

// Writes all of `data` to `fd` (one write(2) unless the kernel takes less). Returns 0 or an errno value.
int WriteAll(int fd, const std::string& data) {
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (n == 0) return EIO;
    done += static_cast<size_t>(n);
  }
  return 0;
}

}  // namespace

absl::StatusOr<std::unique_ptr<AuditLog>> AuditLog::Open(const Options& options) {
  std::unique_ptr<AuditLog> log(new AuditLog(options));
  if (options.path.empty()) return log;
  const int fd = ::open(options.path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) {
    const int error = errno;
    return absl::Status(absl::ErrnoToStatusCode(error),
                        absl::StrCat("cannot open the audit log ", options.path, ": ", std::strerror(error),
                                     "; check that its directory exists and is writable by the server, or set "
                                     "another audit log path"));
  }
  absl::MutexLock lock(&log->mu_);
  log->fd_ = fd;
  return log;
}

AuditLog::~AuditLog() {
  absl::MutexLock lock(&mu_);
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

void AuditLog::Record(const AuditEvent& event) {
  const std::string line = ToJsonLine(event) + "\n";
  absl::MutexLock lock(&mu_);
  if (options_.keep_in_memory > 0) {
    // Trimmed in batches: the vector holds between keep and 2*keep events, so each Record costs O(1) amortized.
    recent_.push_back(event);
    if (static_cast<int64_t>(recent_.size()) >= 2 * options_.keep_in_memory) {
      recent_.erase(recent_.begin(), recent_.end() - options_.keep_in_memory);
    }
  }
  if (fd_ < 0) return;
  int error = WriteAll(fd_, line);
  const char* what = "write";
  if (error == 0 && options_.sync && ::fsync(fd_) != 0) {
    error = errno;
    what = "fsync";
  }
  if (error == 0) return;
  ++write_errors_;
  const absl::Time now = absl::Now();
  if (now - last_error_logged_ >= kErrorLogInterval) {
    last_error_logged_ = now;
    DS_LOG(ERROR) << "audit log " << options_.path << ": " << what << " failed: " << std::strerror(error) << " ("
                  << write_errors_ << " audit write errors so far; events are being lost: check the disk's free "
                  << "space and the file's permissions)";
  }
}

std::vector<AuditEvent> AuditLog::events() const {
  absl::MutexLock lock(&mu_);
  const size_t keep = static_cast<size_t>(std::max<int64_t>(0, options_.keep_in_memory));
  const size_t first = recent_.size() > keep ? recent_.size() - keep : 0;
  return std::vector<AuditEvent>(recent_.begin() + static_cast<std::ptrdiff_t>(first), recent_.end());
}

int64_t AuditLog::write_errors() const {
  absl::MutexLock lock(&mu_);
  return write_errors_;
}

std::string AuditLog::ToJsonLine(const AuditEvent& event) {
  nlohmann::ordered_json json;
  json["time"] = absl::FormatTime("%Y-%m-%d%ET%H:%M:%E6SZ", event.time, absl::UTCTimeZone());
  json["principal"] = event.principal;
  json["caller_tenant"] = event.caller_tenant;
  json["action"] = event.action;
  json["tenant"] = event.tenant;
  json["target"] = event.target;
  json["detail"] = event.detail;
  json["peer"] = event.peer;
  json["code"] = absl::StatusCodeToString(event.code);
  json["message"] = event.message;
  try {
    // Invalid UTF-8 (a client-supplied name or message) becomes U+FFFD instead of throwing.
    return json.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
  } catch (const std::exception& e) {
    // Not expected with the replace handler; keep the line valid JSON anyway.
    return nlohmann::ordered_json{{"time", json["time"]}, {"action", "audit.format_failed"}, {"message", e.what()}}
        .dump(-1, ' ', true, nlohmann::ordered_json::error_handler_t::replace);
  }
}

}  // namespace auth
}  // namespace deltaserve
