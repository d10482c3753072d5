// ServerMetrics: every Prometheus metric the server exports, in one registry.
//
// Names carry the `deltaserve_` prefix and base units; label values come only from small fixed sets (RPC names,
// gRPC status code names), never from request content. The class owns the prometheus::Registry; the metric
// objects it hands out live as long as it does. Thread-safe (prometheus-cpp metrics are atomic).
#ifndef DELTASERVE_SERVER_METRICS_METRICS_H_
#define DELTASERVE_SERVER_METRICS_METRICS_H_

#include <array>
#include <map>
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
#include "delta_store/observed_store.h"
#include "server/deltas/delta_cache.h"
#include "server/tuning/job_observer.h"

namespace deltaserve {
namespace metrics {

class ServerMetrics : public batching::BatcherObserver,
                      public deltas::DeltaCacheObserver,
                      public tuning::JobObserver,
                      public store::StoreObserver {
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
  // The scheduler's side of BatcherObserver: deltaserve_batch_distinct_deltas, deltaserve_batch_rows_by_method_total
  // {method} (the delta method names, "base", or "other"), deltaserve_tenant_requests_total{tenant,priority},
  // deltaserve_tenant_queued_rows{tenant}, deltaserve_queue_rejected_requests_total{reason}.
  void OnBatchDeltas(int distinct_deltas, const std::map<std::string, int>& rows_by_method) override;
  void OnRequestAdmitted(const std::string& tenant, batching::Priority priority) override;
  void OnTenantQueuedRows(const std::string& tenant, int64_t delta) override;
  void OnRequestRejected(const std::string& tenant, batching::RejectReason reason) override;

  // The `tenant` label value of per-tenant metrics. Label values stay few: the first kMaxTenantLabels distinct
  // tenants seen whose names are valid store names (1-64 of [a-z0-9._-], docs/STORE.md) are their own value;
  // every other tenant is "other". Thread-safe.
  static constexpr int kMaxTenantLabels = 32;
  std::string TenantLabel(const std::string& tenant);

  // DeltaCacheObserver: deltaserve_delta_cache_lookups_total{tier}, deltaserve_delta_loads_total{source,outcome},
  // deltaserve_delta_load_seconds{source}, deltaserve_delta_cache_evictions_total{tier},
  // deltaserve_delta_cache_resident_bytes{tier}, deltaserve_delta_cache_resident_packs{tier}.
  void OnCacheLookup(deltas::CacheTier served_from) override;
  void OnCacheLoad(deltas::CacheTier source, bool ok, absl::Duration duration) override;
  void OnCacheEviction(deltas::CacheTier tier) override;
  void OnCacheResidency(deltas::CacheTier tier, int64_t bytes, int64_t entries) override;

  // JobObserver: deltaserve_tuning_jobs_total{state} (jobs entering each state), deltaserve_tuning_jobs{state}
  // (queued / running now), deltaserve_tuning_steps_total, deltaserve_tuning_examples_total,
  // deltaserve_tuning_step_seconds.
  void OnJobState(absl::string_view state) override;
  void OnJobCounts(int64_t queued, int64_t running) override;
  void OnTrainingStep(int64_t examples, absl::Duration duration) override;

  // StoreObserver: deltaserve_store_operations_total{op,code} (op: store::StoreOpName; code: the status code
  // name) and deltaserve_store_operation_duration_seconds{op}.
  void OnStoreOperation(store::StoreOp op, absl::StatusCode code, absl::Duration latency) override;

  // deltaserve_ready: 1 while the server is ready for calls (model loaded, not draining), else 0.
  void SetReady(bool ready);

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
  prometheus::Family<prometheus::Counter>& cache_lookups_;
  prometheus::Family<prometheus::Counter>& delta_loads_;
  prometheus::Family<prometheus::Histogram>& delta_load_seconds_;
  prometheus::Family<prometheus::Counter>& cache_evictions_;
  prometheus::Family<prometheus::Gauge>& cache_resident_bytes_;
  prometheus::Family<prometheus::Gauge>& cache_resident_packs_;
  // The series of the families above by CacheTier (index = static_cast<int>(tier); nullptr where a tier has
  // none), looked up once: the cache reports every request.
  std::array<prometheus::Counter*, deltas::kNumCacheTiers> lookups_by_tier_{};
  std::array<prometheus::Counter*, deltas::kNumCacheTiers> loads_ok_by_source_{};
  std::array<prometheus::Counter*, deltas::kNumCacheTiers> loads_error_by_source_{};
  std::array<prometheus::Histogram*, deltas::kNumCacheTiers> load_seconds_by_source_{};
  std::array<prometheus::Counter*, deltas::kNumCacheTiers> evictions_by_tier_{};
  std::array<prometheus::Gauge*, deltas::kNumCacheTiers> resident_bytes_by_tier_{};
  std::array<prometheus::Gauge*, deltas::kNumCacheTiers> resident_packs_by_tier_{};
  // The scheduler's metrics (metrics.cc), registered in `registry_` when the object is built.
  struct SchedulerSeries;
  static std::shared_ptr<SchedulerSeries> MakeSchedulerSeries(prometheus::Registry& registry);
  std::shared_ptr<SchedulerSeries> scheduler_ = MakeSchedulerSeries(*registry_);
  // The fine-tuning jobs' metrics (metrics.cc).
  struct TuningSeries;
  static std::shared_ptr<TuningSeries> MakeTuningSeries(prometheus::Registry& registry);
  std::shared_ptr<TuningSeries> tuning_ = MakeTuningSeries(*registry_);
  // The store's and the lifecycle's metrics (metrics.cc).
  struct StoreSeries;
  static std::shared_ptr<StoreSeries> MakeStoreSeries(prometheus::Registry& registry);
  std::shared_ptr<StoreSeries> store_ = MakeStoreSeries(*registry_);
};

}  // namespace metrics
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_METRICS_METRICS_H_
