// The tenants file (tenants.h): parsing with validation, canonical serialization, atomic writes, API tokens.
#include "server/auth/tenants.h"

#include <openssl/rand.h>
#include <sys/stat.h>

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "delta_store/store.h"
#include "nlohmann/json.hpp"
#include "server/common/file_util.h"
#include "server/common/sha256.h"

namespace deltaserve {
namespace auth {
namespace {

using Json = nlohmann::json;

constexpr int kFormat = 1;
constexpr size_t kIdHexDigits = 12;
constexpr size_t kSecretChars = 43;
constexpr char kTokenPrefix[] = "dst_";
// Quota numbers above this are surely typos (and would lose precision as doubles).
constexpr double kMaxQuotaValue = 9007199254740992.0;  // 2^53
// "2026-11-29T18:00:00Z", with a fraction only when the time has one.
constexpr char kTimeFormat[] = "%Y-%m-%d%ET%H:%M:%E*SZ";

// One quota field: its JSON name, and whether it takes whole numbers only.
struct QuotaField {
  const char* name;
  double TenantQuota::*real;    // set for the fractional fields
  int64_t TenantQuota::*whole;  // set for the whole-number fields
};
constexpr QuotaField kQuotaFields[] = {
    {"requests_per_second", &TenantQuota::requests_per_second, nullptr},
    {"burst", &TenantQuota::burst, nullptr},
    {"max_concurrent_requests", nullptr, &TenantQuota::max_concurrent_requests},
    {"store_bytes", nullptr, &TenantQuota::store_bytes},
    {"max_packs", nullptr, &TenantQuota::max_packs},
    {"max_running_jobs", nullptr, &TenantQuota::max_running_jobs},
    {"max_queued_jobs", nullptr, &TenantQuota::max_queued_jobs},
};

const QuotaField* FindQuotaField(absl::string_view name) {
  for (const QuotaField& field : kQuotaFields) {
    if (name == field.name) return &field;
  }
  return nullptr;
}

std::string QuotaFieldNames() {
  std::vector<std::string> names;
  for (const QuotaField& field : kQuotaFields) names.push_back(field.name);
  return absl::StrJoin(names, ", ");
}

void SetQuotaField(const QuotaField& field, double value, TenantQuota* quota) {
  if (field.real != nullptr) {
    quota->*field.real = value;
  } else {
    quota->*field.whole = static_cast<int64_t>(value);
  }
}

double GetQuotaField(const QuotaField& field, const TenantQuota& quota) {
  return field.real != nullptr ? quota.*field.real : static_cast<double>(quota.*field.whole);
}

absl::Status Bad(const std::string& path, absl::string_view problem) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": ", problem));
}

std::string TypeName(const Json& value) { return value.type_name(); }

bool IsLowerHex(absl::string_view text, size_t digits) {
  if (text.size() != digits) return false;
  for (char c : text) {
    if (!absl::ascii_isdigit(c) && !(c >= 'a' && c <= 'f')) return false;
  }
  return true;
}

bool IsBase64Url(absl::string_view text) {
  for (char c : text) {
    if (!absl::ascii_isalnum(c) && c != '-' && c != '_') return false;
  }
  return true;
}

std::string TimeText(absl::Time time) { return absl::FormatTime(kTimeFormat, time, absl::UTCTimeZone()); }

