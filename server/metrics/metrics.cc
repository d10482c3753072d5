#include "server/metrics/metrics.h"

#include <algorithm>
#include <set>
#include <sstream>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "prometheus/text_serializer.h"

namespace deltaserve {
namespace metrics {
namespace {

prometheus::Histogram::BucketBoundaries LatencyBuckets() {
  // 100 us .. ~26 s, x2 per bucket.
  prometheus::Histogram::BucketBoundaries b;
  for (double v = 1e-4; v < 30; v *= 2) b.push_back(v);
  return b;
}

prometheus::Histogram::BucketBoundaries PowersOfTwo(double max) {
  prometheus::Histogram::BucketBoundaries b;
  for (double v = 1; v <= max; v *= 2) b.push_back(v);
  return b;
}

}  // namespace

ServerMetrics::ServerMetrics()
    : registry_(std::make_shared<prometheus::Registry>()),
      requests_(prometheus::BuildCounter()
                    .Name("deltaserve_requests_total")
                    .Help("Finished RPCs by method and gRPC status code.")
                    .Register(*registry_)),
      request_duration_(prometheus::BuildHistogram()
                            .Name("deltaserve_request_duration_seconds")
                            .Help("Time from receiving an RPC to answering it, by method.")
                            .Register(*registry_)),
      inputs_(prometheus::BuildCounter()
                  .Name("deltaserve_embed_inputs_total")
                  .Help("Inputs (texts or token id lists) embedded.")
                  .Register(*registry_)
                  .Add({})),
      tokens_(prometheus::BuildCounter()
                  .Name("deltaserve_embed_tokens_total")
                  .Help("Tokens of the embedded inputs, special tokens included.")
                  .Register(*registry_)
                  .Add({})),
      batch_rows_(prometheus::BuildHistogram()
                      .Name("deltaserve_batch_rows")
                      .Help("Rows (input sequences) per forward pass.")
                      .Register(*registry_)
                      .Add({}, PowersOfTwo(1024))),
      batch_padded_tokens_(prometheus::BuildHistogram()
                               .Name("deltaserve_batch_padded_tokens")
                               .Help("Padded tokens (rows x longest row) per forward pass.")
                               .Register(*registry_)
                               .Add({}, PowersOfTwo(1 << 20))),
      batch_duration_(prometheus::BuildHistogram()
                          .Name("deltaserve_batch_duration_seconds")
                          .Help("Time one forward pass (a batch) takes.")
                          .Register(*registry_)
                          .Add({}, LatencyBuckets())),
      queue_duration_(prometheus::BuildHistogram()
                          .Name("deltaserve_queue_duration_seconds")
                          .Help("Time a row waits in the batch queue before its batch runs.")
                          .Register(*registry_)
                          .Add({}, LatencyBuckets())),
      batches_(prometheus::BuildCounter()
                   .Name("deltaserve_batches_total")
                   .Help("Forward passes run.")
                   .Register(*registry_)
                   .Add({})),
      padded_tokens_(prometheus::BuildCounter()
                         .Name("deltaserve_batch_padded_tokens_total")
                         .Help("Padded tokens of the batches (rows x longest row; a packed pass computes only the real ones); "
                               "compare with deltaserve_batch_real_tokens_total.")
                         .Register(*registry_)
                         .Add({})),
      real_tokens_(prometheus::BuildCounter()
                       .Name("deltaserve_batch_real_tokens_total")
                       .Help("Real (non-padding) tokens computed.")
                       .Register(*registry_)
                       .Add({})),
      queue_depth_(prometheus::BuildGauge()
                       .Name("deltaserve_queue_rows")
                       .Help("Rows waiting in the batch queue.")
                       .Register(*registry_)
                       .Add({})),
      dropped_rows_(prometheus::BuildCounter()
                        .Name("deltaserve_queue_dropped_rows_total")
                        .Help("Queued rows dropped uncomputed because their request ended, by reason.")
                        .Register(*registry_)),
      store_bytes_(prometheus::BuildCounter()
                       .Name("deltaserve_delta_store_bytes_total")
                       .Help("Delta pack bytes received (direction=push) and sent (direction=pull) by the Deltas API.")
                       .Register(*registry_)),
      model_load_seconds_(prometheus::BuildGauge()
                              .Name("deltaserve_model_load_seconds")
                              .Help("Time it took to load the served model at start.")
                              .Register(*registry_)
                              .Add({})),
      model_info_(prometheus::BuildGauge()
                      .Name("deltaserve_model_info")
                      .Help("The served model (value 1): family, compute dtype, device, BLAS and parameter count.")
                      .Register(*registry_)),
      cache_lookups_(prometheus::BuildCounter()
                         .Name("deltaserve_delta_cache_lookups_total")
                         .Help("Delta pack lookups answered, by the tier the pack came from: device (a hit), host "
                               "or store (misses loaded from there, or waiting for such a load).")
                         .Register(*registry_)),
      delta_loads_(prometheus::BuildCounter()
                       .Name("deltaserve_delta_loads_total")
                       .Help("Delta pack loads into the device tier, by source (host, store) and outcome (ok, error).")
                       .Register(*registry_)),
      delta_load_seconds_(prometheus::BuildHistogram()
                              .Name("deltaserve_delta_load_seconds")
                              .Help("Time one delta pack load takes (read, parse, bind to the model), by source.")
                              .Register(*registry_)),
      cache_evictions_(prometheus::BuildCounter()
                           .Name("deltaserve_delta_cache_evictions_total")
                           .Help("Delta packs evicted from a cache tier (device: moved to host when it fits; host: "
                                 "dropped).")
                           .Register(*registry_)),
      cache_resident_bytes_(prometheus::BuildGauge()
                                .Name("deltaserve_delta_cache_resident_bytes")
                                .Help("Bytes the delta cache holds, by tier (device: bound packs on the model's "
                                      "device; host: serialized size of evicted packs' copies).")
                                .Register(*registry_)),
      cache_resident_packs_(prometheus::BuildGauge()
                                .Name("deltaserve_delta_cache_resident_packs")
                                .Help("Delta packs the cache holds, by tier.")
                                .Register(*registry_)) {
  // Every series exists from the start (at zero), so dashboards and rate() see them before the first event.
  for (deltas::CacheTier tier : {deltas::CacheTier::kDevice, deltas::CacheTier::kHost, deltas::CacheTier::kStore}) {
    const int i = static_cast<int>(tier);
    const std::string name = deltas::CacheTierName(tier);
    lookups_by_tier_[i] = &cache_lookups_.Add({{"tier", name}});
    if (tier != deltas::CacheTier::kDevice) {
      loads_ok_by_source_[i] = &delta_loads_.Add({{"source", name}, {"outcome", "ok"}});
      loads_error_by_source_[i] = &delta_loads_.Add({{"source", name}, {"outcome", "error"}});
      load_seconds_by_source_[i] = &delta_load_seconds_.Add({{"source", name}}, LatencyBuckets());
    }
    if (tier != deltas::CacheTier::kStore) {
      evictions_by_tier_[i] = &cache_evictions_.Add({{"tier", name}});
      resident_bytes_by_tier_[i] = &cache_resident_bytes_.Add({{"tier", name}});
      resident_packs_by_tier_[i] = &cache_resident_packs_.Add({{"tier", name}});
    }
  }
}

void ServerMetrics::RecordRequest(const std::string& rpc, absl::StatusCode code, absl::Duration latency) {
  requests_.Add({{"rpc", rpc}, {"code", absl::StatusCodeToString(code)}}).Increment();
  request_duration_.Add({{"rpc", rpc}}, LatencyBuckets()).Observe(absl::ToDoubleSeconds(latency));
}

void ServerMetrics::RecordInputs(int64_t inputs, int64_t tokens) {
  inputs_.Increment(static_cast<double>(inputs));
  tokens_.Increment(static_cast<double>(tokens));
}

void ServerMetrics::RecordStoreBytes(bool push, int64_t bytes) {
  store_bytes_.Add({{"direction", push ? "push" : "pull"}}).Increment(static_cast<double>(bytes));
}

void ServerMetrics::SetModelLoadSeconds(double seconds) { model_load_seconds_.Set(seconds); }

void ServerMetrics::SetModelInfo(const std::string& family, const std::string& dtype, const std::string& device,
                                 const std::string& blas, int64_t parameters) {
  model_info_
      .Add({{"family", family},
            {"dtype", dtype},
            {"device", device},
            {"blas", blas},
            {"parameters", std::to_string(parameters)}})
      .Set(1);
}

void ServerMetrics::OnBatch(int rows, int64_t padded_tokens, int64_t real_tokens, absl::Duration run_time) {
  batches_.Increment();
  batch_rows_.Observe(rows);
  batch_padded_tokens_.Observe(static_cast<double>(padded_tokens));
  padded_tokens_.Increment(static_cast<double>(padded_tokens));
  real_tokens_.Increment(static_cast<double>(real_tokens));
  batch_duration_.Observe(absl::ToDoubleSeconds(run_time));
}

void ServerMetrics::OnRowQueued(absl::Duration queue_time) {
  queue_duration_.Observe(absl::ToDoubleSeconds(queue_time));
}

void ServerMetrics::OnQueueDepth(int64_t rows) { queue_depth_.Set(static_cast<double>(rows)); }

void ServerMetrics::OnRowsDropped(int rows, absl::StatusCode why) {
  dropped_rows_.Add({{"reason", absl::StatusCodeToString(why)}}).Increment(rows);
}

void ServerMetrics::OnCacheLookup(deltas::CacheTier served_from) {
  lookups_by_tier_[static_cast<int>(served_from)]->Increment();
}

void ServerMetrics::OnCacheLoad(deltas::CacheTier source, bool ok, absl::Duration duration) {
  const int i = static_cast<int>(source);
  if (loads_ok_by_source_[i] == nullptr) return;  // not a load source
  (ok ? loads_ok_by_source_ : loads_error_by_source_)[i]->Increment();
  if (ok) load_seconds_by_source_[i]->Observe(absl::ToDoubleSeconds(duration));
}

void ServerMetrics::OnCacheEviction(deltas::CacheTier tier) {
  if (prometheus::Counter* c = evictions_by_tier_[static_cast<int>(tier)]) c->Increment();
}

void ServerMetrics::OnCacheResidency(deltas::CacheTier tier, int64_t bytes, int64_t entries) {
  const int i = static_cast<int>(tier);
  if (resident_bytes_by_tier_[i] == nullptr) return;
  resident_bytes_by_tier_[i]->Set(static_cast<double>(bytes));
  resident_packs_by_tier_[i]->Set(static_cast<double>(entries));
}

// The scheduler's series. Method and reason series exist from the start (at zero); tenant series appear with
// their tenant.
struct ServerMetrics::SchedulerSeries {
  explicit SchedulerSeries(prometheus::Registry& registry)
      : distinct_deltas(prometheus::BuildHistogram()
                            .Name("deltaserve_batch_distinct_deltas")
                            .Help("Distinct delta packs per batch (rows on the base model alone not counted).")
                            .Register(registry)
                            .Add({}, prometheus::Histogram::BucketBoundaries{0, 1, 2, 4, 8, 16, 32, 64, 128, 256,
                                                                             512, 1024})),
        rows_by_method(prometheus::BuildCounter()
                           .Name("deltaserve_batch_rows_by_method_total")
                           .Help("Rows computed, by delta method (a row whose pack has several methods counts under "
                                 "each; base = no delta).")
                           .Register(registry)),
        tenant_requests(prometheus::BuildCounter()
                            .Name("deltaserve_tenant_requests_total")
                            .Help("Requests admitted to the batch queue, by tenant (the first 32 tenants seen; "
                                  "then \"other\") and priority.")
                            .Register(registry)),
        tenant_queued_rows(prometheus::BuildGauge()
                               .Name("deltaserve_tenant_queued_rows")
                               .Help("Rows waiting in the batch queue, by tenant (the first 32 tenants seen; then "
                                     "\"other\").")
                               .Register(registry)),
        rejected(prometheus::BuildCounter()
                     .Name("deltaserve_queue_rejected_requests_total")
                     .Help("Requests refused by the batch queue at admission, by reason (queue_full, "
                           "tenant_queue_full, request_too_large, shutting_down).")
                     .Register(registry)) {
    // delta::MethodKindName's names (this library does not link the delta methods), "base" and "other".
    for (const char* method :
         {"lora", "bitfit", "ln_tuning", "parallel_adapter", "ia3", "prefix", "prompt", "adapter", "base", "other"}) {
      method_rows[method] = &rows_by_method.Add({{"method", method}});
    }
    for (batching::RejectReason reason :
         {batching::RejectReason::kQueueFull, batching::RejectReason::kTenantQueueFull,
          batching::RejectReason::kTooLarge, batching::RejectReason::kShuttingDown}) {
      rejected.Add({{"reason", batching::RejectReasonName(reason)}});
    }
  }

