#include "client/loadgen/load_report.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace deltaserve {
namespace loadgen {

double Percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0;
  const double n = static_cast<double>(sorted.size());
  // Nearest rank: ceil(p/100 * n), 1-based, at least 1.
  int64_t rank = static_cast<int64_t>(std::ceil(p / 100.0 * n - 1e-9));
  rank = std::clamp<int64_t>(rank, 1, static_cast<int64_t>(sorted.size()));
  return sorted[static_cast<size_t>(rank - 1)];
}

void LoadRecorder::Record(absl::Duration latency, absl::StatusCode code, int64_t inputs, int64_t task) {
  ++tasks_[task];
  if (code == absl::StatusCode::kOk) {
    ok_latencies_ms_.push_back(absl::ToDoubleMilliseconds(latency));
    ok_inputs_ += inputs;
  } else {
    ++errors_[code];
  }
}

void LoadRecorder::RecordStartLag(absl::Duration lag) {
  start_lags_ms_.push_back(std::max(0.0, absl::ToDoubleMilliseconds(lag)));
}

void LoadRecorder::Merge(const LoadRecorder& other) {
  ok_latencies_ms_.insert(ok_latencies_ms_.end(), other.ok_latencies_ms_.begin(), other.ok_latencies_ms_.end());
  start_lags_ms_.insert(start_lags_ms_.end(), other.start_lags_ms_.begin(), other.start_lags_ms_.end());
  for (const auto& [code, n] : other.errors_) errors_[code] += n;
  for (const auto& [task, n] : other.tasks_) tasks_[task] += n;
  ok_inputs_ += other.ok_inputs_;
  not_sent_ += other.not_sent_;
}

int64_t LoadRecorder::errors() const {
  int64_t n = 0;
  for (const auto& [code, count] : errors_) n += count;
  return n;
}

std::string HintForCode(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kResourceExhausted:
      return "the server's queue is full: the load is above capacity (lower it, or raise --max_queued_rows)";
    case absl::StatusCode::kDeadlineExceeded:
      return "requests outlived their deadline (--timeout_s): the server is overloaded or a pack load is slow";
    case absl::StatusCode::kUnavailable:
      return "the server could not be reached or is shutting down";
    case absl::StatusCode::kNotFound:
      return "a task is not registered: run with --setup=push, or check --task_prefix / --tenants";
    case absl::StatusCode::kInvalidArgument:
      return "the server rejected the request: check --batch against its max_inputs_per_request and the texts";
    case absl::StatusCode::kFailedPrecondition:
      return "a pack does not fit the served model (another backbone?)";
    case absl::StatusCode::kCancelled:
      return "the call was cancelled";
    default:
      return "";
  }
}

LoadReport Summarize(const LoadRecorder& recorder, const RunShape& shape, const VerdictRules& rules) {
  LoadReport r;
  r.shape = shape;
  std::vector<double> lat = recorder.ok_latencies_ms();
  std::sort(lat.begin(), lat.end());
  r.ok = static_cast<int64_t>(lat.size());
  r.errors = recorder.errors();
  r.requests = r.ok + r.errors;
  r.ok_inputs = recorder.ok_inputs();
  r.not_sent = recorder.not_sent();
  if (shape.seconds > 0) {
    r.requests_per_second = r.ok / shape.seconds;
    r.inputs_per_second = r.ok_inputs / shape.seconds;
  }
  r.p50_ms = Percentile(lat, 50);
  r.p95_ms = Percentile(lat, 95);
  r.p99_ms = Percentile(lat, 99);
  r.max_ms = lat.empty() ? 0 : lat.back();
  r.mean_ms = lat.empty() ? 0 : std::accumulate(lat.begin(), lat.end(), 0.0) / lat.size();
  std::vector<double> lags = recorder.start_lags_ms();
  std::sort(lags.begin(), lags.end());
  r.start_lag_p99_ms = Percentile(lags, 99);
  for (const auto& [code, n] : recorder.errors_by_code()) r.errors_by_code[absl::StatusCodeToString(code)] = n;
  for (const auto& [task, n] : recorder.requests_by_task()) {
    if (task >= 0) ++r.distinct_tasks;
  }

  // The verdict: the first problem found, in order of severity.
  // Requests the client could not send in time are a sign of saturation, not server errors.
  const double error_rate = r.requests > 0 ? static_cast<double>(r.errors) / r.requests : 0;
  const std::string load = shape.mode == "open"
                               ? absl::StrFormat("at a target of %.1f req/s", shape.target_qps)
                               : absl::StrFormat("with %d concurrent clients", shape.concurrency);
  if (r.ok == 0) {
    r.verdict = "FAIL";
    std::string why = "no request succeeded";
    if (!recorder.errors_by_code().empty()) {
      const auto worst = std::max_element(recorder.errors_by_code().begin(), recorder.errors_by_code().end(),
                                          [](const auto& a, const auto& b) { return a.second < b.second; });
      why = absl::StrCat(why, " (mostly ", absl::StatusCodeToString(worst->first), ": ", HintForCode(worst->first),
                         ")");
    }
    r.verdict_line = absl::StrCat("FAIL: ", why, " ", load, ".");
  } else if (error_rate > rules.max_error_rate) {
    r.verdict = "FAIL";
    const auto worst = std::max_element(recorder.errors_by_code().begin(), recorder.errors_by_code().end(),
                                        [](const auto& a, const auto& b) { return a.second < b.second; });
    std::string why = absl::StrCat(", mostly ", absl::StatusCodeToString(worst->first));
    const std::string hint = HintForCode(worst->first);
    if (!hint.empty()) absl::StrAppend(&why, ": ", hint);
    r.verdict_line = absl::StrFormat("FAIL: %.2f %% of requests failed%s (%s; allowed %.2f %%).", 100 * error_rate,
                                     why, load, 100 * rules.max_error_rate);
  } else if (shape.mode == "open" && shape.target_qps > 0 &&
             (r.requests_per_second < rules.min_achieved_share * shape.target_qps || r.not_sent > 0)) {
    r.verdict = "SATURATED";
    r.verdict_line = absl::StrFormat(
        "SATURATED: %.1f req/s achieved of %.1f targeted (p99 %.1f ms%s): this load is above the server's "
        "capacity%s.",
        r.requests_per_second, shape.target_qps, r.p99_ms,
        r.not_sent > 0 ? absl::StrFormat(", %d due requests never sent", r.not_sent) : "",
        r.errors == 0 && r.start_lag_p99_ms > 100
            ? absl::StrFormat(" (requests waited for one of the %d in-flight slots: p99 %.0f ms late)",
                              shape.concurrency, r.start_lag_p99_ms)
            : "");
  } else if (rules.slo_p99_ms > 0 && r.p99_ms > rules.slo_p99_ms) {
    r.verdict = "MISSES_SLO";
    r.verdict_line = absl::StrFormat("MISSES SLO: p99 %.1f ms > %.1f ms at %.1f req/s (%.1f inputs/s) %s.", r.p99_ms,
                                     rules.slo_p99_ms, r.requests_per_second, r.inputs_per_second, load);
  } else {
    r.verdict = "OK";
    r.verdict_line = absl::StrFormat("OK: %.1f req/s (%.1f inputs/s) %s, p50 %.1f ms, p99 %.1f ms, %s%s.",
                                     r.requests_per_second, r.inputs_per_second, load, r.p50_ms, r.p99_ms,
                                     r.errors == 0 ? "no errors" : absl::StrCat(r.errors, " errors"),
                                     rules.slo_p99_ms > 0 ? absl::StrFormat(" (SLO p99 <= %.1f ms met)",
                                                                            rules.slo_p99_ms)
                                                          : "");
  }
  return r;
}