// Fails on any key of `object` not in `allowed`, so that a misspelt field never silently does nothing.
absl::Status CheckKeys(const std::string& path, const Json& object, std::initializer_list<const char*> allowed) {
  for (auto it = object.begin(); it != object.end(); ++it) {
    bool known = false;
    for (const char* name : allowed) known = known || it.key() == name;
    if (!known) {
      std::vector<std::string> names(allowed.begin(), allowed.end());
      return Bad(path.empty() ? it.key() : absl::StrCat(path, ".", it.key()),
                 absl::StrCat("unknown field (known here: ", absl::StrJoin(names, ", "), ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> GetString(const std::string& path, const Json& value) {
  if (!value.is_string()) return Bad(path, absl::StrCat("expected a string, not ", TypeName(value)));
  return value.get<std::string>();
}

absl::StatusOr<absl::Time> GetTime(const std::string& path, const Json& value) {
  auto text = GetString(path, value);
  if (!text.ok()) return text.status();
  absl::Time time;
  std::string error;
  if (!absl::ParseTime(absl::RFC3339_full, *text, &time, &error)) {
    return Bad(path, absl::StrCat("\"", absl::CHexEscape(*text), "\" is not an RFC 3339 time (",
                                  "write e.g. \"2026-11-29T18:00:00Z\"): ", error));
  }
  return time;
}

absl::StatusOr<double> GetQuotaValue(const std::string& path, const QuotaField& field, const Json& value) {
  if (!value.is_number()) return Bad(path, absl::StrCat("expected a number, not ", TypeName(value)));
  const double number = value.get<double>();
  if (!std::isfinite(number) || number < 0 || number > kMaxQuotaValue) {
    return Bad(path, absl::StrCat("expected a non-negative number (0 = unlimited), not ", value.dump()));
  }
  if (field.whole != nullptr && number != std::floor(number)) {
    return Bad(path, absl::StrCat("expected a whole number (0 = unlimited), not ", value.dump()));
  }
  return number;
}

absl::StatusOr<std::map<std::string, double>> ParseQuota(const std::string& path, const Json& value) {
  if (!value.is_object()) return Bad(path, absl::StrCat("expected an object, not ", TypeName(value)));
  std::map<std::string, double> out;
  for (auto it = value.begin(); it != value.end(); ++it) {
    const std::string field_path = absl::StrCat(path, ".", it.key());
    const QuotaField* field = FindQuotaField(it.key());
    if (field == nullptr) {
      return Bad(field_path, absl::StrCat("unknown quota field (known: ", QuotaFieldNames(), ")"));
    }
    auto number = GetQuotaValue(field_path, *field, it.value());
    if (!number.ok()) return number.status();
    out[it.key()] = *number;
  }
  return out;
}

absl::StatusOr<TokenRecord> ParseToken(const std::string& path, const Json& value) {
  if (!value.is_object()) return Bad(path, absl::StrCat("expected an object, not ", TypeName(value)));
  if (auto status = CheckKeys(path, value, {"id", "sha256", "created", "description", "revoked"}); !status.ok()) {
    return status;
  }
  TokenRecord token;
  for (const char* required : {"id", "sha256", "created"}) {
    if (!value.contains(required)) return Bad(absl::StrCat(path, ".", required), "missing");
  }
  auto id = GetString(path + ".id", value["id"]);
  if (!id.ok()) return id.status();
  if (!IsLowerHex(*id, kIdHexDigits)) return Bad(path + ".id", "expected 12 lowercase hex digits");
  token.id = *id;
  auto sha256 = GetString(path + ".sha256", value["sha256"]);
  if (!sha256.ok()) return sha256.status();
  if (!IsLowerHex(*sha256, 64)) return Bad(path + ".sha256", "expected 64 lowercase hex digits");
  token.sha256 = *sha256;
  auto created = GetTime(path + ".created", value["created"]);
  if (!created.ok()) return created.status();
  token.created = *created;
  if (value.contains("description")) {
    auto description = GetString(path + ".description", value["description"]);
    if (!description.ok()) return description.status();
    token.description = *description;
  }
  if (value.contains("revoked")) {
    auto revoked = GetTime(path + ".revoked", value["revoked"]);
    if (!revoked.ok()) return revoked.status();
    token.revoked = *revoked;
  }
  return token;
}

// Where each token id, token hash and certificate name was first seen, to reject the second.
struct Seen {
  std::map<std::string, std::string> token_ids;      // id -> path
  std::map<std::string, std::string> token_hashes;   // sha256 -> path
  std::map<std::string, std::string> cert_tenants;   // certificate name -> tenant
};

absl::StatusOr<TenantRecord> ParseTenant(const std::string& name, const Json& value, Seen* seen) {
  const std::string path = absl::StrCat("tenants.", name);
  if (!value.is_object()) return Bad(path, absl::StrCat("expected an object, not ", TypeName(value)));
  if (auto status = CheckKeys(path, value, {"role", "quota", "certificate_names", "tokens"}); !status.ok()) {
    return status;
  }
  TenantRecord tenant;
  if (value.contains("role")) {
    auto role = GetString(path + ".role", value["role"]);
    if (!role.ok()) return role.status();
    if (*role == "tenant") {
      tenant.role = Role::kTenant;
    } else if (*role == "admin") {
      tenant.role = Role::kAdmin;
    } else {
      return Bad(path + ".role", absl::StrCat("unknown role \"", absl::CHexEscape(*role),
                                              "\": write \"tenant\" or \"admin\""));
    }
  }
  if (value.contains("quota")) {
    auto quota = ParseQuota(path + ".quota", value["quota"]);
    if (!quota.ok()) return quota.status();
    tenant.quota_overrides = std::move(*quota);
  }
  if (value.contains("certificate_names")) {
    const Json& names = value["certificate_names"];
    const std::string names_path = path + ".certificate_names";
    if (!names.is_array()) return Bad(names_path, absl::StrCat("expected an array, not ", TypeName(names)));
    for (size_t i = 0; i < names.size(); ++i) {
      const std::string item_path = absl::StrCat(names_path, "[", i, "]");
      auto cert = GetString(item_path, names[i]);
      if (!cert.ok()) return cert.status();
      if (cert->empty()) return Bad(item_path, "empty certificate name");
      auto [it, inserted] = seen->cert_tenants.emplace(*cert, name);
      if (!inserted) {
        return Bad(item_path, it->second == name
                                  ? absl::StrCat("certificate name \"", *cert, "\" is listed twice")
                                  : absl::StrCat("certificate name \"", *cert, "\" is also claimed by tenant \"",
                                                 it->second, "\": a certificate authenticates one tenant"));
      }
      tenant.certificate_names.push_back(*cert);
    }
  }
  if (value.contains("tokens")) {
    const Json& tokens = value["tokens"];
    const std::string tokens_path = path + ".tokens";
    if (!tokens.is_array()) return Bad(tokens_path, absl::StrCat("expected an array, not ", TypeName(tokens)));
    for (size_t i = 0; i < tokens.size(); ++i) {
      const std::string item_path = absl::StrCat(tokens_path, "[", i, "]");
      auto token = ParseToken(item_path, tokens[i]);
      if (!token.ok()) return token.status();
      if (auto [it, inserted] = seen->token_ids.emplace(token->id, item_path); !inserted) {
        return Bad(item_path + ".id",
                   absl::StrCat("token id ", token->id, " is also used by ", it->second, ": ids must be unique"));
      }
      if (auto [it, inserted] = seen->token_hashes.emplace(token->sha256, item_path); !inserted) {
        return Bad(item_path + ".sha256",
                   absl::StrCat("the same token hash is also at ", it->second, ": each token must be listed once"));
      }
      tenant.tokens.push_back(std::move(*token));
    }
  }
  return tenant;
}

absl::StatusOr<TenantsFile> ParseDocument(const Json& root) {
  if (!root.is_object()) return Bad("(top level)", absl::StrCat("expected an object, not ", TypeName(root)));
  if (auto status = CheckKeys("", root, {"format", "default_quota", "tenants"}); !status.ok()) return status;
  if (!root.contains("format")) return Bad("format", "missing: a tenants file starts with \"format\": 1");
  const Json& format = root["format"];
  if (!format.is_number_integer() || format.get<int64_t>() != kFormat) {
    return Bad("format", absl::StrCat("unknown format ", format.dump(), ": this server reads format ", kFormat));
  }
  TenantsFile file;
  if (root.contains("default_quota")) {
    auto quota = ParseQuota("default_quota", root["default_quota"]);
    if (!quota.ok()) return quota.status();
    for (const auto& [name, value] : *quota) SetQuotaField(*FindQuotaField(name), value, &file.default_quota);
  }
  if (root.contains("tenants")) {
    const Json& tenants = root["tenants"];
    if (!tenants.is_object()) return Bad("tenants", absl::StrCat("expected an object, not ", TypeName(tenants)));
    Seen seen;
    for (auto it = tenants.begin(); it != tenants.end(); ++it) {
      if (!store::IsValidName(it.key())) {
        return Bad(absl::StrCat("tenants.", it.key()), store::CheckName("tenant name", it.key()).message());
      }
      auto tenant = ParseTenant(it.key(), it.value(), &seen);
      if (!tenant.ok()) return tenant.status();
      file.tenants.emplace(it.key(), std::move(*tenant));
    }
  }
  return file;
}

// A quota number as JSON: a whole number when it is one (50, not 50.0).
Json QuotaNumber(double value) {
  if (value == std::floor(value) && std::fabs(value) <= kMaxQuotaValue) return static_cast<int64_t>(value);
  return value;
}

}  // namespace

TenantQuota TenantsFile::QuotaOf(const std::string& tenant) const {
  TenantQuota quota = default_quota;
  auto it = tenants.find(tenant);
  if (it == tenants.end()) return quota;
  for (const auto& [name, value] : it->second.quota_overrides) {
    if (const QuotaField* field = FindQuotaField(name)) SetQuotaField(*field, value, &quota);
  }
  return quota;
}

absl::StatusOr<TenantsFile> ParseTenantsFile(absl::string_view json) {
  Json root;
  try {
    root = Json::parse(json.begin(), json.end());
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("not valid JSON: ", e.what()));
  }
  try {
    return ParseDocument(root);
  } catch (const Json::exception& e) {  // not expected: every access is type-checked first
    return absl::InvalidArgumentError(absl::StrCat("unreadable tenants file: ", e.what()));
  }
}

std::string SerializeTenantsFile(const TenantsFile& file) {
  Json root = Json::object();
  root["format"] = kFormat;
  Json default_quota = Json::object();
  for (const QuotaField& field : kQuotaFields) {
    default_quota[field.name] = QuotaNumber(GetQuotaField(field, file.default_quota));
  }
  root["default_quota"] = std::move(default_quota);
  Json tenants = Json::object();
  for (const auto& [name, tenant] : file.tenants) {
    Json t = Json::object();
    t["role"] = tenant.role == Role::kAdmin ? "admin" : "tenant";
    if (!tenant.quota_overrides.empty()) {
      Json quota = Json::object();
      for (const auto& [field, value] : tenant.quota_overrides) quota[field] = QuotaNumber(value);
      t["quota"] = std::move(quota);
    }
    if (!tenant.certificate_names.empty()) t["certificate_names"] = tenant.certificate_names;
    Json tokens = Json::array();
    for (const TokenRecord& token : tenant.tokens) {
      Json r = Json::object();
      r["id"] = token.id;
      r["sha256"] = token.sha256;
      r["created"] = TimeText(token.created);
      if (!token.description.empty()) r["description"] = token.description;
      if (token.revoked.has_value()) r["revoked"] = TimeText(*token.revoked);
      tokens.push_back(std::move(r));
    }
    t["tokens"] = std::move(tokens);
    tenants[name] = std::move(t);
  }
  root["tenants"] = std::move(tenants);
  // Replace, not throw, on invalid UTF-8 in a description.
  return root.dump(2, ' ', false, Json::error_handler_t::replace) + "\n";
}

absl::StatusOr<TenantsFile> ReadTenantsFile(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0 && errno == ENOENT) {
    return absl::NotFoundError(absl::StrCat("tenants file ", path, " does not exist: create it with `deltactl admin ",
                                            "--tenants_file=", path, " tenant add NAME`"));
  }
  auto text = ReadFileToString(path);
  if (!text.ok()) return text.status();
  auto file = ParseTenantsFile(*text);
  if (!file.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("tenants file ", path, ": ", file.status().message(),
                                                   " (fix the file, or edit it with `deltactl admin`)"));
  }
  return file;
}

absl::Status WriteTenantsFile(const std::string& path, const TenantsFile& file) {
  return WriteFileAtomically(path, SerializeTenantsFile(file), 0600);
}

absl::StatusOr<NewToken> GenerateToken(absl::string_view description, absl::Time now) {
  unsigned char id_bytes[kIdHexDigits / 2];
  unsigned char secret_bytes[32];
  if (RAND_bytes(id_bytes, sizeof(id_bytes)) != 1 || RAND_bytes(secret_bytes, sizeof(secret_bytes)) != 1) {
    return absl::InternalError("no randomness available (OpenSSL RAND_bytes failed): cannot make a token");
  }
  NewToken out;
  out.record.id = absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(id_bytes), sizeof(id_bytes)));
  std::string secret;
  absl::WebSafeBase64Escape(absl::string_view(reinterpret_cast<const char*>(secret_bytes), sizeof(secret_bytes)),
                            &secret);
  out.token = absl::StrCat(kTokenPrefix, out.record.id, "_", secret);
  out.record.sha256 = HashToken(out.token);
  out.record.created = now;
  out.record.description = std::string(description);
  return out;
}

std::string HashToken(absl::string_view token) {
  std::string digest = Sha256Digest(token);
  return digest.substr(digest.find(':') + 1);
}

std::optional<std::string> TokenId(absl::string_view token) {
  constexpr size_t kPrefix = sizeof(kTokenPrefix) - 1;
  if (token.size() != kPrefix + kIdHexDigits + 1 + kSecretChars) return std::nullopt;
  if (!absl::StartsWith(token, kTokenPrefix)) return std::nullopt;
  const absl::string_view id = token.substr(kPrefix, kIdHexDigits);
  if (!IsLowerHex(id, kIdHexDigits) || token[kPrefix + kIdHexDigits] != '_') return std::nullopt;
  if (!IsBase64Url(token.substr(kPrefix + kIdHexDigits + 1))) return std::nullopt;
  return std::string(id);
}

}  // namespace auth
}  // namespace deltaserve
