// OciRegistryStore (oci_store.h): a DeltaStore over an OCI registry. The wire calls are in registry_client.cc;
// this file maps blobs, versions and labels onto repositories, tags and manifests.
#include "delta_store/oci_store.h"

#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/mutex.h"
#include "delta_store/registry_client.h"
#include "nlohmann/json.hpp"
#include "server/common/logging.h"
#include "server/common/sha256.h"
#include "server/common/status_macros.h"

namespace deltaserve {
namespace store {
namespace {

constexpr char kConfigMediaType[] = "application/vnd.deltaserve.pack.config.v1+json";
constexpr char kPackMediaType[] = "application/vnd.deltaserve.pack.v1";
// The config blob every manifest points at (the Distribution spec requires one).
constexpr char kConfigBlob[] = "{\"format\":\"deltaserve.pack.v1\"}";
constexpr char kCreatedKey[] = "org.opencontainers.image.created";
constexpr char kVersionKey[] = "io.deltaserve.version";
constexpr char kLabelKey[] = "io.deltaserve.label";
constexpr char kDeletedKey[] = "io.deltaserve.deleted";
constexpr char kNonceKey[] = "io.deltaserve.nonce";
constexpr char kBlobTagPrefix[] = "sha256-";

// One repository path component as the Distribution spec allows it: [a-z0-9]+ joined by ".", "_", "__" or "-"+.
bool IsRepoComponent(absl::string_view s) {
  size_t i = 0;
  auto alnum_run = [&] {
    size_t start = i;
    while (i < s.size() && (absl::ascii_islower(s[i]) || absl::ascii_isdigit(s[i]))) ++i;
    return i > start;
  };
  if (!alnum_run()) return false;
  while (i < s.size()) {
    if (s[i] == '.') {
      ++i;
    } else if (s[i] == '_') {
      i += (i + 1 < s.size() && s[i + 1] == '_') ? 2 : 1;
    } else if (s[i] == '-') {
      while (i < s.size() && s[i] == '-') ++i;
    } else {
      return false;
    }
    if (!alnum_run()) return false;
  }
  return true;
}

std::string TimeText(absl::Time t) { return absl::FormatTime(absl::RFC3339_full, t, absl::UTCTimeZone()); }

std::string Nonce() {
  static absl::Mutex mu(absl::kConstInit);
  static std::mt19937_64* rng ABSL_GUARDED_BY(mu) = nullptr;
  absl::MutexLock lock(&mu);
  if (rng == nullptr) rng = new std::mt19937_64(std::random_device{}());
  return absl::StrCat(absl::Hex((*rng)(), absl::kZeroPad16));
}

// What one of our manifests says. Tags "<N>" name versions, tags "<label>" labels, and in the blob repository
// tags "sha256-<hex>" blobs; a tombstone marks a deleted version, label or blob.
struct TagRecord {
  bool deleted = false;
  int64_t version = 0;      // versions and labels: the version named
  std::string label;        // labels: the label
  std::string blob_digest;  // the layer (not for tombstones)
  int64_t blob_size = 0;
  absl::Time created;  // version: added; label: set; blob: committed; tombstone: deleted
};

std::string EncodeManifest(const TagRecord& r) {
  nlohmann::json config = {
      {"mediaType", kConfigMediaType}, {"digest", Sha256Digest(kConfigBlob)}, {"size", sizeof(kConfigBlob) - 1}};
  nlohmann::json layers = nlohmann::json::array();
  if (!r.deleted) layers.push_back({{"mediaType", kPackMediaType}, {"digest", r.blob_digest}, {"size", r.blob_size}});
  // The nonce makes every manifest unique, so deleting one by digest never takes another tag with it.
  nlohmann::json annotations = {{kCreatedKey, TimeText(r.created)}, {kNonceKey, Nonce()}};
  if (r.version > 0) annotations[kVersionKey] = absl::StrCat(r.version);
  if (!r.label.empty()) annotations[kLabelKey] = r.label;
  if (r.deleted) annotations[kDeletedKey] = "true";
  nlohmann::json m = {
      {"schemaVersion", 2}, {"mediaType", kOciManifestMediaType}, {"artifactType", kPackMediaType}, {"config", config},
      {"layers", layers},   {"annotations", annotations}};
  return m.dump();
}

// NOT_FOUND-free: FAILED_PRECONDITION for a manifest this store did not write (a foreign tag in our repository).
absl::StatusOr<TagRecord> DecodeManifest(const std::string& body) {
  auto foreign = absl::FailedPreconditionError("not a deltaserve manifest");
  nlohmann::json m = nlohmann::json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (!m.is_object() || !m.contains("config") || !m["config"].is_object() || !m.contains("annotations") ||
      !m["annotations"].is_object() || m["config"].value("mediaType", "") != kConfigMediaType) {
    return foreign;
  }
  const nlohmann::json& a = m["annotations"];
  TagRecord r;
  std::string error;
  if (!absl::ParseTime(absl::RFC3339_full, a.value(kCreatedKey, ""), &r.created, &error)) return foreign;
  r.deleted = a.value(kDeletedKey, "") == "true";
  r.label = a.value(kLabelKey, "");
  if (a.contains(kVersionKey) && !absl::SimpleAtoi(a.value(kVersionKey, ""), &r.version)) return foreign;
  if (r.deleted) return r;
  if (!m.contains("layers") || !m["layers"].is_array() || m["layers"].size() != 1) return foreign;
  const nlohmann::json& layer = m["layers"][0];
  if (!layer.is_object() || !layer.contains("digest") || !layer["digest"].is_string() || !layer.contains("size") ||
      !layer["size"].is_number_integer()) {
    return foreign;
  }
  r.blob_digest = layer["digest"].get<std::string>();
  r.blob_size = layer["size"].get<int64_t>();
  if (!IsSha256Digest(r.blob_digest) || r.blob_size < 0) return foreign;
  return r;
}

bool IsVersionTag(absl::string_view tag, int64_t* version) {
  return !tag.empty() && std::all_of(tag.begin(), tag.end(), [](char c) { return absl::ascii_isdigit(c); }) &&
         absl::SimpleAtoi(tag, version) && *version > 0;
}

// An unlinked temporary file: it vanishes with its descriptor, whatever happens to the process.
class TempFile {
 public:
  static absl::StatusOr<std::unique_ptr<TempFile>> Create(const std::string& dir) {
    std::string path = absl::StrCat(dir, "/deltaserve-oci-XXXXXX");
    int fd = mkstemp(path.data());
    if (fd < 0) {
      return absl::UnavailableError(absl::StrCat("cannot create a temporary file in ", dir, ": ", strerror(errno),
                                                 "; set the store's temp_dir to a writable directory"));
    }
    unlink(path.c_str());
    return std::unique_ptr<TempFile>(new TempFile(fd));
  }
  ~TempFile() { close(fd_); }

