#include "server/model/model.h"

namespace deltaserve {
namespace model {

const char* ModuleKindName(ModuleKind kind) {
  switch (kind) {
    case ModuleKind::kEmbedding:
      return "embedding";
    case ModuleKind::kLinear:
      return "linear";
    case ModuleKind::kLayerNorm:
      return "layer_norm";
    case ModuleKind::kAttention:
      return "attention";
    case ModuleKind::kBlockOutput:
      return "block_output";
  }
  return "unknown";
}

}  // namespace model
}  // namespace deltaserve
