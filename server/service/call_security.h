// CallSecurity: the checks every deltaserve RPC handler starts with, and the audit record of mutations.
//
// Begin() authenticates the call (auth::Authenticator: bearer token or TLS client certificate), resolves the
// tenant it acts for (auth::ActingTenant: a non-admin may act only for its own tenant) and admits it under the
// tenant's quota (auth::RequestLimiter: request rate and calls in flight). The returned Call holds the
// admission until it is destroyed, so a handler keeps its slot for exactly as long as it runs. Audit() records a
// mutation (or a refused attempt at one) in the audit log.
//
// Does not own the authenticator, limiter or audit log (all optional but the authenticator); they must outlive
// it. Thread-safe.
#ifndef DELTASERVE_SERVER_SERVICE_CALL_SECURITY_H_
#define DELTASERVE_SERVER_SERVICE_CALL_SECURITY_H_

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "grpcpp/server_context.h"
#include "server/auth/audit_log.h"
#include "server/auth/authenticator.h"
#include "server/auth/request_limiter.h"

namespace deltaserve {
namespace service {

class CallSecurity {
 public:
  // One admitted call.
  struct Call {
    auth::Caller caller;
    // The tenant the call acts for: the request's tenant field when set, else the caller's own; "" only in the
    // auth-free mode (= the server's default tenant).
    std::string tenant;
    auth::RequestLimiter::Admission admission;
  };

  // REQUIRES: authenticator is not null; all three outlive this object. limiter and audit may be null (no
  // per-tenant admission; no audit log).
  CallSecurity(const auth::Authenticator* authenticator, auth::RequestLimiter* limiter, auth::AuditLog* audit);

  // Authenticates the call of `context`, resolves the tenant it acts for from `requested_tenant` (a request's
  // tenant field), and admits it. Errors: UNAUTHENTICATED, PERMISSION_DENIED (another tenant), RESOURCE_EXHAUSTED
  // (the tenant's rate or concurrency; with a retry hint).
  absl::StatusOr<Call> Begin(grpc::ServerContext* context, absl::string_view requested_tenant) const;

  // Re-resolves the tenant an admitted call acts for, from a tenant named later in the call (an upload's header).
  // PERMISSION_DENIED as in Begin().
  static absl::Status ActFor(Call* call, absl::string_view requested_tenant);

  // Records a mutation in the audit log (nothing without one): `call` as Begin() returned it (an error = a refused
  // attempt, recorded with the requested tenant), the action (auth/audit_log.h), the target and detail, and the
  // outcome.
  void Audit(grpc::ServerContext* context, const absl::StatusOr<Call>& call, absl::string_view requested_tenant,
             absl::string_view action, absl::string_view target, absl::string_view detail,
             const absl::Status& outcome) const;

  // The credentials of a call: the `authorization` metadata value, and the verified client certificate's common
  // names (mutual TLS only).
  static std::optional<std::string> AuthorizationHeader(const grpc::ServerContext& context);
  static std::vector<std::string> CertificateNames(const grpc::ServerContext& context);

  bool auth_enabled() const { return authenticator_->enabled(); }

 private:
  const auth::Authenticator* const authenticator_;
  auth::RequestLimiter* const limiter_;
  auth::AuditLog* const audit_;
};

}  // namespace service
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_SERVICE_CALL_SECURITY_H_
