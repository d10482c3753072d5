// Placeholder: being implemented.
#include "server/delta/head.h"

namespace deltaserve {
namespace delta {

absl::StatusOr<std::unique_ptr<Head>> Head::Create(HeadSpec, const model::Model&) {
  return absl::UnimplementedError("head: not implemented yet");
}
int64_t Head::bytes() const { return 0; }
absl::StatusOr<at::Tensor> Head::Apply(const at::Tensor&) const { return absl::UnimplementedError("head"); }

}  // namespace delta
}  // namespace deltaserve
