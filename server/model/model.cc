#include "server/model/model.h"

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
