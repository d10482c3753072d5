// RefTable (ref_table.h): versions, labels, quotas and paging, and the journal encoding of RefOps.
#include "delta_store/ref_table.h"

#include <algorithm>
#include <limits>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"
#include "server/common/sha256.h"
#include "server/common/status_macros.h"

namespace deltaserve {
namespace store {
namespace {

constexpr int kDefaultPageSize = 100;
constexpr int kMaxPageSize = 1000;

std::string TaskName(const std::string& tenant, const std::string& task) { return absl::StrCat(tenant, "/", task); }

absl::Status CheckTask(const std::string& tenant, const std::string& task) {
  DS_RETURN_IF_ERROR(CheckName("tenant", tenant));
  return CheckName("task", task);
}

absl::Status CheckDigest(const std::string& digest) {
  if (IsSha256Digest(digest)) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("digest \"", absl::CHexEscape(digest.substr(0, 80)),
                                                 "\" is malformed: write sha256: and 64 lowercase hex digits"));
}

absl::Status CheckVersion(int64_t version) {
  if (version >= 1) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("version ", version, " is invalid: versions start at 1"));
}

// A user label: valid, and not the store-managed "latest".
absl::Status CheckUserLabel(const std::string& label) {
  if (label == kLatestLabel) {
    return absl::InvalidArgumentError(
        "label \"latest\" is managed by the store (it always names the highest version); use another label");
  }
  if (IsValidLabel(label)) return absl::OkStatus();
  DS_RETURN_IF_ERROR(CheckName("label", label));
  return absl::InvalidArgumentError(
      absl::StrCat("label \"", label, "\" is not a valid label: it is all digits and would read as a version"));
}

const char* KindName(RefOp::Kind kind) {
  switch (kind) {
    case RefOp::Kind::kAddVersion: return "add_version";
    case RefOp::Kind::kSetLabel: return "set_label";
    case RefOp::Kind::kDeleteLabel: return "delete_label";
    case RefOp::Kind::kDeleteVersion: return "delete_version";
    case RefOp::Kind::kReserveVersions: return "reserve_versions";
  }
  return "?";
}

// The page token is the web-safe base64 of "tenant/task@version", the last item of the previous page.
std::string EncodePageToken(const VersionInfo& last) {
  std::string token;
  absl::WebSafeBase64Escape(absl::StrCat(last.tenant, "/", last.task, "@", last.version), &token);
  return token;
}

absl::StatusOr<Ref> DecodePageToken(const std::string& token, const ListOptions& options) {
  auto bad = absl::InvalidArgumentError(
      "page_token is not one this listing returned; pass a next_page_token unchanged, with the same tenant and "
      "task filters, or \"\" for the first page");
  std::string text;
  if (!absl::WebSafeBase64Unescape(token, &text)) return bad;
  absl::StatusOr<Ref> ref = ParseRef(text, "");
  if (!ref.ok() || ref->version <= 0) return bad;
  if (!options.tenant.empty() && ref->tenant != options.tenant) return bad;
  if (!options.task.empty() && ref->task != options.task) return bad;
  return ref;
}

}  // namespace

// --- Encoding ---

