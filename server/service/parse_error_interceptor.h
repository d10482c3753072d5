// ParseErrorInterceptorFactory: gives requests that cannot be parsed a clear INVALID_ARGUMENT.
//
// When gRPC cannot deserialize a request (most often: a proto3 `string` field such as EmbedRequest.texts holding
// invalid UTF-8, which C++ clients can send), it answers INTERNAL with an empty message before any handler runs.
// Our own INTERNAL statuses always carry a message, so an INTERNAL with an empty message is a parse failure; this
// interceptor rewrites it, at PRE_SEND_STATUS, into INVALID_ARGUMENT naming the method and the likely cause.
//
// Stateless: thread-safe; one interceptor object per call, as gRPC requires.
#ifndef DELTASERVE_SERVER_SERVICE_PARSE_ERROR_INTERCEPTOR_H_
#define DELTASERVE_SERVER_SERVICE_PARSE_ERROR_INTERCEPTOR_H_

#include "grpcpp/support/server_interceptor.h"

namespace deltaserve {
namespace service {

class ParseErrorInterceptorFactory : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  grpc::experimental::Interceptor* CreateServerInterceptor(grpc::experimental::ServerRpcInfo* info) override;
};

}  // namespace service
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_SERVICE_PARSE_ERROR_INTERCEPTOR_H_
