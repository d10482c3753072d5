// Placeholder: being implemented.
#include "server/delta/methods_internal.h"

namespace deltaserve {
namespace delta {

absl::StatusOr<std::unique_ptr<Method>> CreatePrompt(MethodSpec, const model::Model&, const MethodLimits&) {
  return absl::UnimplementedError("prompt: not implemented yet");
}
absl::StatusOr<std::unique_ptr<MethodBatch>> MakePromptBatch(const std::vector<const Method*>&, const model::Model&) {
  return absl::UnimplementedError("prompt: not implemented yet");
}

}  // namespace delta
}  // namespace deltaserve
