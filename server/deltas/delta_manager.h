// DeltaManager: the server's side of the delta store.
//
//   - Push validates a pack against the served model (format, methods, targets, shapes, backbone fingerprint)
//     before anything is stored, stores its canonical bytes under their digest and adds the task's next version
//     (then sets the requested labels);
//   - Get / OpenPull / List / SetLabel / DeleteLabel / DeleteVersion answer the Deltas API;
//   - as an inference::DeltaResolver it turns a request's task reference into a loaded pack: the store resolves
//     the reference to a digest (atomically, so a label moved meanwhile gives the old or the new pack, never a
//     mix), and loaded packs are kept by digest under a byte budget (least recently used first out). A pack
//     handed to a request is a shared_ptr: it stays alive while the request's rows run, evicted or not.
//
// Tenants: "" means the default tenant (Options::default_tenant) everywhere, while the server runs without
// authentication.
//
// Owns its cache of loaded packs; does not own the store or the model. Thread-safe.
#ifndef DELTASERVE_SERVER_DELTAS_DELTA_MANAGER_H_
#define DELTASERVE_SERVER_DELTAS_DELTA_MANAGER_H_

#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "delta_store/store.h"
#include "server/delta/delta_pack.h"
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

class DeltaManager : public inference::DeltaResolver {
 public:
  struct Options {
    // Limits every pack must respect (also the largest push).
    delta::PackLimits limits;
    // Bytes of loaded packs (on the model's device) kept for reuse beyond those in use.
    int64_t cache_bytes = int64_t{1} << 30;
    // The tenant a request with an empty tenant acts for.
    std::string default_tenant = "default";
  };

  // REQUIRES: store and model outlive the manager.
  DeltaManager(store::DeltaStore* store, const model::Model* model, const Options& options);

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
  // Packs loaded now.
  int num_packs() const override;

  // The store reference a request's selector means for `tenant` (exposed for tests). The selector's task may
  // also be a text reference ("task@3", "tenant/task:prod", "sha256:<hex>", ...); then the selector's version,
  // label and digest must be unset, and a tenant inside it must equal the request's (when that is non-empty).
  absl::StatusOr<store::Ref> ToStoreRef(const std::string& tenant, const inference::TaskSelector& selector) const;

 private:
  absl::StatusOr<store::Ref> ParseTextRef(const std::string& tenant, const std::string& text) const;
  // The loaded pack of `digest`, from the cache or loaded from the store.
  absl::StatusOr<std::shared_ptr<const delta::DeltaPack>> LoadPack(const std::string& digest) const;

  store::DeltaStore* const store_;
  const model::Model* const model_;
  const Options options_;

  mutable absl::Mutex mu_;
  // Loaded packs by digest, with their position in lru_ (front = most recent).
  struct CacheEntry {
    std::shared_ptr<const delta::DeltaPack> pack;
    std::list<std::string>::iterator lru;
  };
  mutable std::map<std::string, CacheEntry> cache_ ABSL_GUARDED_BY(mu_);
  mutable std::list<std::string> lru_ ABSL_GUARDED_BY(mu_);
  mutable int64_t cache_used_ ABSL_GUARDED_BY(mu_) = 0;
};

// The summary of a pack's contents.
PackSummary Summarize(const delta::PackContents& contents);
PackSummary Summarize(const delta::DeltaPack& pack);

}  // namespace deltas
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_DELTAS_DELTA_MANAGER_H_