std::string FormatTable(const std::vector<LoadReport>& steps) {
  std::string out = absl::StrFormat("%-10s %9s %10s %9s %9s %9s %9s %8s %10s  %s\n", "load", "req/s", "inputs/s",
                                    "p50 ms", "p95 ms", "p99 ms", "max ms", "errors", "tasks hit", "verdict");
  for (const LoadReport& r : steps) {
    const std::string load = r.shape.mode == "open" ? absl::StrFormat("%.0f qps", r.shape.target_qps)
                                                    : absl::StrFormat("%d clients", r.shape.concurrency);
    const std::string tasks =
        r.shape.num_tasks > 0 ? absl::StrCat(r.distinct_tasks, "/", r.shape.num_tasks) : std::string("base");
    absl::StrAppendFormat(&out, "%-10s %9.1f %10.1f %9.1f %9.1f %9.1f %9.1f %8d %10s  %s\n", load,
                          r.requests_per_second, r.inputs_per_second, r.p50_ms, r.p95_ms, r.p99_ms, r.max_ms,
                          r.errors, tasks, r.verdict);
  }
  return out;
}

std::string FormatErrors(const LoadReport& report) {
  if (report.errors_by_code.empty() && report.not_sent == 0) return "none\n";
  std::string out;
  for (const auto& [code, n] : report.errors_by_code) {
    absl::StatusCode c = absl::StatusCode::kUnknown;
    for (int i = 0; i <= 16; ++i) {
      if (absl::StatusCodeToString(static_cast<absl::StatusCode>(i)) == code) c = static_cast<absl::StatusCode>(i);
    }
    const std::string hint = HintForCode(c);
    absl::StrAppend(&out, "  ", code, " ", n, hint.empty() ? "" : absl::StrCat(" (", hint, ")"), "\n");
  }
  if (report.not_sent > 0) {
    absl::StrAppend(&out, "  not sent: ", report.not_sent,
                    " due requests were still waiting for an in-flight slot when the step ended (the server was "
                    "slower than the arrivals; not server errors)\n");
  }
  return out;
}

nlohmann::json ToJson(const LoadReport& r) {
  nlohmann::json j;
  j["mode"] = r.shape.mode;
  j["concurrency"] = r.shape.concurrency;
  if (r.shape.mode == "open") j["target_qps"] = r.shape.target_qps;
  j["seconds"] = r.shape.seconds;
  j["requests"] = r.requests;
  j["ok"] = r.ok;
  j["errors"] = r.errors;
  j["not_sent"] = r.not_sent;
  j["inputs"] = r.ok_inputs;
  j["requests_per_second"] = r.requests_per_second;
  j["inputs_per_second"] = r.inputs_per_second;
  j["latency_ms"] = {{"p50", r.p50_ms}, {"p95", r.p95_ms}, {"p99", r.p99_ms}, {"max", r.max_ms},
                     {"mean", r.mean_ms}};
  if (r.shape.mode == "open") j["start_lag_p99_ms"] = r.start_lag_p99_ms;
  j["errors_by_code"] = r.errors_by_code;
  j["tasks"] = r.shape.num_tasks;
  j["distinct_tasks"] = r.distinct_tasks;
  j["verdict"] = r.verdict;
  j["verdict_line"] = r.verdict_line;
  return j;
}

}  // namespace loadgen
}  // namespace deltaserve
