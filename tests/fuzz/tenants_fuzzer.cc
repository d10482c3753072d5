// Fuzz target: the tenants file (server/auth/tenants.h ParseTenantsFile) and the credentials every call carries
// (server/auth/authenticator.h Authenticate: the `authorization` metadata and certificate names).
//
// Input layout: byte 0 picks the mode, the rest is the text.
//   even  a tenants file. Invariants: errors are INVALID_ARGUMENT; a parsed file serializes to text that parses
//         back to the same serialization; every tenant has a quota.
//   odd   an `authorization` value (bit 1 set: also a certificate name, the part after the first 0x1f byte), checked
//         against a fixed tenants file with one live and one revoked token. Invariants: errors are
//         UNAUTHENTICATED; a success names tenant "acme" or "ops"; TokenId / HashToken never fail.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "server/auth/authenticator.h"
#include "server/auth/tenants.h"
#include "tests/fuzz/fuzz_util.h"

namespace deltaserve {
namespace {

// A well-formed token (its secret is public: this is a test file).
constexpr char kLiveToken[] = "dst_0123456789ab_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
constexpr char kRevokedToken[] = "dst_fedcba987654_BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB";

const auth::Authenticator& FixedAuthenticator() {
  static const auth::Authenticator* authenticator = [] {
    auth::TenantsFile file;
    auth::TenantRecord acme;
    acme.certificate_names = {"acme-prod"};
    acme.quota_overrides["max_concurrent_requests"] = 4;
    auth::TokenRecord live;
    live.id = "0123456789ab";
    live.sha256 = auth::HashToken(kLiveToken);
    live.created = absl::FromUnixSeconds(1700000000);
    acme.tokens.push_back(live);
    auth::TokenRecord revoked;
    revoked.id = "fedcba987654";
    revoked.sha256 = auth::HashToken(kRevokedToken);
    revoked.created = absl::FromUnixSeconds(1700000000);
    revoked.revoked = absl::FromUnixSeconds(1700001000);
    acme.tokens.push_back(revoked);
    file.tenants["acme"] = acme;
    auth::TenantRecord ops;
    ops.role = auth::Role::kAdmin;
    ops.certificate_names = {"ops"};
    file.tenants["ops"] = ops;
    const std::string path = fuzz::ScratchDir() + "/tenants.json";
    fuzz::WriteScratchFile(path, auth::SerializeTenantsFile(file));
    auth::Authenticator::Options options;
    options.tenants_file = path;
    options.reload_interval = absl::ZeroDuration();
    absl::StatusOr<std::unique_ptr<auth::Authenticator>> a = auth::Authenticator::Create(options);
    FUZZ_CHECK(a.ok());
    return a->release();  // kept for the life of the process
  }();
  return *authenticator;
}

void FuzzTenantsFile(absl::string_view text) {
  absl::StatusOr<auth::TenantsFile> file = auth::ParseTenantsFile(text);
  if (!file.ok()) {
    FUZZ_CHECK(file.status().code() == absl::StatusCode::kInvalidArgument);
    return;
  }
  for (const auto& [name, tenant] : file->tenants) file->QuotaOf(name);
  const std::string serialized = auth::SerializeTenantsFile(*file);
  absl::StatusOr<auth::TenantsFile> again = auth::ParseTenantsFile(serialized);
  FUZZ_CHECK(again.ok());
  FUZZ_CHECK(auth::SerializeTenantsFile(*again) == serialized);
}

void FuzzCredentials(bool with_certificate, absl::string_view text) {
  std::vector<std::string> certificates;
  absl::string_view header = text;
  if (with_certificate) {
    const size_t split = text.find('\x1f');
    if (split != absl::string_view::npos) {
      header = text.substr(0, split);
      certificates.emplace_back(text.substr(split + 1));
    }
  }
  auth::HashToken(header);
  std::optional<std::string> id = auth::TokenId(header);
  if (id.has_value()) FUZZ_CHECK(id->size() == 12);

  absl::StatusOr<auth::Caller> caller = FixedAuthenticator().Authenticate(header, certificates);
  if (!caller.ok()) {
    FUZZ_CHECK(caller.status().code() == absl::StatusCode::kUnauthenticated);
  } else {
    FUZZ_CHECK(caller->tenant == "acme" || caller->tenant == "ops");
    absl::StatusOr<std::string> acting = auth::ActingTenant(*caller, "other");
    FUZZ_CHECK(acting.ok() == caller->admin);
  }
  // Without the header: the certificate alone.
  absl::StatusOr<auth::Caller> by_certificate = FixedAuthenticator().Authenticate(std::nullopt, certificates);
  if (!by_certificate.ok()) FUZZ_CHECK(by_certificate.status().code() == absl::StatusCode::kUnauthenticated);
}

void FuzzOne(absl::string_view input) {
  uint8_t mode = 0;
  if (!input.empty()) {
    mode = static_cast<uint8_t>(input[0]);
    input.remove_prefix(1);
  }
  if ((mode & 1) == 0) {
    FuzzTenantsFile(input);
  } else {
    FuzzCredentials((mode & 2) != 0, input);
  }
}

}  // namespace
}  // namespace deltaserve

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  deltaserve::FixedAuthenticator();  // built before the first input: its allocations are not that input's leaks
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  deltaserve::FuzzOne(deltaserve::fuzz::AsView(data, size));
  return 0;
}
