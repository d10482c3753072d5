// Reading a deltaserve server's Prometheus /metrics endpoint from the load generator: a plain HTTP GET and a
// parser of the text exposition format, so a load report can show what the server saw (batch sizes, queue time,
// cache hits) next to what the client measured.
//
// Pure functions (ScrapeMetrics does one blocking HTTP request); thread-safe.
#ifndef DELTASERVE_CLIENT_LOADGEN_METRICS_SCRAPE_H_
#define DELTASERVE_CLIENT_LOADGEN_METRICS_SCRAPE_H_

#include <map>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace deltaserve {
namespace loadgen {

// Every sample of a text-format exposition, by series ("name" or "name{labels}" exactly as written).
// INVALID_ARGUMENT naming the line for a sample line that is not "series value [timestamp]".
absl::StatusOr<std::map<std::string, double>> ParsePrometheusText(absl::string_view text);

// The sum of every series of metric `name` (all label sets; "name" itself, not name_sum / name_count).
double SumMetric(const std::map<std::string, double>& samples, const std::string& name);
// The sum of the series of `name` whose labels contain `label_pair` (e.g. "result=\"hit\"").
double SumMetricWithLabel(const std::map<std::string, double>& samples, const std::string& name,
                          const std::string& label_pair);

// GET http://<host:port>/metrics and parse it. UNAVAILABLE when the endpoint cannot be reached or answers other
// than 200.
absl::StatusOr<std::map<std::string, double>> ScrapeMetrics(const std::string& host_port,
                                                            absl::Duration timeout = absl::Seconds(5));

}  // namespace loadgen
}  // namespace deltaserve

#endif  // DELTASERVE_CLIENT_LOADGEN_METRICS_SCRAPE_H_
