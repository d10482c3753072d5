// DeltaManager: the server's side of the delta store.
//
//   - Push validates a pack against the served model (format, methods, targets, shapes, backbone fingerprint)
//     before anything is stored, stores its canonical bytes under their digest and adds the task's next version
//     (then sets the requested labels);
//   - Get / OpenPull / List / SetLabel / DeleteLabel / DeleteVersion answer the Deltas API;
//   - as an inference::DeltaResolver it turns a request's task reference into a loaded pack: the store resolves
//     the reference to a digest (atomically, so a label moved meanwhile gives the old or the new pack, never a
//     mix: a request keeps the pack it resolved at admission, a label move takes effect for the next request),
//     and the pack comes from the DeltaCache (delta_cache.h): tier 1 holds packs bound to the model on its
//     device under Options::cache_bytes, tier 2 the host copies of recently evicted ones under
//     Options::host_cache_bytes, else the store. A pack handed to a request is a shared_ptr that pins it in
//     tier 1 until the request's rows have run. A miss loads on the resolving (request) thread, one load per
//     digest however many requests miss on it at once;
//   - Prefetch resolves task references and loads their packs into tier 1 ahead of requests.
//
// Tenants: "" means the default tenant (Options::default_tenant) everywhere, while the server runs without
// authentication.
//
// Owns its cache of loaded packs; does not own the store, the model or the cache observer. Thread-safe.
#ifndef DELTASERVE_SERVER_DELTAS_DELTA_MANAGER_H_
#define DELTASERVE_SERVER_DELTAS_DELTA_MANAGER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "delta_store/store.h"
#include "server/delta/delta_pack.h"
#include "server/deltas/delta_cache.h"
#include "server/inference/delta_resolver.h"
#include "server/model/model.h"

namespace deltaserve {
namespace deltas {

// What a pack holds, from its manifest.
struct PackSummary {
  std::string name;
  std::vector<std::string> methods;
  std::string backbone_fingerprint;
  std::string backbone_family;
  std::string head_kind;  // "classification", "regression" or ""
  std::vector<std::string> head_labels;
  std::string description;  // provenance.description, when present
};

struct PushRequest {
  std::string tenant;
  std::string task;
  // "sha256:<hex>" the uploaded bytes must hash to ("" = not checked).
  std::string expected_digest;
  // Labels to point at the new version.
  std::vector<std::string> labels;
};

struct PushResult {
  store::VersionInfo version;
  bool created = false;
  std::string uploaded_digest;
  PackSummary pack;
};

struct PackDescription {
  store::VersionInfo version;
  PackSummary pack;
};

struct ImportReport {
  int imported = 0;
  // Files that could not be imported, with the reason (skipped; the server still starts).
  std::vector<std::pair<std::string, std::string>> failed;
};

// A pack in the cache's tier 2: its canonical contents (manifest, method and head specs with float32 CPU
// tensors), the data its canonical bytes hold, ready to bind to the model again without reading or parsing the
// store's bytes. Immutable once made.
struct HostPack {
  delta::PackContents contents;
  // The canonical bytes' length (tier 2's measure).
  int64_t serialized_bytes = 0;
};

// The cache of loaded packs by digest (delta_cache.h).
using DeltaCache = TieredCache<delta::DeltaPack, HostPack>;

// What Prefetch did for one reference.
struct PrefetchResult {
  // The version the reference resolved to (tenant, task, version, digest, labels; only the digest for a
  // digest-only reference).
  store::VersionInfo version;
  // Where the pack came from: kDevice (it was loaded already), kHost or kStore.
  CacheTier source = CacheTier::kDevice;
  // Bytes the pack takes on the device, and its canonical bytes' length.
  int64_t device_bytes = 0;
  int64_t serialized_bytes = 0;
  // How long the load took (zero when it was loaded already).
  absl::Duration load_time;
  // Whether it is in tier 1 when Prefetch returns: false when the pack alone exceeds the device budget, or later
  // packs of the same call pushed it out.
  bool resident = false;
};

class DeltaManager : public inference::DeltaResolver {
 public:
  // Most task references one Prefetch takes.
  static constexpr int kMaxPrefetchTasks = 1000;

  struct Options {
    // Limits every pack must respect (also the largest push).
    delta::PackLimits limits;
    // Tier 1 of the pack cache: bytes of packs bound to the model (DeltaPack::bytes(), on the model's device)
    // kept loaded. Packs in use are never evicted, so this may be exceeded while they run.
    int64_t cache_bytes = int64_t{1} << 30;
    // Tier 2: bytes (serialized size) of recently evicted packs kept in host memory; 0 disables it.
    int64_t host_cache_bytes = int64_t{1} << 30;
    // Told about the cache's lookups, loads, evictions and residency (metrics); nullptr = nobody. Must outlive
    // the manager.
    DeltaCacheObserver* cache_observer = nullptr;
    // The tenant a request with an empty tenant acts for.
    std::string default_tenant = "default";
  };