  absl::Status Append(absl::string_view data) {
    while (!data.empty()) {
      ssize_t n = write(fd_, data.data(), data.size());
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return absl::UnavailableError(absl::StrCat("cannot write a temporary blob file: ", strerror(errno)));
      data.remove_prefix(n);
    }
    return absl::OkStatus();
  }
  // Reads exactly `n` bytes at `offset`.
  absl::Status ReadAt(int64_t offset, int64_t n, std::string* out) {
    out->resize(n);
    int64_t done = 0;
    while (done < n) {
      ssize_t r = pread(fd_, out->data() + done, n - done, offset + done);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) {
        return absl::DataLossError(absl::StrCat("cannot read back a temporary blob file: ",
                                                r < 0 ? strerror(errno) : "it is shorter than written"));
      }
      done += r;
    }
    return absl::OkStatus();
  }
  ssize_t PRead(char* buffer, size_t n, int64_t offset) { return pread(fd_, buffer, n, offset); }

 private:
  explicit TempFile(int fd) : fd_(fd) {}
  const int fd_;
};

// A blob downloaded to a temporary file; the digest was checked while downloading.
class OciBlobReader : public BlobReader {
 public:
  OciBlobReader(std::unique_ptr<TempFile> file, int64_t size, std::string digest, bool intact)
      : file_(std::move(file)), size_(size), digest_(std::move(digest)), intact_(intact) {}
  int64_t size() const override { return size_; }
  absl::StatusOr<size_t> Read(char* buffer, size_t n) override {
    n = static_cast<size_t>(std::min<int64_t>(n, size_ - offset_));
    if (!intact_ && offset_ + static_cast<int64_t>(n) == size_) {
      return absl::DataLossError(absl::StrCat(
          "blob ", digest_,
          " from the OCI registry does not hash to its digest (corrupt in the registry's storage); it is not served"));
    }
    size_t done = 0;
    while (done < n) {
      ssize_t r = file_->PRead(buffer + done, n - done, offset_ + done);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) return absl::DataLossError(absl::StrCat("cannot read the downloaded copy of blob ", digest_));
      done += r;
    }
    offset_ += n;
    return n;
  }

 private:
  std::unique_ptr<TempFile> file_;
  const int64_t size_;
  const std::string digest_;
  const bool intact_;
  int64_t offset_ = 0;
};

class OciRegistryStore;

// Buffers the blob in a temporary file while hashing it; Commit checks the digest, then uploads.
class OciBlobWriter : public BlobWriter {
 public:
  OciBlobWriter(OciRegistryStore* store, std::unique_ptr<TempFile> file, std::string expected, int64_t max_bytes)
      : store_(store), file_(std::move(file)), expected_(std::move(expected)), max_bytes_(max_bytes) {}
  absl::Status Append(absl::string_view data) override;
  absl::StatusOr<BlobInfo> Commit() override;

 private:
  OciRegistryStore* const store_;
  std::unique_ptr<TempFile> file_;
  const std::string expected_;
  const int64_t max_bytes_;
  Sha256Hasher hasher_;
  int64_t size_ = 0;
  bool committed_ = false;
  bool failed_ = false;  // an Append failed: the bytes are incomplete
};

class OciRegistryStore : public DeltaStore {
 public:
  OciRegistryStore(const OciRegistryStoreOptions& options, std::unique_ptr<RegistryClient> client)
      : options_(options), client_(std::move(client)), blob_repo_(absl::StrCat(options.repository_prefix, "/blobs")) {}

