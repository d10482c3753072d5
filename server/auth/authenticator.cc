// Authenticator (authenticator.h): bearer tokens and client certificates to callers, with a polled tenants file.
#include "server/auth/authenticator.h"

#include <sys/stat.h>

#include <cerrno>
#include <set>
#include <unordered_map>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "server/common/file_util.h"
#include "server/common/logging.h"
#include "server/common/sha256.h"

namespace deltaserve {
namespace auth {
namespace {

constexpr char kFilePrincipal[] = "tenants-file";
// The poll thread re-reads the content every this many intervals even when size and mtime look unchanged (an
// edit within the file system's mtime granularity that keeps the size).
constexpr int kContentCheckEvery = 10;

struct TokenEntry {
  std::string tenant;
  std::string id;
  std::optional<absl::Time> revoked;
};

// The lookups derived from one TenantsFile.
struct IndexData {
  std::unordered_map<std::string, TokenEntry> by_hash;     // token sha256 (hex) -> token
  std::unordered_map<std::string, std::string> by_cert;    // certificate name -> tenant
};

IndexData BuildIndex(const TenantsFile& file) {
  IndexData index;
  for (const auto& [tenant, record] : file.tenants) {
    for (const TokenRecord& token : record.tokens) index.by_hash[token.sha256] = {tenant, token.id, token.revoked};
    for (const std::string& name : record.certificate_names) index.by_cert.emplace(name, tenant);
  }
  return index;
}

// "size:mtime_ns" of `path`, or "missing" when it cannot be stat'ed.
std::string StatSignature(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return "missing";
  return absl::StrCat(static_cast<int64_t>(st.st_size), ":", static_cast<int64_t>(st.st_mtim.tv_sec), ".",
                      static_cast<int64_t>(st.st_mtim.tv_nsec));
}

std::string StatPart(const std::string& signature) { return signature.substr(0, signature.rfind('|')); }
std::string ContentPart(const std::string& signature) {
  const size_t bar = signature.rfind('|');
  return bar == std::string::npos ? "" : signature.substr(bar + 1);
}

struct Loaded {
  TenantsFile file;
  std::string signature;  // "<stat>|<sha256 of the content>"
};

absl::StatusOr<Loaded> LoadFile(const std::string& path) {
  const std::string stat_part = StatSignature(path);
  if (stat_part == "missing") {
    return absl::NotFoundError(absl::StrCat("tenants file ", path, " does not exist (or cannot be read): create it ",
                                            "with `deltactl admin --tenants_file=", path, " tenant add NAME`"));
  }
  auto text = ReadFileToString(path);
  if (!text.ok()) return text.status();
  auto file = ParseTenantsFile(*text);
  if (!file.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("tenants file ", path, ": ", file.status().message(),
                                                   " (fix the file, or edit it with `deltactl admin`)"));
  }
  return Loaded{std::move(*file), absl::StrCat(stat_part, "|", Sha256Digest(*text))};
}

AuditEvent FileEvent(absl::string_view action, absl::string_view tenant, absl::string_view target,
                     absl::string_view detail) {
  AuditEvent event;
  event.principal = kFilePrincipal;
  event.action = std::string(action);
  event.tenant = std::string(tenant);
  event.target = std::string(target);
  event.detail = std::string(detail);
  return event;
}

std::string TimeText(absl::Time time) { return absl::FormatTime("%Y-%m-%d%ET%H:%M:%E*SZ", time, absl::UTCTimeZone()); }

const char* RoleName(Role role) { return role == Role::kAdmin ? "admin" : "tenant"; }

// The audit events that turn `before` into `after`.
std::vector<AuditEvent> Diff(const TenantsFile& before, const TenantsFile& after) {
  std::vector<AuditEvent> events;
  static const TenantRecord kNone;
  for (const auto& [name, old_tenant] : before.tenants) {
    if (after.tenants.count(name) == 0) {
      events.push_back(FileEvent("tenant.remove", name, "", ""));
      for (const TokenRecord& token : old_tenant.tokens) {
        events.push_back(FileEvent("token.delete", name, token.id, "its tenant was removed"));
      }
    }
  }
  for (const auto& [name, new_tenant] : after.tenants) {
    auto old_it = before.tenants.find(name);
    const bool added = old_it == before.tenants.end();
    const TenantRecord& old_tenant = added ? kNone : old_it->second;
    if (added) {
      events.push_back(FileEvent("tenant.add", name, "", absl::StrCat("role ", RoleName(new_tenant.role))));
    } else if (old_tenant.role != new_tenant.role || old_tenant.quota_overrides != new_tenant.quota_overrides ||
               old_tenant.certificate_names != new_tenant.certificate_names) {
      std::vector<std::string> changes;
      if (old_tenant.role != new_tenant.role) {
        changes.push_back(absl::StrCat("role ", RoleName(old_tenant.role), " -> ", RoleName(new_tenant.role)));
      }
      if (old_tenant.quota_overrides != new_tenant.quota_overrides) changes.push_back("quota changed");
      if (old_tenant.certificate_names != new_tenant.certificate_names) {
        changes.push_back(absl::StrCat("certificate names: ", absl::StrJoin(new_tenant.certificate_names, ",")));
      }
      events.push_back(FileEvent("tenant.update", name, "", absl::StrJoin(changes, "; ")));
    }
    std::map<std::string, const TokenRecord*> old_tokens;
    for (const TokenRecord& token : old_tenant.tokens) old_tokens[token.id] = &token;
    std::set<std::string> new_ids;
    for (const TokenRecord& token : new_tenant.tokens) {
      new_ids.insert(token.id);
      auto it = old_tokens.find(token.id);
      const TokenRecord* old_token = it == old_tokens.end() ? nullptr : it->second;
      if (old_token == nullptr || old_token->sha256 != token.sha256) {
        events.push_back(FileEvent("token.create", name, token.id, token.description));
      } else if (old_token->revoked.has_value() && !token.revoked.has_value()) {
        events.push_back(FileEvent("token.create", name, token.id, "revocation lifted: the token works again"));
      }
      if (token.revoked.has_value() && (old_token == nullptr || !old_token->revoked.has_value())) {
        events.push_back(FileEvent("token.revoke", name, token.id, absl::StrCat("revoked ", TimeText(*token.revoked))));
      }
    }
    for (const TokenRecord& token : old_tenant.tokens) {
      if (new_ids.count(token.id) == 0) events.push_back(FileEvent("token.delete", name, token.id, ""));
    }
  }
  return events;
}

absl::Status Unauthenticated(absl::string_view message) { return absl::UnauthenticatedError(message); }

}  // namespace

struct Authenticator::Index : IndexData {
  explicit Index(IndexData data) : IndexData(std::move(data)) {}
};

Authenticator::Authenticator(const Options& options) : options_(options) {}

absl::StatusOr<std::unique_ptr<Authenticator>> Authenticator::Create(const Options& options) {
  std::unique_ptr<Authenticator> auth(new Authenticator(options));
  if (options.tenants_file.empty()) return auth;
  auto loaded = LoadFile(options.tenants_file);
  if (!loaded.ok()) return loaded.status();
  auto index = std::make_shared<const Index>(BuildIndex(loaded->file));
  {
    absl::MutexLock lock(&auth->mu_);
    auth->file_ = std::make_shared<const TenantsFile>(std::move(loaded->file));
    auth->index_ = std::move(index);
    auth->file_signature_ = std::move(loaded->signature);
    auth->generation_ = 1;
  }
  if (options.reload_interval > absl::ZeroDuration()) {
    auth->poller_ = std::thread([a = auth.get()] { a->PollLoop(); });
  }
  return auth;
}

Authenticator::~Authenticator() {
  stop_.Notify();
  if (poller_.joinable()) poller_.join();
}

absl::StatusOr<Caller> Authenticator::Authenticate(std::optional<absl::string_view> authorization,
                                                   absl::Span<const std::string> certificate_names) const {
  if (!enabled()) {
    Caller caller;
    caller.admin = true;
    caller.principal = "anonymous";
    return caller;
  }
  std::shared_ptr<const TenantsFile> file;
  std::shared_ptr<const Index> index;
  {
    absl::ReaderMutexLock lock(&mu_);
    file = file_;
    index = index_;
  }
  auto caller_of = [&](const std::string& tenant, std::string principal) {
    Caller caller;
    caller.tenant = tenant;
    caller.admin = file->tenants.at(tenant).role == Role::kAdmin;
    caller.principal = std::move(principal);
    caller.quota = file->QuotaOf(tenant);
    return caller;
  };

  if (authorization.has_value()) {
    const std::vector<absl::string_view> parts = absl::StrSplit(*authorization, ' ', absl::SkipEmpty());
    if (parts.size() != 2 || !absl::EqualsIgnoreCase(parts[0], "bearer")) {
      return Unauthenticated("malformed authorization header: send 'authorization: Bearer <token>'");
    }
    const absl::string_view token = parts[1];
    const std::optional<std::string> id = TokenId(token);
    if (!id.has_value()) {
      return Unauthenticated(
          "malformed API token: expected dst_<12 hex digits>_<43 characters> (check that it was copied whole, "
          "or ask an admin for a new one: deltactl admin token create)");
    }
    // The hash lookup is the comparison: the secret itself is never compared character by character.
    auto it = index->by_hash.find(HashToken(token));
    if (it == index->by_hash.end()) {
      return Unauthenticated(absl::StrCat("unknown API token dst_", *id,
                                          "_\xE2\x80\xA6: check the token, or ask an admin for a new one "
                                          "(deltactl admin token create)"));
    }
    const TokenEntry& entry = it->second;
    if (entry.revoked.has_value()) {
      return Unauthenticated(absl::StrCat("API token ", entry.id, " was revoked at ", TimeText(*entry.revoked),
                                          ": ask an admin for a new one"));
    }
    return caller_of(entry.tenant, absl::StrCat("token:", entry.id));
  }

  if (!certificate_names.empty()) {
    for (const std::string& name : certificate_names) {
      auto it = index->by_cert.find(name);
      if (it != index->by_cert.end()) return caller_of(it->second, absl::StrCat("cert:", name));
    }
    return Unauthenticated(absl::StrCat("client certificate \"", absl::StrJoin(certificate_names, "\", \""),
                                        "\" is not claimed by any tenant: add its name to a tenant's ",
                                        "certificate_names in the tenants file, or send 'authorization: Bearer ",
                                        "<token>'"));
  }
  return Unauthenticated(
      "this server requires authentication: send 'authorization: Bearer <token>' (deltactl --token or "
      "DELTASERVE_TOKEN)");
}

absl::Status Authenticator::Reload() {
  if (!enabled()) return absl::OkStatus();
  auto loaded = LoadFile(options_.tenants_file);
  if (!loaded.ok()) {
    DS_LOG(ERROR) << "reloading the tenants file failed; the previous contents stay in force: "
                  << loaded.status().message();
    if (options_.audit != nullptr) {
      AuditEvent event = FileEvent("tenants.reload_failed", "", options_.tenants_file, "");
      event.code = loaded.status().code();
      event.message = std::string(loaded.status().message());
      options_.audit->Record(event);
    }
    return loaded.status();
  }
  auto index = std::make_shared<const Index>(BuildIndex(loaded->file));
  auto file = std::make_shared<const TenantsFile>(std::move(loaded->file));
  std::shared_ptr<const TenantsFile> before;
  int64_t generation = 0;
  {
    absl::MutexLock lock(&mu_);
    before = std::move(file_);
    file_ = file;
    index_ = std::move(index);
    file_signature_ = std::move(loaded->signature);
    generation = ++generation_;
  }
  const std::vector<AuditEvent> events =
      before == nullptr ? std::vector<AuditEvent>() : Diff(*before, *file);
  if (!events.empty()) {
    DS_LOG(INFO) << "tenants file " << options_.tenants_file << " reloaded (generation " << generation << "): "
                 << events.size() << " change(s)";
  }
  if (options_.audit != nullptr) {
    for (const AuditEvent& event : events) options_.audit->Record(event);
  }
  return absl::OkStatus();
}

std::optional<TenantQuota> Authenticator::QuotaOf(const std::string& tenant) const {
  if (!enabled()) return std::nullopt;
  std::shared_ptr<const TenantsFile> file;
  {
    absl::ReaderMutexLock lock(&mu_);
    file = file_;
  }
  if (file == nullptr || file->tenants.count(tenant) == 0) return std::nullopt;
  return file->QuotaOf(tenant);
}

int64_t Authenticator::generation() const {
  absl::ReaderMutexLock lock(&mu_);
  return generation_;
}

void Authenticator::PollLoop() {
  const std::string& path = options_.tenants_file;
  std::string failed_signature;  // the content a reload failed on: not retried until it changes again
  for (int64_t tick = 1; !stop_.WaitForNotificationWithTimeout(options_.reload_interval); ++tick) {
    std::string known;
    {
      absl::ReaderMutexLock lock(&mu_);
      known = file_signature_;
    }
    const std::string stat_now = StatSignature(path);
    if (stat_now == StatPart(known) && tick % kContentCheckEvery != 0) continue;
    std::string content;
    if (stat_now != "missing") {
      auto text = ReadFileToString(path);
      content = text.ok() ? Sha256Digest(*text) : "unreadable";
    }
    const std::string now = absl::StrCat(stat_now, "|", content);
    if (content == ContentPart(known) && !content.empty()) {
      // Touched, not changed: remember the new size and mtime so the content is not hashed on every tick.
      absl::MutexLock lock(&mu_);
      if (file_signature_ == known) file_signature_ = now;
      continue;
    }
    if (now == failed_signature) continue;
    failed_signature = Reload().ok() ? "" : now;
  }
}

absl::StatusOr<std::string> ActingTenant(const Caller& caller, absl::string_view requested) {
  if (requested.empty()) return caller.tenant;
  if (caller.admin || requested == caller.tenant) return std::string(requested);
  const char* what = absl::StartsWith(caller.principal, "cert:") ? "certificate" : "token";
  return absl::PermissionDeniedError(absl::StrCat("the ", what, " of tenant \"", caller.tenant,
                                                  "\" may not act for tenant \"", requested,
                                                  "\": leave the tenant empty to act for your own, or use an admin's "
                                                  "credentials"));
}

}  // namespace auth
}  // namespace deltaserve
