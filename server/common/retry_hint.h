// Retry hints on RESOURCE_EXHAUSTED / UNAVAILABLE answers: how long a client should wait before trying again.
//
// The hint travels as a payload of the absl::Status under kRetryAfterPayloadUrl (the delay in whole milliseconds,
// as decimal ASCII); the gRPC layer copies it into the trailing metadata key `retry-after-ms` (docs/API.md).
// Whoever refuses work for a while (the batcher's queue bounds, a tenant's request rate) attaches one. Stateless
// functions: thread-safe.
#ifndef DELTASERVE_SERVER_COMMON_RETRY_HINT_H_
#define DELTASERVE_SERVER_COMMON_RETRY_HINT_H_

#include <optional>

#include "absl/status/status.h"
#include "absl/time/time.h"

namespace deltaserve {

inline constexpr char kRetryAfterPayloadUrl[] = "deltaserve.dev/retry-after-ms";

// Attaches `delay` (rounded up to whole milliseconds, at least 1) to `status`. REQUIRES: status is not OK.
void SetRetryAfter(absl::Status& status, absl::Duration delay);
// The hint attached by SetRetryAfter, if any (and well-formed).
std::optional<absl::Duration> GetRetryAfter(const absl::Status& status);

}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_COMMON_RETRY_HINT_H_