  absl::StatusOr<std::unique_ptr<BlobWriter>> NewBlobWriter(const std::string& expected_digest) override {
    if (!expected_digest.empty()) DS_RETURN_IF_ERROR(CheckDigest(expected_digest));
    DS_ASSIGN_OR_RETURN(std::unique_ptr<TempFile> file, TempFile::Create(temp_dir()));
    return std::unique_ptr<BlobWriter>(
        new OciBlobWriter(this, std::move(file), expected_digest, options_.max_blob_bytes));
  }

  absl::StatusOr<std::unique_ptr<BlobReader>> OpenBlob(const std::string& digest) override {
    DS_ASSIGN_OR_RETURN(BlobEntry entry, LookupBlob(digest));
    bool intact = false;
    DS_ASSIGN_OR_RETURN(std::unique_ptr<TempFile> file, Download(blob_repo_, digest, entry.info.size, &intact));
    return std::unique_ptr<BlobReader>(new OciBlobReader(std::move(file), entry.info.size, digest, intact));
  }

  absl::StatusOr<BlobInfo> StatBlob(const std::string& digest) override {
    DS_ASSIGN_OR_RETURN(BlobEntry entry, LookupBlob(digest));
    return entry.info;
  }

  absl::StatusOr<std::vector<BlobInfo>> ListBlobs() override {
    DS_ASSIGN_OR_RETURN(std::vector<BlobEntry> entries, ListBlobEntries());
    std::vector<BlobInfo> blobs;
    for (BlobEntry& e : entries) blobs.push_back(std::move(e.info));
    return blobs;
  }

  absl::Status DeleteBlob(const std::string& digest) override {
    absl::MutexLock lock(&mu_);
    DS_ASSIGN_OR_RETURN(BlobEntry entry, LookupBlob(digest));
    RefTable view;
    DS_RETURN_IF_ERROR(LoadAll(&view));
    absl::StatusOr<VersionInfo> user = view.Resolve(Ref{"", "", 0, "", digest});
    if (user.ok()) {
      return absl::FailedPreconditionError(absl::StrCat("blob ", digest, " is still referenced by ", user->tenant, "/",
                                                        user->task, "@", user->version,
                                                        "; delete the versions that use it first"));
    }
    return RemoveBlob(entry);
  }

  absl::StatusOr<VersionInfo> AddVersion(const std::string& tenant, const std::string& task,
                                         const std::string& digest) override {
    DS_RETURN_IF_ERROR(CheckName("tenant", tenant));
    DS_RETURN_IF_ERROR(CheckName("task", task));
    for (const auto& [what, name] : {std::make_pair("tenant", tenant), std::make_pair("task", task)}) {
      if (!IsRepoComponent(name)) {
        return absl::InvalidArgumentError(
            absl::StrCat(what, " \"", name,
                         "\" cannot be part of a registry repository name: '.', '_' and '-' must stand between letters "
                         "or digits (the OCI distribution spec); rename it"));
      }
    }
    DS_RETURN_IF_ERROR(CheckDigest(digest));
    absl::MutexLock lock(&mu_);
    absl::StatusOr<BlobEntry> blob = LookupBlob(digest);
    if (absl::IsNotFound(blob.status())) {
      return absl::NotFoundError(
          absl::StrCat("blob ", digest, " is not in the store: push the pack's bytes before adding it as a version of ",
                       tenant, "/", task));
    }
    DS_RETURN_IF_ERROR(blob.status());
    const std::string repo = TaskRepo(tenant, task);

    for (int attempt = 0; attempt < std::max(1, options_.add_version_attempts); ++attempt) {
      // Quotas count the tenant's every task; without one, the task alone decides. The quota is asked once (its
      // lookup may answer differently on a second call), so what is loaded and what is checked agree.
      RefTable view;
      QuotaOptions quota;
      quota.default_quota = options_.quotas.For(tenant);
      if (quota.default_quota.max_bytes > 0 || quota.default_quota.max_versions > 0) {
        DS_RETURN_IF_ERROR(LoadTenant(tenant, &view));
      } else {
        DS_RETURN_IF_ERROR(LoadTask(tenant, task, &view, nullptr));
      }
      VersionInfo existing;
      DS_ASSIGN_OR_RETURN(std::optional<RefOp> op, view.PlanAddVersion(tenant, task, digest, blob->info.size,
                                                                       absl::Now(), quota, &existing));
      if (!op.has_value()) return existing;
      DS_RETURN_IF_ERROR(EnsureBlobIn(repo, digest, blob->info.size));
      const std::string tag = absl::StrCat(op->version);

      // No compare-and-swap in a registry: check the number is free, put, and read back who won.
      absl::StatusOr<RegistryClient::Manifest> taken = client_->GetManifest(repo, tag);
      if (taken.ok()) continue;  // another replica just added it: plan again
      if (!absl::IsNotFound(taken.status())) return taken.status();
      TagRecord record;
      record.version = op->version;
      record.blob_digest = digest;
      record.blob_size = blob->info.size;
      record.created = op->time;
      DS_ASSIGN_OR_RETURN(std::string mine, client_->PutManifest(repo, tag, EncodeManifest(record)));
      DS_ASSIGN_OR_RETURN(RegistryClient::Manifest winner, client_->GetManifest(repo, tag));
      if (winner.digest != mine) {
        client_->DeleteManifest(repo, mine).IgnoreError();  // ours is untagged now
        DS_LOG(WARNING) << "another replica added " << tenant << "/" << task << "@" << tag
                        << " at the same time; retrying with the next number";
        continue;
      }
      DS_RETURN_IF_ERROR(view.Apply(*op));
      UpdateLatest(tenant, task, view);
      return view.Resolve(Ref{tenant, task, op->version, "", ""});
    }
    return absl::AbortedError(absl::StrCat("could not add a version of ", tenant, "/", task, " after ",
                                           options_.add_version_attempts,
                                           " attempts: other replicas kept taking the next number; retry"));
  }