std::string EncodeRefOp(const RefOp& op) {
  nlohmann::json j;
  j["op"] = KindName(op.kind);
  j["tenant"] = op.tenant;
  j["task"] = op.task;
  j["version"] = op.version;
  switch (op.kind) {
    case RefOp::Kind::kAddVersion:
      j["digest"] = op.digest;
      j["size"] = op.size;
      break;
    case RefOp::Kind::kSetLabel:
    case RefOp::Kind::kDeleteLabel:
      j["label"] = op.label;
      break;
    case RefOp::Kind::kDeleteVersion:
    case RefOp::Kind::kReserveVersions:
      break;
  }
  j["time_us"] = absl::ToUnixMicros(op.time);
  // Names are ASCII once validated; replace (rather than throw on) anything else an unvalidated op may carry.
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

absl::StatusOr<RefOp> DecodeRefOp(absl::string_view line) {
  auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat("reference journal entry is malformed (", why, "): \"",
                                                   absl::CHexEscape(line.substr(0, 200)), "\""));
  };
  nlohmann::json j = nlohmann::json::parse(line.begin(), line.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return bad("not JSON");
  if (!j.is_object()) return bad("not a JSON object");
  auto get_string = [&](const char* key, std::string* out) {
    auto it = j.find(key);
    if (it == j.end() || !it->is_string()) return false;
    *out = it->get<std::string>();
    return true;
  };
  auto get_int = [&](const char* key, int64_t* out) {
    auto it = j.find(key);
    if (it == j.end() || !it->is_number_integer()) return false;
    if (it->is_number_unsigned() && it->get<uint64_t>() > uint64_t{std::numeric_limits<int64_t>::max()}) {
      return false;
    }
    *out = it->get<int64_t>();
    return true;
  };

  RefOp op;
  std::string kind;
  if (!get_string("op", &kind)) return bad("no \"op\"");
  if (kind == "add_version") {
    op.kind = RefOp::Kind::kAddVersion;
    if (!get_string("digest", &op.digest) || !get_int("size", &op.size)) return bad("no digest or size");
  } else if (kind == "set_label" || kind == "delete_label") {
    op.kind = kind == "set_label" ? RefOp::Kind::kSetLabel : RefOp::Kind::kDeleteLabel;
    if (!get_string("label", &op.label)) return bad("no label");
  } else if (kind == "delete_version") {
    op.kind = RefOp::Kind::kDeleteVersion;
  } else if (kind == "reserve_versions") {
    op.kind = RefOp::Kind::kReserveVersions;
  } else {
    return bad("unknown op");
  }
  int64_t time_us = 0;
  if (!get_string("tenant", &op.tenant) || !get_string("task", &op.task)) return bad("no tenant or task");
  if (!get_int("version", &op.version)) return bad("no version");
  if (!get_int("time_us", &time_us)) return bad("no time_us");
  op.time = absl::FromUnixMicros(time_us);
  return op;
}

Quota QuotaOptions::For(const std::string& tenant) const {
  auto it = per_tenant.find(tenant);
  Quota quota = it == per_tenant.end() ? default_quota : it->second;
  if (!lookup) return quota;
  const std::optional<Quota> dynamic = lookup(tenant);
  if (!dynamic.has_value()) return quota;
  if (dynamic->max_bytes != 0) quota.max_bytes = dynamic->max_bytes;
  if (dynamic->max_versions != 0) quota.max_versions = dynamic->max_versions;
  return quota;
}

// --- Planning ---

absl::StatusOr<std::optional<RefOp>> RefTable::PlanAddVersion(const std::string& tenant, const std::string& task,
                                                              const std::string& digest, int64_t size,
                                                              absl::Time now, const QuotaOptions& quotas,
                                                              VersionInfo* existing) const {
  DS_RETURN_IF_ERROR(CheckTask(tenant, task));
  DS_RETURN_IF_ERROR(CheckDigest(digest));
  if (size < 0) return absl::InvalidArgumentError(absl::StrCat("blob size ", size, " is negative"));
  int64_t next_version = 1;
  auto it = tasks_.find({tenant, task});
  if (it != tasks_.end()) {
    for (const auto& [number, version] : it->second.versions) {
      if (version.digest != digest) continue;
      if (existing != nullptr) *existing = Info(tenant, task, it->second, number);
      return std::optional<RefOp>();
    }
    next_version = it->second.next_version;
  }

  const Quota quota = quotas.For(tenant);
  TenantUsage usage = Usage(tenant);
  if (quota.max_versions > 0 && usage.versions + 1 > quota.max_versions) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "tenant \"", tenant, "\" is at its quota of ", quota.max_versions, " versions (usage: ", usage.versions,
        " versions, limit: ", quota.max_versions, "); delete versions it no longer needs, or raise its quota"));
  }
  // A blob the tenant's versions already reference adds no bytes.
  int64_t added = size;
  for (auto t = tasks_.lower_bound({tenant, ""}); t != tasks_.end() && t->first.first == tenant; ++t) {
    for (const auto& [number, version] : t->second.versions) {
      if (version.digest == digest) added = 0;
    }
  }
  if (quota.max_bytes > 0 && usage.bytes + added > quota.max_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "tenant \"", tenant, "\" would exceed its quota of ", quota.max_bytes, " bytes: this pack adds ", added,
        " bytes to a usage of ", usage.bytes, " bytes (limit: ", quota.max_bytes,
        "); delete versions it no longer needs, or raise its quota"));
  }

  RefOp op;
  op.kind = RefOp::Kind::kAddVersion;
  op.tenant = tenant;
  op.task = task;
  op.version = next_version;
  op.digest = digest;
  op.size = size;
  op.time = now;
  return std::optional<RefOp>(std::move(op));
}

