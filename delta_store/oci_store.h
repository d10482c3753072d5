// OciRegistryStore: a DeltaStore kept in an OCI registry (the Distribution spec), so that replicas behind one
// Kubernetes Service share one store. Layout under a repository prefix P (docs/STORE.md, "Shared store"):
//   P/blobs            every blob, and per blob a tag "sha256-<hex>" on a small index manifest (the blob is its
//                      layer) that makes it visible, lists it and keeps the registry's own GC off it
//   P/<tenant>/<task>  one OCI image manifest per tag: tag "<N>" is version N, tag "<label>" a label (and
//                      "latest"); each manifest's one layer is the pack blob (mounted from P/blobs), its
//                      annotations carry the version number, label and creation time
// A registry cannot delete a tag, so deleting a version or label re-points its tag at a tombstone manifest
// (annotation io.deltaserve.deleted); version numbers stay taken. Every tag has a manifest of its own, so a
// manifest can be deleted (best effort, to tidy up) without taking another tag with it.
//
// The registry is the only state: every call reads what it needs from the registry (a reference query reads the
// task's tags; AddVersion and quotas read the tenant's tasks), builds a RefTable view and plans with it. A
// registry has no compare-and-swap, so two replicas adding a version of the same task at once may race: the
// store checks that the tag is free before its PUT and reads it back after, retrying with the next number when
// another replica took it; a race inside that window still loses one of the two pushes (see docs/STORE.md).
// Within one process mutations are serialized.
//
// Thread-safe.
#ifndef DELTASERVE_DELTA_STORE_OCI_STORE_H_
#define DELTASERVE_DELTA_STORE_OCI_STORE_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "delta_store/ref_table.h"
#include "delta_store/store.h"

namespace deltaserve {
namespace store {

struct OciRegistryStoreOptions {
  // Base URL of the registry: scheme://host[:port].
  std::string url = "http://127.0.0.1:5000";
  // Repository prefix: one or more path components of [a-z0-9] separated by ., _, __ or -, joined by "/".
  std::string repository_prefix = "deltaserve";
  // Static bearer token sent with every request ("" = none).
  std::string bearer_token;
  // HTTP basic credentials, used when `username` is set and there is no bearer token.
  std::string username;
  std::string password;
  // Time to connect to the registry.
  absl::Duration connect_timeout = absl::Seconds(5);
  // Time for one request, transfer included.
  absl::Duration request_timeout = absl::Minutes(5);
  // Largest blob accepted by a BlobWriter (and downloaded by OpenBlob).
  int64_t max_blob_bytes = int64_t{256} << 20;
  // Per-tenant quotas, checked by AddVersion against the registry's current contents.
  QuotaOptions quotas;
  // Uploads larger than this go in PATCH chunks of this size.
  int64_t chunk_size = int64_t{8} << 20;
  // Where writers and readers buffer a blob (an unlinked temporary file); "" = $TMPDIR, else /tmp.
  std::string temp_dir;
  // How often AddVersion retries with a new number when another replica took the one it planned.
  int add_version_attempts = 5;
  // Check on open that the registry answers (GET /v2/).
  bool check_on_open = true;
};

// UNAVAILABLE when check_on_open and the registry does not answer; UNAUTHENTICATED / PERMISSION_DENIED when it
// refuses the credentials; INVALID_ARGUMENT for bad options.
absl::StatusOr<std::unique_ptr<DeltaStore>> OpenOciRegistryStore(const OciRegistryStoreOptions& options);

}  // namespace store
}  // namespace deltaserve

#endif  // DELTASERVE_DELTA_STORE_OCI_STORE_H_
