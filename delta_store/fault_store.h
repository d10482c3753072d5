// FaultInjectingStore: wraps a DeltaStore and fails chosen operations, for tests of the code above the store
// (the idea of leveldb's ErrorEnv). Thread-safe.
#ifndef DELTASERVE_DELTA_STORE_FAULT_STORE_H_
#define DELTASERVE_DELTA_STORE_FAULT_STORE_H_

#include <map>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "delta_store/store.h"

namespace deltaserve {
namespace store {

class FaultInjectingStore : public DeltaStore {
 public:
  // Operation names for FailNext / FailAlways: "NewBlobWriter", "Append", "Commit", "OpenBlob", "Read",
  // "StatBlob", "ListBlobs", "DeleteBlob", "AddVersion", "Resolve", "SetLabel", "DeleteLabel", "DeleteVersion",
  // "List", "Usage", "CollectGarbage".
  // REQUIRES: `base` outlives this store.
  explicit FaultInjectingStore(DeltaStore* base);

  // The next `count` calls of `op` return `status` without reaching the base store.
  void FailNext(const std::string& op, absl::Status status, int count = 1);
  // Every call of `op` fails with `status` until Clear().
  void FailAlways(const std::string& op, absl::Status status);
  // Read() returns its bytes with one bit flipped (a corrupt medium), until Clear(): the lowest bit of the first
  // byte each reader returns. The flip happens above the base store, after any verification of its own, so the
  // caller gets wrong bytes (and a digest check on them fails).
  void CorruptReads(bool on);
  void Clear();
  // How many times `op` was called (failed or not).
  int Calls(const std::string& op) const;

  absl::StatusOr<std::unique_ptr<BlobWriter>> NewBlobWriter(const std::string& expected_digest) override;
  absl::StatusOr<std::unique_ptr<BlobReader>> OpenBlob(const std::string& digest) override;
  absl::StatusOr<BlobInfo> StatBlob(const std::string& digest) override;
  absl::StatusOr<std::vector<BlobInfo>> ListBlobs() override;
  absl::Status DeleteBlob(const std::string& digest) override;
  absl::StatusOr<VersionInfo> AddVersion(const std::string& tenant, const std::string& task,
                                         const std::string& digest) override;
  absl::StatusOr<VersionInfo> Resolve(const Ref& ref) override;
  absl::Status SetLabel(const std::string& tenant, const std::string& task, const std::string& label,
                        int64_t version) override;
  absl::Status DeleteLabel(const std::string& tenant, const std::string& task, const std::string& label) override;
  absl::Status DeleteVersion(const std::string& tenant, const std::string& task, int64_t version) override;
  absl::StatusOr<ListPage> List(const ListOptions& options) override;
  absl::StatusOr<TenantUsage> Usage(const std::string& tenant) override;
  absl::StatusOr<GcReport> CollectGarbage(const GcOptions& options) override;

  // For the wrapped writers and readers: the injected failure for `op`, or OK (counts the call).
  absl::Status Check(const std::string& op);
  bool corrupt_reads() const;

 private:
  struct Rule {
    absl::Status status;
    int remaining = 0;  // < 0: always
  };
  DeltaStore* const base_;
  mutable absl::Mutex mu_;
  std::map<std::string, Rule> rules_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int> calls_ ABSL_GUARDED_BY(mu_);
  bool corrupt_reads_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace store
}  // namespace deltaserve

#endif  // DELTASERVE_DELTA_STORE_FAULT_STORE_H_
