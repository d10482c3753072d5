// The one place where absl::Status becomes grpc::Status (Answer() adds what travels beside it). Codes map one to
// one (both follow the canonical gRPC codes); the message is kept as is. Stateless: thread-safe.
#ifndef DELTASERVE_SERVER_SERVICE_GRPC_STATUS_H_
#define DELTASERVE_SERVER_SERVICE_GRPC_STATUS_H_

#include "absl/status/status.h"
#include "grpcpp/server_context.h"
#include "grpcpp/support/status.h"

namespace deltaserve {
namespace service {

grpc::Status ToGrpcStatus(const absl::Status& status);

// A handler's answer: ToGrpcStatus(status), plus a retry hint attached to the status (server/common/retry_hint.h:
// a full queue, a tenant over its request rate) as the trailing metadata `retry-after-ms` (docs/API.md).
grpc::Status Answer(grpc::ServerContext* context, const absl::Status& status);

}  // namespace service
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_SERVICE_GRPC_STATUS_H_