  absl::StatusOr<VersionInfo> Resolve(const Ref& ref) override {
    // Validation first, from an empty table (anything but NOT_FOUND is a problem with the ref itself).
    RefTable view;
    absl::StatusOr<VersionInfo> checked = view.Resolve(ref);
    if (!absl::IsNotFound(checked.status())) return checked;
    if (ref.tenant.empty()) {  // a blob by content
      DS_ASSIGN_OR_RETURN(BlobEntry entry, LookupBlob(ref.digest));
      VersionInfo info;
      info.digest = entry.info.digest;
      info.size = entry.info.size;
      info.created = entry.info.created;
      return info;
    }
    if (ref.task.empty()) {
      DS_RETURN_IF_ERROR(LoadTenant(ref.tenant, &view));
    } else {
      DS_RETURN_IF_ERROR(LoadTask(ref.tenant, ref.task, &view, nullptr));
    }
    return view.Resolve(ref);
  }

  absl::Status SetLabel(const std::string& tenant, const std::string& task, const std::string& label,
                        int64_t version) override {
    DS_RETURN_IF_ERROR(Precheck(RefTable().PlanSetLabel(tenant, task, label, version, absl::Now()).status()));
    absl::MutexLock lock(&mu_);
    RefTable view;
    TaskTags tags;
    DS_RETURN_IF_ERROR(LoadTask(tenant, task, &view, &tags));
    DS_RETURN_IF_ERROR(view.PlanSetLabel(tenant, task, label, version, absl::Now()).status());
    DS_ASSIGN_OR_RETURN(VersionInfo target, view.Resolve(Ref{tenant, task, version, "", ""}));
    return PutLabel(tenant, task, label, target, tags);
  }

  absl::Status DeleteLabel(const std::string& tenant, const std::string& task, const std::string& label) override {
    DS_RETURN_IF_ERROR(Precheck(RefTable().PlanDeleteLabel(tenant, task, label, absl::Now()).status()));
    absl::MutexLock lock(&mu_);
    RefTable view;
    TaskTags tags;
    DS_RETURN_IF_ERROR(LoadTask(tenant, task, &view, &tags));
    DS_RETURN_IF_ERROR(view.PlanDeleteLabel(tenant, task, label, absl::Now()).status());
    return PutTombstone(tenant, task, label, tags);
  }

  absl::Status DeleteVersion(const std::string& tenant, const std::string& task, int64_t version) override {
    DS_RETURN_IF_ERROR(Precheck(RefTable().PlanDeleteVersion(tenant, task, version, absl::Now()).status()));
    absl::MutexLock lock(&mu_);
    RefTable view;
    TaskTags tags;
    DS_RETURN_IF_ERROR(LoadTask(tenant, task, &view, &tags));
    DS_ASSIGN_OR_RETURN(RefOp op, view.PlanDeleteVersion(tenant, task, version, absl::Now()));
    DS_RETURN_IF_ERROR(PutTombstone(tenant, task, absl::StrCat(version), tags));
    DS_RETURN_IF_ERROR(view.Apply(op));
    UpdateLatest(tenant, task, view, &tags);
    return absl::OkStatus();
  }

  absl::StatusOr<ListPage> List(const ListOptions& options) override {
    RefTable view;
    DS_RETURN_IF_ERROR(view.List(options).status());  // validates the options and the token
    if (!options.task.empty()) {
      DS_RETURN_IF_ERROR(LoadTask(options.tenant, options.task, &view, nullptr));
    } else if (!options.tenant.empty()) {
      DS_RETURN_IF_ERROR(LoadTenant(options.tenant, &view));
    } else {
      DS_RETURN_IF_ERROR(LoadAll(&view));
    }
    return view.List(options);
  }

  absl::StatusOr<TenantUsage> Usage(const std::string& tenant) override {
    DS_RETURN_IF_ERROR(CheckName("tenant", tenant));
    RefTable view;
    DS_RETURN_IF_ERROR(LoadTenant(tenant, &view));
    return view.Usage(tenant);
  }

  absl::StatusOr<GcReport> CollectGarbage(const GcOptions& options) override {
    absl::MutexLock lock(&mu_);
    const absl::Time now = options.now == absl::InfiniteFuture() ? absl::Now() : options.now;
    RefTable view;
    DS_RETURN_IF_ERROR(LoadAll(&view));
    const std::set<std::string> referenced = view.ReferencedDigests();
    DS_ASSIGN_OR_RETURN(std::vector<BlobEntry> blobs, ListBlobEntries());
    GcReport report;
    for (const BlobEntry& blob : blobs) {
      if (referenced.count(blob.info.digest) > 0 || blob.info.created + options.grace > now) continue;
      DS_RETURN_IF_ERROR(RemoveBlob(blob));
      ++report.blobs_removed;
      report.bytes_removed += blob.info.size;
    }
    return report;
  }