  prometheus::Histogram& distinct_deltas;
  prometheus::Family<prometheus::Counter>& rows_by_method;
  prometheus::Family<prometheus::Counter>& tenant_requests;
  prometheus::Family<prometheus::Gauge>& tenant_queued_rows;
  prometheus::Family<prometheus::Counter>& rejected;
  std::map<std::string, prometheus::Counter*> method_rows;  // filled by the constructor, read-only after

  absl::Mutex mu;
  std::set<std::string> tenants ABSL_GUARDED_BY(mu);  // the tenants that are their own label value
};

std::shared_ptr<ServerMetrics::SchedulerSeries> ServerMetrics::MakeSchedulerSeries(prometheus::Registry& registry) {
  return std::make_shared<SchedulerSeries>(registry);
}

struct ServerMetrics::TuningSeries {
  explicit TuningSeries(prometheus::Registry& registry)
      : jobs_total(prometheus::BuildCounter()
                       .Name("deltaserve_tuning_jobs_total")
                       .Help("Fine-tuning jobs entering each state (queued = submitted; succeeded, failed, "
                             "cancelled = finished).")
                       .Register(registry)),
        jobs(prometheus::BuildGauge()
                 .Name("deltaserve_tuning_jobs")
                 .Help("Fine-tuning jobs queued and running now.")
                 .Register(registry)),
        queued(jobs.Add({{"state", "queued"}})),
        running(jobs.Add({{"state", "running"}})),
        steps(prometheus::BuildCounter()
                  .Name("deltaserve_tuning_steps_total")
                  .Help("Training steps (optimizer updates) done by fine-tuning jobs.")
                  .Register(registry)
                  .Add({})),
        examples(prometheus::BuildCounter()
                     .Name("deltaserve_tuning_examples_total")
                     .Help("Training examples processed by fine-tuning jobs.")
                     .Register(registry)
                     .Add({})),
        step_seconds(prometheus::BuildHistogram()
                         .Name("deltaserve_tuning_step_seconds")
                         .Help("Duration of one training step (forward, backward, update).")
                         .Register(registry)
                         .Add({}, prometheus::Histogram::BucketBoundaries{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                                                                          5, 10, 30})) {
    for (const char* state : {"queued", "running", "succeeded", "failed", "cancelled"}) {
      by_state[state] = &jobs_total.Add({{"state", state}});
    }
  }
  prometheus::Family<prometheus::Counter>& jobs_total;
  prometheus::Family<prometheus::Gauge>& jobs;
  prometheus::Gauge& queued;
  prometheus::Gauge& running;
  prometheus::Counter& steps;
  prometheus::Counter& examples;
  prometheus::Histogram& step_seconds;
  std::map<std::string, prometheus::Counter*, std::less<>> by_state;
};

std::shared_ptr<ServerMetrics::TuningSeries> ServerMetrics::MakeTuningSeries(prometheus::Registry& registry) {
  return std::make_shared<TuningSeries>(registry);
}

void ServerMetrics::OnJobState(absl::string_view state) {
  auto it = tuning_->by_state.find(state);
  if (it != tuning_->by_state.end()) it->second->Increment();
}

void ServerMetrics::OnJobCounts(int64_t queued, int64_t running) {
  tuning_->queued.Set(static_cast<double>(queued));
  tuning_->running.Set(static_cast<double>(running));
}

void ServerMetrics::OnTrainingStep(int64_t examples, absl::Duration duration) {
  tuning_->steps.Increment();
  tuning_->examples.Increment(static_cast<double>(examples));
  tuning_->step_seconds.Observe(absl::ToDoubleSeconds(duration));
}

std::string ServerMetrics::TenantLabel(const std::string& tenant) {
  const bool valid = !tenant.empty() && tenant.size() <= 64 &&
                     std::all_of(tenant.begin(), tenant.end(), [](char c) {
                       return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
                     }) &&
                     tenant[0] != '.' && tenant[0] != '_' && tenant[0] != '-';
  if (!valid) return "other";
  absl::MutexLock lock(&scheduler_->mu);
  if (scheduler_->tenants.count(tenant) > 0) return tenant;
  if (static_cast<int>(scheduler_->tenants.size()) >= kMaxTenantLabels) return "other";
  scheduler_->tenants.insert(tenant);
  return tenant;
}

void ServerMetrics::OnBatchDeltas(int distinct_deltas, const std::map<std::string, int>& rows_by_method) {
  scheduler_->distinct_deltas.Observe(distinct_deltas);
  for (const auto& [method, rows] : rows_by_method) {
    auto it = scheduler_->method_rows.find(method);
    if (it == scheduler_->method_rows.end()) it = scheduler_->method_rows.find("other");
    it->second->Increment(rows);
  }
}

void ServerMetrics::OnRequestAdmitted(const std::string& tenant, batching::Priority priority) {
  scheduler_->tenant_requests.Add({{"tenant", TenantLabel(tenant)}, {"priority", batching::PriorityName(priority)}})
      .Increment();
}

void ServerMetrics::OnTenantQueuedRows(const std::string& tenant, int64_t delta) {
  prometheus::Gauge& rows = scheduler_->tenant_queued_rows.Add({{"tenant", TenantLabel(tenant)}});
  if (delta >= 0) {
    rows.Increment(static_cast<double>(delta));
  } else {
    rows.Decrement(static_cast<double>(-delta));
  }
}

void ServerMetrics::OnRequestRejected(const std::string& tenant, batching::RejectReason reason) {
  scheduler_->rejected.Add({{"reason", batching::RejectReasonName(reason)}}).Increment();
}

struct ServerMetrics::StoreSeries {
  explicit StoreSeries(prometheus::Registry& registry)
      : operations(prometheus::BuildCounter()
                       .Name("deltaserve_store_operations_total")
                       .Help("Delta store operations, by operation and outcome (a status code name; UNAVAILABLE, "
                             "INTERNAL, DATA_LOSS, DEADLINE_EXCEEDED, UNKNOWN are the store's own failures).")
                       .Register(registry)),
        duration(prometheus::BuildHistogram()
                     .Name("deltaserve_store_operation_duration_seconds")
                     .Help("Time one delta store operation takes, by operation (a shared store's include the "
                           "registry's round trips).")
                     .Register(registry)),
        ready(prometheus::BuildGauge()
                  .Name("deltaserve_ready")
                  .Help("1 while the server is ready for calls (model loaded, not draining), else 0.")
                  .Register(registry)
                  .Add({})) {
    for (int i = 0; i < store::kNumStoreOps; ++i) {
      const char* op = store::StoreOpName(static_cast<store::StoreOp>(i));
      ok[i] = &operations.Add({{"op", op}, {"code", "OK"}});
      seconds[i] = &duration.Add({{"op", op}}, LatencyBuckets());
    }
  }
  prometheus::Family<prometheus::Counter>& operations;
  prometheus::Family<prometheus::Histogram>& duration;
  prometheus::Gauge& ready;
  // By static_cast<int>(StoreOp): the OK counters (the common case, looked up once) and the histograms.
  std::array<prometheus::Counter*, store::kNumStoreOps> ok{};
  std::array<prometheus::Histogram*, store::kNumStoreOps> seconds{};
};

std::shared_ptr<ServerMetrics::StoreSeries> ServerMetrics::MakeStoreSeries(prometheus::Registry& registry) {
  return std::make_shared<StoreSeries>(registry);
}

void ServerMetrics::OnStoreOperation(store::StoreOp op, absl::StatusCode code, absl::Duration latency) {
  const int i = static_cast<int>(op);
  if (i < 0 || i >= store::kNumStoreOps) return;
  if (code == absl::StatusCode::kOk) {
    store_->ok[i]->Increment();
  } else {
    store_->operations.Add({{"op", store::StoreOpName(op)}, {"code", absl::StatusCodeToString(code)}}).Increment();
  }
  store_->seconds[i]->Observe(absl::ToDoubleSeconds(latency));
}

void ServerMetrics::SetReady(bool ready) { store_->ready.Set(ready ? 1 : 0); }

std::string ServerMetrics::Serialize() const {
  std::ostringstream out;
  prometheus::TextSerializer().Serialize(out, registry_->Collect());
  return out.str();
}

}  // namespace metrics
}  // namespace deltaserve
