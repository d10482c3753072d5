#include "server/delta/delta_batch.h"

#include "server/common/status_macros.h"

namespace deltaserve {
namespace delta {

absl::StatusOr<std::unique_ptr<DeltaBatch>> DeltaBatch::Create(const std::vector<const DeltaPack*>& rows,
                                                                const model::Model& model) {
  std::unique_ptr<DeltaBatch> batch(new DeltaBatch());
  for (int k = 0; k < kNumMethodKinds; ++k) {
    const MethodKind kind = static_cast<MethodKind>(k);
    std::vector<const Method*> methods(rows.size(), nullptr);
    bool any = false;
    for (size_t i = 0; i < rows.size(); ++i) {
      if (rows[i] == nullptr) continue;
      methods[i] = rows[i]->method(kind);
      any = any || methods[i] != nullptr;
    }
    if (!any) continue;
    DS_ASSIGN_OR_RETURN(std::unique_ptr<MethodBatch> mb, MakeMethodBatch(kind, std::move(methods), model));
    batch->batches_.push_back(std::move(mb));
  }
  if (batch->batches_.empty()) return std::unique_ptr<DeltaBatch>();
  return batch;
}

int64_t DeltaBatch::LeadingVirtualTokens(int64_t row) const {
  int64_t n = 0;
  for (const auto& b : batches_) n += b->LeadingVirtualTokens(row);
  return n;
}

void DeltaBatch::OnTokenLayout(const model::TokenLayout& layout) {
  for (const auto& b : batches_) b->OnTokenLayout(layout);
}

void DeltaBatch::OnTokenEmbeddings(at::Tensor* hidden, at::Tensor* mask) {
  for (const auto& b : batches_) b->OnTokenEmbeddings(hidden, mask);
}

void DeltaBatch::OnLinearInput(const model::ModuleInfo& module, at::Tensor* input) {
  for (const auto& b : batches_) b->OnLinearInput(module, input);
}

void DeltaBatch::OnLinear(const model::ModuleInfo& module, const at::Tensor& input, at::Tensor* output) {
  for (const auto& b : batches_) b->OnLinear(module, input, output);
}

void DeltaBatch::OnLayerNorm(const model::ModuleInfo& module, const at::Tensor& input, at::Tensor* output) {
  for (const auto& b : batches_) b->OnLayerNorm(module, input, output);
}

void DeltaBatch::OnAttentionKeyValue(const model::ModuleInfo& attention, at::Tensor* keys, at::Tensor* values,
                                     at::Tensor* key_mask) {
  for (const auto& b : batches_) b->OnAttentionKeyValue(attention, keys, values, key_mask);
}

void DeltaBatch::OnBlockOutput(const model::ModuleInfo& block, at::Tensor* hidden) {
  for (const auto& b : batches_) b->OnBlockOutput(block, hidden);
}

}  // namespace delta
}  // namespace deltaserve
