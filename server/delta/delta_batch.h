// DeltaBatch: the hooks of one forward pass in which row i carries delta pack d_i (or none). It holds one
// MethodBatch per method kind present in the batch and calls them, in MethodKind order, at every hook point; the
// base computation stays shared by all rows.
//
// Built per batch on the batch's thread and used by that thread only (not thread-safe). It pins nothing itself:
// the caller keeps the packs alive for the pass (the rows' shared_ptrs).
#ifndef DELTASERVE_SERVER_DELTA_DELTA_BATCH_H_
#define DELTASERVE_SERVER_DELTA_DELTA_BATCH_H_

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "server/delta/delta_pack.h"
#include "server/delta/method.h"
#include "server/model/model.h"

namespace deltaserve {
namespace delta {

class DeltaBatch : public model::ForwardHooks {
 public:
  // rows[i]: the pack of row i, or nullptr for the base model. Returns nullptr (no hooks needed) when no row has
  // a method. REQUIRES: every pack was loaded for `model`.
  static absl::StatusOr<std::unique_ptr<DeltaBatch>> Create(const std::vector<const DeltaPack*>& rows,
                                                            const model::Model& model);

  // Positions at the start of row `row`'s output that are soft (prompt) tokens, not the caller's.
  int64_t LeadingVirtualTokens(int64_t row) const;

  bool SupportsPackedTokens() const override { return true; }  // every MethodBatch does
  void OnTokenLayout(const model::TokenLayout& layout) override;
  void OnTokenEmbeddings(at::Tensor* hidden, at::Tensor* mask) override;
  void OnLinearInput(const model::ModuleInfo& module, at::Tensor* input) override;
  void OnLinear(const model::ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override;
  void OnLayerNorm(const model::ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override;
  void OnAttentionKeyValue(const model::ModuleInfo& attention, at::Tensor* keys, at::Tensor* values,
                           at::Tensor* key_mask) override;
  void OnBlockOutput(const model::ModuleInfo& block, at::Tensor* hidden) override;

 private:
  std::vector<std::unique_ptr<MethodBatch>> batches_;
};

}  // namespace delta
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_DELTA_DELTA_BATCH_H_
