// CachingStore: a DeltaStore made of a remote store (the truth, shared by every replica: the OCI registry store)
// and a local store used as a read-through blob cache (a filesystem store of this replica).
//   - OpenBlob serves the local copy when there is one; otherwise it streams the blob from the remote into the
//     local store (which verifies the digest) and serves that. A local copy that fails verification is dropped,
//     so the next open fetches it again. Cached blobs keep serving while the remote is unreachable.
//   - NewBlobWriter writes to the remote and, on the side, to the local store.
//   - StatBlob, ListBlobs and DeleteBlob go to the remote (StatBlob falls back to the local copy when the remote
//     is UNAVAILABLE); DeleteBlob also drops the local copy.
//   - References (versions, labels, listings, usage) always go to the remote, so a label moved through one
//     replica is seen by the others at once; Resolve answers may be reused for `resolve_ttl` (default: never).
//   - CollectGarbage collects the remote, then evicts from the local store every cached blob older than the
//     grace period (the local store holds no references, so its own GC removes them; they are fetched again on
//     the next open). Blobs deleted through another replica stay in this cache until then; they are only ever
//     served by digest, so what is served is still exactly the bytes asked for.
// Owns both stores. Thread-safe.
#ifndef DELTASERVE_DELTA_STORE_CACHING_STORE_H_
#define DELTASERVE_DELTA_STORE_CACHING_STORE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "delta_store/store.h"

namespace deltaserve {
namespace store {

struct CachingStoreOptions {
  // How long a successful Resolve answer is reused before asking the remote again; zero = never reused (a label
  // moved through another replica is seen at once). Mutations through this store drop every reused answer.
  absl::Duration resolve_ttl = absl::ZeroDuration();
};

struct CacheStats {
  int64_t hits = 0;         // OpenBlob served from the local store
  int64_t misses = 0;       // OpenBlob fetched from the remote
  int64_t fill_errors = 0;  // fetched blobs the local store could not keep (served from the remote instead)
};

class CachingStore : public DeltaStore {
 public:
  // REQUIRES: remote and cache are not null.
  CachingStore(std::unique_ptr<DeltaStore> remote, std::unique_ptr<DeltaStore> cache,
               const CachingStoreOptions& options = {});

  CacheStats stats() const;

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

 private:
  // Copies blob `digest` from the remote into the cache. Returns the remote's errors as they are; a failure of
  // the cache also sets *cache_failed.
  absl::Status Fill(const std::string& digest, bool* cache_failed);
  void DropResolved();

  const std::unique_ptr<DeltaStore> remote_;
  const std::unique_ptr<DeltaStore> cache_;
  const CachingStoreOptions options_;

  mutable absl::Mutex mu_;
  CacheStats stats_ ABSL_GUARDED_BY(mu_);
  // Reusable Resolve answers: ref key -> (answer, expiry).
  std::map<std::string, std::pair<VersionInfo, absl::Time>> resolved_ ABSL_GUARDED_BY(mu_);
};

}  // namespace store
}  // namespace deltaserve

#endif  // DELTASERVE_DELTA_STORE_CACHING_STORE_H_
