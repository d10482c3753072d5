// DeltaServiceImpl: the gRPC glue of deltaserve.v1.DeltaService (push, get, pull, list, label, delete delta
// packs). Handlers are thin: they time the call, admit it (CallSecurity), move bytes between the stream and the
// DeltaManager, audit mutations, convert the status (Answer) and record metrics. Validation and storage live in
// deltas::DeltaManager.
//
// Does not own the manager, the metrics or the call security; all must outlive it. Thread-safe (gRPC calls handlers
// concurrently).
#ifndef DELTASERVE_SERVER_SERVICE_DELTA_SERVICE_H_
#define DELTASERVE_SERVER_SERVICE_DELTA_SERVICE_H_

#include <cstdint>

#include "deltaserve/v1/deltas.grpc.pb.h"
#include "server/deltas/delta_manager.h"
#include "server/metrics/metrics.h"
#include "server/service/call_security.h"

namespace deltaserve {
namespace service {

class DeltaServiceImpl final : public deltaserve::v1::DeltaService::Service {
 public:
  struct Options {
    // Largest pack a PushDelta stream may carry, in bytes.
    int64_t max_push_bytes = int64_t{512} << 20;
    // PullDelta chunk size when the request asks for none (and the largest it may ask for).
    int32_t default_chunk_bytes = 1 << 20;
  };

  // REQUIRES: manager, metrics and security (not null) outlive this object.
  DeltaServiceImpl(deltas::DeltaManager* manager, metrics::ServerMetrics* metrics, const CallSecurity* security,
                   const Options& options);

  grpc::Status PushDelta(grpc::ServerContext* context,
                         grpc::ServerReader<deltaserve::v1::PushDeltaRequest>* reader,
                         deltaserve::v1::PushDeltaResponse* response) override;
  grpc::Status GetDelta(grpc::ServerContext* context, const deltaserve::v1::GetDeltaRequest* request,
                        deltaserve::v1::GetDeltaResponse* response) override;
  grpc::Status PullDelta(grpc::ServerContext* context, const deltaserve::v1::PullDeltaRequest* request,
                         grpc::ServerWriter<deltaserve::v1::PullDeltaResponse>* writer) override;
  grpc::Status ListDeltas(grpc::ServerContext* context, const deltaserve::v1::ListDeltasRequest* request,
                          deltaserve::v1::ListDeltasResponse* response) override;
  grpc::Status SetLabel(grpc::ServerContext* context, const deltaserve::v1::SetLabelRequest* request,
                        deltaserve::v1::SetLabelResponse* response) override;
  grpc::Status DeleteLabel(grpc::ServerContext* context, const deltaserve::v1::DeleteLabelRequest* request,
                           deltaserve::v1::DeleteLabelResponse* response) override;
  grpc::Status DeleteVersion(grpc::ServerContext* context, const deltaserve::v1::DeleteVersionRequest* request,
                             deltaserve::v1::DeleteVersionResponse* response) override;

 private:
  deltas::DeltaManager* const manager_;
  metrics::ServerMetrics* const metrics_;
  const CallSecurity* const security_;
  const Options options_;
};

}  // namespace service
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_SERVICE_DELTA_SERVICE_H_
