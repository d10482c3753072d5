#include "server/batching/batch_plan.h"

#include <algorithm>
#include <numeric>

namespace deltaserve {
namespace batching {

std::vector<std::vector<size_t>> PlanForwardPasses(const std::vector<int64_t>& lengths, double max_padding_ratio) {
  std::vector<size_t> order(lengths.size());
  std::iota(order.begin(), order.end(), 0);
  if (lengths.empty()) return {};
  int64_t longest = 0, real = 0;
  for (int64_t len : lengths) {
    longest = std::max(longest, len);
    real += len;
  }
  if (max_padding_ratio <= 0 ||
      static_cast<double>(longest) * static_cast<double>(lengths.size()) <= max_padding_ratio * real) {
    return {order};
  }
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return lengths[a] < lengths[b]; });
  std::vector<std::vector<size_t>> passes(1);
  int64_t pass_real = 0;
  for (size_t index : order) {
    const int64_t len = lengths[index];
    const size_t n = passes.back().size();
    if (n > 0 && static_cast<double>(len) * static_cast<double>(n + 1) > max_padding_ratio * (pass_real + len)) {
      passes.emplace_back();
      pass_real = 0;
    }
    passes.back().push_back(index);
    pass_real += len;
  }
  return passes;
}

}  // namespace batching
}  // namespace deltaserve