  // For OciBlobWriter::Commit: makes the verified bytes in `file` visible as blob `digest`.
  absl::StatusOr<BlobInfo> CommitBlob(const std::string& digest, int64_t size, TempFile& file) {
    KeyLock upload(this, BlobTag(digest));
    absl::StatusOr<BlobEntry> existing = LookupBlob(digest);
    if (existing.ok()) return existing->info;
    if (!absl::IsNotFound(existing.status())) return existing.status();
    absl::StatusOr<int64_t> stored = client_->HeadBlob(blob_repo_, digest);
    if (absl::IsNotFound(stored.status())) {
      DS_RETURN_IF_ERROR(client_->UploadBlob(
          blob_repo_, digest, size,
          [&file](int64_t offset, int64_t n, std::string* out) { return file.ReadAt(offset, n, out); }));
    } else {
      DS_RETURN_IF_ERROR(stored.status());
    }
    DS_RETURN_IF_ERROR(EnsureConfig(blob_repo_));
    TagRecord record;
    record.blob_digest = digest;
    record.blob_size = size;
    record.created = absl::Now();
    DS_RETURN_IF_ERROR(client_->PutManifest(blob_repo_, BlobTag(digest), EncodeManifest(record)).status());
    return BlobInfo{digest, size, record.created};
  }

 private:
  // Holds a key (a blob or a repository) for one upload at a time in this process: concurrent uploads of the same
  // blob make the registry rewrite its link file while another request reads it ("blob unknown").
  class KeyLock {
   public:
    KeyLock(OciRegistryStore* store, std::string key) : store_(store), key_(std::move(key)) {
      absl::MutexLock lock(&store_->uploads_mu_);
      store_->uploads_mu_.Await(absl::Condition(this, &KeyLock::Free));
      store_->uploads_.insert(key_);
    }
    ~KeyLock() {
      absl::MutexLock lock(&store_->uploads_mu_);
      store_->uploads_.erase(key_);
    }

   private:
    bool Free() const { return store_->uploads_.count(key_) == 0; }
    OciRegistryStore* const store_;
    const std::string key_;
  };

  // A visible blob and the manifest of its index tag.
  struct BlobEntry {
    BlobInfo info;
    std::string manifest;
  };
  // The tags of one task repository, as read: tag -> (manifest digest, record).
  struct TaskTags {
    std::map<std::string, std::pair<std::string, TagRecord>> tags;
  };

  std::string temp_dir() const {
    if (!options_.temp_dir.empty()) return options_.temp_dir;
    const char* env = getenv("TMPDIR");
    return env != nullptr && env[0] != '\0' ? env : "/tmp";
  }
  std::string TaskRepo(const std::string& tenant, const std::string& task) const {
    return absl::StrCat(options_.repository_prefix, "/", tenant, "/", task);
  }
  static std::string BlobTag(const std::string& digest) {
    return absl::StrCat(kBlobTagPrefix, absl::StripPrefix(digest, "sha256:"));
  }
  static absl::Status CheckDigest(const std::string& digest) {
    if (IsSha256Digest(digest)) return absl::OkStatus();
    return absl::InvalidArgumentError(
        absl::StrCat("digest \"", digest.substr(0, 80), "\" is malformed: write sha256: and 64 lowercase hex digits"));
  }
  // A plan against an empty table fails with NOT_FOUND (nothing exists) unless the arguments themselves are
  // wrong: those errors are returned before asking the registry anything.
  static absl::Status Precheck(const absl::Status& planned_on_empty) {
    return absl::IsNotFound(planned_on_empty) ? absl::OkStatus() : planned_on_empty;
  }

  // --- Blobs ---

  absl::StatusOr<BlobEntry> LookupBlob(const std::string& digest) {
    DS_RETURN_IF_ERROR(CheckDigest(digest));
    absl::StatusOr<RegistryClient::Manifest> m = client_->GetManifest(blob_repo_, BlobTag(digest));
    absl::StatusOr<TagRecord> record = m.ok() ? DecodeManifest(m->body) : m.status();
    if (absl::IsNotFound(record.status()) || (record.ok() && (record->deleted || record->blob_digest != digest))) {
      return absl::NotFoundError(absl::StrCat("blob ", digest, " is not in the store (registry ", client_->url(),
                                              ", repository ", blob_repo_, ")"));
    }
    if (!record.ok()) {
      return absl::Status(record.status().code(),
                          absl::StrCat("reading blob ", digest, "'s index tag: ", record.status().message()));
    }
    return BlobEntry{BlobInfo{digest, record->blob_size, record->created}, m->digest};
  }

