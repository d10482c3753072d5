#include "server/common/retry_hint.h"

#include <algorithm>
#include <cstdint>
#include <string>

#include "absl/strings/cord.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace deltaserve {

void SetRetryAfter(absl::Status& status, absl::Duration delay) {
  const int64_t ms = std::max<int64_t>(1, absl::ToInt64Milliseconds(absl::Ceil(delay, absl::Milliseconds(1))));
  status.SetPayload(kRetryAfterPayloadUrl, absl::Cord(absl::StrCat(ms)));
}

std::optional<absl::Duration> GetRetryAfter(const absl::Status& status) {
  auto payload = status.GetPayload(kRetryAfterPayloadUrl);
  if (!payload.has_value()) return std::nullopt;
  int64_t ms = 0;
  if (!absl::SimpleAtoi(std::string(*payload), &ms) || ms < 0) return std::nullopt;
  return absl::Milliseconds(ms);
}

}  // namespace deltaserve
