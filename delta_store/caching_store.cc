// CachingStore (caching_store.h): a remote store with a local read-through blob cache.
#include "delta_store/caching_store.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "server/common/logging.h"
#include "server/common/status_macros.h"

namespace deltaserve {
namespace store {
namespace {

constexpr size_t kCopyBufferBytes = size_t{1} << 20;

// Writes to the remote; the local copy is best effort (dropped at its first error).
class TeeWriter : public BlobWriter {
 public:
  TeeWriter(std::unique_ptr<BlobWriter> remote, std::unique_ptr<BlobWriter> local)
      : remote_(std::move(remote)), local_(std::move(local)) {}

  absl::Status Append(absl::string_view data) override {
    DS_RETURN_IF_ERROR(remote_->Append(data));
    if (local_ != nullptr && !local_->Append(data).ok()) local_.reset();
    return absl::OkStatus();
  }

  absl::StatusOr<BlobInfo> Commit() override {
    DS_ASSIGN_OR_RETURN(BlobInfo info, remote_->Commit());
    if (local_ != nullptr) {
      absl::StatusOr<BlobInfo> local = local_->Commit();
      if (!local.ok()) DS_LOG(WARNING) << "could not keep a local copy of " << info.digest << ": " << local.status();
      local_.reset();
    }
    return info;
  }

 private:
  std::unique_ptr<BlobWriter> remote_;
  std::unique_ptr<BlobWriter> local_;
};

// Serves a cached copy; when it fails verification, drops it from the cache so the next open fetches it again.
class CachedReader : public BlobReader {
 public:
  CachedReader(std::unique_ptr<BlobReader> base, DeltaStore* cache, std::string digest)
      : base_(std::move(base)), cache_(cache), digest_(std::move(digest)) {}
  int64_t size() const override { return base_->size(); }
  absl::StatusOr<size_t> Read(char* buffer, size_t n) override {
    absl::StatusOr<size_t> read = base_->Read(buffer, n);
    if (absl::IsDataLoss(read.status())) {
      cache_->DeleteBlob(digest_).IgnoreError();
      return absl::DataLossError(absl::StrCat(read.status().message(),
                                              " (the local cached copy was dropped; open the blob again to fetch it "
                                              "from the shared store)"));
    }
    return read;
  }

