// `deltactl admin`: edits a tenants file (deltactl_admin.h).
#include "client/deltactl_admin.h"

#include <cmath>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "delta_store/store.h"
#include "server/auth/tenants.h"

ABSL_FLAG(std::string, tenants_file, "",
          "admin: the tenants file to edit (the server's --tenants_file; created by `admin tenant add`).");
ABSL_FLAG(std::string, role, "tenant", "admin tenant add: 'tenant' (acts for itself) or 'admin' (for any tenant).");
ABSL_DECLARE_FLAG(std::string, description);  // deltactl_tune.cc; here: admin token create's note

namespace deltaserve {
namespace client {
namespace {

using auth::Role;
using auth::TenantRecord;
using auth::TenantsFile;
using auth::TokenRecord;

constexpr char kAdminUsage[] =
    "usage (edits the tenants file; a running server re-reads it within seconds):\n"
    "  deltactl admin --tenants_file=F tenant add NAME [--role=admin]\n"
    "  deltactl admin --tenants_file=F tenant rm NAME\n"
    "  deltactl admin --tenants_file=F tenant ls\n"
    "  deltactl admin --tenants_file=F tenant quota NAME KEY=VALUE...   (KEY= removes an override; keys:\n"
    "      requests_per_second, burst, max_concurrent_requests, store_bytes, max_packs, max_running_jobs,\n"
    "      max_queued_jobs)\n"
    "  deltactl admin --tenants_file=F token create TENANT [--description=D]\n"
    "  deltactl admin --tenants_file=F token revoke ID\n"
    "  deltactl admin --tenants_file=F token ls [TENANT]\n";

int Usage(absl::string_view problem) {
  std::cerr << "deltactl admin: " << problem << "\n" << kAdminUsage;
  return 2;
}

int Fail(const absl::Status& status) {
  std::cerr << "deltactl: " << absl::StatusCodeToString(status.code()) << ": " << status.message() << "\n";
  return 1;
}

std::string TimeText(absl::Time time) { return absl::FormatTime("%Y-%m-%d %H:%M:%S", time, absl::UTCTimeZone()); }

const char* RoleName(Role role) { return role == Role::kAdmin ? "admin" : "tenant"; }

int ActiveTokens(const TenantRecord& tenant) {
  int n = 0;
  for (const TokenRecord& token : tenant.tokens) n += !token.revoked.has_value();
  return n;
}

absl::Status NoTenant(const std::string& name) {
  return absl::NotFoundError(
      absl::StrCat("no tenant ", name, ": deltactl admin --tenants_file=", absl::GetFlag(FLAGS_tenants_file),
                   " tenant add ", name));
}

// Validates `file` as the server will (by a serialize / parse round trip) and writes it.
absl::Status Save(const std::string& path, const TenantsFile& file) {
  auto check = auth::ParseTenantsFile(auth::SerializeTenantsFile(file));
  if (!check.ok()) return check.status();
  return auth::WriteTenantsFile(path, file);
}

int TenantAdd(const std::string& path, const std::vector<std::string>& args) {
  if (args.size() != 1) return Usage("tenant add NAME [--role=admin]");
  const std::string& name = args[0];
  if (absl::Status status = store::CheckName("tenant name", name); !status.ok()) return Fail(status);
  const std::string role = absl::GetFlag(FLAGS_role);
  if (role != "tenant" && role != "admin") {
    return Usage(absl::StrCat("--role must be 'tenant' or 'admin', not '", role, "'"));
  }
  TenantsFile file;
  auto read = auth::ReadTenantsFile(path);
  const bool created = !read.ok() && read.status().code() == absl::StatusCode::kNotFound;
  if (read.ok()) {
    file = std::move(*read);
  } else if (!created) {
    return Fail(read.status());
  }
  if (file.tenants.count(name) > 0) {
    return Fail(absl::AlreadyExistsError(absl::StrCat("tenant ", name, " already exists in ", path,
                                                      " (deltactl admin tenant ls)")));
  }
  file.tenants[name].role = role == "admin" ? Role::kAdmin : Role::kTenant;
  if (absl::Status status = Save(path, file); !status.ok()) return Fail(status);
  std::cout << "added tenant " << name << " (role " << role << ")" << (created ? " to the new file " : " to ") << path
            << "\n";
  std::cerr << "next: deltactl admin --tenants_file=" << path << " token create " << name << "\n";
  return 0;
}

int TenantRemove(const std::string& path, TenantsFile file, const std::vector<std::string>& args) {
  if (args.size() != 1) return Usage("tenant rm NAME");
  auto it = file.tenants.find(args[0]);
  if (it == file.tenants.end()) return Fail(absl::NotFoundError(absl::StrCat("no tenant ", args[0], " in ", path)));
  const int active = ActiveTokens(it->second);
  file.tenants.erase(it);
  if (absl::Status status = Save(path, file); !status.ok()) return Fail(status);
  std::cout << "removed tenant " << args[0] << " and its tokens (" << active
            << " active); its stored deltas and jobs are kept\n";
  return 0;
}

int TenantList(const TenantsFile& file) {
  std::printf("%-24s %-7s %7s  %s\n", "TENANT", "ROLE", "TOKENS", "QUOTA OVERRIDES");
  for (const auto& [name, tenant] : file.tenants) {
    std::vector<std::string> quota;
    for (const auto& [key, value] : tenant.quota_overrides) quota.push_back(absl::StrCat(key, "=", value));
    std::printf("%-24s %-7s %7d  %s\n", name.c_str(), RoleName(tenant.role), ActiveTokens(tenant),
                absl::StrJoin(quota, " ").c_str());
  }
  return 0;
}

int SetTenantQuota(const std::string& path, TenantsFile file, const std::vector<std::string>& args) {
  if (args.size() < 2) return Usage("tenant quota NAME KEY=VALUE... (KEY= removes an override)");
  auto it = file.tenants.find(args[0]);
  if (it == file.tenants.end()) return Fail(NoTenant(args[0]));
  for (size_t i = 1; i < args.size(); ++i) {
    const size_t eq = args[i].find('=');
    if (eq == std::string::npos || eq == 0) return Usage(absl::StrCat("'", args[i], "' is not KEY=VALUE"));
    const std::string key = args[i].substr(0, eq), value = args[i].substr(eq + 1);
    if (value.empty()) {
      it->second.quota_overrides.erase(key);
      continue;
    }
    double number = 0;
    if (!absl::SimpleAtod(value, &number) || !std::isfinite(number)) {
      return Usage(absl::StrCat("'", value, "' (for ", key, ") is not a number"));
    }
    it->second.quota_overrides[key] = number;
  }
  // An unknown key or a bad value fails here, named as in the file ("tenants.acme.quota.bursts: ...").
  if (absl::Status status = Save(path, file); !status.ok()) return Fail(status);
  const auth::TenantQuota q = file.QuotaOf(args[0]);
  std::cout << "tenant " << args[0] << " quota (0 = unlimited): requests_per_second=" << q.requests_per_second
            << " burst=" << q.burst << " max_concurrent_requests=" << q.max_concurrent_requests
            << " store_bytes=" << q.store_bytes << " max_packs=" << q.max_packs
            << " max_running_jobs=" << q.max_running_jobs << " max_queued_jobs=" << q.max_queued_jobs << "\n";
  return 0;
}

int TokenCreate(const std::string& path, TenantsFile file, const std::vector<std::string>& args) {
  if (args.size() != 1) return Usage("token create TENANT [--description=D]");
  auto it = file.tenants.find(args[0]);
  if (it == file.tenants.end()) return Fail(NoTenant(args[0]));
  const absl::Time now = absl::FromUnixSeconds(absl::ToUnixSeconds(absl::Now()));  // whole seconds in the file
  auto token = auth::GenerateToken(absl::GetFlag(FLAGS_description), now);
  if (!token.ok()) return Fail(token.status());
  it->second.tokens.push_back(token->record);
  if (absl::Status status = Save(path, file); !status.ok()) return Fail(status);
  std::cout << token->token << std::endl;
  std::cerr << "created token " << token->record.id << " for tenant " << args[0]
            << ". It is shown only this once and cannot be shown again: store it now (deltactl --token, or "
               "DELTASERVE_TOKEN). Revoke it with: deltactl admin token revoke "
            << token->record.id << "\n";
  return 0;
}

int TokenRevoke(const std::string& path, TenantsFile file, const std::vector<std::string>& args) {
  if (args.size() != 1) return Usage("token revoke ID");
  // The whole token text names its id too.
  const std::string id = auth::TokenId(args[0]).value_or(args[0]);
  for (auto& [name, tenant] : file.tenants) {
    for (TokenRecord& token : tenant.tokens) {
      if (token.id != id) continue;
      if (token.revoked.has_value()) {
        std::cout << "token " << id << " of tenant " << name << " was already revoked at "
                  << TimeText(*token.revoked) << " UTC\n";
        return 0;
      }
      token.revoked = absl::FromUnixSeconds(absl::ToUnixSeconds(absl::Now()));
      if (absl::Status status = Save(path, file); !status.ok()) return Fail(status);
      std::cout << "revoked token " << id << " of tenant " << name
                << "; the server stops accepting it when it re-reads the file (within seconds)\n";
      return 0;
    }
  }
  return Fail(absl::NotFoundError(absl::StrCat("no token ", id, " in ", path, " (deltactl admin token ls)")));
}

int TokenList(const TenantsFile& file, const std::vector<std::string>& args) {
  if (args.size() > 1) return Usage("token ls [TENANT]");
  if (args.size() == 1 && file.tenants.count(args[0]) == 0) return Fail(NoTenant(args[0]));
  std::printf("%-12s  %-24s %-19s  %-19s  %s\n", "ID", "TENANT", "CREATED", "REVOKED", "DESCRIPTION");
  for (const auto& [name, tenant] : file.tenants) {
    if (args.size() == 1 && name != args[0]) continue;
    for (const TokenRecord& token : tenant.tokens) {
      std::printf("%-12s  %-24s %-19s  %-19s  %s\n", token.id.c_str(), name.c_str(), TimeText(token.created).c_str(),
                  token.revoked.has_value() ? TimeText(*token.revoked).c_str() : "-", token.description.c_str());
    }
  }
  return 0;
}

}  // namespace

int AdminCommand(const std::vector<std::string>& args) {
  const std::string path = absl::GetFlag(FLAGS_tenants_file);
  if (args.size() < 2) return Usage("give a subcommand");
  if (path.empty()) return Usage("--tenants_file is required (the file the server reads with --tenants_file)");
  const std::string what = args[0] + " " + args[1];
  const std::vector<std::string> rest(args.begin() + 2, args.end());
  if (what == "tenant add") return TenantAdd(path, rest);
  const bool known = what == "tenant rm" || what == "tenant ls" || what == "tenant quota" || what == "token create" ||
                     what == "token revoke" || what == "token ls";
  if (!known) return Usage(absl::StrCat("unknown subcommand '", what, "'"));
  auto file = auth::ReadTenantsFile(path);
  if (!file.ok()) return Fail(file.status());
  if (what == "tenant rm") return TenantRemove(path, std::move(*file), rest);
  if (what == "tenant ls") {
    if (!rest.empty()) return Usage("tenant ls takes no arguments");
    return TenantList(*file);
  }
  if (what == "tenant quota") return SetTenantQuota(path, std::move(*file), rest);
  if (what == "token create") return TokenCreate(path, std::move(*file), rest);
  if (what == "token revoke") return TokenRevoke(path, std::move(*file), rest);
  return TokenList(*file, rest);
}

}  // namespace client
}  // namespace deltaserve