absl::StatusOr<RefOp> RefTable::PlanSetLabel(const std::string& tenant, const std::string& task,
                                             const std::string& label, int64_t version, absl::Time now) const {
  DS_RETURN_IF_ERROR(CheckTask(tenant, task));
  DS_RETURN_IF_ERROR(CheckUserLabel(label));
  DS_RETURN_IF_ERROR(CheckVersion(version));
  DS_RETURN_IF_ERROR(Resolve(Ref{tenant, task, version, "", ""}).status());
  RefOp op;
  op.kind = RefOp::Kind::kSetLabel;
  op.tenant = tenant;
  op.task = task;
  op.label = label;
  op.version = version;
  op.time = now;
  return op;
}

absl::StatusOr<RefOp> RefTable::PlanDeleteLabel(const std::string& tenant, const std::string& task,
                                                const std::string& label, absl::Time now) const {
  DS_RETURN_IF_ERROR(CheckTask(tenant, task));
  DS_RETURN_IF_ERROR(CheckUserLabel(label));
  auto it = tasks_.find({tenant, task});
  if (it == tasks_.end() || it->second.labels.count(label) == 0) {
    return absl::NotFoundError(
        absl::StrCat("label \"", label, "\" is not set on ", TaskName(tenant, task), "; nothing to delete"));
  }
  RefOp op;
  op.kind = RefOp::Kind::kDeleteLabel;
  op.tenant = tenant;
  op.task = task;
  op.label = label;
  op.time = now;
  return op;
}

absl::StatusOr<RefOp> RefTable::PlanDeleteVersion(const std::string& tenant, const std::string& task,
                                                  int64_t version, absl::Time now) const {
  DS_RETURN_IF_ERROR(CheckTask(tenant, task));
  DS_RETURN_IF_ERROR(CheckVersion(version));
  DS_RETURN_IF_ERROR(Resolve(Ref{tenant, task, version, "", ""}).status());
  const Task& t = tasks_.at({tenant, task});
  std::vector<std::string> labels;
  for (const auto& [label, target] : t.labels) {
    if (target == version) labels.push_back(label);
  }
  if (!labels.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        TaskName(tenant, task), "@", version, " is still named by label(s) ", absl::StrJoin(labels, ", "),
        "; move or delete those labels first"));
  }
  RefOp op;
  op.kind = RefOp::Kind::kDeleteVersion;
  op.tenant = tenant;
  op.task = task;
  op.version = version;
  op.time = now;
  return op;
}

// --- Applying ---

