// ServerMetrics: every Prometheus metric the server exports, in one registry.
//
// Names carry the `deltaserve_` prefix and base units; label values come only from small fixed sets (RPC names,
// gRPC status code names), never from request content. The class owns the prometheus::Registry; the metric
// objects it hands out live as long as it does. Thread-safe (prometheus-cpp metrics are atomic).
#ifndef DELTASERVE_SERVER_METRICS_METRICS_H_
#define DELTASERVE_SERVER_METRICS_METRICS_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "server/batching/batcher.h"

namespace deltaserve {
namespace metrics {

class ServerMetrics : public batching::BatcherObserver {
 public:
  ServerMetrics();
  ~ServerMetrics() override = default;

  // One finished RPC: counts deltaserve_requests_total{rpc,code} and observes
  // deltaserve_request_duration_seconds{rpc}. REQUIRES: `rpc` is one of a fixed set of method names.
  void RecordRequest(const std::string& rpc, absl::StatusCode code, absl::Duration latency);
  // Inputs (texts or id lists) and tokens processed by Embed.
  void RecordInputs(int64_t inputs, int64_t tokens);
  // Bytes moved by the Deltas API: deltaserve_delta_store_bytes_total{direction="push"|"pull"}.
  void RecordStoreBytes(bool push, int64_t bytes);
  void SetModelLoadSeconds(double seconds);
  void SetModelInfo(const std::string& family, const std::string& dtype, const std::string& device,
                    const std::string& blas, int64_t parameters);

  // BatcherObserver.
  void OnBatch(int rows, int64_t padded_tokens, int64_t real_tokens, absl::Duration run_time) override;
  void OnRowQueued(absl::Duration queue_time) override;
  void OnQueueDepth(int64_t rows) override;
  void OnRowsDropped(int rows, absl::StatusCode why) override;

  // The text exposition format (version 0.0.4) of every metric.
  std::string Serialize() const;
  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Family<prometheus::Histogram>& request_duration_;
  prometheus::Counter& inputs_;
  prometheus::Counter& tokens_;
  prometheus::Histogram& batch_rows_;
  prometheus::Histogram& batch_padded_tokens_;
  prometheus::Histogram& batch_duration_;
  prometheus::Histogram& queue_duration_;
  prometheus::Counter& batches_;
  prometheus::Counter& padded_tokens_;
  prometheus::Counter& real_tokens_;
  prometheus::Gauge& queue_depth_;
  prometheus::Family<prometheus::Counter>& dropped_rows_;
  prometheus::Family<prometheus::Counter>& store_bytes_;
  prometheus::Gauge& model_load_seconds_;
  prometheus::Family<prometheus::Gauge>& model_info_;
};

}  // namespace metrics
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_METRICS_METRICS_H_
