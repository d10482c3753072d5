// MemoryStore (memory_store.h): blobs as shared strings, references in a RefTable, all under one mutex.
#include "delta_store/memory_store.h"

#include <algorithm>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "server/common/sha256.h"
#include "server/common/status_macros.h"

namespace deltaserve {
namespace store {
namespace {

absl::Status CheckDigest(const std::string& digest) {
  if (IsSha256Digest(digest)) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("digest \"", digest.substr(0, 80),
                                                 "\" is malformed: write sha256: and 64 lowercase hex digits"));
}

absl::Status BlobNotFound(const std::string& digest) {
  return absl::NotFoundError(absl::StrCat("no blob ", digest, " in the store; push it first"));
}

struct Blob {
  std::shared_ptr<const std::string> data;  // shared with open readers
  absl::Time created;
};

class MemoryStore;

class MemoryBlobWriter : public BlobWriter {
 public:
  MemoryBlobWriter(MemoryStore* store, std::string expected_digest, int64_t max_bytes)
      : store_(store), expected_digest_(std::move(expected_digest)), max_bytes_(max_bytes) {}
  absl::Status Append(absl::string_view data) override;
  absl::StatusOr<BlobInfo> Commit() override;

 private:
  MemoryStore* const store_;
  const std::string expected_digest_;
  const int64_t max_bytes_;
  Sha256Hasher hasher_;
  std::string data_;
  bool committed_ = false;
  bool failed_ = false;  // an Append failed: the bytes are incomplete
};

class MemoryBlobReader : public BlobReader {
 public:
  explicit MemoryBlobReader(std::shared_ptr<const std::string> data) : data_(std::move(data)) {}
  int64_t size() const override { return static_cast<int64_t>(data_->size()); }
  absl::StatusOr<size_t> Read(char* buffer, size_t n) override {
    size_t count = std::min(n, data_->size() - offset_);
    data_->copy(buffer, count, offset_);
    offset_ += count;
    return count;
  }

 private:
  const std::shared_ptr<const std::string> data_;
  size_t offset_ = 0;
};

class MemoryStore : public DeltaStore {
 public:
  explicit MemoryStore(const MemoryStoreOptions& options) : options_(options) {}

  absl::StatusOr<std::unique_ptr<BlobWriter>> NewBlobWriter(const std::string& expected_digest) override {
    if (!expected_digest.empty()) DS_RETURN_IF_ERROR(CheckDigest(expected_digest));
    return std::unique_ptr<BlobWriter>(new MemoryBlobWriter(this, expected_digest, options_.max_blob_bytes));
  }

  // Makes `data` (hashing to `digest`) visible, or returns the blob already stored with that digest.
  BlobInfo Insert(const std::string& digest, std::string data) {
    absl::MutexLock lock(&mu_);
    auto [it, inserted] = blobs_.try_emplace(digest);
    if (inserted) it->second = Blob{std::make_shared<const std::string>(std::move(data)), absl::Now()};
    return Info(digest, it->second);
  }

  absl::StatusOr<std::unique_ptr<BlobReader>> OpenBlob(const std::string& digest) override {
    DS_RETURN_IF_ERROR(CheckDigest(digest));
    absl::MutexLock lock(&mu_);
    auto it = blobs_.find(digest);
    if (it == blobs_.end()) return BlobNotFound(digest);
    return std::unique_ptr<BlobReader>(new MemoryBlobReader(it->second.data));
  }

  absl::StatusOr<BlobInfo> StatBlob(const std::string& digest) override {
    DS_RETURN_IF_ERROR(CheckDigest(digest));
    absl::MutexLock lock(&mu_);
    auto it = blobs_.find(digest);
    if (it == blobs_.end()) return BlobNotFound(digest);
    return Info(digest, it->second);
  }

  absl::StatusOr<std::vector<BlobInfo>> ListBlobs() override {
    absl::MutexLock lock(&mu_);
    std::vector<BlobInfo> blobs;
    for (const auto& [digest, blob] : blobs_) blobs.push_back(Info(digest, blob));
    return blobs;
  }

  absl::Status DeleteBlob(const std::string& digest) override {
    DS_RETURN_IF_ERROR(CheckDigest(digest));
    absl::MutexLock lock(&mu_);
    if (blobs_.count(digest) == 0) return BlobNotFound(digest);
    DS_RETURN_IF_ERROR(CheckUnreferenced(digest));
    blobs_.erase(digest);
    return absl::OkStatus();
  }

  absl::StatusOr<VersionInfo> AddVersion(const std::string& tenant, const std::string& task,
                                         const std::string& digest) override {
    DS_RETURN_IF_ERROR(CheckName("tenant", tenant));
    DS_RETURN_IF_ERROR(CheckName("task", task));
    DS_RETURN_IF_ERROR(CheckDigest(digest));
    absl::MutexLock lock(&mu_);
    auto blob = blobs_.find(digest);
    if (blob == blobs_.end()) return BlobNotFound(digest);
    VersionInfo existing;
    DS_ASSIGN_OR_RETURN(std::optional<RefOp> op,
                        refs_.PlanAddVersion(tenant, task, digest, static_cast<int64_t>(blob->second.data->size()),
                                             absl::Now(), options_.quotas, &existing));
    if (!op.has_value()) return existing;
    DS_RETURN_IF_ERROR(refs_.Apply(*op));
    return refs_.Resolve(Ref{tenant, task, op->version, "", ""});
  }

