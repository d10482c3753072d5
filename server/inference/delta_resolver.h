// DeltaResolver: finds the delta pack a request names (tenant + TaskSelector). The serving path asks it once per
// request and keeps the returned shared_ptr for as long as the request's rows run, so a pack in use is never
// freed under a batch (the handle pins it). The server's resolver is deltas::DeltaManager (packs from the delta
// store); tests use small fakes. Implementations must be thread-safe.
#ifndef DELTASERVE_SERVER_INFERENCE_DELTA_RESOLVER_H_
#define DELTASERVE_SERVER_INFERENCE_DELTA_RESOLVER_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "server/delta/delta_pack.h"
#include "server/model/model.h"

namespace deltaserve {
namespace inference {

// A request's task selector (the public API's TaskRef). Empty = the base model.
struct TaskSelector {
  std::string task;
  int64_t version = 0;  // 0 = unset
  std::string label;
  std::string digest;
  bool empty() const { return task.empty() && version == 0 && label.empty() && digest.empty(); }
};

class DeltaResolver {
 public:
  virtual ~DeltaResolver() = default;
  // The pack `selector` names for `tenant`. NOT_FOUND (naming the task and tenant) when there is none;
  // INVALID_ARGUMENT for a malformed selector; FAILED_PRECONDITION for selectors this resolver cannot serve.
  // REQUIRES: !selector.empty().
  virtual absl::StatusOr<std::shared_ptr<const delta::DeltaPack>> Resolve(const std::string& tenant,
                                                                          const TaskSelector& selector) const = 0;
  // Packs loaded (ready to serve) now.
  virtual int num_packs() const = 0;
};

}  // namespace inference
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_INFERENCE_DELTA_RESOLVER_H_
