#include "client/deltactl_backup.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <iostream>
#include <map>
#include <set>
#include <utility>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "server/auth/tenants.h"
#include "server/common/file_util.h"
#include "server/common/sha256.h"

ABSL_FLAG(std::string, out, "", "backup: the directory to write (must not exist or be empty; see --overwrite).");
ABSL_FLAG(bool, overwrite, false, "backup: replace an existing, non-empty --out directory once the new backup is complete.");
ABSL_FLAG(bool, dry_run, false, "restore: check the backup (manifest and every blob's digest) and push nothing.");
ABSL_FLAG(std::vector<std::string>, tenants, {},
          "backup: the tenants to back up (comma separated; with --tenant and --tenants_file's tenants; other "
          "tenants than the caller's need an admin token).");
ABSL_FLAG(bool, all_tenants, false,
          "backup: every tenant's packs (ListDeltas all_tenants; needs an admin token, or a server without "
          "authentication).");
ABSL_DECLARE_FLAG(std::string, tenants_file);

namespace deltaserve {
namespace client {
namespace {

namespace fs = std::filesystem;
namespace pb = ::deltaserve::v1;

constexpr char kFormat[] = "deltaserve-backup";
constexpr int kFormatVersion = 1;
constexpr char kLatest[] = "latest";

int Error(const std::string& message) {
  std::cerr << "deltactl: " << message << "\n";
  return 1;
}

int Error(const std::string& what, const absl::Status& status) {
  std::cerr << "deltactl: " << what << ": " << absl::StatusCodeToString(status.code()) << ": " << status.message()
            << "\n";
  return 1;
}

std::string BlobName(const std::string& digest) { return "sha256-" + digest.substr(7); }

std::string Rfc3339(int64_t unix_micros) {
  return absl::FormatTime(absl::RFC3339_full, absl::FromUnixMicros(unix_micros), absl::UTCTimeZone());
}

// Flushes a directory's entries (a rename into it) to disk; best effort.
void SyncDir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return;
  (void)::fsync(fd);
  ::close(fd);
}

struct TaskVersions {
  std::vector<pb::DeltaVersion> versions;  // ascending
  std::map<std::string, int64_t> labels;   // label -> version ("latest" included)
};

}  // namespace

int BackupCommand(DeltaserveClient& client, const BackupContext& ctx, const std::vector<std::string>& args) {
  std::string out = absl::GetFlag(FLAGS_out);
  if (!args.empty() || out.empty()) {
    std::cerr << "deltactl: backup --out=DIR [--tenant=T | --tenants=A,B | --tenants_file=F | --all_tenants] "
                 "[--overwrite]\n";
    return 2;
  }
  while (out.size() > 1 && out.back() == '/') out.pop_back();
  const bool overwrite = absl::GetFlag(FLAGS_overwrite);
  std::error_code ec;
  bool replace = false;
  if (fs::exists(out, ec)) {
    if (!fs::is_directory(out, ec)) {
      std::cerr << "deltactl: backup: " << out << " exists and is not a directory\n";
      return 2;
    }
    if (!fs::is_empty(out, ec)) {
      if (!overwrite) {
        std::cerr << "deltactl: backup: " << out
                  << " exists and is not empty: choose a new directory, or add --overwrite to replace it once the "
                     "new backup is complete\n";
        return 2;
      }
      replace = true;
    }
  }

  // The tenants: --tenant, --tenants, the tenants file's; none = the caller's own ("").
  std::set<std::string> tenants;
  if (!ctx.tenant.empty()) tenants.insert(ctx.tenant);
  for (const std::string& t : absl::GetFlag(FLAGS_tenants)) {
    if (!t.empty()) tenants.insert(t);
  }
  if (const std::string file = absl::GetFlag(FLAGS_tenants_file); !file.empty()) {
    absl::StatusOr<auth::TenantsFile> read = auth::ReadTenantsFile(file);
    if (!read.ok()) return Error(absl::StrCat("backup: tenants file ", file), read.status());
    for (const auto& [name, record] : read->tenants) tenants.insert(name);
  }
  const bool all_tenants = absl::GetFlag(FLAGS_all_tenants);
  if (all_tenants && !tenants.empty()) {
    std::cerr << "deltactl: backup: --all_tenants takes no --tenant, --tenants or --tenants_file\n";
    return 2;
  }
  const bool own_only = tenants.empty() && !all_tenants;
  if (tenants.empty()) tenants.insert("");  // the caller's own, or (--all_tenants) every tenant

  absl::StatusOr<pb::GetModelInfoResponse> info = client.GetModelInfo();
  if (!info.ok()) return Error("backup: GetModelInfo", info.status());

  // Every version of every tenant, by (tenant, task).
  std::map<std::pair<std::string, std::string>, TaskVersions> tasks;
  std::set<std::string> listed_tenants;
  for (const std::string& tenant : tenants) {
    pb::ListDeltasRequest request;
    request.set_tenant(tenant);
    request.set_all_tenants(all_tenants);
    request.set_page_size(1000);
    do {
      absl::StatusOr<pb::ListDeltasResponse> page = client.ListDeltas(request);
      if (!page.ok()) {
        return Error(all_tenants ? std::string("backup: listing every tenant")
                                 : absl::StrCat("backup: listing tenant \"", tenant.empty() ? "(own)" : tenant, "\""),
                     page.status());
      }
      for (const pb::DeltaVersion& v : page->versions()) {
        listed_tenants.insert(v.tenant());
        TaskVersions& tv = tasks[{v.tenant(), v.task()}];
        tv.versions.push_back(v);
        for (const std::string& label : v.labels()) tv.labels[label] = v.version();
      }
      request.set_page_token(page->next_page_token());
    } while (!request.page_token().empty());
  }
  if (own_only) {
    std::cerr << "deltactl: backup: the caller's own tenant"
              << (listed_tenants.empty() ? "" : absl::StrCat(" (", *listed_tenants.begin(), ")"))
              << " only; name others with --tenants=A,B, or take them all with --all_tenants (needs an admin "
                 "token, or a server without authentication)\n";
  }

  // Pull each distinct blob once into DIR.tmp/blobs.
  const std::string tmp = out + ".tmp";
  fs::remove_all(tmp, ec);  // a backup that died half-way
  if (!fs::create_directories(tmp + "/blobs", ec)) {
    return Error(absl::StrCat("backup: cannot create ", tmp, "/blobs: ", ec.message()));
  }
  // A backup that fails leaves no DIR.tmp behind.
  struct RemoveOnFailure {
    std::string path;
    bool done = false;
    ~RemoveOnFailure() {
      std::error_code ignored;
      if (!done) fs::remove_all(path, ignored);
    }
  } cleanup{tmp};
  std::set<std::string> pulled;  // digests written
  std::set<std::string> gone;    // "tenant/task@N" deleted between the listing and the pull
  int64_t bytes_total = 0;
  for (auto& [key, tv] : tasks) {
    for (const pb::DeltaVersion& v : tv.versions) {
      if (pulled.count(v.digest()) > 0) continue;
      const std::string name = absl::StrCat(v.tenant(), "/", v.task(), "@", v.version());
      std::string bytes;
      absl::StatusOr<pb::DeltaVersion> got = client.PullDelta(v.tenant(), name, &bytes);
      if (!got.ok() && got.status().code() == absl::StatusCode::kNotFound) {
        gone.insert(name);  // deleted since it was listed; another version may still have its pack
        continue;
      }
      if (!got.ok()) return Error(absl::StrCat("backup: pulling ", name), got.status());
      if (got->digest() != v.digest() || Sha256Digest(bytes) != v.digest()) {
        return Error(absl::StrCat("backup: pulling ", name, ": the bytes received hash to ", Sha256Digest(bytes),
                                  ", not ", v.digest(), "; nothing was written to ", out));
      }
      const std::string path = absl::StrCat(tmp, "/blobs/", BlobName(v.digest()));
      if (absl::Status s = WriteFileAtomically(path, bytes); !s.ok()) return Error("backup: writing", s);
      absl::StatusOr<std::string> written = FileSha256Digest(path);
      if (!written.ok()) return Error(absl::StrCat("backup: reading back ", path), written.status());
      if (*written != v.digest()) {
        return Error(absl::StrCat("backup: ", path, " hashes to ", *written, " after writing, not ", v.digest(),
                                  ": check the disk"));
      }
      pulled.insert(v.digest());
      bytes_total += static_cast<int64_t>(bytes.size());
    }
  }

  // The manifest: versions whose bytes were written, and the labels on them.
  nlohmann::json manifest_tenants = nlohmann::json::array();
  int64_t num_tasks = 0, num_versions = 0, num_labels = 0;
  nlohmann::json skipped = nlohmann::json::array();
  std::map<std::string, nlohmann::json> by_tenant;
  for (const auto& [key, tv] : tasks) {
    nlohmann::json versions = nlohmann::json::array();
    std::set<int64_t> kept;
    for (const pb::DeltaVersion& v : tv.versions) {
      const std::string name = absl::StrCat(key.first, "/", key.second, "@", v.version());
      if (pulled.count(v.digest()) == 0 || gone.count(name) > 0) {
        skipped.push_back(name);
        std::cerr << "deltactl: backup: " << name << " was deleted while the backup ran; left out\n";
        continue;
      }
      kept.insert(v.version());
      versions.push_back({{"version", v.version()},
                          {"digest", v.digest()},
                          {"size_bytes", v.size_bytes()},
                          {"created", Rfc3339(v.created_unix_micros())},
                          {"created_unix_micros", v.created_unix_micros()}});
    }
    if (versions.empty()) continue;
    nlohmann::json labels = nlohmann::json::object();
    for (const auto& [label, version] : tv.labels) {
      if (kept.count(version) == 0) continue;
      labels[label] = version;
      if (label != kLatest) ++num_labels;
    }
    ++num_tasks;
    num_versions += static_cast<int64_t>(versions.size());
    nlohmann::json& tenant = by_tenant[key.first];
    if (tenant.is_null()) tenant = {{"tenant", key.first}, {"tasks", nlohmann::json::array()}};
    tenant["tasks"].push_back({{"task", key.second}, {"versions", std::move(versions)}, {"labels", std::move(labels)}});
  }
  for (auto& [name, tenant] : by_tenant) manifest_tenants.push_back(std::move(tenant));
  const std::string created = absl::FormatTime(absl::RFC3339_sec, absl::Now(), absl::UTCTimeZone());
  const nlohmann::json manifest = {
      {"format", kFormat},
      {"format_version", kFormatVersion},
      {"created", created},
      {"server",
       {{"address", ctx.server},
        {"server_version", info->server_version()},
        {"model", info->model().name()},
        {"backbone_fingerprint", info->model().fingerprint()}}},
      {"tenants", manifest_tenants},
      {"blobs", pulled.size()},
      {"bytes", bytes_total}};
  if (absl::Status s = WriteFileAtomically(tmp + "/manifest.json", manifest.dump(2) + "\n"); !s.ok()) {
    return Error("backup: writing the manifest", s);
  }
  SyncDir(tmp + "/blobs");
  SyncDir(tmp);

  // DIR.tmp -> DIR; an old DIR (--overwrite) is moved aside first and removed once the new one is in place.
  const std::string old = out + ".old";
  if (replace) {
    fs::remove_all(old, ec);
    fs::rename(out, old, ec);
    if (ec) return Error(absl::StrCat("backup: cannot move ", out, " aside to ", old, ": ", ec.message()));
  } else if (fs::exists(out, ec)) {
    fs::remove(out, ec);  // empty
  }
  fs::rename(tmp, out, ec);
  if (ec) {
    const std::string message = ec.message();
    if (replace) fs::rename(old, out, ec);  // put the previous backup back
    return Error(absl::StrCat("backup: cannot rename ", tmp, " to ", out, ": ", message));
  }
  cleanup.done = true;
  SyncDir(fs::absolute(out).parent_path().string());
  if (replace) fs::remove_all(old, ec);

  ctx.print({{"backup", out},
             {"created", created},
             {"backbone_fingerprint", info->model().fingerprint()},
             {"tenants", manifest_tenants.size()},
             {"tasks", num_tasks},
             {"versions", num_versions},
             {"labels", num_labels},
             {"blobs", pulled.size()},
             {"bytes", bytes_total},
             {"skipped", skipped}});
  return 0;
}

namespace {

struct ManifestVersion {
  int64_t version = 0;
  std::string digest;
  int64_t size = 0;
};

struct ManifestTask {
  std::string tenant, task;
  std::vector<ManifestVersion> versions;  // ascending
  std::map<std::string, int64_t> labels;  // without "latest"
};

// Reads and checks DIR/manifest.json; an error names the file and what is wrong.
absl::StatusOr<std::vector<ManifestTask>> ReadManifest(const std::string& dir, nlohmann::json* manifest) {
  const std::string path = dir + "/manifest.json";
  absl::StatusOr<nlohmann::json> read = ReadJsonObject(path);
  if (!read.ok()) return read.status();
  *manifest = *read;
  auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", what, "; not a usable deltactl backup"));
  };
  const nlohmann::json& m = *read;
  if (!m.contains("format") || m["format"] != kFormat) return bad("\"format\" is not \"deltaserve-backup\"");
  if (!m.contains("format_version") || !m["format_version"].is_number_integer()) {
    return bad("no integer \"format_version\"");
  }
  if (m["format_version"].get<int64_t>() != kFormatVersion) {
    return bad(absl::StrCat("format_version ", m["format_version"].dump(), " is not ", kFormatVersion,
                            " (written by another deltactl version)"));
  }
  if (!m.contains("tenants") || !m["tenants"].is_array()) return bad("no \"tenants\" array");
  std::vector<ManifestTask> tasks;
  std::set<std::pair<std::string, std::string>> seen;
  for (const nlohmann::json& t : m["tenants"]) {
    if (!t.is_object() || !t.contains("tenant") || !t["tenant"].is_string() || !t.contains("tasks") ||
        !t["tasks"].is_array()) {
      return bad("a tenant entry without \"tenant\" and \"tasks\"");
    }
    const std::string tenant = t["tenant"];
    for (const nlohmann::json& k : t["tasks"]) {
      if (!k.is_object() || !k.contains("task") || !k["task"].is_string() || !k.contains("versions") ||
          !k["versions"].is_array()) {
        return bad(absl::StrCat("a task of tenant \"", tenant, "\" without \"task\" and \"versions\""));
      }
      ManifestTask task;
      task.tenant = tenant;
      task.task = k["task"];
      const std::string name = absl::StrCat(tenant, "/", task.task);
      if (!seen.insert({tenant, task.task}).second) return bad(absl::StrCat(name, " appears twice"));
      std::set<int64_t> numbers;
      for (const nlohmann::json& v : k["versions"]) {
        if (!v.is_object() || !v.contains("version") || !v["version"].is_number_integer() || !v.contains("digest") ||
            !v["digest"].is_string() || !v.contains("size_bytes") || !v["size_bytes"].is_number_integer()) {
          return bad(absl::StrCat(name, ": a version without integer \"version\", \"size_bytes\" and a \"digest\""));
        }
        ManifestVersion mv{v["version"].get<int64_t>(), v["digest"].get<std::string>(),
                           v["size_bytes"].get<int64_t>()};
        if (mv.version <= 0 || !numbers.insert(mv.version).second) {
          return bad(absl::StrCat(name, ": version ", mv.version, " is not positive or appears twice"));
        }
        if (!IsSha256Digest(mv.digest)) {
          return bad(absl::StrCat(name, "@", mv.version, ": \"", mv.digest, "\" is not sha256:<64 hex>"));
        }
        task.versions.push_back(std::move(mv));
      }
      std::sort(task.versions.begin(), task.versions.end(),
                [](const ManifestVersion& a, const ManifestVersion& b) { return a.version < b.version; });
      if (k.contains("labels")) {
        if (!k["labels"].is_object()) return bad(absl::StrCat(name, ": \"labels\" is not an object"));
        for (const auto& [label, version] : k["labels"].items()) {
          if (!version.is_number_integer() || numbers.count(version.get<int64_t>()) == 0) {
            return bad(absl::StrCat(name, ": label \"", label, "\" names no version of the task"));
          }
          if (label != kLatest) task.labels[label] = version.get<int64_t>();
        }
      }
      tasks.push_back(std::move(task));
    }
  }
  return tasks;
}

}  // namespace

