// MemoryStore: a DeltaStore kept entirely in memory (blobs as strings, references in a RefTable). For tests and
// for a server run without a store directory. Thread-safe.
#ifndef DELTASERVE_DELTA_STORE_MEMORY_STORE_H_
#define DELTASERVE_DELTA_STORE_MEMORY_STORE_H_

#include <memory>

#include "delta_store/ref_table.h"
#include "delta_store/store.h"

namespace deltaserve {
namespace store {

struct MemoryStoreOptions {
  // Largest blob accepted by a BlobWriter.
  int64_t max_blob_bytes = int64_t{256} << 20;
  // Per-tenant quotas, checked by AddVersion.
  QuotaOptions quotas;
};

std::unique_ptr<DeltaStore> NewMemoryStore(const MemoryStoreOptions& options = {});

}  // namespace store
}  // namespace deltaserve

#endif  // DELTASERVE_DELTA_STORE_MEMORY_STORE_H_
