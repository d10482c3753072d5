// AuditLog: an append-only record of every mutation and every refused attempt at one — who, what, when, outcome.
//
// One JSON object per line (docs/SECURITY.md):
//   {"time":"2026-11-29T18:20:01.123456Z","principal":"token:3f9a1c2b7d0e","caller_tenant":"acme",
//    "action":"label.set","tenant":"acme","target":"sentiment:prod","detail":"version 3","peer":"ipv4:10.0.0.7:51234",
//    "code":"OK","message":""}
// Actions: delta.push, label.set, label.delete, version.delete, dataset.upload, job.submit, job.cancel (from the
// RPCs) and token.create, token.revoke, token.delete, tenant.add, tenant.update (role, quota or certificate names),
// tenant.remove, tenants.reload_failed (from the tenants file's reloads; principal "tenants-file").
//
// Owns the open file. Thread-safe: Record() may be called from any thread; lines never interleave. Each line is
// written with one write(2) and flushed; with `sync` it is also fsync'ed.
#ifndef DELTASERVE_SERVER_AUTH_AUDIT_LOG_H_
#define DELTASERVE_SERVER_AUTH_AUDIT_LOG_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace deltaserve {
namespace auth {

struct AuditEvent {
  absl::Time time = absl::Now();
  std::string principal;      // Caller::principal, or "tenants-file"
  std::string caller_tenant;  // the caller's own tenant ("" when anonymous)
  std::string action;         // see the file comment
  std::string tenant;         // the tenant acted on
  std::string target;         // task, "task@3", "task:prod", a job id, a digest, a token id, ...
  std::string detail;         // free text: the version pushed, the label's new version, ...
  std::string peer;           // grpc peer string ("" when not from a call)
  absl::StatusCode code = absl::StatusCode::kOk;
  std::string message;        // the error message when code != OK
};

class AuditLog {
 public:
  struct Options {
    // The file appended to (created with mode 0600 when missing); "" = a log that keeps events in memory only
    // (for tests; see events()).
    std::string path;
    // fsync after every line (slower; survives a power cut).
    bool sync = false;
    // Events kept in memory for events() (the most recent; 0 = none).
    int64_t keep_in_memory = 0;
  };

  // Opens (creates) the file. Errors: the file system's (PERMISSION_DENIED, NOT_FOUND for a missing directory).
  static absl::StatusOr<std::unique_ptr<AuditLog>> Open(const Options& options);
  ~AuditLog();

  // Appends `event`. A write error is logged and counted (write_errors()), never returned: a full disk must not
  // fail the call being audited after it happened.
  void Record(const AuditEvent& event);

  // The most recent events (up to keep_in_memory), oldest first.
  std::vector<AuditEvent> events() const;
  int64_t write_errors() const;

  // The JSON line for `event` (without the newline).
  static std::string ToJsonLine(const AuditEvent& event);

 private:
  explicit AuditLog(const Options& options) : options_(options) {}

  const Options options_;
  mutable absl::Mutex mu_;
  int fd_ ABSL_GUARDED_BY(mu_) = -1;
  std::vector<AuditEvent> recent_ ABSL_GUARDED_BY(mu_);
  int64_t write_errors_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Time last_error_logged_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();  // write errors log once a minute
};

}  // namespace auth
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_AUTH_AUDIT_LOG_H_
