// ObservedStore: wraps a DeltaStore and reports every operation (which one, its status code, how long it took)
// to a StoreObserver, so that the server can export store traffic and errors as metrics without the store
// depending on a metrics library. It changes nothing else: every call and its result pass through unchanged.
//
// Owns the wrapped store. Thread-safe when the wrapped store and the observer are (both must be: the server calls
// the store from many threads).
#ifndef DELTASERVE_DELTA_STORE_OBSERVED_STORE_H_
#define DELTASERVE_DELTA_STORE_OBSERVED_STORE_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "delta_store/store.h"

namespace deltaserve {
namespace store {

// What an observed call did: a small, fixed set (these are metric label values).
enum class StoreOp {
  kGet,            // OpenBlob, and each Read that fails (a corrupt blob shows up here)
  kPut,            // NewBlobWriter, and the writer's Commit
  kStat,           // StatBlob
  kList,           // ListBlobs, List
  kUsage,          // Usage
  kAddVersion,     // AddVersion
  kResolve,        // Resolve
  kSetLabel,       // SetLabel
  kDeleteLabel,    // DeleteLabel
  kDeleteVersion,  // DeleteVersion
  kDeleteBlob,     // DeleteBlob
  kGc,             // CollectGarbage
};
inline constexpr int kNumStoreOps = 12;
// "get", "put", "stat", "list", "usage", "add_version", "resolve", "set_label", "delete_label", "delete_version",
// "delete_blob", "gc".
const char* StoreOpName(StoreOp op);

// Receives one call per observed operation. Implementations must be thread-safe and fast (called inline).
class StoreObserver {
 public:
  virtual ~StoreObserver() = default;
  virtual void OnStoreOperation(StoreOp op, absl::StatusCode code, absl::Duration latency) = 0;
};

// REQUIRES: `observer` outlives the returned store and every reader and writer it hands out.
std::unique_ptr<DeltaStore> NewObservedStore(std::unique_ptr<DeltaStore> base, StoreObserver* observer);

}  // namespace store
}  // namespace deltaserve

#endif  // DELTASERVE_DELTA_STORE_OBSERVED_STORE_H_
