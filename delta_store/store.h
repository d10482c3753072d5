// DeltaStore: the content-addressed store of delta packs (docs/STORE.md).
//
// Two layers behind one interface:
//   - blobs, addressed by "sha256:<hex>" of their bytes. A blob is written through a BlobWriter that hashes while
//     it streams; it becomes visible only on Commit(), and only when its digest equals the expected one (when
//     one was given). Writing the same bytes twice stores one blob.
//   - references: "tenant/task" names with immutable numbered versions (1, 2, ...) and movable labels. Every
//     version points at a blob. The label "latest" is kept by the store (it always names the highest version);
//     users set and delete other labels ("prod", "canary", ...). Resolving a reference and moving a label are
//     atomic: a reader sees the old or the new target, never anything else.
// A blob referenced by any version cannot be deleted; CollectGarbage removes unreferenced blobs (and stale
// temporary files) older than a grace period, so a blob written for a version that is about to be added is safe.
// Per-tenant quotas (bytes and version count) are enforced when a version is added: RESOURCE_EXHAUSTED.
//
// Implementations: filesystem (fs_store.h, the default), in-memory (memory_store.h), an OCI registry
// (oci_store.h) with a read-through cache (caching_store.h), and an error-injecting wrapper for tests
// (fault_store.h). All are thread-safe. No LibTorch: the store knows bytes, not tensors.
#ifndef DELTASERVE_DELTA_STORE_STORE_H_
#define DELTASERVE_DELTA_STORE_STORE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace deltaserve {
namespace store {

// The store-managed label: always the highest version of a task.
inline constexpr char kLatestLabel[] = "latest";

struct BlobInfo {
  std::string digest;  // "sha256:<hex>"
  int64_t size = 0;
  absl::Time created;  // when it became visible (filesystem: the file's mtime)
};

// Streams one blob into the store. Not thread-safe: one writer per upload. Destroying a writer that was not
// committed discards what it wrote (nothing becomes visible).
class BlobWriter {
 public:
  virtual ~BlobWriter() = default;
  // Appends bytes. RESOURCE_EXHAUSTED once the blob would exceed the store's max_blob_bytes;
  // FAILED_PRECONDITION after Commit().
  virtual absl::Status Append(absl::string_view data) = 0;
  // Makes the blob visible (durably, for persistent stores) and returns it. DATA_LOSS when an expected digest
  // was given and the bytes do not match it (nothing becomes visible). Committing bytes that are already stored
  // returns the existing blob. REQUIRES: called at most once.
  virtual absl::StatusOr<BlobInfo> Commit() = 0;
};

// Streams one blob out of the store. Not thread-safe: one reader per download.
class BlobReader {
 public:
  virtual ~BlobReader() = default;
  virtual int64_t size() const = 0;
  // Reads up to `n` bytes into `buffer`; returns how many, 0 at the end. When the store verifies reads, the
  // read that reaches the end returns DATA_LOSS instead if the bytes do not hash to the digest (the blob is
  // corrupt on disk; it is not served).
  virtual absl::StatusOr<size_t> Read(char* buffer, size_t n) = 0;
};

// One version of a task.
struct VersionInfo {
  std::string tenant;
  std::string task;
  int64_t version = 0;
  std::string digest;
  int64_t size = 0;                 // the blob's size
  absl::Time created;               // when the version was added
  std::vector<std::string> labels;  // labels naming it, sorted ("latest" included)
};

// What a reference names. Exactly one of version / label / digest is set, or none (= label "latest").
// A digest-only reference (tenant/task empty) names a blob by content; with a tenant (and optionally a task),
// the blob must also be a version of that tenant's (task's) packs.
struct Ref {
  std::string tenant;
  std::string task;
  int64_t version = 0;
  std::string label;
  std::string digest;
};

struct ListOptions {
  // Only this tenant's versions; "" = every tenant.
  std::string tenant;
  // Only this task's (requires tenant); "" = every task.
  std::string task;
  // Versions per page; 0 = the store's default (100). At most 1000.
  int page_size = 0;
  // From a previous page's next_page_token; "" = the first page.
  std::string page_token;
};

struct ListPage {
  // Ordered by (tenant, task, version).
  std::vector<VersionInfo> versions;
  // "" on the last page.
  std::string next_page_token;
};

struct Quota {
  // Bytes of distinct blobs the tenant's versions reference; 0 = unlimited.
  int64_t max_bytes = 0;
  // Versions over all the tenant's tasks; 0 = unlimited.
  int64_t max_versions = 0;
};

struct TenantUsage {
  int64_t bytes = 0;
  int64_t versions = 0;
};

struct GcOptions {
  // Unreferenced blobs and temporary files younger than this are kept (an upload may be about to reference
  // them).
  absl::Duration grace = absl::Hours(1);
  // "Now", for tests; absl::InfiniteFuture() = the real clock.
  absl::Time now = absl::InfiniteFuture();
};

struct GcReport {
  int64_t blobs_removed = 0;
  int64_t bytes_removed = 0;
  int64_t temp_files_removed = 0;
};

class DeltaStore {
 public:
  virtual ~DeltaStore() = default;

