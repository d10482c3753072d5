// What one load-generator run measured, and how it is shown: per-worker recorders (LoadRecorder), the merged
// summary (LoadReport: throughput, latency percentiles, errors by gRPC code, distinct tasks hit) and its text and
// JSON forms with a one-line verdict a person can act on.
//
// LoadRecorder is not thread-safe: each worker owns one, and they are merged after the run. The free functions
// are pure.
#ifndef DELTASERVE_CLIENT_LOADGEN_LOAD_REPORT_H_
#define DELTASERVE_CLIENT_LOADGEN_LOAD_REPORT_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "nlohmann/json.hpp"

namespace deltaserve {
namespace loadgen {

// The nearest-rank percentile of `sorted` (ascending): the smallest value with at least p % of the values at or
// below it. 0 for an empty vector. REQUIRES: 0 <= p <= 100.
double Percentile(const std::vector<double>& sorted, double p);

// What one worker saw: ok latencies, errors by code, requests per task, inputs. Not thread-safe.
class LoadRecorder {
 public:
  // One finished request: its latency, its status, the inputs it carried (texts) and the task it ran (-1 = the
  // base model).
  void Record(absl::Duration latency, absl::StatusCode code, int64_t inputs, int64_t task);
  // A request that was due (open loop) but never sent because the run ended first.
  void RecordNotSent() { ++not_sent_; }
  // How late a request started after its scheduled arrival (open loop).
  void RecordStartLag(absl::Duration lag);
  void Merge(const LoadRecorder& other);

  int64_t requests() const { return static_cast<int64_t>(ok_latencies_ms_.size()) + errors(); }
  int64_t errors() const;

  // Latencies of ok requests in ms, in completion order.
  const std::vector<double>& ok_latencies_ms() const { return ok_latencies_ms_; }
  const std::vector<double>& start_lags_ms() const { return start_lags_ms_; }
  const std::map<absl::StatusCode, int64_t>& errors_by_code() const { return errors_; }
  const std::map<int64_t, int64_t>& requests_by_task() const { return tasks_; }
  int64_t ok_inputs() const { return ok_inputs_; }
  int64_t not_sent() const { return not_sent_; }

 private:
  std::vector<double> ok_latencies_ms_;
  std::vector<double> start_lags_ms_;
  std::map<absl::StatusCode, int64_t> errors_;
  std::map<int64_t, int64_t> tasks_;  // task -> requests (ok or not)
  int64_t ok_inputs_ = 0;
  int64_t not_sent_ = 0;
};

// How a run (or one step of a sweep) was shaped, for the report.
struct RunShape {
  // "closed": `concurrency` clients each send the next request when the previous one returns;
  // "open": requests arrive at `target_qps` whatever the server's speed, at most `concurrency` in flight.
  std::string mode = "closed";
  int concurrency = 1;
  double target_qps = 0;  // open loop only
  // Seconds of the measuring window (warm-up excluded).
  double seconds = 0;
  // Tasks the draws were over (0 = the base model only).
  int64_t num_tasks = 0;
};

// What the verdict judges against.
struct VerdictRules {
  // The p99 latency a deployment must meet, in ms (0 = no objective).
  double slo_p99_ms = 0;
  // The largest acceptable share of failed requests.
  double max_error_rate = 0.001;
  // An open loop is saturated when it achieves less than this share of the target rate.
  double min_achieved_share = 0.95;
};

struct LoadReport {
  RunShape shape;
  int64_t requests = 0;  // finished, ok or not
  int64_t ok = 0;
  int64_t errors = 0;
  int64_t ok_inputs = 0;
  int64_t not_sent = 0;  // open loop: due but not sent before the end (the client could not keep up)
  double requests_per_second = 0;  // ok requests per second of the window
  double inputs_per_second = 0;    // ok inputs per second of the window
  // Latency of ok requests, ms (open loop: from the scheduled arrival, so client-side waiting counts).
  double p50_ms = 0, p95_ms = 0, p99_ms = 0, max_ms = 0, mean_ms = 0;
  // Open loop: p99 of how late requests started after their scheduled arrival, ms (a large value means the
  // client ran out of in-flight slots: raise --concurrency).
  double start_lag_p99_ms = 0;
  std::map<std::string, int64_t> errors_by_code;  // "RESOURCE_EXHAUSTED" -> count
  int64_t distinct_tasks = 0;
  // "OK", "FAIL", "SATURATED" or "MISSES_SLO", and the sentence that explains it.
  std::string verdict;
  std::string verdict_line;
};

// The summary of `recorder` for a run shaped as `shape`, judged by `rules`.
LoadReport Summarize(const LoadRecorder& recorder, const RunShape& shape, const VerdictRules& rules);

// A fixed-width table of steps (one line each) with a header, for a terminal.
std::string FormatTable(const std::vector<LoadReport>& steps);
// Errors by code ("RESOURCE_EXHAUSTED 12 (queue full: ...)"), one per line; "none" when there are none.
std::string FormatErrors(const LoadReport& report);
nlohmann::json ToJson(const LoadReport& report);

// What to do about an error code, in a few words ("" when there is nothing specific to say).
std::string HintForCode(absl::StatusCode code);

}  // namespace loadgen
}  // namespace deltaserve

#endif  // DELTASERVE_CLIENT_LOADGEN_LOAD_REPORT_H_
