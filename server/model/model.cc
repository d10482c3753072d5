#include "server/model/model.h"

#include <ATen/ops/repeat_interleave.h>
#include <ATen/ops/zeros.h>

#include "absl/strings/str_cat.h"
#include "server/common/status_macros.h"
#include "server/common/torch_status.h"

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

TokenLayout TokenLayout::Padded(int64_t rows) {
  TokenLayout layout;
  layout.rows_ = rows;
  return layout;
}

TokenLayout TokenLayout::Packed(const at::Tensor& mask) {
  TokenLayout layout;
  layout.packed_ = true;
  layout.rows_ = mask.size(0);
  layout.length_ = mask.size(1);
  layout.token_index_ = mask.reshape({-1}).nonzero().squeeze(1);
  const at::Tensor counts = mask.sum(1).to(at::kCPU, at::kLong).contiguous();  // [B]
  const int64_t* c = counts.data_ptr<int64_t>();
  layout.offsets_.resize(static_cast<size_t>(layout.rows_) + 1, 0);
  for (int64_t r = 0; r < layout.rows_; ++r) layout.offsets_[r + 1] = layout.offsets_[r] + c[r];
  layout.row_of_token_ = at::repeat_interleave(counts.to(mask.device()));
  return layout;
}

at::Tensor TokenLayout::Rows(const at::Tensor& t, int64_t first, int64_t count) const {
  if (packed_) return t.narrow(0, offsets_[first], offsets_[first + count] - offsets_[first]);
  return t.narrow(0, first, count).view({-1, t.size(-1)});
}

at::Tensor TokenLayout::PerRow(const at::Tensor& v, const at::Tensor& t) const {
  if (packed_) return v.size(0) == 1 ? v : v.index_select(0, row_of_token_);
  std::vector<int64_t> shape(t.dim(), 1);
  shape.front() = v.size(0);
  shape.back() = v.size(1);
  return v.view(shape);
}

at::Tensor TokenLayout::Pack(const at::Tensor& padded) const {
  std::vector<int64_t> shape = padded.sizes().vec();
  shape.erase(shape.begin());
  shape.front() = -1;
  return padded.reshape(shape).index_select(0, token_index_);
}

at::Tensor TokenLayout::Unpack(const at::Tensor& packed) const {
  std::vector<int64_t> shape = packed.sizes().vec();
  shape.front() = rows_ * length_;
  at::Tensor out = at::zeros(shape, packed.options());
  out.index_copy_(0, token_index_, packed);
  shape.front() = length_;
  shape.insert(shape.begin(), rows_);
  return out.view(shape);
}

void TokenLayout::UnpackSlices(const at::Tensor& fused, const std::vector<at::Tensor*>& slices) const {
  const int64_t width = fused.size(-1) / static_cast<int64_t>(slices.size());
  bool views = true;
  for (size_t i = 0; i < slices.size() && views; ++i) {
    const at::Tensor& s = *slices[i];
    views = s.is_alias_of(fused) && s.strides() == fused.strides() && s.size(-1) == width &&
            s.storage_offset() == fused.storage_offset() + static_cast<int64_t>(i) * width;
  }
  if (!views) {
    for (at::Tensor* s : slices) *s = Unpack(*s);
    return;
  }
  const at::Tensor whole = Unpack(fused);
  for (size_t i = 0; i < slices.size(); ++i) *slices[i] = whole.narrow(-1, static_cast<int64_t>(i) * width, width);
}

TokenLayout PlanTokenLayout(const ForwardInput& input, const at::Tensor& mask, const ForwardHooks* hooks) {
  const bool pack = input.pack_tokens && (hooks == nullptr || hooks->SupportsPackedTokens()) && mask.size(0) > 1 &&
                    !mask.all().item<bool>();
  return pack ? TokenLayout::Packed(mask) : TokenLayout::Padded(mask.size(0));
}

absl::Status ValidateForwardInput(const ForwardInput& input, int64_t vocab_size, int64_t max_sequence_length) {
  const at::Tensor& ids = input.input_ids;
  const at::Tensor& mask = input.attention_mask;
  if (!ids.defined() || ids.dim() != 2 || ids.scalar_type() != at::kLong) {
    return absl::InvalidArgumentError("input_ids must be a [B,T] int64 tensor");
  }
  if (!mask.defined() || mask.dim() != 2 || mask.scalar_type() != at::kBool) {
    return absl::InvalidArgumentError("attention_mask must be a [B,T] bool tensor");
  }
  if (ids.sizes() != mask.sizes()) {
    return absl::InvalidArgumentError(absl::StrCat("input_ids ", ShapeString(ids.sizes()), " and attention_mask ",
                                                   ShapeString(mask.sizes()), " differ in shape"));
  }
  const int64_t batch = ids.size(0), length = ids.size(1);
  if (batch < 1 || length < 1) return absl::InvalidArgumentError("the batch is empty (B and T must be at least 1)");
  if (length > max_sequence_length) {
    return absl::InvalidArgumentError(absl::StrCat("sequence length ", length, " exceeds the model's maximum of ",
                                                   max_sequence_length, " tokens"));
  }
  int64_t min_id = 0, max_id = 0;
  bool first_real = false;
  DS_RETURN_IF_ERROR(TorchCallVoid(
      [&] {
        min_id = ids.min().item<int64_t>();
        max_id = ids.max().item<int64_t>();
        first_real = mask.select(1, 0).all().item<bool>();
      },
      "checking the forward input"));
  if (min_id < 0 || max_id >= vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat("input_ids hold ids in [", min_id, ", ", max_id,
                                                   "], outside the vocabulary [0, ", vocab_size, ")"));
  }
  if (!first_real) {
    return absl::InvalidArgumentError("attention_mask must be true in the first column (every row needs a token)");
  }
  return absl::OkStatus();
}

}  // namespace model
}  // namespace deltaserve
