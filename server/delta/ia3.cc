// Placeholder: being implemented.
#include "server/delta/methods_internal.h"

namespace deltaserve {
namespace delta {

absl::StatusOr<std::unique_ptr<Method>> CreateIa3(MethodSpec, const model::Model&, const MethodLimits&) {
  return absl::UnimplementedError("ia3: not implemented yet");
}
absl::StatusOr<std::unique_ptr<MethodBatch>> MakeIa3Batch(const std::vector<const Method*>&, const model::Model&) {
  return absl::UnimplementedError("ia3: not implemented yet");
}

}  // namespace delta
}  // namespace deltaserve