  // --- Blobs ---
  // A writer for a new blob. `expected_digest` ("" = none) is checked on Commit. INVALID_ARGUMENT for a
  // malformed expected digest.
  virtual absl::StatusOr<std::unique_ptr<BlobWriter>> NewBlobWriter(const std::string& expected_digest) = 0;
  // NOT_FOUND when no blob has that digest; INVALID_ARGUMENT for a malformed digest.
  virtual absl::StatusOr<std::unique_ptr<BlobReader>> OpenBlob(const std::string& digest) = 0;
  virtual absl::StatusOr<BlobInfo> StatBlob(const std::string& digest) = 0;
  // Every visible blob, ordered by digest.
  virtual absl::StatusOr<std::vector<BlobInfo>> ListBlobs() = 0;
  // FAILED_PRECONDITION while any version references it; NOT_FOUND when absent.
  virtual absl::Status DeleteBlob(const std::string& digest) = 0;

  // --- References ---
  // Adds the next version of tenant/task pointing at blob `digest` and moves "latest" to it. When a version of
  // that task already points at `digest`, returns that version unchanged (pushing the same pack twice is
  // idempotent). INVALID_ARGUMENT for bad names; NOT_FOUND when the blob is absent; RESOURCE_EXHAUSTED (naming
  // the quota, the usage and the limit) when the tenant's quota would be exceeded.
  virtual absl::StatusOr<VersionInfo> AddVersion(const std::string& tenant, const std::string& task,
                                                 const std::string& digest) = 0;
  // The version `ref` names. NOT_FOUND naming what is missing (tenant/task, version, label or digest).
  // A digest-only ref resolves to a VersionInfo with empty tenant/task and version 0 when the blob exists.
  virtual absl::StatusOr<VersionInfo> Resolve(const Ref& ref) = 0;
  // Points `label` at an existing version (creating or moving it). INVALID_ARGUMENT for "latest" (store-managed)
  // or a bad label; NOT_FOUND when the version is absent.
  virtual absl::Status SetLabel(const std::string& tenant, const std::string& task, const std::string& label,
                                int64_t version) = 0;
  // NOT_FOUND when the label is not set; INVALID_ARGUMENT for "latest".
  virtual absl::Status DeleteLabel(const std::string& tenant, const std::string& task, const std::string& label) = 0;
  // Removes a version. FAILED_PRECONDITION (naming the labels) while a user label points at it; "latest" moves
  // to the highest remaining version (the task disappears with its last version). Version numbers are never
  // reused.
  virtual absl::Status DeleteVersion(const std::string& tenant, const std::string& task, int64_t version) = 0;
  // INVALID_ARGUMENT for a bad page token or page size.
  virtual absl::StatusOr<ListPage> List(const ListOptions& options) = 0;
  // The tenant's current usage (zero for an unknown tenant).
  virtual absl::StatusOr<TenantUsage> Usage(const std::string& tenant) = 0;

  // --- Maintenance ---
  virtual absl::StatusOr<GcReport> CollectGarbage(const GcOptions& options) = 0;
};

// --- Names and references (names.cc) ---

// Tenant, task and label names: 1-64 characters of [a-z0-9._-], starting with a letter or digit. They become
// path components and registry repository names, so nothing else is accepted. Labels must also not be all
// digits (that would read as a version).
bool IsValidName(absl::string_view name);
bool IsValidLabel(absl::string_view label);
// INVALID_ARGUMENT "<what> \"<name>\" is not a valid name: ..." when !IsValidName.
absl::Status CheckName(absl::string_view what, absl::string_view name);

// Parses the textual reference forms:
//   sha256:<64 hex>          a pack by content
//   task                     task of `default_tenant`, label latest (also task@3, task:prod, task@sha256:<hex>)
//   tenant/task              label latest
//   tenant/task@3            version 3
//   tenant/task:prod         label prod
//   tenant/task@sha256:<hex> that digest, which must be a version of tenant/task
// INVALID_ARGUMENT naming the problem for anything else.
absl::StatusOr<Ref> ParseRef(absl::string_view text, absl::string_view default_tenant);
// The canonical text of a ref (inverse of ParseRef).
std::string FormatRef(const Ref& ref);

// --- Convenience over any DeltaStore (store_util.cc) ---

// Writes `data` as one blob.
absl::StatusOr<BlobInfo> PutBlob(DeltaStore& store, absl::string_view data, const std::string& expected_digest = "");
// Reads a whole blob (verified when the store verifies reads).
absl::StatusOr<std::string> ReadBlob(DeltaStore& store, const std::string& digest);
// PutBlob then AddVersion.
absl::StatusOr<VersionInfo> PushPack(DeltaStore& store, const std::string& tenant, const std::string& task,
                                     absl::string_view data);

}  // namespace store
}  // namespace deltaserve

#endif  // DELTASERVE_DELTA_STORE_STORE_H_
