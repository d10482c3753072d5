#include "server/service/grpc_status.h"

#include <optional>
#include <string>

#include "server/common/retry_hint.h"

namespace deltaserve {
namespace service {

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

grpc::Status Answer(grpc::ServerContext* context, const absl::Status& status) {
  if (std::optional<absl::Duration> hint = GetRetryAfter(status)) {
    context->AddTrailingMetadata("retry-after-ms", std::to_string(absl::ToInt64Milliseconds(*hint)));
  }
  return ToGrpcStatus(status);
}

}  // namespace service
}  // namespace deltaserve