int RestoreCommand(DeltaserveClient& client, const BackupContext& ctx, const std::vector<std::string>& args) {
  if (args.size() != 1) {
    std::cerr << "deltactl: restore DIR [--tenant=T] [--dry_run]\n";
    return 2;
  }
  std::string dir = args[0];
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  const bool dry_run = absl::GetFlag(FLAGS_dry_run);
  nlohmann::json manifest;
  absl::StatusOr<std::vector<ManifestTask>> read = ReadManifest(dir, &manifest);
  if (!read.ok()) return Error("restore: nothing was restored", read.status());
  std::vector<ManifestTask> tasks = *std::move(read);
  if (!ctx.tenant.empty()) {
    const size_t before = tasks.size();
    tasks.erase(std::remove_if(tasks.begin(), tasks.end(),
                               [&](const ManifestTask& t) { return t.tenant != ctx.tenant; }),
                tasks.end());
    if (before > 0 && tasks.empty()) {
      return Error(absl::StrCat("restore: ", dir, " holds no versions of tenant \"", ctx.tenant, "\""));
    }
  }

  // Every blob the restore needs, checked before anything is pushed.
  std::map<std::string, int64_t> blobs;  // digest -> size
  int64_t num_versions = 0, num_labels = 0;
  for (const ManifestTask& t : tasks) {
    for (const ManifestVersion& v : t.versions) blobs[v.digest] = v.size;
    num_versions += static_cast<int64_t>(t.versions.size());
    num_labels += static_cast<int64_t>(t.labels.size());
  }
  std::vector<std::string> damaged;
  int64_t bytes_total = 0;
  for (const auto& [digest, size] : blobs) {
    const std::string path = absl::StrCat(dir, "/blobs/", BlobName(digest));
    absl::StatusOr<std::string> actual = FileSha256Digest(path);
    if (!actual.ok()) {
      damaged.push_back(absl::StrCat(path, ": missing or unreadable"));
    } else if (*actual != digest) {
      damaged.push_back(absl::StrCat(path, ": its sha256 is ", *actual, ", not the manifest's ", digest));
    } else {
      std::error_code ec;
      const auto on_disk = static_cast<int64_t>(fs::file_size(path, ec));
      if (!ec && on_disk != size) {
        damaged.push_back(absl::StrCat(path, ": ", on_disk, " bytes, the manifest says ", size));
      }
      bytes_total += on_disk;
    }
  }
  if (!damaged.empty()) {
    for (const std::string& d : damaged) std::cerr << "deltactl: restore: " << d << "\n";
    return Error(absl::StrCat("restore: ", damaged.size(), " damaged blob file(s) in ", dir,
                              ": nothing was restored (use an intact copy of the backup)"));
  }
  std::set<std::string> tenant_names;
  for (const ManifestTask& t : tasks) tenant_names.insert(t.tenant);
  nlohmann::json summary = {{"backup", dir},
                            {"dry_run", dry_run},
                            {"tenants", tenant_names.size()},
                            {"tasks", tasks.size()},
                            {"versions", num_versions},
                            {"labels", num_labels},
                            {"blobs", blobs.size()},
                            {"bytes", bytes_total}};
  if (dry_run) {
    ctx.print(summary);
    return 0;
  }

  if (absl::StatusOr<pb::GetModelInfoResponse> info = client.GetModelInfo(); !info.ok()) {
    return Error("restore: GetModelInfo", info.status());
  } else if (manifest.contains("server") && manifest["server"].is_object() &&
             manifest["server"].value("backbone_fingerprint", "") != info->model().fingerprint()) {
    std::cerr << "deltactl: restore: the backup was taken on a server with backbone "
              << manifest["server"].value("backbone_fingerprint", "?") << "; this one serves "
              << info->model().fingerprint() << ": packs of the other backbone will be refused\n";
  }

  int64_t restored = 0, present = 0, labels_set = 0, labels_present = 0;
  nlohmann::json failures = nlohmann::json::array();
  nlohmann::json renumbered = nlohmann::json::object();
  auto fail = [&](const std::string& what, const std::string& digest, const absl::Status& status) {
    std::cerr << "deltactl: restore: " << what << ": " << absl::StatusCodeToString(status.code()) << ": "
              << status.message() << "\n";
    nlohmann::json f = {{"what", what}, {"code", absl::StatusCodeToString(status.code())},
                        {"message", std::string(status.message())}};
    if (!digest.empty()) f["digest"] = digest;
    failures.push_back(std::move(f));
  };
  for (const ManifestTask& t : tasks) {
    const std::string name = absl::StrCat(t.tenant, "/", t.task);
    std::map<int64_t, pb::DeltaVersion> mapped;  // old number -> the target's version
    for (const ManifestVersion& v : t.versions) {
      const std::string what = absl::StrCat(name, "@", v.version);
      absl::StatusOr<std::string> bytes = ReadFileToString(absl::StrCat(dir, "/blobs/", BlobName(v.digest)));
      if (!bytes.ok()) {
        fail(what, v.digest, bytes.status());
        continue;
      }
      pb::PushDeltaHeader header;
      header.set_tenant(t.tenant);
      header.set_task(t.task);
      absl::StatusOr<pb::PushDeltaResponse> pushed = client.PushDelta(header, *bytes);
      if (!pushed.ok()) {
        fail(what, v.digest, pushed.status());
        continue;
      }
      if (pushed->version().digest() != v.digest) {
        fail(what, v.digest,
             absl::DataLossError(absl::StrCat("the server stored it as version ", pushed->version().version(),
                                              " with digest ", pushed->version().digest(), ", not ", v.digest,
                                              ": the backup's blob is not in canonical form (not written by "
                                              "deltactl backup?); its labels are not moved")));
        continue;
      }
      (pushed->created() ? restored : present) += 1;
      mapped[v.version] = pushed->version();
    }
    nlohmann::json renumbering = nlohmann::json::object();
    for (const auto& [old_number, version] : mapped) {
      if (version.version() != old_number) renumbering[std::to_string(old_number)] = version.version();
    }
    if (!renumbering.empty()) {
      std::vector<std::string> pairs;
      for (const auto& [old_number, version] : mapped) {
        if (version.version() != old_number) pairs.push_back(absl::StrCat(old_number, " -> ", version.version()));
      }
      std::cerr << "deltactl: restore: " << name << ": versions renumbered by the store: " << absl::StrJoin(pairs, ", ")
                << " (digests unchanged)\n";
      renumbered[name] = std::move(renumbering);
    }
    for (const auto& [label, old_number] : t.labels) {
      const std::string what = absl::StrCat(name, ":", label);
      auto it = mapped.find(old_number);
      if (it == mapped.end()) {
        fail(what, "", absl::FailedPreconditionError(absl::StrCat("version ", old_number, " was not restored")));
        continue;
      }
      const auto& labels = it->second.labels();
      if (std::find(labels.begin(), labels.end(), label) != labels.end()) {
        ++labels_present;
        continue;
      }
      pb::SetLabelRequest request;
      request.set_tenant(t.tenant);
      request.set_task(t.task);
      request.set_label(label);
      request.set_version(it->second.version());
      absl::StatusOr<pb::SetLabelResponse> set = client.SetLabel(request);
      if (!set.ok()) {
        fail(what, "", set.status());
        continue;
      }
      ++labels_set;
    }
  }
  summary["restored"] = restored;
  summary["already_present"] = present;
  summary["labels_set"] = labels_set;
  summary["labels_present"] = labels_present;
  summary["failed"] = failures.size();
  summary["renumbered"] = std::move(renumbered);
  summary["failures"] = std::move(failures);
  if (present > 0 && restored == 0 && summary["failed"] == 0) {
    std::cerr << "deltactl: restore: all " << present << " versions already present\n";
  }
  ctx.print(summary);
  return summary["failed"] == 0 ? 0 : 1;
}

}  // namespace client
}  // namespace deltaserve
