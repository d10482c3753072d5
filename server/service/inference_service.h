// InferenceServiceImpl: the gRPC glue of deltaserve.v1.InferenceService. Handlers are thin: they time the call,
// admit it (CallSecurity: caller, tenant, quota), convert the proto to the engine's request, delegate to the
// InferenceEngine, convert the status (Answer) and the result, and record metrics. No logic lives here.
//
// Does not own the engine, the metrics, the delta manager or the call security; all must outlive it. Thread-safe
// (gRPC calls handlers concurrently).
#ifndef DELTASERVE_SERVER_SERVICE_INFERENCE_SERVICE_H_
#define DELTASERVE_SERVER_SERVICE_INFERENCE_SERVICE_H_

#include <functional>
#include <string>

#include "deltaserve/v1/inference.grpc.pb.h"
#include "server/deltas/delta_manager.h"
#include "server/service/call_security.h"
#include "server/inference/inference_engine.h"
#include "server/metrics/metrics.h"

namespace deltaserve {
namespace service {

// Facts about the running server that GetModelInfo reports besides the model's own.
struct ServerFacts {
  std::string server_version;
  std::string torch_version;
  std::string blas;
  int intra_op_threads = 0;
  double model_load_seconds = 0;
  int64_t max_receive_message_bytes = 0;
  // Delta packs loaded now.
  std::function<int()> num_deltas = [] { return 0; };
};

class InferenceServiceImpl final : public deltaserve::v1::InferenceService::Service {
 public:
  // REQUIRES: engine, metrics, deltas (nullptr: Prefetch answers UNIMPLEMENTED) and security (not null) outlive
  // this object.
  InferenceServiceImpl(inference::InferenceEngine* engine, metrics::ServerMetrics* metrics, ServerFacts facts,
                       deltas::DeltaManager* deltas, const CallSecurity* security);

  grpc::Status Embed(grpc::ServerContext* context, const deltaserve::v1::EmbedRequest* request,
                     deltaserve::v1::EmbedResponse* response) override;
  grpc::Status Classify(grpc::ServerContext* context, const deltaserve::v1::ClassifyRequest* request,
                        deltaserve::v1::ClassifyResponse* response) override;
  grpc::Status GetModelInfo(grpc::ServerContext* context, const deltaserve::v1::GetModelInfoRequest* request,
                            deltaserve::v1::GetModelInfoResponse* response) override;
  grpc::Status Prefetch(grpc::ServerContext* context, const deltaserve::v1::PrefetchRequest* request,
                        deltaserve::v1::PrefetchResponse* response) override;

 private:
  inference::InferenceEngine* const engine_;
  metrics::ServerMetrics* const metrics_;
  const ServerFacts facts_;
  deltas::DeltaManager* const deltas_;
  const CallSecurity* const security_;
};

}  // namespace service
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_SERVICE_INFERENCE_SERVICE_H_
