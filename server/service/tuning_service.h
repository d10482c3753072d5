// TuningServiceImpl: the gRPC glue of deltaserve.v1.TuningService (upload datasets; submit, get, list, cancel and
// watch fine-tuning jobs). Handlers are thin: they time the call, admit it (CallSecurity), move bytes or messages
// between the stream and the tuning::JobManager, audit mutations, convert the status (Answer) and record metrics.
//
// Does not own the manager, the metrics or the call security; all must outlive it. Thread-safe (gRPC calls
// handlers concurrently).
#ifndef DELTASERVE_SERVER_SERVICE_TUNING_SERVICE_H_
#define DELTASERVE_SERVER_SERVICE_TUNING_SERVICE_H_

#include <cstdint>

#include "deltaserve/v1/tuning.grpc.pb.h"
#include "server/metrics/metrics.h"
#include "server/service/call_security.h"
#include "server/tuning/job_manager.h"

namespace deltaserve {
namespace service {

class TuningServiceImpl final : public deltaserve::v1::TuningService::Service {
 public:
  struct Options {
    // Largest dataset an UploadDataset stream may carry, in bytes.
    int64_t max_upload_bytes = int64_t{256} << 20;
  };

  // REQUIRES: jobs, metrics and security (not null) outlive this object.
  TuningServiceImpl(tuning::JobManager* jobs, metrics::ServerMetrics* metrics, const CallSecurity* security,
                    const Options& options);

  grpc::Status UploadDataset(grpc::ServerContext* context,
                             grpc::ServerReader<deltaserve::v1::UploadDatasetRequest>* reader,
                             deltaserve::v1::UploadDatasetResponse* response) override;
  grpc::Status SubmitJob(grpc::ServerContext* context, const deltaserve::v1::SubmitJobRequest* request,
                         deltaserve::v1::SubmitJobResponse* response) override;
  grpc::Status GetJob(grpc::ServerContext* context, const deltaserve::v1::GetJobRequest* request,
                      deltaserve::v1::Job* response) override;
  grpc::Status ListJobs(grpc::ServerContext* context, const deltaserve::v1::ListJobsRequest* request,
                        deltaserve::v1::ListJobsResponse* response) override;
  grpc::Status CancelJob(grpc::ServerContext* context, const deltaserve::v1::CancelJobRequest* request,
                         deltaserve::v1::Job* response) override;
  grpc::Status WatchJob(grpc::ServerContext* context, const deltaserve::v1::WatchJobRequest* request,
                        grpc::ServerWriter<deltaserve::v1::JobEvent>* writer) override;

 private:
  tuning::JobManager* const jobs_;
  metrics::ServerMetrics* const metrics_;
  const CallSecurity* const security_;
  const Options options_;
};

}  // namespace service
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_SERVICE_TUNING_SERVICE_H_
