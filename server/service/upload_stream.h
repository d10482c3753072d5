// ReadUploadStream: the reading half of deltaserve's client-streaming uploads (DeltaService.PushDelta,
// TuningService.UploadDataset): the first message carries a header with `size_bytes` (0 = not known), every later
// one a `chunk` of the bytes. Sizes are checked while reading, so an upload over the limit is refused before it is
// held in memory. A free function over the call's objects: thread-safe as they are.
#ifndef DELTASERVE_SERVER_SERVICE_UPLOAD_STREAM_H_
#define DELTASERVE_SERVER_SERVICE_UPLOAD_STREAM_H_

#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "grpcpp/grpcpp.h"

namespace deltaserve {
namespace service {

// Reads the header into *header and the chunks into *bytes. `rpc` names the call and `noun` what is uploaded
// ("pack", "dataset") in the messages. `on_header` (optional) checks the header before any chunk is read (e.g.
// the tenant it names); its error ends the call. Errors: INVALID_ARGUMENT (no header first, a header later, a negative or
// wrong size_bytes, no bytes at all), RESOURCE_EXHAUSTED (over max_bytes, announced or arriving), CANCELLED (the
// client went away).
// REQUIRES: Request is a message with a oneof `part` of `header` (with int64 size_bytes) and `bytes chunk`.
template <typename Request>
absl::Status ReadUploadStream(grpc::ServerContext* context, grpc::ServerReader<Request>* reader, int64_t max_bytes,
                              absl::string_view rpc, absl::string_view noun,
                              std::decay_t<decltype(std::declval<Request>().header())>* header, std::string* bytes,
                              const std::function<absl::Status(
                                  const std::decay_t<decltype(std::declval<Request>().header())>&)>& on_header =
                                  nullptr) {
  Request message;
  if (!reader->Read(&message) || message.part_case() != Request::kHeader) {
    return absl::InvalidArgumentError(absl::StrCat(rpc, ": the first message must carry the header"));
  }
  *header = message.header();  // a copy: the chunks below overwrite `message`
  if (on_header) {
    absl::Status checked = on_header(*header);
    if (!checked.ok()) return checked;
  }
  const int64_t announced = header->size_bytes();
  if (announced < 0) {
    return absl::InvalidArgumentError(absl::StrCat(rpc, ": size_bytes is ", announced, ": give the ", noun,
                                                   "'s size in bytes, or 0 if unknown"));
  }
  if (announced > max_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(rpc, ": a ", noun, " of ", announced,
                                                     " bytes is over this server's limit of ", max_bytes, " bytes"));
  }
  bytes->reserve(static_cast<size_t>(announced));
  while (reader->Read(&message)) {
    if (message.part_case() != Request::kChunk) {
      return absl::InvalidArgumentError(absl::StrCat(rpc, ": only the first message may carry a header"));
    }
    if (static_cast<int64_t>(bytes->size() + message.chunk().size()) > max_bytes) {
      return absl::ResourceExhaustedError(
          absl::StrCat(rpc, ": the ", noun, " is over this server's limit of ", max_bytes, " bytes"));
    }
    bytes->append(message.chunk());
  }
  if (context->IsCancelled()) return absl::CancelledError(absl::StrCat(rpc, ": the client cancelled the upload"));
  if (announced != 0 && static_cast<int64_t>(bytes->size()) != announced) {
    return absl::InvalidArgumentError(
        absl::StrCat(rpc, ": the header announced ", announced, " bytes but ", bytes->size(), " arrived"));
  }
  if (bytes->empty()) return absl::InvalidArgumentError(absl::StrCat(rpc, ": no ", noun, " bytes after the header"));
  return absl::OkStatus();
}

}  // namespace service
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_SERVICE_UPLOAD_STREAM_H_
