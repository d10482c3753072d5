// The one place where absl::Status becomes grpc::Status. Codes map one to one (both follow the canonical gRPC
// codes); the message is kept as is. Stateless: thread-safe.
#ifndef DELTASERVE_SERVER_SERVICE_GRPC_STATUS_H_
#define DELTASERVE_SERVER_SERVICE_GRPC_STATUS_H_

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace deltaserve {
namespace service {

grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace service
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_SERVICE_GRPC_STATUS_H_