  absl::StatusOr<VersionInfo> Resolve(const Ref& ref) override {
    absl::MutexLock lock(&mu_);
    if (!ref.tenant.empty() || !ref.task.empty() || ref.digest.empty()) return refs_.Resolve(ref);
    // A digest alone names a blob.
    DS_RETURN_IF_ERROR(CheckDigest(ref.digest));
    if (ref.version != 0 || !ref.label.empty()) {
      return absl::InvalidArgumentError("a reference names a version, a label or a digest, not several");
    }
    auto it = blobs_.find(ref.digest);
    if (it == blobs_.end()) return BlobNotFound(ref.digest);
    VersionInfo info;
    info.digest = ref.digest;
    info.size = static_cast<int64_t>(it->second.data->size());
    info.created = it->second.created;
    return info;
  }

  absl::Status SetLabel(const std::string& tenant, const std::string& task, const std::string& label,
                        int64_t version) override {
    absl::MutexLock lock(&mu_);
    DS_ASSIGN_OR_RETURN(RefOp op, refs_.PlanSetLabel(tenant, task, label, version, absl::Now()));
    return refs_.Apply(op);
  }

  absl::Status DeleteLabel(const std::string& tenant, const std::string& task, const std::string& label) override {
    absl::MutexLock lock(&mu_);
    DS_ASSIGN_OR_RETURN(RefOp op, refs_.PlanDeleteLabel(tenant, task, label, absl::Now()));
    return refs_.Apply(op);
  }

  absl::Status DeleteVersion(const std::string& tenant, const std::string& task, int64_t version) override {
    absl::MutexLock lock(&mu_);
    DS_ASSIGN_OR_RETURN(RefOp op, refs_.PlanDeleteVersion(tenant, task, version, absl::Now()));
    return refs_.Apply(op);
  }

  absl::StatusOr<ListPage> List(const ListOptions& options) override {
    absl::MutexLock lock(&mu_);
    return refs_.List(options);
  }

  absl::StatusOr<TenantUsage> Usage(const std::string& tenant) override {
    absl::MutexLock lock(&mu_);
    return refs_.Usage(tenant);
  }

  absl::StatusOr<GcReport> CollectGarbage(const GcOptions& options) override {
    const absl::Time now = options.now == absl::InfiniteFuture() ? absl::Now() : options.now;
    absl::MutexLock lock(&mu_);
    const std::set<std::string> referenced = refs_.ReferencedDigests();
    GcReport report;
    for (auto it = blobs_.begin(); it != blobs_.end();) {
      if (referenced.count(it->first) == 0 && now - it->second.created >= options.grace) {
        ++report.blobs_removed;
        report.bytes_removed += static_cast<int64_t>(it->second.data->size());
        it = blobs_.erase(it);
      } else {
        ++it;
      }
    }
    return report;
  }

 private:
  static BlobInfo Info(const std::string& digest, const Blob& blob) {
    return BlobInfo{digest, static_cast<int64_t>(blob.data->size()), blob.created};
  }

  absl::Status CheckUnreferenced(const std::string& digest) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Ref ref;
    ref.digest = digest;
    absl::StatusOr<VersionInfo> user = refs_.Resolve(ref);
    if (!user.ok()) return absl::OkStatus();
    return absl::FailedPreconditionError(absl::StrCat("blob ", digest, " is still referenced (by ", user->tenant, "/",
                                                      user->task, "@", user->version,
                                                      " at least); delete the versions that use it first"));
  }

  const MemoryStoreOptions options_;
  absl::Mutex mu_;
  std::map<std::string, Blob> blobs_ ABSL_GUARDED_BY(mu_);
  RefTable refs_ ABSL_GUARDED_BY(mu_);
};

absl::Status MemoryBlobWriter::Append(absl::string_view data) {
  if (committed_) return absl::FailedPreconditionError("this blob was already committed; start a new upload");
  if (static_cast<int64_t>(data_.size() + data.size()) > max_bytes_) {
    failed_ = true;
    return absl::ResourceExhaustedError(absl::StrCat("the blob exceeds the store's limit of ", max_bytes_,
                                                     " bytes (max_blob_bytes); push a smaller pack"));
  }
  hasher_.Update(data);
  data_.append(data.data(), data.size());
  return absl::OkStatus();
}

absl::StatusOr<BlobInfo> MemoryBlobWriter::Commit() {
  if (committed_) return absl::FailedPreconditionError("this blob was already committed");
  if (failed_) return absl::FailedPreconditionError("an earlier Append failed; the upload is incomplete");
  committed_ = true;
  std::string digest = hasher_.Finish();
  if (!expected_digest_.empty() && digest != expected_digest_) {
    return absl::DataLossError(absl::StrCat("the uploaded bytes hash to ", digest, ", not the expected ",
                                            expected_digest_,
                                            ": the upload was corrupted or the digest is wrong; nothing was stored"));
  }
  return store_->Insert(digest, std::move(data_));
}

}  // namespace

std::unique_ptr<DeltaStore> NewMemoryStore(const MemoryStoreOptions& options) {
  return std::make_unique<MemoryStore>(options);
}

}  // namespace store
}  // namespace deltaserve
