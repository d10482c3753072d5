#include "client/client.h"

#include <chrono>

#include "grpcpp/grpcpp.h"

namespace deltaserve {
namespace client {
namespace {

void SetDeadline(grpc::ClientContext* context, absl::Duration timeout) {
  context->set_deadline(std::chrono::system_clock::now() +
                        std::chrono::microseconds(absl::ToInt64Microseconds(timeout)));
}

}  // namespace

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

DeltaserveClient::DeltaserveClient(const Options& options) : options_(options) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(options.max_receive_message_bytes);
  channel_ = grpc::CreateCustomChannel(options.target, grpc::InsecureChannelCredentials(), args);
  inference_ = deltaserve::v1::InferenceService::NewStub(channel_);
  health_ = grpc::health::v1::Health::NewStub(channel_);
}

absl::StatusOr<std::string> DeltaserveClient::Health(const std::string& service) {
  grpc::ClientContext context;
  SetDeadline(&context, options_.timeout);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  grpc::Status status = health_->Check(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status());
}

absl::StatusOr<deltaserve::v1::GetModelInfoResponse> DeltaserveClient::GetModelInfo() {
  grpc::ClientContext context;
  SetDeadline(&context, options_.timeout);
  deltaserve::v1::GetModelInfoResponse response;
  grpc::Status status = inference_->GetModelInfo(&context, deltaserve::v1::GetModelInfoRequest(), &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::StatusOr<deltaserve::v1::EmbedResponse> DeltaserveClient::Embed(const deltaserve::v1::EmbedRequest& request) {
  grpc::ClientContext context;
  SetDeadline(&context, options_.timeout);
  deltaserve::v1::EmbedResponse response;
  grpc::Status status = inference_->Embed(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::StatusOr<deltaserve::v1::ClassifyResponse> DeltaserveClient::Classify(
    const deltaserve::v1::ClassifyRequest& request) {
  grpc::ClientContext context;
  SetDeadline(&context, options_.timeout);
  deltaserve::v1::ClassifyResponse response;
  grpc::Status status = inference_->Classify(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
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

}  // namespace client
}  // namespace deltaserve
