#include "server/service/version.h"

#include <torch/version.h>

namespace deltaserve {

std::string TorchVersion() { return TORCH_VERSION; }

}  // namespace deltaserve
