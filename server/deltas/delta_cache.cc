#include "server/deltas/delta_cache.h"

namespace deltaserve {
namespace deltas {

const char* CacheTierName(CacheTier tier) {
  switch (tier) {
    case CacheTier::kDevice:
      return "device";
    case CacheTier::kHost:
      return "host";
    case CacheTier::kStore:
      return "store";
  }
  return "unknown";
}

}  // namespace deltas
}  // namespace deltaserve
