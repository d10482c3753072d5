#include "server/common/serving_activity.h"

namespace deltaserve {

std::atomic<int64_t> ServingActivity::in_flight_{0};
absl::Mutex ServingActivity::mu_(absl::kConstInit);

void ServingActivity::WaitUntilIdle(absl::Duration max_wait) {
  if (in_flight_.load(std::memory_order_acquire) == 0) return;
  absl::MutexLock lock(&mu_);
  mu_.AwaitWithTimeout(absl::Condition(
                           +[](std::atomic<int64_t>* n) { return n->load(std::memory_order_acquire) == 0; },
                           &in_flight_),
                       max_wait);
}

}  // namespace deltaserve
