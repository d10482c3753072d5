#include "server/batching/batch_plan.h"

#include <algorithm>
#include <functional>
#include <numeric>

namespace deltaserve {
namespace batching {

std::vector<std::vector<size_t>> PlanForwardPasses(const std::vector<int64_t>& lengths, double max_padding_ratio,
                                                   const std::vector<int>& groups) {
  if (!groups.empty() && std::adjacent_find(groups.begin(), groups.end(), std::not_equal_to<int>()) != groups.end()) {
    // Several groups: plan each on its own (groups in order of first appearance), then map back to row indices.
    std::vector<int> seen;
    std::vector<std::vector<size_t>> passes;
    for (int group : groups) {
      if (std::find(seen.begin(), seen.end(), group) != seen.end()) continue;
      seen.push_back(group);
      std::vector<size_t> rows;
      std::vector<int64_t> group_lengths;
      for (size_t i = 0; i < lengths.size(); ++i) {
        if (groups[i] != group) continue;
        rows.push_back(i);
        group_lengths.push_back(lengths[i]);
      }
      for (std::vector<size_t>& pass : PlanForwardPasses(group_lengths, max_padding_ratio)) {
        for (size_t& index : pass) index = rows[index];
        passes.push_back(std::move(pass));
      }
    }
    return passes;
  }
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
