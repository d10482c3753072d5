#include "client/client.h"

#include <algorithm>
#include <chrono>
#include <utility>

#include "grpcpp/grpcpp.h"
#include "absl/strings/str_cat.h"
#include "server/common/file_util.h"
#include "server/common/sha256.h"

namespace deltaserve {
namespace client {
namespace {

void SetDeadline(grpc::ClientContext* context, absl::Duration timeout) {
  context->set_deadline(std::chrono::system_clock::now() +
                        std::chrono::microseconds(absl::ToInt64Microseconds(timeout)));
}

// `value` when the call ended OK, else the call's status.
template <typename T>
absl::StatusOr<T> Finish(const grpc::Status& status, T value) {
  if (!status.ok()) return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
  return value;
}

// One unary call with the client's deadline.
// The `authorization` metadata of every call ("" = none).
void Authorize(grpc::ClientContext* context, const std::string& authorization) {
  if (!authorization.empty()) context->AddMetadata("authorization", authorization);
}

template <typename Stub, typename Request, typename Response>
absl::StatusOr<Response> Unary(Stub* stub,
                               grpc::Status (Stub::*method)(grpc::ClientContext*, const Request&, Response*),
                               const Request& request, absl::Duration timeout, const std::string& authorization) {
  grpc::ClientContext context;
  SetDeadline(&context, timeout);
  Authorize(&context, authorization);
  Response response;
  grpc::Status status = (stub->*method)(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

}  // namespace

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

namespace {

bool UsesTls(const DeltaserveClient::Options& o) {
  return o.tls || !o.tls_ca_file.empty() || !o.tls_cert_file.empty() || !o.tls_key_file.empty();
}

// The channel's credentials; with TLS, the files' contents ("" for an unreadable file: the handshake then fails).
std::shared_ptr<grpc::ChannelCredentials> Credentials(const DeltaserveClient::Options& o) {
  if (!UsesTls(o)) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions ssl;
  auto read = [](const std::string& path) { return path.empty() ? std::string() : ReadFileToString(path).value_or(""); };
  ssl.pem_root_certs = read(o.tls_ca_file);
  ssl.pem_private_key = read(o.tls_key_file);
  ssl.pem_cert_chain = read(o.tls_cert_file);
  return grpc::SslCredentials(ssl);
}

}  // namespace

absl::StatusOr<std::unique_ptr<DeltaserveClient>> DeltaserveClient::Create(const Options& options) {
  for (const auto& [path, what] : {std::pair{options.tls_ca_file, "TLS CA"}, std::pair{options.tls_cert_file,
                                   "client certificate"}, std::pair{options.tls_key_file, "client key"}}) {
    if (path.empty()) continue;
    absl::StatusOr<std::string> text = ReadFileToString(path);
    if (!text.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(what, " ", path, " cannot be read: ", text.status().message()));
    }
  }
  if (options.tls_cert_file.empty() != options.tls_key_file.empty()) {
    return absl::InvalidArgumentError("a client certificate needs both --tls_cert and --tls_key");
  }
  return std::make_unique<DeltaserveClient>(options);
}

DeltaserveClient::DeltaserveClient(const Options& options)
    : options_(options), authorization_(options.token.empty() ? "" : "Bearer " + options.token) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(options.max_receive_message_bytes);
  if (!options.tls_server_name.empty()) args.SetSslTargetNameOverride(options.tls_server_name);
  channel_ = grpc::CreateCustomChannel(options.target, Credentials(options), args);
  inference_ = deltaserve::v1::InferenceService::NewStub(channel_);
  deltas_ = deltaserve::v1::DeltaService::NewStub(channel_);
  tuning_ = deltaserve::v1::TuningService::NewStub(channel_);
  health_ = grpc::health::v1::Health::NewStub(channel_);
}

absl::StatusOr<std::string> DeltaserveClient::Health(const std::string& service) {
  grpc::ClientContext context;
  SetDeadline(&context, options_.timeout);
  Authorize(&context, authorization_);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  grpc::Status status = health_->Check(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status());
}

absl::StatusOr<deltaserve::v1::GetModelInfoResponse> DeltaserveClient::GetModelInfo() {
  return Unary(inference_.get(), &deltaserve::v1::InferenceService::Stub::GetModelInfo,
               deltaserve::v1::GetModelInfoRequest(), options_.timeout, authorization_);
}

absl::StatusOr<deltaserve::v1::EmbedResponse> DeltaserveClient::Embed(const deltaserve::v1::EmbedRequest& request) {
  return Unary(inference_.get(), &deltaserve::v1::InferenceService::Stub::Embed, request, options_.timeout,
               authorization_);
}

absl::StatusOr<deltaserve::v1::ClassifyResponse> DeltaserveClient::Classify(
    const deltaserve::v1::ClassifyRequest& request) {
  return Unary(inference_.get(), &deltaserve::v1::InferenceService::Stub::Classify, request, options_.timeout,
               authorization_);
}

absl::StatusOr<deltaserve::v1::PrefetchResponse> DeltaserveClient::Prefetch(
    const deltaserve::v1::PrefetchRequest& request) {
  return Unary(inference_.get(), &deltaserve::v1::InferenceService::Stub::Prefetch, request, options_.timeout,
               authorization_);
}

absl::StatusOr<std::vector<std::vector<float>>> DeltaserveClient::EmbedTexts(const std::vector<std::string>& texts) {
  deltaserve::v1::EmbedRequest request;
  for (const std::string& text : texts) request.add_texts(text);
  absl::StatusOr<deltaserve::v1::EmbedResponse> response = Embed(request);
  if (!response.ok()) return response.status();
  std::vector<std::vector<float>> out;
  out.reserve(response->results_size());
  for (const auto& result : response->results()) {
    out.emplace_back(result.embedding().values().begin(), result.embedding().values().end());
  }
  return out;
}

absl::StatusOr<deltaserve::v1::PushDeltaResponse> DeltaserveClient::PushDelta(deltaserve::v1::PushDeltaHeader header,
                                                                              absl::string_view bytes,
                                                                              const Progress& progress) {
  constexpr size_t kChunk = 1 << 20;
  const int64_t total = static_cast<int64_t>(bytes.size());
  header.set_size_bytes(total);
  if (header.expected_digest().empty()) header.set_expected_digest(Sha256Digest(bytes));
  grpc::ClientContext context;
  SetDeadline(&context, options_.timeout + absl::Seconds(static_cast<double>(total) / kChunk));
  Authorize(&context, authorization_);
  deltaserve::v1::PushDeltaResponse response;
  std::unique_ptr<grpc::ClientWriter<deltaserve::v1::PushDeltaRequest>> writer =
      deltas_->PushDelta(&context, &response);
  deltaserve::v1::PushDeltaRequest message;
  *message.mutable_header() = std::move(header);
  bool open = writer->Write(message);
  for (size_t offset = 0; open && offset < bytes.size(); offset += kChunk) {
    message.set_chunk(bytes.data() + offset, std::min(kChunk, bytes.size() - offset));
    open = writer->Write(message);
    if (open && progress) progress(static_cast<int64_t>(std::min(offset + kChunk, bytes.size())), total);
  }
  writer->WritesDone();                          // a server that stopped reading early has its answer in Finish()
  const grpc::Status status = writer->Finish();  // fills `response`: call it before reading it
  return Finish(status, std::move(response));
}

absl::StatusOr<deltaserve::v1::GetDeltaResponse> DeltaserveClient::GetDelta(const std::string& tenant,
                                                                            const std::string& ref) {
  deltaserve::v1::GetDeltaRequest request;
  request.set_tenant(tenant);
  request.set_ref(ref);
  return Unary(deltas_.get(), &deltaserve::v1::DeltaService::Stub::GetDelta, request, options_.timeout, authorization_);
}

absl::StatusOr<deltaserve::v1::DeltaVersion> DeltaserveClient::PullDelta(const std::string& tenant,
                                                                         const std::string& ref, std::string* bytes,
                                                                         const Progress& progress) {
  deltaserve::v1::PullDeltaRequest request;
  request.set_tenant(tenant);
  request.set_ref(ref);
  grpc::ClientContext context;
  SetDeadline(&context, options_.timeout);
  Authorize(&context, authorization_);
  std::unique_ptr<grpc::ClientReader<deltaserve::v1::PullDeltaResponse>> reader = deltas_->PullDelta(&context, request);
  deltaserve::v1::PullDeltaResponse message;
  deltaserve::v1::DeltaVersion version;
  while (reader->Read(&message)) {
    if (message.has_version()) {
      version = message.version();
      bytes->reserve(bytes->size() + static_cast<size_t>(version.size_bytes()));
    } else {
      bytes->append(message.chunk());
      if (progress) progress(static_cast<int64_t>(bytes->size()), version.size_bytes());
    }
  }
  const grpc::Status status = reader->Finish();
  return Finish(status, std::move(version));
}

absl::StatusOr<deltaserve::v1::ListDeltasResponse> DeltaserveClient::ListDeltas(
    const deltaserve::v1::ListDeltasRequest& request) {
  return Unary(deltas_.get(), &deltaserve::v1::DeltaService::Stub::ListDeltas, request, options_.timeout,
               authorization_);
}

absl::StatusOr<deltaserve::v1::SetLabelResponse> DeltaserveClient::SetLabel(
    const deltaserve::v1::SetLabelRequest& request) {
  return Unary(deltas_.get(), &deltaserve::v1::DeltaService::Stub::SetLabel, request, options_.timeout, authorization_);
}

absl::Status DeltaserveClient::DeleteLabel(const deltaserve::v1::DeleteLabelRequest& request) {
  return Unary(deltas_.get(), &deltaserve::v1::DeltaService::Stub::DeleteLabel, request, options_.timeout,
               authorization_)
      .status();
}

absl::Status DeltaserveClient::DeleteVersion(const deltaserve::v1::DeleteVersionRequest& request) {
  return Unary(deltas_.get(), &deltaserve::v1::DeltaService::Stub::DeleteVersion, request, options_.timeout,
               authorization_)
      .status();
}

absl::StatusOr<deltaserve::v1::UploadDatasetResponse> DeltaserveClient::UploadDataset(const std::string& tenant,
                                                                                      absl::string_view bytes,
                                                                                      const Progress& progress) {
  constexpr size_t kChunk = 1 << 20;
  const int64_t total = static_cast<int64_t>(bytes.size());
  grpc::ClientContext context;
  SetDeadline(&context, options_.timeout + absl::Seconds(static_cast<double>(total) / kChunk));
  Authorize(&context, authorization_);
  deltaserve::v1::UploadDatasetResponse response;
  auto writer = tuning_->UploadDataset(&context, &response);
  deltaserve::v1::UploadDatasetRequest message;
  message.mutable_header()->set_tenant(tenant);
  message.mutable_header()->set_size_bytes(total);
  message.mutable_header()->set_expected_digest(Sha256Digest(bytes));
  bool open = writer->Write(message);
  for (size_t offset = 0; open && offset < bytes.size(); offset += kChunk) {
    message.set_chunk(bytes.data() + offset, std::min(kChunk, bytes.size() - offset));
    open = writer->Write(message);
    if (open && progress) progress(static_cast<int64_t>(std::min(offset + kChunk, bytes.size())), total);
  }
  writer->WritesDone();
  const grpc::Status status = writer->Finish();
  return Finish(status, std::move(response));
}

absl::StatusOr<deltaserve::v1::SubmitJobResponse> DeltaserveClient::SubmitJob(
    const deltaserve::v1::SubmitJobRequest& request) {
  return Unary(tuning_.get(), &deltaserve::v1::TuningService::Stub::SubmitJob, request, options_.timeout,
               authorization_);
}

absl::StatusOr<deltaserve::v1::Job> DeltaserveClient::GetJob(const std::string& tenant, const std::string& id) {
  deltaserve::v1::GetJobRequest request;
  request.set_tenant(tenant);
  request.set_id(id);
  return Unary(tuning_.get(), &deltaserve::v1::TuningService::Stub::GetJob, request, options_.timeout, authorization_);
}

absl::StatusOr<deltaserve::v1::ListJobsResponse> DeltaserveClient::ListJobs(
    const deltaserve::v1::ListJobsRequest& request) {
  return Unary(tuning_.get(), &deltaserve::v1::TuningService::Stub::ListJobs, request, options_.timeout,
               authorization_);
}

absl::StatusOr<deltaserve::v1::Job> DeltaserveClient::CancelJob(const std::string& tenant, const std::string& id) {
  deltaserve::v1::CancelJobRequest request;
  request.set_tenant(tenant);
  request.set_id(id);
  return Unary(tuning_.get(), &deltaserve::v1::TuningService::Stub::CancelJob, request, options_.timeout,
               authorization_);
}

absl::StatusOr<deltaserve::v1::Job> DeltaserveClient::WatchJob(
    const std::string& tenant, const std::string& id, const std::function<bool(const deltaserve::v1::Job&)>& on_event,
    absl::Duration timeout) {
  deltaserve::v1::WatchJobRequest request;
  request.set_tenant(tenant);
  request.set_id(id);
  grpc::ClientContext context;
  if (timeout != absl::InfiniteDuration()) SetDeadline(&context, timeout);
  Authorize(&context, authorization_);
  auto reader = tuning_->WatchJob(&context, request);
  deltaserve::v1::JobEvent event;
  deltaserve::v1::Job last;
  bool stopped = false;
  while (reader->Read(&event)) {
    last = event.job();
    if (on_event && !on_event(last)) {
      stopped = true;
      context.TryCancel();
      break;
    }
  }
  const grpc::Status status = reader->Finish();
  if (stopped) return last;
  return Finish(status, std::move(last));
}

}  // namespace client
}  // namespace deltaserve
