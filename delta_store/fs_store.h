// FileSystemStore: the default DeltaStore, under one root directory (docs/STORE.md):
//   <root>/blobs/sha256/<2 hex>/<62 hex>   immutable blobs, named by digest
//   <root>/tmp/                            uploads in progress (written, fsync'ed, renamed into blobs/)
//   <root>/refs/journal                    the reference journal: one checksummed RefOp per line, fsync'ed
//                                          before a mutation is acknowledged; compacted on open
//   <root>/LOCK                            flock'ed by the open store: one process per root
// A blob is visible only after its bytes and its directory entry are durable; a mutation is acknowledged only
// after its journal line is. On open a torn last journal line (a crash mid-append) is dropped, and everything
// acknowledged before it is intact. Path names come only from digests and validated names.
// Thread-safe.
#ifndef DELTASERVE_DELTA_STORE_FS_STORE_H_
#define DELTASERVE_DELTA_STORE_FS_STORE_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "delta_store/ref_table.h"
#include "delta_store/store.h"

namespace deltaserve {
namespace store {

struct FileSystemStoreOptions {
  // Largest blob accepted by a BlobWriter.
  int64_t max_blob_bytes = int64_t{256} << 20;
  // Per-tenant quotas, checked by AddVersion.
  QuotaOptions quotas;
  // Verify a blob's digest on every read (true), or only on its first read since the store was opened (false).
  bool verify_every_read = false;
  // fsync files and directories (false only for tests that do not simulate crashes; never in production).
  bool sync = true;
  // Create <root> when it does not exist.
  bool create_if_missing = true;
};

// Opens (and recovers) the store at `root`. FAILED_PRECONDITION when another process holds it;
// DATA_LOSS when the journal is corrupt before its last line (refusing to guess); NOT_FOUND when `root` is
// missing and !create_if_missing.
absl::StatusOr<std::unique_ptr<DeltaStore>> OpenFileSystemStore(const std::string& root,
                                                                 const FileSystemStoreOptions& options = {});

}  // namespace store
}  // namespace deltaserve

#endif  // DELTASERVE_DELTA_STORE_FS_STORE_H_
