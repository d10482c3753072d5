// The tenants file: who may call the server, with which role, and each tenant's quotas (docs/SECURITY.md).
//
// A JSON document (format 1) that the server reads at start and re-reads when it changes (Authenticator), and
// that `deltactl admin` edits. It holds no secret: only the sha256 of each API token.
//
//   {
//     "format": 1,
//     "default_quota": { "requests_per_second": 50, "burst": 100, ... },   // every tenant's, unless overridden
//     "tenants": {
//       "acme": {
//         "role": "tenant",                       // or "admin": may act for any tenant
//         "quota": { "max_concurrent_requests": 8 },   // fields given here override default_quota's
//         "certificate_names": ["acme-prod"],     // client-certificate common names that authenticate as acme
//         "tokens": [ { "id": "3f9a1c2b7d0e", "sha256": "<64 hex>", "created": "2026-11-29T18:00:00Z",
//                       "description": "ci", "revoked": "2026-12-01T09:00:00Z" } ]   // "revoked" only once revoked
//       }
//     }
//   }
//
// An API token is "dst_<id>_<secret>": <id> 12 lowercase hex digits (public: it names the token in logs, the audit
// log and `deltactl admin token revoke`), <secret> 43 characters of base64url (32 random bytes). The file keeps
// sha256(token) in hex.
//
// Plain values and free functions: thread-compatible.
#ifndef DELTASERVE_SERVER_AUTH_TENANTS_H_
#define DELTASERVE_SERVER_AUTH_TENANTS_H_

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace deltaserve {
namespace auth {

// A tenant's limits. 0 everywhere = unlimited. Enforced by RequestLimiter (rate, concurrency), the delta store
// (bytes, packs) and the job manager (jobs).
struct TenantQuota {
  // Sustained requests per second (token bucket refill rate); 0 = unlimited.
  double requests_per_second = 0;
  // Bucket size: requests allowed in a burst; 0 = max(1, requests_per_second).
  double burst = 0;
  // Requests of the tenant in flight at once; 0 = unlimited.
  int64_t max_concurrent_requests = 0;
  // Bytes of the tenant's stored packs (serialized); 0 = unlimited.
  int64_t store_bytes = 0;
  // Versions the tenant may store; 0 = unlimited.
  int64_t max_packs = 0;
  // Fine-tuning jobs of the tenant running at once, and queued or running; 0 = the server's defaults.
  int64_t max_running_jobs = 0;
  int64_t max_queued_jobs = 0;
};

enum class Role { kTenant, kAdmin };

struct TokenRecord {
  std::string id;      // 12 lowercase hex digits
  std::string sha256;  // of the whole token text, 64 lowercase hex digits
  absl::Time created = absl::UnixEpoch();
  std::string description;
  std::optional<absl::Time> revoked;  // set once revoked; the token no longer authenticates
};

struct TenantRecord {
  Role role = Role::kTenant;
  // Overrides of default_quota's fields (a field absent here takes default_quota's value).
  std::map<std::string, double> quota_overrides;
  std::vector<std::string> certificate_names;
  std::vector<TokenRecord> tokens;
};

struct TenantsFile {
  TenantQuota default_quota;
  std::map<std::string, TenantRecord> tenants;  // by tenant name (store::IsValidName)

  // default_quota with the tenant's overrides applied. REQUIRES: tenants contains `tenant`.
  TenantQuota QuotaOf(const std::string& tenant) const;
};

// Parses and validates a tenants file. INVALID_ARGUMENT naming the path to the bad field
// ("tenants.acme.tokens[1].sha256: ...") for: malformed JSON, an unknown format or field, a bad tenant name, an
// unknown role, a negative or non-numeric quota, a token id or hash of the wrong form, the same token id or hash
// twice, a certificate name claimed by two tenants.
absl::StatusOr<TenantsFile> ParseTenantsFile(absl::string_view json);
// The canonical JSON text of `file` (2-space indented, keys sorted, a trailing newline); parses back to `file`.
std::string SerializeTenantsFile(const TenantsFile& file);

// Reads and parses `path` (NOT_FOUND when missing; ParseTenantsFile's errors prefixed with the path).
absl::StatusOr<TenantsFile> ReadTenantsFile(const std::string& path);
// Writes `file` to `path` atomically (temp file + rename) with mode 0600.
absl::Status WriteTenantsFile(const std::string& path, const TenantsFile& file);

struct NewToken {
  std::string token;   // the secret text, "dst_<id>_<secret>": shown once, never stored
  TokenRecord record;  // what the tenants file keeps
};
// A fresh token from the system's random source (OpenSSL RAND_bytes). INTERNAL when no randomness is available.
absl::StatusOr<NewToken> GenerateToken(absl::string_view description, absl::Time now);
// sha256(token) in lowercase hex.
std::string HashToken(absl::string_view token);
// The id part of a well-formed token text, or nullopt.
std::optional<std::string> TokenId(absl::string_view token);

}  // namespace auth
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_AUTH_TENANTS_H_