  absl::StatusOr<std::vector<BlobEntry>> ListBlobEntries() {
    DS_ASSIGN_OR_RETURN(std::vector<std::string> tags, client_->ListTags(blob_repo_));
    std::vector<BlobEntry> blobs;
    for (const std::string& tag : tags) {
      if (!absl::StartsWith(tag, kBlobTagPrefix)) continue;
      const std::string digest = absl::StrCat("sha256:", tag.substr(strlen(kBlobTagPrefix)));
      if (!IsSha256Digest(digest)) continue;
      absl::StatusOr<BlobEntry> entry = LookupBlob(digest);
      if (absl::IsNotFound(entry.status())) continue;  // deleted (a tombstone) or just removed
      DS_RETURN_IF_ERROR(entry.status());
      blobs.push_back(*std::move(entry));
    }
    std::sort(blobs.begin(), blobs.end(),
              [](const BlobEntry& a, const BlobEntry& b) { return a.info.digest < b.info.digest; });
    return blobs;
  }

  // Hides a blob (a tombstone on its index tag), then tidies up what the registry allows.
  absl::Status RemoveBlob(const BlobEntry& blob) {
    TagRecord tombstone;
    tombstone.deleted = true;
    tombstone.created = absl::Now();
    DS_RETURN_IF_ERROR(client_->PutManifest(blob_repo_, BlobTag(blob.info.digest), EncodeManifest(tombstone)).status());
    client_->DeleteManifest(blob_repo_, blob.manifest).IgnoreError();
    client_->DeleteBlob(blob_repo_, blob.info.digest).IgnoreError();
    return absl::OkStatus();
  }

  // Downloads blob `digest` of `repo` (`size` bytes) to a temporary file, hashing it; *intact says whether the
  // bytes match the digest.
  absl::StatusOr<std::unique_ptr<TempFile>> Download(const std::string& repo, const std::string& digest, int64_t size,
                                                     bool* intact) {
    if (size > options_.max_blob_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat("blob ", digest, " is ", size,
                                                       " bytes, more than this store's max_blob_bytes (",
                                                       options_.max_blob_bytes, ")"));
    }
    DS_ASSIGN_OR_RETURN(std::unique_ptr<TempFile> file, TempFile::Create(temp_dir()));
    Sha256Hasher hasher;
    int64_t received = 0;
    DS_RETURN_IF_ERROR(client_->GetBlob(repo, digest, [&](absl::string_view data) -> absl::Status {
      received += data.size();
      if (received > size) {
        return absl::DataLossError(absl::StrCat("the OCI registry sent more than the ", size, " bytes of blob ", digest,
                                                "; its storage may be corrupt"));
      }
      hasher.Update(data);
      return file->Append(data);
    }));
    if (received != size) {
      return absl::DataLossError(absl::StrCat("the OCI registry sent ", received, " of the ", size, " bytes of blob ",
                                              digest, "; its storage may be corrupt"));
    }
    *intact = hasher.Finish() == digest;
    return file;
  }

  // Makes the config blob available in `repo`.
  absl::Status EnsureConfig(const std::string& repo) {
    KeyLock upload(this, absl::StrCat(repo, " config"));
    {
      absl::MutexLock lock(&config_mu_);
      if (config_repos_.count(repo) > 0) return absl::OkStatus();
    }
    const std::string digest = Sha256Digest(kConfigBlob);
    absl::StatusOr<int64_t> size = client_->HeadBlob(repo, digest);
    if (absl::IsNotFound(size.status())) {
      DS_RETURN_IF_ERROR(client_->UploadBlob(repo, digest, kConfigBlob));
    } else {
      DS_RETURN_IF_ERROR(size.status());
    }
    absl::MutexLock lock(&config_mu_);
    config_repos_.insert(repo);
    return absl::OkStatus();
  }

  // Makes the config and the pack blob `digest` available in task repository `repo`: a cross-repository mount
  // from the blob repository, or a copy when the registry declines to mount.
  absl::Status EnsureBlobIn(const std::string& repo, const std::string& digest, int64_t size) {
    DS_RETURN_IF_ERROR(EnsureConfig(repo));
    absl::StatusOr<int64_t> present = client_->HeadBlob(repo, digest);
    if (present.ok() || !absl::IsNotFound(present.status())) return present.status();
    DS_ASSIGN_OR_RETURN(bool mounted, client_->MountBlob(repo, digest, blob_repo_));
    if (mounted) return absl::OkStatus();
    bool intact = false;
    DS_ASSIGN_OR_RETURN(std::unique_ptr<TempFile> file, Download(blob_repo_, digest, size, &intact));
    if (!intact) {
      return absl::DataLossError(
          absl::StrCat("blob ", digest, " in the OCI registry does not hash to its digest; push the pack again"));
    }
    return client_->UploadBlob(repo, digest, size, [&file](int64_t offset, int64_t n, std::string* out) {
      return file->ReadAt(offset, n, out);
    });
  }

  // --- References ---

