// Authenticator: who is calling. Turns a call's credentials (an `authorization: Bearer <token>` header, or the
// verified common name of a TLS client certificate) into a Caller (tenant, role, quota), using the tenants file
// (tenants.h), which it re-reads when the file changes — tokens are created and revoked without a restart.
//
// Without a tenants file it runs in the auth-free mode (for local use): every call is the anonymous admin, and
// requests may name any tenant (an empty tenant = the default one). The server logs that loudly at start.
//
// Owns the parsed tenants file (an immutable snapshot swapped on reload) and, when reload_interval > 0, a thread
// that polls the file. Thread-safe.
#ifndef DELTASERVE_SERVER_AUTH_AUTHENTICATOR_H_
#define DELTASERVE_SERVER_AUTH_AUTHENTICATOR_H_

#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "server/auth/audit_log.h"
#include "server/auth/tenants.h"

namespace deltaserve {
namespace auth {

struct Caller {
  // The caller's own tenant; "" for the anonymous caller of the auth-free mode.
  std::string tenant;
  // May act for any tenant (role "admin", and the anonymous caller of the auth-free mode).
  bool admin = false;
  // Who, for logs and the audit log: "token:<id>", "cert:<common name>" or "anonymous".
  std::string principal;
  // The tenant's quota (unlimited for the anonymous caller).
  TenantQuota quota;
};

class Authenticator {
 public:
  struct Options {
    // The tenants file; "" = the auth-free mode.
    std::string tenants_file;
    // How often the file is checked for changes (size, mtime and content); 0 = only by Reload().
    absl::Duration reload_interval = absl::Seconds(2);
    // Token and tenant changes found on reload are recorded here (token.create, token.revoke, token.delete,
    // tenant.add, tenant.remove, tenants.reload_failed); nullptr = nowhere. Must outlive the authenticator.
    AuditLog* audit = nullptr;
  };

  // Reads the tenants file (when given). Errors: NOT_FOUND (missing file), INVALID_ARGUMENT (ParseTenantsFile's).
  static absl::StatusOr<std::unique_ptr<Authenticator>> Create(const Options& options);
  ~Authenticator();

  // Whether calls must authenticate (a tenants file is in use).
  bool enabled() const { return !options_.tenants_file.empty(); }

  // The caller of a call with `authorization` (the metadata value, when present) and the verified TLS client
  // certificate's common names (empty without mutual TLS). A bearer token wins over a certificate. Errors
  // (UNAUTHENTICATED, with what to do): no credentials, a malformed header or token, an unknown token, a revoked
  // token ("token 3f9a1c2b7d0e was revoked at ..."), a certificate name no tenant claims. In the auth-free mode:
  // the anonymous admin, whatever the credentials.
  absl::StatusOr<Caller> Authenticate(std::optional<absl::string_view> authorization,
                                      absl::Span<const std::string> certificate_names) const;

  // Re-reads the tenants file now. On an error the previous contents stay in force (and the error is returned,
  // logged and audited). OK without a file.
  absl::Status Reload();

  // The tenant's quota in the tenants file as it is now (default_quota with the tenant's overrides): a reload
  // changes the answer. nullopt in the auth-free mode and for a tenant the file does not list. Quick (a map
  // lookup on the current snapshot); the delta store asks it on every push.
  std::optional<TenantQuota> QuotaOf(const std::string& tenant) const;

  // Successful reloads so far (the first read counts).
  int64_t generation() const;

 private:
  explicit Authenticator(const Options& options);
  void PollLoop();

  const Options options_;
  mutable absl::Mutex mu_;
  std::shared_ptr<const TenantsFile> file_ ABSL_GUARDED_BY(mu_);
  // Derived lookups, rebuilt aside on every reload and swapped with file_.
  struct Index;
  std::shared_ptr<const Index> index_ ABSL_GUARDED_BY(mu_);
  std::string file_signature_ ABSL_GUARDED_BY(mu_);  // size + mtime + sha256 of the last content read
  int64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Notification stop_;
  std::thread poller_;
};

// The tenant a call acts for: `requested` when non-empty, else the caller's own tenant ("" for the anonymous
// caller: the default tenant). PERMISSION_DENIED when a non-admin caller names another tenant ("the token of
// tenant \"a\" may not act for tenant \"b\""). Naming a tenant never reveals whether it exists: the check is on
// the name alone. (Objects of another tenant named by id — a job id, a digest — are NOT_FOUND, like ids that do
// not exist; docs/SECURITY.md.)
absl::StatusOr<std::string> ActingTenant(const Caller& caller, absl::string_view requested);

}  // namespace auth
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_AUTH_AUTHENTICATOR_H_
