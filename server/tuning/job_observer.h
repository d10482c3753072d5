// JobObserver: what the job manager tells the metrics about fine-tuning jobs. An interface only (no LibTorch, no
// protos), so that the metrics library does not depend on the trainer. Implementations must be thread-safe: the
// manager calls them from RPC and worker threads, with none of its locks held.
#ifndef DELTASERVE_SERVER_TUNING_JOB_OBSERVER_H_
#define DELTASERVE_SERVER_TUNING_JOB_OBSERVER_H_

#include <cstdint>

#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace deltaserve {
namespace tuning {

class JobObserver {
 public:
  virtual ~JobObserver() = default;
  // A job entered `state`: "queued" (submitted), "running", "succeeded", "failed" or "cancelled".
  virtual void OnJobState(absl::string_view state) {}
  // Jobs now queued and running.
  virtual void OnJobCounts(int64_t queued, int64_t running) {}
  // A training step over `examples` examples took `duration`.
  virtual void OnTrainingStep(int64_t examples, absl::Duration duration) {}
};

}  // namespace tuning
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_TUNING_JOB_OBSERVER_H_