  // REQUIRES: store and model outlive the manager.
  DeltaManager(store::DeltaStore* store, const model::Model* model, const Options& options);
  ~DeltaManager() override;

  // The tenant a request acts for: `tenant`, or the default one when empty. INVALID_ARGUMENT for a bad name.
  absl::StatusOr<std::string> EffectiveTenant(const std::string& tenant) const;

  // Validates `bytes` as a pack for the served model and stores it (see the class comment). Errors:
  // INVALID_ARGUMENT (names, malformed pack), FAILED_PRECONDITION (a pack of another backbone), DATA_LOSS
  // (expected digest mismatch), RESOURCE_EXHAUSTED (quota), and the store's. Nothing is stored unless the pack
  // is valid; labels are set only after the version exists.
  absl::StatusOr<PushResult> Push(const PushRequest& request, absl::string_view bytes);

  // The version `ref` (text form, see store::ParseRef) names, with its pack's summary.
  absl::StatusOr<PackDescription> Get(const std::string& tenant, const std::string& ref);
  // The version and a reader of its bytes.
  absl::StatusOr<std::pair<store::VersionInfo, std::unique_ptr<store::BlobReader>>> OpenPull(
      const std::string& tenant, const std::string& ref);
  // Every tenant's versions (the caller has checked the right to see them).
  absl::StatusOr<store::ListPage> ListAllTenants(int page_size, const std::string& page_token);
  absl::StatusOr<store::ListPage> List(const std::string& tenant, const std::string& task, int page_size,
                                       const std::string& page_token);
  absl::StatusOr<store::VersionInfo> SetLabel(const std::string& tenant, const std::string& task,
                                              const std::string& label, int64_t version);
  absl::Status DeleteLabel(const std::string& tenant, const std::string& task, const std::string& label);
  absl::Status DeleteVersion(const std::string& tenant, const std::string& task, int64_t version);

  // Pushes every pack file of `dir` (the --delta_dir layout: <dir>/<task>.dpack for the default tenant,
  // <dir>/<tenant>/<task>.dpack) as a version of its task; a file already stored as a version of its task adds
  // nothing. NOT_FOUND when `dir` is not a directory.
  absl::StatusOr<ImportReport> ImportDirectory(const std::string& dir, const std::string& suffix = ".dpack");

  // inference::DeltaResolver.
  absl::StatusOr<std::shared_ptr<const delta::DeltaPack>> Resolve(
      const std::string& tenant, const inference::TaskSelector& selector) const override;
  // Packs loaded now (the cache's tier 1).
  int num_packs() const override;

  // Resolves each selector (as Resolve does) and loads its pack into tier 1, in order; all selectors are
  // checked before anything loads. Errors: INVALID_ARGUMENT for no selectors or more than kMaxPrefetchTasks, or
  // a malformed selector (naming it), NOT_FOUND for a reference that names nothing, and load errors (DATA_LOSS,
  // FAILED_PRECONDITION, ...); on an error, packs of earlier selectors stay loaded.
  absl::StatusOr<std::vector<PrefetchResult>> Prefetch(const std::string& tenant,
                                                       const std::vector<inference::TaskSelector>& selectors);

  // The cache's state and counters.
  CacheStats cache_stats() const;

  // The store reference a request's selector means for `tenant` (exposed for tests). The selector's task may
  // also be a text reference ("task@3", "tenant/task:prod", "sha256:<hex>", ...); then the selector's version,
  // label and digest must be unset, and a tenant inside it must equal the request's (when that is non-empty).
  absl::StatusOr<store::Ref> ToStoreRef(const std::string& tenant, const inference::TaskSelector& selector) const;

 private:
  class PackLoader;

  absl::StatusOr<store::Ref> ParseTextRef(const std::string& tenant, const std::string& text) const;

  store::DeltaStore* const store_;
  const model::Model* const model_;
  const Options options_;
  // Loads packs for the cache (from the store, or from host copies). Declared before the cache that uses it.
  const std::unique_ptr<PackLoader> loader_;
  const std::unique_ptr<DeltaCache> cache_;
};

// The summary of a pack's contents.
PackSummary Summarize(const delta::PackContents& contents);
PackSummary Summarize(const delta::DeltaPack& pack);

}  // namespace deltas
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_DELTAS_DELTA_MANAGER_H_
