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
                                     const CallSecurity* security, const Options& options)
    : jobs_(jobs), metrics_(metrics), security_(security), options_(options) {}

grpc::Status TuningServiceImpl::UploadDataset(grpc::ServerContext* context,
                                              grpc::ServerReader<pb::UploadDatasetRequest>* reader,
                                              pb::UploadDatasetResponse* response) {
  const absl::Time start = absl::Now();
  // The caller is checked before any byte is read, the tenant in the header before any chunk is.
  absl::StatusOr<CallSecurity::Call> admitted = security_->Begin(context, "");
  pb::UploadDatasetHeader header;
  std::string bytes;
  absl::Status status = admitted.status();
  if (admitted.ok()) {
    status = ReadUploadStream(
        context, reader, options_.max_upload_bytes, "UploadDataset", "dataset", &header, &bytes,
        [&](const pb::UploadDatasetHeader& h) { return CallSecurity::ActFor(&*admitted, h.tenant()); });
  }
  if (status.ok()) {
    absl::StatusOr<store::BlobInfo> blob = jobs_->UploadDataset(admitted->tenant, header.expected_digest(), bytes);
    status = blob.status();
    if (blob.ok()) {
      response->set_digest(blob->digest);
      response->set_size_bytes(blob->size);
    }
  }
  security_->Audit(context, admitted, header.tenant(), "dataset.upload", response->digest(),
                   absl::StrCat(bytes.size(), " bytes"), status);
  metrics_->RecordRequest("UploadDataset", status.code(), absl::Now() - start);
  return Answer(context, status);
}

grpc::Status TuningServiceImpl::SubmitJob(grpc::ServerContext* context, const pb::SubmitJobRequest* request,
                                          pb::SubmitJobResponse* response) {
  const absl::Time start = absl::Now();
  absl::StatusOr<CallSecurity::Call> admitted = security_->Begin(context, request->tenant());
  absl::Status status = admitted.status();
  if (admitted.ok()) {
    pb::SubmitJobRequest submit = *request;
    submit.set_tenant(admitted->tenant);
    absl::StatusOr<std::pair<pb::Job, bool>> result = jobs_->Submit(submit);
    if (result.ok()) {
      *response->mutable_job() = std::move(result->first);
      response->set_created(result->second);
    }
    status = result.status();
  }
  security_->Audit(context, admitted, request->tenant(), "job.submit", response->job().id(),
                   absl::StrCat("task ", request->spec().task(), response->created() ? "" : " (existing job)"), status);
  metrics_->RecordRequest("SubmitJob", status.code(), absl::Now() - start);
  return Answer(context, status);
}

grpc::Status TuningServiceImpl::GetJob(grpc::ServerContext* context, const pb::GetJobRequest* request,
                                       pb::Job* response) {
  const absl::Time start = absl::Now();
  absl::StatusOr<CallSecurity::Call> admitted = security_->Begin(context, request->tenant());
  absl::Status status = admitted.status();
  if (admitted.ok()) {
    absl::StatusOr<pb::Job> job = jobs_->Get(admitted->tenant, request->id());
    if (job.ok()) *response = *std::move(job);
    status = job.status();
  }
  metrics_->RecordRequest("GetJob", status.code(), absl::Now() - start);
  return Answer(context, status);
}

grpc::Status TuningServiceImpl::ListJobs(grpc::ServerContext* context, const pb::ListJobsRequest* request,
                                         pb::ListJobsResponse* response) {
  const absl::Time start = absl::Now();
  absl::StatusOr<CallSecurity::Call> admitted = security_->Begin(context, request->tenant());
  absl::Status status = admitted.status();
  if (admitted.ok()) {
    pb::ListJobsRequest list = *request;
    list.set_tenant(admitted->tenant);
    absl::StatusOr<pb::ListJobsResponse> page = jobs_->List(list);
    if (page.ok()) *response = *std::move(page);
    status = page.status();
  }
  metrics_->RecordRequest("ListJobs", status.code(), absl::Now() - start);
  return Answer(context, status);
}

grpc::Status TuningServiceImpl::CancelJob(grpc::ServerContext* context, const pb::CancelJobRequest* request,
                                          pb::Job* response) {
  const absl::Time start = absl::Now();
  absl::StatusOr<CallSecurity::Call> admitted = security_->Begin(context, request->tenant());
  absl::Status status = admitted.status();
  if (admitted.ok()) {
    absl::StatusOr<pb::Job> job = jobs_->Cancel(admitted->tenant, request->id());
    if (job.ok()) *response = *std::move(job);
    status = job.status();
  }
  security_->Audit(context, admitted, request->tenant(), "job.cancel", request->id(), "", status);
  metrics_->RecordRequest("CancelJob", status.code(), absl::Now() - start);
  return Answer(context, status);
}

grpc::Status TuningServiceImpl::WatchJob(grpc::ServerContext* context, const pb::WatchJobRequest* request,
                                         grpc::ServerWriter<pb::JobEvent>* writer) {
  const absl::Time start = absl::Now();
  absl::StatusOr<CallSecurity::Call> admitted = security_->Begin(context, request->tenant());
  // A watch may last as long as its job: it counts against the request rate, not the calls in flight.
  if (admitted.ok()) admitted->admission = auth::RequestLimiter::Admission();
  auto watch = [&]() -> absl::Status {
    if (!admitted.ok()) return admitted.status();
    int64_t seen = 0;
    while (true) {
      // Wakes at least every second to notice a client that went away.
      const int64_t before = seen;
      absl::StatusOr<pb::Job> job = jobs_->Watch(admitted->tenant, request->id(), &seen, absl::Seconds(1));
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
  return Answer(context, status);
}

}  // namespace service
}  // namespace deltaserve