absl::Status RefTable::Apply(const RefOp& op) {
  DS_RETURN_IF_ERROR(CheckTask(op.tenant, op.task));
  const std::string name = TaskName(op.tenant, op.task);
  switch (op.kind) {
    case RefOp::Kind::kAddVersion: {
      DS_RETURN_IF_ERROR(CheckDigest(op.digest));
      if (op.size < 0) return absl::InvalidArgumentError(absl::StrCat("blob size ", op.size, " is negative"));
      auto it = tasks_.find({op.tenant, op.task});
      int64_t next = it == tasks_.end() ? 1 : it->second.next_version;
      if (op.version < next || op.version == std::numeric_limits<int64_t>::max()) {
        return absl::FailedPreconditionError(absl::StrCat(
            "cannot add ", name, "@", op.version, ": version numbers are never reused (next is ", next, ")"));
      }
      if (it != tasks_.end()) {
        for (const auto& [number, version] : it->second.versions) {
          if (version.digest == op.digest) {
            return absl::FailedPreconditionError(
                absl::StrCat("cannot add ", name, "@", op.version, ": ", op.digest, " is already version ", number));
          }
        }
      }
      Task& task = tasks_[{op.tenant, op.task}];
      task.versions[op.version] = Version{op.digest, op.size, op.time};
      task.next_version = op.version + 1;
      return absl::OkStatus();
    }
    case RefOp::Kind::kReserveVersions: {
      if (op.version < 1 || op.version == std::numeric_limits<int64_t>::max()) {
        return absl::InvalidArgumentError(absl::StrCat("cannot reserve versions of ", name, " below ", op.version));
      }
      Task& t = tasks_[{op.tenant, op.task}];
      t.next_version = std::max(t.next_version, op.version);
      return absl::OkStatus();
    }
    case RefOp::Kind::kSetLabel: {
      DS_ASSIGN_OR_RETURN(RefOp planned, PlanSetLabel(op.tenant, op.task, op.label, op.version, op.time));
      tasks_[{op.tenant, op.task}].labels[planned.label] = planned.version;
      return absl::OkStatus();
    }
    case RefOp::Kind::kDeleteLabel: {
      DS_ASSIGN_OR_RETURN(RefOp planned, PlanDeleteLabel(op.tenant, op.task, op.label, op.time));
      tasks_[{op.tenant, op.task}].labels.erase(planned.label);
      return absl::OkStatus();
    }
    case RefOp::Kind::kDeleteVersion: {
      DS_ASSIGN_OR_RETURN(RefOp planned, PlanDeleteVersion(op.tenant, op.task, op.version, op.time));
      // The task stays (without versions, invisible) so that its numbers are not reused.
      tasks_[{op.tenant, op.task}].versions.erase(planned.version);
      return absl::OkStatus();
    }
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown reference op kind ", static_cast<int>(op.kind)));
}

// --- Queries ---

VersionInfo RefTable::Info(const std::string& tenant, const std::string& task, const Task& t,
                           int64_t version) const {
  const Version& v = t.versions.at(version);
  VersionInfo info;
  info.tenant = tenant;
  info.task = task;
  info.version = version;
  info.digest = v.digest;
  info.size = v.size;
  info.created = v.created;
  for (const auto& [label, target] : t.labels) {
    if (target == version) info.labels.push_back(label);
  }
  if (t.versions.rbegin()->first == version) info.labels.push_back(kLatestLabel);
  std::sort(info.labels.begin(), info.labels.end());
  return info;
}

absl::StatusOr<VersionInfo> RefTable::Resolve(const Ref& ref) const {
  int selectors = (ref.version != 0) + !ref.label.empty() + !ref.digest.empty();
  if (selectors > 1) {
    return absl::InvalidArgumentError(
        "a reference names a version, a label or a digest, not several; drop all but one");
  }
  if (ref.version < 0) DS_RETURN_IF_ERROR(CheckVersion(ref.version));
  if (!ref.digest.empty()) DS_RETURN_IF_ERROR(CheckDigest(ref.digest));
  if (ref.tenant.empty()) {
    if (!ref.task.empty()) return absl::InvalidArgumentError("a reference with a task must also name its tenant");
    if (ref.digest.empty()) return absl::InvalidArgumentError("a reference must name a tenant/task or a digest");
  } else {
    DS_RETURN_IF_ERROR(CheckName("tenant", ref.tenant));
  }

  // A digest without a task: the first version (of the tenant, or of anyone) pointing at it.
  if (ref.task.empty()) {
    if (ref.digest.empty()) return absl::InvalidArgumentError("a reference to a tenant's packs must name a task");
    auto begin = ref.tenant.empty() ? tasks_.begin() : tasks_.lower_bound({ref.tenant, ""});
    for (auto it = begin; it != tasks_.end(); ++it) {
      if (!ref.tenant.empty() && it->first.first != ref.tenant) break;
      for (const auto& [number, version] : it->second.versions) {
        if (version.digest == ref.digest) return Info(it->first.first, it->first.second, it->second, number);
      }
    }
    return absl::NotFoundError(absl::StrCat(
        ref.digest, " is not a version of ", ref.tenant.empty() ? "any task" : "any task of tenant \"" + ref.tenant + "\""));
  }

  DS_RETURN_IF_ERROR(CheckName("task", ref.task));
  const std::string name = TaskName(ref.tenant, ref.task);
  auto it = tasks_.find({ref.tenant, ref.task});
  if (it == tasks_.end() || it->second.versions.empty()) {
    return absl::NotFoundError(absl::StrCat(name, " has no versions: push a pack to it first"));
  }
  const Task& t = it->second;
  if (ref.version > 0) {
    if (t.versions.count(ref.version) == 0) {
      return absl::NotFoundError(absl::StrCat(name, " has no version ", ref.version, " (it has ", t.versions.size(),
                                              " version(s); the latest is ", t.versions.rbegin()->first, ")"));
    }
    return Info(ref.tenant, ref.task, t, ref.version);
  }
  if (!ref.digest.empty()) {
    for (const auto& [number, version] : t.versions) {
      if (version.digest == ref.digest) return Info(ref.tenant, ref.task, t, number);
    }
    return absl::NotFoundError(absl::StrCat(ref.digest, " is not a version of ", name));
  }
  if (ref.label.empty() || ref.label == kLatestLabel) {
    return Info(ref.tenant, ref.task, t, t.versions.rbegin()->first);
  }
  if (!IsValidLabel(ref.label)) return CheckUserLabel(ref.label);
  auto label = t.labels.find(ref.label);
  if (label == t.labels.end()) {
    std::vector<std::string> labels = {kLatestLabel};
    for (const auto& [l, target] : t.labels) labels.push_back(l);
    std::sort(labels.begin(), labels.end());
    return absl::NotFoundError(absl::StrCat(name, " has no label \"", ref.label, "\" (its labels: ",
                                            absl::StrJoin(labels, ", "), ")"));
  }
  return Info(ref.tenant, ref.task, t, label->second);
}

absl::StatusOr<ListPage> RefTable::List(const ListOptions& options) const {
  if (options.page_size < 0 || options.page_size > kMaxPageSize) {
    return absl::InvalidArgumentError(absl::StrCat("page_size ", options.page_size,
                                                   " is out of range: use 1 to ", kMaxPageSize,
                                                   ", or 0 for the default (", kDefaultPageSize, ")"));
  }
  if (!options.tenant.empty()) DS_RETURN_IF_ERROR(CheckName("tenant", options.tenant));
  if (!options.task.empty()) {
    if (options.tenant.empty()) return absl::InvalidArgumentError("listing by task requires a tenant too");
    DS_RETURN_IF_ERROR(CheckName("task", options.task));
  }
  const size_t page_size = options.page_size == 0 ? kDefaultPageSize : options.page_size;

  // The first item is strictly after `after` (tenant, task, version).
  std::pair<std::string, std::string> start{options.tenant, options.task};
  int64_t after_version = 0;
  if (!options.page_token.empty()) {
    DS_ASSIGN_OR_RETURN(Ref last, DecodePageToken(options.page_token, options));
    start = {last.tenant, last.task};
    after_version = last.version;
  }

  ListPage page;
  for (auto it = tasks_.lower_bound(start); it != tasks_.end(); ++it) {
    const auto& [tenant, task] = it->first;
    if (!options.tenant.empty() && tenant != options.tenant) break;
    if (!options.task.empty() && task != options.task) break;
    auto v = it->first == start ? it->second.versions.upper_bound(after_version) : it->second.versions.begin();
    for (; v != it->second.versions.end(); ++v) {
      if (page.versions.size() == page_size) {
        page.next_page_token = EncodePageToken(page.versions.back());
        return page;
      }
      page.versions.push_back(Info(tenant, task, it->second, v->first));
    }
  }
  return page;
}

TenantUsage RefTable::Usage(const std::string& tenant) const {
  TenantUsage usage;
  std::map<std::string, int64_t> sizes;  // distinct digests
  for (auto it = tasks_.lower_bound({tenant, ""}); it != tasks_.end() && it->first.first == tenant; ++it) {
    for (const auto& [number, version] : it->second.versions) {
      ++usage.versions;
      sizes[version.digest] = version.size;
    }
  }
  for (const auto& [digest, size] : sizes) usage.bytes += size;
  return usage;
}

bool RefTable::IsReferenced(const std::string& digest) const {
  for (const auto& [key, task] : tasks_) {
    for (const auto& [number, version] : task.versions) {
      if (version.digest == digest) return true;
    }
  }
  return false;
}

std::set<std::string> RefTable::ReferencedDigests() const {
  std::set<std::string> digests;
  for (const auto& [key, task] : tasks_) {
    for (const auto& [number, version] : task.versions) digests.insert(version.digest);
  }
  return digests;
}

std::vector<RefOp> RefTable::Snapshot() const {
  std::vector<RefOp> ops;
  for (const auto& [key, t] : tasks_) {
    RefOp op;
    op.tenant = key.first;
    op.task = key.second;
    absl::Time last_created = absl::UnixEpoch();
    for (const auto& [number, version] : t.versions) {
      op.kind = RefOp::Kind::kAddVersion;
      op.version = number;
      op.digest = version.digest;
      op.size = version.size;
      op.time = last_created = version.created;
      ops.push_back(op);
    }
    op.digest.clear();
    op.size = 0;
    op.time = last_created;
    int64_t highest = t.versions.empty() ? 0 : t.versions.rbegin()->first;
    if (t.next_version > highest + 1) {
      op.kind = RefOp::Kind::kReserveVersions;
      op.version = t.next_version;
      ops.push_back(op);
    }
    op.kind = RefOp::Kind::kSetLabel;
    for (const auto& [label, target] : t.labels) {
      op.label = label;
      op.version = target;
      ops.push_back(op);
    }
  }
  return ops;
}

}  // namespace store
}  // namespace deltaserve
