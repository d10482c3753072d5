// PlanForwardPasses: how one batch of rows runs as forward passes. Rows whose lengths differ a lot waste compute
// on padding; the plan sorts them by length and cuts the sorted list wherever adding the next row would make the
// pass's padded tokens (rows x longest) exceed `max_padding_ratio` x its real tokens. A ratio <= 0 gives one pass
// with every row in its original order. Lengths are effective lengths: tokens plus whatever a row's delta adds
// (prompt tuning's soft tokens). Rows of different `groups` never share a pass: each group is planned on its own
// (the engine keeps rows with soft tokens apart from rows without, which would otherwise all pay for them).
//
// Stateless: thread-safe. No LibTorch.
#ifndef DELTASERVE_SERVER_BATCHING_BATCH_PLAN_H_
#define DELTASERVE_SERVER_BATCHING_BATCH_PLAN_H_

#include <cstddef>
#include <cstdint>
#include <vector>

namespace deltaserve {
namespace batching {

// Each inner vector holds the indices (into `lengths`) of one forward pass. `groups` is empty (one group) or holds
// one entry per row.
std::vector<std::vector<size_t>> PlanForwardPasses(const std::vector<int64_t>& lengths, double max_padding_ratio,
                                                   const std::vector<int>& groups = {});

}  // namespace batching
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_BATCHING_BATCH_PLAN_H_
