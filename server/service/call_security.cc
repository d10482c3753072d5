#include "server/service/call_security.h"

#include <utility>

#include "grpc/grpc_security_constants.h"
#include "grpcpp/security/auth_context.h"

namespace deltaserve {
namespace service {

CallSecurity::CallSecurity(const auth::Authenticator* authenticator, auth::RequestLimiter* limiter,
                           auth::AuditLog* audit)
    : authenticator_(authenticator), limiter_(limiter), audit_(audit) {}

std::optional<std::string> CallSecurity::AuthorizationHeader(const grpc::ServerContext& context) {
  const auto& metadata = context.client_metadata();
  auto it = metadata.find("authorization");
  if (it == metadata.end()) return std::nullopt;
  return std::string(it->second.data(), it->second.size());
}

std::vector<std::string> CallSecurity::CertificateNames(const grpc::ServerContext& context) {
  std::vector<std::string> names;
  std::shared_ptr<const grpc::AuthContext> auth = context.auth_context();
  // Peer identity properties exist only when the TLS handshake verified a client certificate.
  if (auth == nullptr || !auth->IsPeerAuthenticated()) return names;
  for (const grpc::string_ref& name : auth->FindPropertyValues(GRPC_X509_CN_PROPERTY_NAME)) {
    names.emplace_back(name.data(), name.size());
  }
  return names;
}

absl::StatusOr<CallSecurity::Call> CallSecurity::Begin(grpc::ServerContext* context,
                                                       absl::string_view requested_tenant) const {
  const std::optional<std::string> authorization = AuthorizationHeader(*context);
  const std::vector<std::string> names = CertificateNames(*context);
  Call call;
  absl::StatusOr<auth::Caller> caller =
      authenticator_->Authenticate(authorization ? std::optional<absl::string_view>(*authorization) : std::nullopt,
                                   names);
  if (!caller.ok()) return caller.status();
  call.caller = *std::move(caller);
  absl::StatusOr<std::string> tenant = auth::ActingTenant(call.caller, requested_tenant);
  if (!tenant.ok()) return tenant.status();
  call.tenant = *std::move(tenant);
  if (limiter_ != nullptr && !call.caller.tenant.empty()) {
    // The caller's quota, counted against the caller's tenant (an admin acting for another tenant spends its own).
    absl::StatusOr<auth::RequestLimiter::Admission> admission = limiter_->Admit(call.caller.tenant, call.caller.quota);
    if (!admission.ok()) return admission.status();
    call.admission = *std::move(admission);
  }
  return call;
}

absl::Status CallSecurity::ActFor(Call* call, absl::string_view requested_tenant) {
  absl::StatusOr<std::string> tenant = auth::ActingTenant(call->caller, requested_tenant);
  if (!tenant.ok()) return tenant.status();
  call->tenant = *std::move(tenant);
  return absl::OkStatus();
}

void CallSecurity::Audit(grpc::ServerContext* context, const absl::StatusOr<Call>& call,
                         absl::string_view requested_tenant, absl::string_view action, absl::string_view target,
                         absl::string_view detail, const absl::Status& outcome) const {
  if (audit_ == nullptr) return;
  auth::AuditEvent event;
  if (call.ok()) {
    event.principal = call->caller.principal;
    event.caller_tenant = call->caller.tenant;
    event.tenant = call->tenant;
  } else {
    // Refused before the caller was known for sure: record what was presented, never the secret.
    const std::optional<std::string> authorization = AuthorizationHeader(*context);
    event.principal = authorization ? "unauthenticated" : "anonymous";
    event.tenant = std::string(requested_tenant);
  }
  event.action = std::string(action);
  event.target = std::string(target);
  event.detail = std::string(detail);
  event.peer = context->peer();
  event.code = outcome.code();
  event.message = std::string(outcome.message());
  audit_->Record(event);
}

}  // namespace service
}  // namespace deltaserve
