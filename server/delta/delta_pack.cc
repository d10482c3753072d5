// Placeholder: being implemented.
#include "server/delta/delta_pack.h"

namespace deltaserve {
namespace delta {

const Method* DeltaPack::method(MethodKind kind) const {
  for (const auto& m : methods_) {
    if (m->kind() == kind) return m.get();
  }
  return nullptr;
}

}  // namespace delta
}  // namespace deltaserve