 private:
  std::unique_ptr<BlobReader> base_;
  DeltaStore* const cache_;
  const std::string digest_;
};

std::string RefKey(const Ref& ref) {
  return absl::StrCat(ref.tenant, "/", ref.task, "@", ref.version, ":", ref.label, "#", ref.digest);
}

}  // namespace

CachingStore::CachingStore(std::unique_ptr<DeltaStore> remote, std::unique_ptr<DeltaStore> cache,
                           const CachingStoreOptions& options)
    : remote_(std::move(remote)), cache_(std::move(cache)), options_(options) {}

CacheStats CachingStore::stats() const {
  absl::MutexLock lock(&mu_);
  return stats_;
}

absl::StatusOr<std::unique_ptr<BlobWriter>> CachingStore::NewBlobWriter(const std::string& expected_digest) {
  DS_ASSIGN_OR_RETURN(std::unique_ptr<BlobWriter> remote, remote_->NewBlobWriter(expected_digest));
  absl::StatusOr<std::unique_ptr<BlobWriter>> local = cache_->NewBlobWriter(expected_digest);
  return std::unique_ptr<BlobWriter>(new TeeWriter(std::move(remote), local.ok() ? *std::move(local) : nullptr));
}

absl::StatusOr<std::unique_ptr<BlobReader>> CachingStore::OpenBlob(const std::string& digest) {
  absl::StatusOr<std::unique_ptr<BlobReader>> local = cache_->OpenBlob(digest);
  if (local.ok()) {
    absl::MutexLock lock(&mu_);
    ++stats_.hits;
  } else if (absl::IsInvalidArgument(local.status())) {
    return local.status();
  } else {
    if (!absl::IsNotFound(local.status())) DS_LOG(WARNING) << "local cache: " << local.status();
    {
      absl::MutexLock lock(&mu_);
      ++stats_.misses;
    }
    bool cache_failed = false;
    absl::Status filled = Fill(digest, &cache_failed);
    if (!filled.ok() && !cache_failed) return filled;  // the shared store's answer (absent, unreachable, corrupt)
    if (filled.ok()) local = cache_->OpenBlob(digest);
    if (!filled.ok() || !local.ok()) {
      DS_LOG(WARNING) << "local cache could not keep " << digest << " (" << (filled.ok() ? local.status() : filled)
                      << "); serving it from the shared store";
      {
        absl::MutexLock lock(&mu_);
        ++stats_.fill_errors;
      }
      return remote_->OpenBlob(digest);
    }
  }
  return std::unique_ptr<BlobReader>(new CachedReader(*std::move(local), cache_.get(), digest));
}

absl::Status CachingStore::Fill(const std::string& digest, bool* cache_failed) {
  DS_ASSIGN_OR_RETURN(std::unique_ptr<BlobReader> remote, remote_->OpenBlob(digest));
  absl::StatusOr<std::unique_ptr<BlobWriter>> writer = cache_->NewBlobWriter(digest);
  *cache_failed = !writer.ok();
  DS_RETURN_IF_ERROR(writer.status());
  std::string buffer(kCopyBufferBytes, '\0');
  while (true) {
    DS_ASSIGN_OR_RETURN(size_t n, remote->Read(buffer.data(), buffer.size()));
    if (n == 0) break;
    absl::Status appended = (*writer)->Append(absl::string_view(buffer.data(), n));
    *cache_failed = !appended.ok();
    DS_RETURN_IF_ERROR(appended);
  }
  absl::Status committed = (*writer)->Commit().status();
  *cache_failed = !committed.ok();
  return committed;
}

absl::StatusOr<BlobInfo> CachingStore::StatBlob(const std::string& digest) {
  absl::StatusOr<BlobInfo> info = remote_->StatBlob(digest);
  if (absl::IsUnavailable(info.status())) {
    absl::StatusOr<BlobInfo> local = cache_->StatBlob(digest);
    if (local.ok()) return local;
  }
  return info;
}

absl::StatusOr<std::vector<BlobInfo>> CachingStore::ListBlobs() { return remote_->ListBlobs(); }

absl::Status CachingStore::DeleteBlob(const std::string& digest) {
  DS_RETURN_IF_ERROR(remote_->DeleteBlob(digest));
  absl::Status local = cache_->DeleteBlob(digest);
  if (!local.ok() && !absl::IsNotFound(local)) DS_LOG(WARNING) << "local cache: " << local;
  return absl::OkStatus();
}

absl::StatusOr<VersionInfo> CachingStore::AddVersion(const std::string& tenant, const std::string& task,
                                                     const std::string& digest) {
  DropResolved();
  return remote_->AddVersion(tenant, task, digest);
}

absl::StatusOr<VersionInfo> CachingStore::Resolve(const Ref& ref) {
  if (options_.resolve_ttl <= absl::ZeroDuration()) return remote_->Resolve(ref);
  const std::string key = RefKey(ref);
  const absl::Time now = absl::Now();
  {
    absl::MutexLock lock(&mu_);
    auto it = resolved_.find(key);
    if (it != resolved_.end() && it->second.second > now) return it->second.first;
  }
  DS_ASSIGN_OR_RETURN(VersionInfo info, remote_->Resolve(ref));
  absl::MutexLock lock(&mu_);
  if (resolved_.size() >= 10000) resolved_.clear();  // bound the memory; answers are cheap to get again
  resolved_[key] = {info, now + options_.resolve_ttl};
  return info;
}

absl::Status CachingStore::SetLabel(const std::string& tenant, const std::string& task, const std::string& label,
                                    int64_t version) {
  DropResolved();
  absl::Status status = remote_->SetLabel(tenant, task, label, version);
  DropResolved();
  return status;
}

absl::Status CachingStore::DeleteLabel(const std::string& tenant, const std::string& task, const std::string& label) {
  DropResolved();
  absl::Status status = remote_->DeleteLabel(tenant, task, label);
  DropResolved();
  return status;
}

absl::Status CachingStore::DeleteVersion(const std::string& tenant, const std::string& task, int64_t version) {
  DropResolved();
  absl::Status status = remote_->DeleteVersion(tenant, task, version);
  DropResolved();
  return status;
}

absl::StatusOr<ListPage> CachingStore::List(const ListOptions& options) { return remote_->List(options); }

absl::StatusOr<TenantUsage> CachingStore::Usage(const std::string& tenant) { return remote_->Usage(tenant); }

absl::StatusOr<GcReport> CachingStore::CollectGarbage(const GcOptions& options) {
  DS_ASSIGN_OR_RETURN(GcReport report, remote_->CollectGarbage(options));
  absl::StatusOr<GcReport> evicted = cache_->CollectGarbage(options);
  if (!evicted.ok()) {
    DS_LOG(WARNING) << "local cache eviction failed: " << evicted.status();
  } else if (evicted->blobs_removed > 0) {
    DS_LOG(INFO) << "local cache: evicted " << evicted->blobs_removed << " blob(s), " << evicted->bytes_removed
                 << " bytes";
  }
  return report;
}

void CachingStore::DropResolved() {
  absl::MutexLock lock(&mu_);
  resolved_.clear();
}

}  // namespace store
}  // namespace deltaserve
