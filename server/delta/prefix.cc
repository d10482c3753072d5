// Placeholder: being implemented.
#include "server/delta/methods_internal.h"

namespace deltaserve {
namespace delta {

absl::StatusOr<std::unique_ptr<Method>> CreatePrefix(MethodSpec, const model::Model&, const MethodLimits&) {
  return absl::UnimplementedError("prefix: not implemented yet");
}
absl::StatusOr<std::unique_ptr<MethodBatch>> MakePrefixBatch(const std::vector<const Method*>&, const model::Model&) {
  return absl::UnimplementedError("prefix: not implemented yet");
}

}  // namespace delta
}  // namespace deltaserve
