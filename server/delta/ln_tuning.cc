// Placeholder: being implemented.
#include "server/delta/methods_internal.h"

namespace deltaserve {
namespace delta {

absl::StatusOr<std::unique_ptr<Method>> CreateLnTuning(MethodSpec, const model::Model&, const MethodLimits&) {
  return absl::UnimplementedError("ln_tuning: not implemented yet");
}
absl::StatusOr<std::unique_ptr<MethodBatch>> MakeLnTuningBatch(const std::vector<const Method*>&, const model::Model&) {
  return absl::UnimplementedError("ln_tuning: not implemented yet");
}

}  // namespace delta
}  // namespace deltaserve
