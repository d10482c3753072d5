// Test helpers for delta methods: the models to run them on, random method specs, and forward passes of id rows
// with per-row deltas, so each test can compare a mixed batch with every row run alone.
//
// Not thread-safe (tests call them from one thread).
#ifndef DELTASERVE_TESTS_DELTA_DELTA_TEST_UTIL_H_
#define DELTASERVE_TESTS_DELTA_DELTA_TEST_UTIL_H_

#include <memory>
#include <string>
#include <vector>

#include "ATen/core/Tensor.h"
#include "absl/status/statusor.h"
#include "server/delta/delta_pack.h"
#include "server/delta/method.h"
#include "server/model/model.h"

namespace deltaserve {
namespace delta {
namespace testing {

// The converted use-lite model (models/use-lite or $DS_USE_LITE_DIR), loaded once; nullptr when absent.
std::shared_ptr<const model::Model> UseLite();

// A tiny random BERT (hidden 32, 2 layers, 4 heads, FFN 64, 40-word vocab), written by the test itself into a
// temporary directory and loaded once. `dtype`: "float32" or "bfloat16".
std::shared_ptr<const model::Model> TinyBert(const std::string& dtype = "float32");

// Both of the above that exist, with a name for test output.
struct NamedModel {
  std::string name;
  std::shared_ptr<const model::Model> model;
};
std::vector<NamedModel> TestModels();

// Deterministic random float32 CPU tensor, N(0, scale^2).
at::Tensor RandomTensor(const std::vector<int64_t>& shape, double scale, uint64_t seed);

// `n` id rows of random lengths in [min_len, max_len] (valid ids of `model`, >= 1 real token).
std::vector<std::vector<int64_t>> RandomRows(const model::Model& model, int n, int64_t min_len, int64_t max_len,
                                             uint64_t seed);

// One forward pass of `rows` (right-padded) with `hooks` (may be null).
absl::StatusOr<model::ForwardOutput> RunRows(const model::Model& model, const std::vector<std::vector<int64_t>>& rows,
                                             model::ForwardHooks* hooks);

// Runs `rows` as one batch where row i carries methods[i] (of `kind`, or nullptr), and each row alone with its
// method; returns the largest absolute difference between the batched and the solo pooled outputs and per-token
// states over real tokens (a row's soft prompt positions excluded).
absl::StatusOr<double> MaxBatchVsSoloDiff(const model::Model& model, MethodKind kind,
                                          const std::vector<std::vector<int64_t>>& rows,
                                          const std::vector<const Method*>& methods);

// The same with whole packs (DeltaBatch), rows[i] carrying packs[i] (or nullptr).
absl::StatusOr<double> MaxPackBatchVsSoloDiff(const model::Model& model,
                                              const std::vector<std::vector<int64_t>>& rows,
                                              const std::vector<const DeltaPack*>& packs);

}  // namespace testing
}  // namespace delta
}  // namespace deltaserve

#endif  // DELTASERVE_TESTS_DELTA_DELTA_TEST_UTIL_H_