  // Reads task tenant/task from its repository into `view` (and its tags into `tags` when not null). A task the
  // registry cannot name, or has never seen, is empty.
  absl::Status LoadTask(const std::string& tenant, const std::string& task, RefTable* view, TaskTags* tags) {
    if (!IsValidName(tenant) || !IsValidName(task) || !IsRepoComponent(tenant) || !IsRepoComponent(task)) {
      return absl::OkStatus();
    }
    const std::string repo = TaskRepo(tenant, task);
    DS_ASSIGN_OR_RETURN(std::vector<std::string> names, client_->ListTags(repo));
    std::map<int64_t, TagRecord> versions;
    std::vector<TagRecord> labels;
    int64_t highest = 0;
    for (const std::string& name : names) {
      int64_t number = 0;
      const bool is_version = IsVersionTag(name, &number);
      if (!is_version && !IsValidLabel(name)) continue;
      if (is_version) highest = std::max(highest, number);  // taken, whatever the tag holds
      absl::StatusOr<RegistryClient::Manifest> m = client_->GetManifest(repo, name);
      if (absl::IsNotFound(m.status())) continue;
      DS_RETURN_IF_ERROR(m.status());
      absl::StatusOr<TagRecord> record = DecodeManifest(m->body);
      if (!record.ok()) {
        DS_LOG(WARNING) << "ignoring tag " << repo << ":" << name << ": " << record.status().message();
        continue;
      }
      if (tags != nullptr) tags->tags[name] = {m->digest, *record};
      if (is_version) {
        if (!record->deleted) versions[number] = *record;
      } else if (!record->deleted && name != kLatestLabel) {
        record->label = name;
        labels.push_back(*record);
      }
    }
    RefOp op;
    op.tenant = tenant;
    op.task = task;
    for (const auto& [number, record] : versions) {
      op.kind = RefOp::Kind::kAddVersion;
      op.version = number;
      op.digest = record.blob_digest;
      op.size = record.blob_size;
      op.time = record.created;
      absl::Status applied = view->Apply(op);
      if (!applied.ok()) DS_LOG(WARNING) << "ignoring " << repo << ":" << number << ": " << applied.message();
    }
    if (highest > 0) {
      op.kind = RefOp::Kind::kReserveVersions;  // numbers of deleted versions stay taken
      op.version = highest + 1;
      op.digest.clear();
      DS_RETURN_IF_ERROR(view->Apply(op));
    }
    for (const TagRecord& record : labels) {
      op.kind = RefOp::Kind::kSetLabel;
      op.version = record.version;
      op.label = record.label;
      op.time = record.created;
      view->Apply(op).IgnoreError();  // a label left on a version another replica deleted: not set
    }
    return absl::OkStatus();
  }

  // Every (tenant, task) with a repository under the prefix (for one tenant when `tenant` is not empty).
  absl::StatusOr<std::vector<std::pair<std::string, std::string>>> Tasks(const std::string& tenant) {
    DS_ASSIGN_OR_RETURN(std::vector<std::string> repos, client_->Catalog());
    std::vector<std::pair<std::string, std::string>> tasks;
    for (const std::string& repo : repos) {
      absl::string_view rest = repo;
      if (!absl::ConsumePrefix(&rest, options_.repository_prefix) || !absl::ConsumePrefix(&rest, "/")) continue;
      std::vector<std::string> parts = absl::StrSplit(rest, '/');
      if (parts.size() != 2 || !IsValidName(parts[0]) || !IsValidName(parts[1])) continue;
      if (!tenant.empty() && parts[0] != tenant) continue;
      tasks.emplace_back(parts[0], parts[1]);
    }
    return tasks;
  }

  absl::Status LoadTenant(const std::string& tenant, RefTable* view) {
    if (!IsValidName(tenant) || !IsRepoComponent(tenant)) return absl::OkStatus();
    DS_ASSIGN_OR_RETURN(auto tasks, Tasks(tenant));
    for (const auto& [tenant_name, task] : tasks) DS_RETURN_IF_ERROR(LoadTask(tenant_name, task, view, nullptr));
    return absl::OkStatus();
  }

  absl::Status LoadAll(RefTable* view) {
    DS_ASSIGN_OR_RETURN(auto tasks, Tasks(""));
    for (const auto& [tenant, task] : tasks) DS_RETURN_IF_ERROR(LoadTask(tenant, task, view, nullptr));
    return absl::OkStatus();
  }

  // Points tag `label` of the task at version `target` (a manifest of its own), then deletes the manifest it
  // pointed at before (best effort: only tidies the registry).
  absl::Status PutLabel(const std::string& tenant, const std::string& task, const std::string& label,
                        const VersionInfo& target, const TaskTags& tags) {
    auto old = tags.tags.find(label);
    if (old != tags.tags.end() && !old->second.second.deleted && old->second.second.version == target.version) {
      return absl::OkStatus();  // already there
    }
    TagRecord record;
    record.version = target.version;
    record.label = label;
    record.blob_digest = target.digest;
    record.blob_size = target.size;
    record.created = absl::Now();
    const std::string repo = TaskRepo(tenant, task);
    DS_RETURN_IF_ERROR(client_->PutManifest(repo, label, EncodeManifest(record)).status());
    if (old != tags.tags.end()) client_->DeleteManifest(repo, old->second.first).IgnoreError();
    return absl::OkStatus();
  }

