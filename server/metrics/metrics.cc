#include "server/metrics/metrics.h"

#include <sstream>

#include "absl/status/status.h"
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
                         .Help("Padded tokens computed; compare with deltaserve_batch_real_tokens_total.")
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
                      .Register(*registry_)) {}

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

std::string ServerMetrics::Serialize() const {
  std::ostringstream out;
  prometheus::TextSerializer().Serialize(out, registry_->Collect());
  return out.str();
}

}  // namespace metrics
}  // namespace deltaserve
