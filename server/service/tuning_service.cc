#include "server/service/tuning_service.h"

#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/service/grpc_status.h"
#include "server/service/upload_stream.h"

namespace deltaserve {
namespace service {

namespace pb = ::deltaserve::v1;

TuningServiceImpl::TuningServiceImpl(tuning::JobManager* jobs, metrics::ServerMetrics* metrics,
                                     const Options& options)
    : jobs_(jobs), metrics_(metrics), options_(options) {}

grpc::Status TuningServiceImpl::UploadDataset(grpc::ServerContext* context,
                                              grpc::ServerReader<pb::UploadDatasetRequest>* reader,
                                              pb::UploadDatasetResponse* response) {
  const absl::Time start = absl::Now();
  pb::UploadDatasetHeader header;
  std::string bytes;
  absl::Status status =
      ReadUploadStream(context, reader, options_.max_upload_bytes, "UploadDataset", "dataset", &header, &bytes);
  if (status.ok()) {
    absl::StatusOr<store::BlobInfo> blob = jobs_->UploadDataset(header.tenant(), header.expected_digest(), bytes);
    status = blob.status();
    if (blob.ok()) {
      response->set_digest(blob->digest);
      response->set_size_bytes(blob->size);
    }
  }
  metrics_->RecordRequest("UploadDataset", status.code(), absl::Now() - start);
  return ToGrpcStatus(status);
}

grpc::Status TuningServiceImpl::SubmitJob(grpc::ServerContext* context, const pb::SubmitJobRequest* request,
                                          pb::SubmitJobResponse* response) {
  const absl::Time start = absl::Now();
  absl::StatusOr<std::pair<pb::Job, bool>> result = jobs_->Submit(*request);
  if (result.ok()) {
    *response->mutable_job() = std::move(result->first);
    response->set_created(result->second);
  }
  metrics_->RecordRequest("SubmitJob", result.status().code(), absl::Now() - start);
  return ToGrpcStatus(result.status());
}

grpc::Status TuningServiceImpl::GetJob(grpc::ServerContext* context, const pb::GetJobRequest* request,
                                       pb::Job* response) {
  const absl::Time start = absl::Now();
  absl::StatusOr<pb::Job> job = jobs_->Get(request->tenant(), request->id());
  if (job.ok()) *response = *std::move(job);
  metrics_->RecordRequest("GetJob", job.status().code(), absl::Now() - start);
  return ToGrpcStatus(job.status());
}

grpc::Status TuningServiceImpl::ListJobs(grpc::ServerContext* context, const pb::ListJobsRequest* request,
                                         pb::ListJobsResponse* response) {
  const absl::Time start = absl::Now();
  absl::StatusOr<pb::ListJobsResponse> page = jobs_->List(*request);
  if (page.ok()) *response = *std::move(page);
  metrics_->RecordRequest("ListJobs", page.status().code(), absl::Now() - start);
  return ToGrpcStatus(page.status());
}

grpc::Status TuningServiceImpl::CancelJob(grpc::ServerContext* context, const pb::CancelJobRequest* request,
                                          pb::Job* response) {
  const absl::Time start = absl::Now();
  absl::StatusOr<pb::Job> job = jobs_->Cancel(request->tenant(), request->id());
  if (job.ok()) *response = *std::move(job);
  metrics_->RecordRequest("CancelJob", job.status().code(), absl::Now() - start);
  return ToGrpcStatus(job.status());
}

grpc::Status TuningServiceImpl::WatchJob(grpc::ServerContext* context, const pb::WatchJobRequest* request,
                                         grpc::ServerWriter<pb::JobEvent>* writer) {
  const absl::Time start = absl::Now();
  auto watch = [&]() -> absl::Status {
    int64_t seen = 0;
    while (true) {
      // Wakes at least every second to notice a client that went away.
      const int64_t before = seen;
      absl::StatusOr<pb::Job> job = jobs_->Watch(request->tenant(), request->id(), &seen, absl::Seconds(1));
      if (!job.ok()) return job.status();
      if (context->IsCancelled()) return absl::CancelledError("WatchJob: the client went away");
      const bool final = tuning::JobManager::IsFinal(job->state());
      if (seen == before && !final) continue;  // woke to check the client only
      pb::JobEvent event;
      *event.mutable_job() = *std::move(job);
      if (!writer->Write(event)) return absl::CancelledError("WatchJob: the client went away");
      if (final) return absl::OkStatus();
    }
  };
  const absl::Status status = watch();
  metrics_->RecordRequest("WatchJob", status.code(), absl::Now() - start);
  return ToGrpcStatus(status);
}

}  // namespace service
}  // namespace deltaserve