  // Re-points tag `tag` at a tombstone (a registry cannot delete a tag), then deletes the old manifest.
  absl::Status PutTombstone(const std::string& tenant, const std::string& task, const std::string& tag,
                            const TaskTags& tags) {
    auto old = tags.tags.find(tag);
    if (old != tags.tags.end() && old->second.second.deleted) return absl::OkStatus();
    TagRecord record;
    record.deleted = true;
    record.created = absl::Now();
    IsVersionTag(tag, &record.version);
    const std::string repo = TaskRepo(tenant, task);
    DS_RETURN_IF_ERROR(client_->PutManifest(repo, tag, EncodeManifest(record)).status());
    if (old != tags.tags.end()) client_->DeleteManifest(repo, old->second.first).IgnoreError();
    return absl::OkStatus();
  }

  // Keeps the registry's "latest" tag on the task's highest version, for tools that pull by tag (this store
  // derives "latest" from the version tags itself, so a failure here is only logged).
  void UpdateLatest(const std::string& tenant, const std::string& task, const RefTable& view,
                    const TaskTags* known = nullptr) {
    TaskTags tags;
    if (known != nullptr) {
      tags = *known;
    } else {
      absl::StatusOr<RegistryClient::Manifest> m = client_->GetManifest(TaskRepo(tenant, task), kLatestLabel);
      absl::StatusOr<TagRecord> record = m.ok() ? DecodeManifest(m->body) : m.status();
      if (record.ok()) tags.tags[kLatestLabel] = {m->digest, *record};
    }
    absl::StatusOr<VersionInfo> latest = view.Resolve(Ref{tenant, task, 0, "", ""});
    absl::Status status = latest.ok() ? PutLabel(tenant, task, kLatestLabel, *latest, tags)
                                      : PutTombstone(tenant, task, kLatestLabel, tags);
    if (!status.ok()) DS_LOG(WARNING) << "could not move tag latest of " << tenant << "/" << task << ": " << status;
  }

  const OciRegistryStoreOptions options_;
  const std::unique_ptr<RegistryClient> client_;
  const std::string blob_repo_;
  // Serializes this process's mutations (another replica's are not: see the header).
  absl::Mutex mu_;
  absl::Mutex config_mu_;
  std::set<std::string> config_repos_ ABSL_GUARDED_BY(config_mu_);  // repositories known to hold the config blob
  absl::Mutex uploads_mu_;
  std::set<std::string> uploads_ ABSL_GUARDED_BY(uploads_mu_);  // keys held by a KeyLock
};

absl::Status OciBlobWriter::Append(absl::string_view data) {
  if (committed_) return absl::FailedPreconditionError("the blob writer was already committed; start a new one");
  if (size_ + static_cast<int64_t>(data.size()) > max_bytes_) {
    failed_ = true;
    return absl::ResourceExhaustedError(absl::StrCat("the blob exceeds this store's max_blob_bytes (", max_bytes_,
                                                     " bytes); raise the limit or push a smaller pack"));
  }
  absl::Status appended = file_->Append(data);
  failed_ = !appended.ok();
  DS_RETURN_IF_ERROR(appended);
  hasher_.Update(data);
  size_ += data.size();
  return absl::OkStatus();
}

absl::StatusOr<BlobInfo> OciBlobWriter::Commit() {
  if (committed_) return absl::FailedPreconditionError("the blob writer was already committed; start a new one");
  committed_ = true;
  if (failed_) return absl::FailedPreconditionError("an earlier Append failed; the upload is incomplete");
  const std::string digest = hasher_.Finish();
  if (!expected_.empty() && digest != expected_) {
    return absl::DataLossError(absl::StrCat("the blob's bytes hash to ", digest, ", not to the expected ", expected_,
                                            "; nothing was stored (the upload was corrupted or the digest is wrong)"));
  }
  return store_->CommitBlob(digest, size_, *file_);
}

}  // namespace

absl::StatusOr<std::unique_ptr<DeltaStore>> OpenOciRegistryStore(const OciRegistryStoreOptions& options) {
  if (options.repository_prefix.empty() || options.repository_prefix.size() > 100) {
    return absl::InvalidArgumentError("the OCI store's repository prefix must be 1-100 characters, e.g. deltaserve");
  }
  for (absl::string_view part : absl::StrSplit(options.repository_prefix, '/')) {
    if (!IsRepoComponent(part)) {
      return absl::InvalidArgumentError(absl::StrCat("the OCI store's repository prefix \"", options.repository_prefix,
                                                     "\" is not a repository path: use components of lowercase letters "
                                                     "and digits joined by '.', '_' or '-', separated by '/'"));
    }
  }
  if (options.max_blob_bytes <= 0) return absl::InvalidArgumentError("max_blob_bytes must be positive");
  RegistryClientOptions client_options;
  client_options.url = options.url;
  client_options.bearer_token = options.bearer_token;
  client_options.username = options.username;
  client_options.password = options.password;
  client_options.connect_timeout = options.connect_timeout;
  client_options.request_timeout = options.request_timeout;
  client_options.chunk_size = options.chunk_size;
  DS_ASSIGN_OR_RETURN(std::unique_ptr<RegistryClient> client, RegistryClient::Create(client_options));
  if (options.check_on_open) DS_RETURN_IF_ERROR(client->Ping());
  return std::unique_ptr<DeltaStore>(new OciRegistryStore(options, std::move(client)));
}

}  // namespace store
}  // namespace deltaserve
