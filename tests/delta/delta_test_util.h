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

// A model that forwards everything to `model` except that parameters() lacks `hidden`: merging a pack that
// targets it fails halfway (after rewriting the parameters before it), which tests the way back.
std::shared_ptr<const model::Model> WithoutParameter(std::shared_ptr<const model::Model> model,
                                                     const std::string& hidden);

// Deterministic random float32 CPU tensor, N(0, scale^2).
at::Tensor RandomTensor(const std::vector<int64_t>& shape, double scale, uint64_t seed);

// `n` id rows of random lengths in [min_len, max_len] (valid ids of `model`, >= 1 real token).
std::vector<std::vector<int64_t>> RandomRows(const model::Model& model, int n, int64_t min_len, int64_t max_len,
                                             uint64_t seed);

// One forward pass of `rows` (right-padded) with `hooks` (may be null); `pack`: ForwardInput::pack_tokens.
absl::StatusOr<model::ForwardOutput> RunRows(const model::Model& model, const std::vector<std::vector<int64_t>>& rows,
                                             model::ForwardHooks* hooks, bool pack = false);

// Runs `rows` as one batch where row i carries methods[i] (of `kind`, or nullptr), padded and packed
// (TokenLayout), and each row alone with its method; returns the largest absolute difference between the batched
// and the solo pooled outputs and per-token states over real tokens (a row's soft prompt positions excluded).
// Max |a - b| between row `row` of `batch` and row 0 of `solo` (one row alone): over the sentence embedding and
// the `len` real token states, skipping `batch_lead` / `solo_lead` leading virtual (prompt) positions.
double RowDiff(const model::ForwardOutput& batch, int64_t row, int64_t batch_lead, const model::ForwardOutput& solo,
               int64_t solo_lead, int64_t len);

absl::StatusOr<double> MaxBatchVsSoloDiff(const model::Model& model, MethodKind kind,
                                          const std::vector<std::vector<int64_t>>& rows,
                                          const std::vector<const Method*>& methods);

// The same with whole packs (DeltaBatch), rows[i] carrying packs[i] (or nullptr), padded and packed.
absl::StatusOr<double> MaxPackBatchVsSoloDiff(const model::Model& model,
                                              const std::vector<std::vector<int64_t>>& rows,
                                              const std::vector<const DeltaPack*>& packs);

// The helpers below check with EXPECT (a failure is recorded, the test goes on); on a failure the *OrFail ones
// return nullptr / an empty value.

// CreateMethod(spec, model, limits), EXPECTing it to succeed.
std::unique_ptr<Method> CreateOrFail(MethodSpec spec, const model::Model& model, const MethodLimits& limits = {});

// MakeMethodBatch(kind, rows, model), EXPECTing it to succeed.
std::unique_ptr<MethodBatch> MakeBatchOrFail(MethodKind kind, const std::vector<const Method*>& rows,
                                             const model::Model& model);

// RunRows(model, rows, hooks), EXPECTing it to succeed.
model::ForwardOutput ForwardOrFail(const model::Model& model, const std::vector<std::vector<int64_t>>& rows,
                                   model::ForwardHooks* hooks);

// Max |a - b| over pooled outputs and hidden states.
double MaxDiff(const model::ForwardOutput& a, const model::ForwardOutput& b);

// A batch-vs-solo bound for `rows`: max(floor, factor x the backbone's own batch-vs-solo difference on them, run
// through `kind`'s batch with no methods) (use-lite's hidden states reach |h| ~ 30: padding alone moves them ~7e-5).
double BatchTolerance(const model::Model& model, MethodKind kind, const std::vector<std::vector<int64_t>>& rows,
                      double floor, double factor);

// EXPECTs CreateMethod(spec, model, limits) to fail with kInvalidArgument and a message containing `needle`.
void ExpectInvalid(const MethodSpec& spec, const model::Model& model, const std::string& needle,
                   const MethodLimits& limits = MethodLimits());

// The module of `model` named `name`; nullptr when none.
const model::ModuleInfo* FindModule(const model::Model& model, const std::string& name);

// A fresh directory /tmp/<prefix>.XXXXXX (EXPECTs mkdtemp to succeed; "/tmp" if not), removed when the tests end.
std::string MakeTempDir(const std::string& prefix);

}  // namespace testing
}  // namespace delta
}  // namespace deltaserve

#endif  // DELTASERVE_TESTS_DELTA_DELTA_TEST_UTIL_H_
