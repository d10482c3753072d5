// ServingActivity: how many serving forward passes run in this process right now, so that background work
// (fine-tuning jobs) can step aside while one does. Measured (docs/BENCHMARKS.md, P8): with a training thread
// running freely — even at nice +19 — a serving forward on a 2-core machine takes about twice as long, because the
// two compete for the cores and memory bandwidth at every op; a trainer that waits between its ops while a serving
// forward is in flight gives serving back part of its latency.
//
// Process-wide state: thread-safe, no LibTorch.
#ifndef DELTASERVE_SERVER_COMMON_SERVING_ACTIVITY_H_
#define DELTASERVE_SERVER_COMMON_SERVING_ACTIVITY_H_

#include <atomic>
#include <cstdint>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace deltaserve {

class ServingActivity {
 public:
  // Marks one serving forward pass in flight for its lifetime. Create it after taking the model's weights lock
  // (a trainer may wait on the counter while it holds the lock shared; counting before an exclusive lock would make
  // both wait on each other until the trainer's wait cap).
  class Scope {
   public:
    Scope() { in_flight_.fetch_add(1, std::memory_order_relaxed); }
    ~Scope() {
      // The last pass out wakes the waiters: absl::Mutex re-evaluates their conditions when it is released.
      if (in_flight_.fetch_sub(1, std::memory_order_acq_rel) == 1) absl::MutexLock lock(&mu_);
    }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;
  };

  // Serving forward passes running now.
  static int64_t InFlight() { return in_flight_.load(std::memory_order_relaxed); }

  // Blocks (without spinning) until no serving forward runs or `max_wait` passed. Returns at once when none runs.
  static void WaitUntilIdle(absl::Duration max_wait);

 private:
  static std::atomic<int64_t> in_flight_;
  static absl::Mutex mu_;
};

}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_COMMON_SERVING_ACTIVITY_H_
