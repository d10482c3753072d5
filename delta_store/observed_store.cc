#include "delta_store/observed_store.h"

#include <type_traits>
#include <utility>

namespace deltaserve {
namespace store {

const char* StoreOpName(StoreOp op) {
  switch (op) {
    case StoreOp::kGet: return "get";
    case StoreOp::kPut: return "put";
    case StoreOp::kStat: return "stat";
    case StoreOp::kList: return "list";
    case StoreOp::kUsage: return "usage";
    case StoreOp::kAddVersion: return "add_version";
    case StoreOp::kResolve: return "resolve";
    case StoreOp::kSetLabel: return "set_label";
    case StoreOp::kDeleteLabel: return "delete_label";
    case StoreOp::kDeleteVersion: return "delete_version";
    case StoreOp::kDeleteBlob: return "delete_blob";
    case StoreOp::kGc: return "gc";
  }
  return "other";
}

namespace {

// Times one call; Report() / Done() hand its status and duration to the observer.
class Timer {
 public:
  Timer(StoreObserver* observer, StoreOp op) : observer_(observer), op_(op), start_(absl::Now()) {}
  void Report(const absl::Status& status) { observer_->OnStoreOperation(op_, status.code(), absl::Now() - start_); }
  // Reports `result`'s status and returns `result`.
  template <typename T>
  T Done(T result) {
    if constexpr (std::is_same_v<T, absl::Status>) {
      Report(static_cast<const absl::Status&>(result));
    } else {
      Report(result.status());
    }
    return result;
  }

 private:
  StoreObserver* const observer_;
  const StoreOp op_;
  const absl::Time start_;
};

class ObservedWriter : public BlobWriter {
 public:
  ObservedWriter(std::unique_ptr<BlobWriter> base, StoreObserver* observer)
      : base_(std::move(base)), observer_(observer) {}
  absl::Status Append(absl::string_view data) override { return base_->Append(data); }
  absl::StatusOr<BlobInfo> Commit() override { return Timer(observer_, StoreOp::kPut).Done(base_->Commit()); }

 private:
  std::unique_ptr<BlobWriter> base_;
  StoreObserver* const observer_;
};

class ObservedReader : public BlobReader {
 public:
  ObservedReader(std::unique_ptr<BlobReader> base, StoreObserver* observer)
      : base_(std::move(base)), observer_(observer) {}
  int64_t size() const override { return base_->size(); }
  absl::StatusOr<size_t> Read(char* buffer, size_t n) override {
    Timer timer(observer_, StoreOp::kGet);
    absl::StatusOr<size_t> got = base_->Read(buffer, n);
    // The open counted the get; a read adds a report only when it fails (a corrupt or vanished blob).
    if (!got.ok()) timer.Report(got.status());
    return got;
  }

 private:
  std::unique_ptr<BlobReader> base_;
  StoreObserver* const observer_;
};

class ObservedStore : public DeltaStore {
 public:
  ObservedStore(std::unique_ptr<DeltaStore> base, StoreObserver* observer)
      : base_(std::move(base)), observer_(observer) {}

  absl::StatusOr<std::unique_ptr<BlobWriter>> NewBlobWriter(const std::string& expected_digest) override {
    absl::StatusOr<std::unique_ptr<BlobWriter>> writer = base_->NewBlobWriter(expected_digest);
    if (!writer.ok()) {
      observer_->OnStoreOperation(StoreOp::kPut, writer.status().code(), absl::ZeroDuration());
      return writer.status();
    }
    return std::unique_ptr<BlobWriter>(std::make_unique<ObservedWriter>(*std::move(writer), observer_));
  }
  absl::StatusOr<std::unique_ptr<BlobReader>> OpenBlob(const std::string& digest) override {
    Timer timer(observer_, StoreOp::kGet);
    absl::StatusOr<std::unique_ptr<BlobReader>> reader = base_->OpenBlob(digest);
    timer.Report(reader.status());
    if (!reader.ok()) return reader.status();
    return std::unique_ptr<BlobReader>(std::make_unique<ObservedReader>(*std::move(reader), observer_));
  }
  absl::StatusOr<BlobInfo> StatBlob(const std::string& digest) override {
    return Timer(observer_, StoreOp::kStat).Done(base_->StatBlob(digest));
  }
  absl::StatusOr<std::vector<BlobInfo>> ListBlobs() override {
    return Timer(observer_, StoreOp::kList).Done(base_->ListBlobs());
  }
  absl::Status DeleteBlob(const std::string& digest) override {
    return Timer(observer_, StoreOp::kDeleteBlob).Done(base_->DeleteBlob(digest));
  }
  absl::StatusOr<VersionInfo> AddVersion(const std::string& tenant, const std::string& task,
                                         const std::string& digest) override {
    return Timer(observer_, StoreOp::kAddVersion).Done(base_->AddVersion(tenant, task, digest));
  }
  absl::StatusOr<VersionInfo> Resolve(const Ref& ref) override {
    return Timer(observer_, StoreOp::kResolve).Done(base_->Resolve(ref));
  }
  absl::Status SetLabel(const std::string& tenant, const std::string& task, const std::string& label,
                        int64_t version) override {
    return Timer(observer_, StoreOp::kSetLabel).Done(base_->SetLabel(tenant, task, label, version));
  }
  absl::Status DeleteLabel(const std::string& tenant, const std::string& task, const std::string& label) override {
    return Timer(observer_, StoreOp::kDeleteLabel).Done(base_->DeleteLabel(tenant, task, label));
  }
  absl::Status DeleteVersion(const std::string& tenant, const std::string& task, int64_t version) override {
    return Timer(observer_, StoreOp::kDeleteVersion).Done(base_->DeleteVersion(tenant, task, version));
  }
  absl::StatusOr<ListPage> List(const ListOptions& options) override {
    return Timer(observer_, StoreOp::kList).Done(base_->List(options));
  }
  absl::StatusOr<TenantUsage> Usage(const std::string& tenant) override {
    return Timer(observer_, StoreOp::kUsage).Done(base_->Usage(tenant));
  }
  absl::StatusOr<GcReport> CollectGarbage(const GcOptions& options) override {
    return Timer(observer_, StoreOp::kGc).Done(base_->CollectGarbage(options));
  }

 private:
  std::unique_ptr<DeltaStore> base_;
  StoreObserver* const observer_;
};

}  // namespace

std::unique_ptr<DeltaStore> NewObservedStore(std::unique_ptr<DeltaStore> base, StoreObserver* observer) {
  return std::make_unique<ObservedStore>(std::move(base), observer);
}

}  // namespace store
}  // namespace deltaserve
