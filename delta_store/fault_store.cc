// FaultInjectingStore (fault_store.h).
#include "delta_store/fault_store.h"

#include <memory>
#include <string>
#include <utility>

#include "server/common/status_macros.h"

namespace deltaserve {
namespace store {
namespace {

class FaultBlobWriter : public BlobWriter {
 public:
  FaultBlobWriter(FaultInjectingStore* store, std::unique_ptr<BlobWriter> base)
      : store_(store), base_(std::move(base)) {}
  absl::Status Append(absl::string_view data) override {
    DS_RETURN_IF_ERROR(store_->Check("Append"));
    return base_->Append(data);
  }
  // A failed Commit leaves the base writer uncommitted: destroying this writer discards its bytes.
  absl::StatusOr<BlobInfo> Commit() override {
    DS_RETURN_IF_ERROR(store_->Check("Commit"));
    return base_->Commit();
  }

 private:
  FaultInjectingStore* const store_;
  const std::unique_ptr<BlobWriter> base_;
};

class FaultBlobReader : public BlobReader {
 public:
  FaultBlobReader(FaultInjectingStore* store, std::unique_ptr<BlobReader> base)
      : store_(store), base_(std::move(base)) {}
  int64_t size() const override { return base_->size(); }
  // With CorruptReads on, the first byte this reader returns has its lowest bit flipped: the base store has
  // already checked its bytes, so the caller gets wrong bytes, as from a medium that lies.
  absl::StatusOr<size_t> Read(char* buffer, size_t n) override {
    DS_RETURN_IF_ERROR(store_->Check("Read"));
    DS_ASSIGN_OR_RETURN(size_t count, base_->Read(buffer, n));
    if (count > 0 && !corrupted_ && store_->corrupt_reads()) {
      buffer[0] ^= 1;
      corrupted_ = true;
    }
    return count;
  }

 private:
  FaultInjectingStore* const store_;
  const std::unique_ptr<BlobReader> base_;
  bool corrupted_ = false;
};

}  // namespace

FaultInjectingStore::FaultInjectingStore(DeltaStore* base) : base_(base) {}

void FaultInjectingStore::FailNext(const std::string& op, absl::Status status, int count) {
  if (count <= 0) return;
  absl::MutexLock lock(&mu_);
  rules_[op] = Rule{std::move(status), count};
}

void FaultInjectingStore::FailAlways(const std::string& op, absl::Status status) {
  absl::MutexLock lock(&mu_);
  rules_[op] = Rule{std::move(status), -1};
}

void FaultInjectingStore::CorruptReads(bool on) {
  absl::MutexLock lock(&mu_);
  corrupt_reads_ = on;
}

void FaultInjectingStore::Clear() {
  absl::MutexLock lock(&mu_);
  rules_.clear();
  corrupt_reads_ = false;
}

int FaultInjectingStore::Calls(const std::string& op) const {
  absl::MutexLock lock(&mu_);
  auto it = calls_.find(op);
  return it == calls_.end() ? 0 : it->second;
}

absl::Status FaultInjectingStore::Check(const std::string& op) {
  absl::MutexLock lock(&mu_);
  ++calls_[op];
  auto it = rules_.find(op);
  if (it == rules_.end()) return absl::OkStatus();
  absl::Status status = it->second.status;
  if (it->second.remaining > 0 && --it->second.remaining == 0) rules_.erase(it);
  return status;
}

bool FaultInjectingStore::corrupt_reads() const {
  absl::MutexLock lock(&mu_);
  return corrupt_reads_;
}

absl::StatusOr<std::unique_ptr<BlobWriter>> FaultInjectingStore::NewBlobWriter(const std::string& expected_digest) {
  DS_RETURN_IF_ERROR(Check("NewBlobWriter"));
  DS_ASSIGN_OR_RETURN(std::unique_ptr<BlobWriter> base, base_->NewBlobWriter(expected_digest));
  return std::unique_ptr<BlobWriter>(new FaultBlobWriter(this, std::move(base)));
}

absl::StatusOr<std::unique_ptr<BlobReader>> FaultInjectingStore::OpenBlob(const std::string& digest) {
  DS_RETURN_IF_ERROR(Check("OpenBlob"));
  DS_ASSIGN_OR_RETURN(std::unique_ptr<BlobReader> base, base_->OpenBlob(digest));
  return std::unique_ptr<BlobReader>(new FaultBlobReader(this, std::move(base)));
}

absl::StatusOr<BlobInfo> FaultInjectingStore::StatBlob(const std::string& digest) {
  DS_RETURN_IF_ERROR(Check("StatBlob"));
  return base_->StatBlob(digest);
}

absl::StatusOr<std::vector<BlobInfo>> FaultInjectingStore::ListBlobs() {
  DS_RETURN_IF_ERROR(Check("ListBlobs"));
  return base_->ListBlobs();
}

absl::Status FaultInjectingStore::DeleteBlob(const std::string& digest) {
  DS_RETURN_IF_ERROR(Check("DeleteBlob"));
  return base_->DeleteBlob(digest);
}

absl::StatusOr<VersionInfo> FaultInjectingStore::AddVersion(const std::string& tenant, const std::string& task,
                                                            const std::string& digest) {
  DS_RETURN_IF_ERROR(Check("AddVersion"));
  return base_->AddVersion(tenant, task, digest);
}

absl::StatusOr<VersionInfo> FaultInjectingStore::Resolve(const Ref& ref) {
  DS_RETURN_IF_ERROR(Check("Resolve"));
  return base_->Resolve(ref);
}

absl::Status FaultInjectingStore::SetLabel(const std::string& tenant, const std::string& task,
                                           const std::string& label, int64_t version) {
  DS_RETURN_IF_ERROR(Check("SetLabel"));
  return base_->SetLabel(tenant, task, label, version);
}

absl::Status FaultInjectingStore::DeleteLabel(const std::string& tenant, const std::string& task,
                                              const std::string& label) {
  DS_RETURN_IF_ERROR(Check("DeleteLabel"));
  return base_->DeleteLabel(tenant, task, label);
}

absl::Status FaultInjectingStore::DeleteVersion(const std::string& tenant, const std::string& task,
                                                int64_t version) {
  DS_RETURN_IF_ERROR(Check("DeleteVersion"));
  return base_->DeleteVersion(tenant, task, version);
}

absl::StatusOr<ListPage> FaultInjectingStore::List(const ListOptions& options) {
  DS_RETURN_IF_ERROR(Check("List"));
  return base_->List(options);
}

absl::StatusOr<TenantUsage> FaultInjectingStore::Usage(const std::string& tenant) {
  DS_RETURN_IF_ERROR(Check("Usage"));
  return base_->Usage(tenant);
}

absl::StatusOr<GcReport> FaultInjectingStore::CollectGarbage(const GcOptions& options) {
  DS_RETURN_IF_ERROR(Check("CollectGarbage"));
  return base_->CollectGarbage(options);
}

}  // namespace store
}  // namespace deltaserve
