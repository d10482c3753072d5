// RunLoad: drives a request function under a closed or an open loop and records what happened.
//
//   closed loop: `concurrency` workers; each sends its next request as soon as the previous one returns (the
//                server's speed sets the rate: this measures capacity at a given concurrency);
//   open loop:   requests arrive at `qps` (Poisson or evenly spaced gaps) whatever the server's speed, served by up
//                to `concurrency` workers; latency counts from the scheduled arrival, so a request that waited for
//                a free worker is as late as a user would see it (no coordinated omission).
//
// Each request draws its task from the caller's `pick_task` (e.g. a ZipfSampler). Requests that start during the
// warm-up are sent but not recorded. The run ends at `duration` (or after `max_requests` measured requests);
// requests in flight then finish and count.
//
// RunLoad blocks; it owns its worker threads for the duration of the call. The request function is called from
// several threads at once and must be thread-safe.
#ifndef DELTASERVE_CLIENT_LOADGEN_LOAD_RUNNER_H_
#define DELTASERVE_CLIENT_LOADGEN_LOAD_RUNNER_H_

#include <cstdint>
#include <functional>
#include <random>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/loadgen/load_report.h"

namespace deltaserve {
namespace loadgen {

enum class LoopMode { kClosed, kOpen };
enum class Arrivals { kPoisson, kUniform };

// "closed" / "open"; "poisson" / "uniform". INVALID_ARGUMENT otherwise.
absl::StatusOr<LoopMode> ParseLoopMode(const std::string& text);
absl::StatusOr<Arrivals> ParseArrivals(const std::string& text);

// Gaps between open-loop arrivals at `qps` per second. Not thread-safe (one dispatcher uses it).
class ArrivalProcess {
 public:
  // INVALID_ARGUMENT unless 0 < qps <= 1e6.
  static absl::StatusOr<ArrivalProcess> Create(double qps, Arrivals kind, uint64_t seed);
  // The gap before the next arrival: exponential with mean 1/qps (Poisson), or exactly 1/qps (uniform).
  absl::Duration NextGap();

 private:
  ArrivalProcess(double qps, Arrivals kind, uint64_t seed) : qps_(qps), kind_(kind), rng_(seed) {}
  double qps_;
  Arrivals kind_;
  std::mt19937_64 rng_;
};

struct RunOptions {
  // Closed or open loop (see the file comment).
  LoopMode mode = LoopMode::kClosed;
  // Closed loop: the number of clients. Open loop: the most requests in flight at once.
  int concurrency = 8;
  // Open loop: the target arrival rate, requests per second (> 0).
  double qps = 0;
  // Open loop: how arrivals are spaced.
  Arrivals arrivals = Arrivals::kPoisson;
  // Measuring time after the warm-up. The run stops at warm-up + duration.
  absl::Duration duration = absl::Seconds(10);
  // Requests started before this much time has passed are sent but not recorded.
  absl::Duration warmup = absl::Seconds(2);
  // Stop after this many measured requests have started (0 = no limit; the duration still applies).
  int64_t max_requests = 0;
  // Seed of the task draws and arrivals (each worker derives its own).
  uint64_t seed = 1;
};

// One request to send.
struct RequestSlot {
  int worker = 0;     // 0 .. concurrency-1
  int64_t task = -1;  // what pick_task drew
};

// Sends one request; returns the inputs it processed, or its error.
using RequestFn = std::function<absl::StatusOr<int64_t>(const RequestSlot& slot)>;
// Draws the task of the next request (called with the calling worker's own engine).
using TaskPicker = std::function<int64_t(std::mt19937_64& rng)>;

// The merged record of the run and the measuring window's length in seconds. INVALID_ARGUMENT for bad options
// (concurrency < 1, an open loop without qps > 0, a non-positive duration, a negative warm-up).
struct RunResult {
  LoadRecorder recorder;
  double seconds = 0;
};
absl::StatusOr<RunResult> RunLoad(const RunOptions& options, const TaskPicker& pick_task, const RequestFn& send);

}  // namespace loadgen
}  // namespace deltaserve

#endif  // DELTASERVE_CLIENT_LOADGEN_LOAD_RUNNER_H_
