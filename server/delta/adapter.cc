// Placeholder: being implemented.
#include "server/delta/methods_internal.h"

namespace deltaserve {
namespace delta {

absl::StatusOr<std::unique_ptr<Method>> CreateAdapter(MethodSpec, const model::Model&, const MethodLimits&) {
  return absl::UnimplementedError("adapter: not implemented yet");
}
absl::StatusOr<std::unique_ptr<MethodBatch>> MakeAdapterBatch(const std::vector<const Method*>&, const model::Model&) {
  return absl::UnimplementedError("adapter: not implemented yet");
}
absl::StatusOr<std::unique_ptr<Method>> CreateParallelAdapter(MethodSpec, const model::Model&, const MethodLimits&) {
  return absl::UnimplementedError("parallel_adapter: not implemented yet");
}
absl::StatusOr<std::unique_ptr<MethodBatch>> MakeParallelAdapterBatch(const std::vector<const Method*>&,
                                                                      const model::Model&) {
  return absl::UnimplementedError("parallel_adapter: not implemented yet");
}

}  // namespace delta
}  // namespace deltaserve
