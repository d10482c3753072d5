// Prompt tuning (Lester et al. 2021): P learned soft-token embeddings placed before a row's token embeddings
// (as PEFT prepends them to inputs_embeds). Positions come from the mask, so soft tokens take positions 0..P-1
// and the row's tokens follow.
//
// Batching. The distinct prompts of the batch are concatenated once ([S, E]). At the hook, one index_select over
// [hidden rows; soft table; a zero row] builds the new [B, T', E] with T' = max_i(P_i + len_i): row i holds its P_i
// soft tokens, then its real tokens, then padding (zeros, mask false). Rows without a prompt keep their tokens at
// the start. The index tensor is built on the host from the mask (one small device-to-host copy).
#include <ATen/TensorOperators.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/common/status_macros.h"
#include "server/common/torch_status.h"
#include "server/delta/methods_internal.h"

namespace deltaserve {
namespace delta {
namespace {

constexpr const char* kEmbeddingModule = "embeddings.word_embeddings";
constexpr const char* kTensorName = "prompt_embeddings";

class PromptMethod : public Method {
 public:
  MethodKind kind() const override { return MethodKind::kPrompt; }
  const MethodSpec& spec() const override { return spec_; }
  int64_t bytes() const override { return bytes_; }

  MethodSpec spec_;
  int64_t bytes_ = 0;
  int64_t num_virtual_tokens_ = 0;
  std::string model_key_;
  at::Tensor embeddings_;  // [P, E] on the model's device, compute dtype
};

class PromptBatch : public MethodBatch {
 public:
  PromptBatch(std::vector<int64_t> lengths, std::vector<int64_t> offsets, at::Tensor soft)
      : MethodBatch(static_cast<int64_t>(lengths.size())),
        lengths_(std::move(lengths)),
        offsets_(std::move(offsets)),
        soft_(std::move(soft)) {}

  int64_t LeadingVirtualTokens(int64_t row) const override {
    return row >= 0 && row < static_cast<int64_t>(lengths_.size()) ? lengths_[row] : 0;
  }

  void OnTokenEmbeddings(at::Tensor* hidden, at::Tensor* mask) override {
    if (!soft_.defined()) return;  // no row has a prompt
    const int64_t b = hidden->size(0), t = hidden->size(1), e = hidden->size(2);
    if (b != static_cast<int64_t>(lengths_.size()) || e != soft_.size(1) || mask->dim() != 2 ||
        mask->size(0) != b || mask->size(1) != t) {
      return;  // not the batch this plan was made for (never on valid use)
    }
    const int64_t num_soft = soft_.size(0);
    const int64_t zero_row = b * t + num_soft;
    const at::Tensor host_mask = mask->to(at::kCPU, at::kBool).contiguous();
    const bool* m = host_mask.data_ptr<bool>();
    // Each row's real token positions, in order.
    std::vector<std::vector<int64_t>> real(b);
    int64_t new_t = 1;
    for (int64_t i = 0; i < b; ++i) {
      for (int64_t j = 0; j < t; ++j) {
        if (m[i * t + j]) real[i].push_back(j);
      }
      new_t = std::max<int64_t>(new_t, lengths_[i] + static_cast<int64_t>(real[i].size()));
    }
    at::Tensor index = at::empty({b * new_t}, at::kLong);
    at::Tensor new_mask = at::zeros({b, new_t}, at::kBool);
    int64_t* idx = index.data_ptr<int64_t>();
    bool* nm = new_mask.data_ptr<bool>();
    for (int64_t i = 0; i < b; ++i) {
      const int64_t p = lengths_[i], n = static_cast<int64_t>(real[i].size());
      for (int64_t k = 0; k < new_t; ++k) {
        int64_t src = zero_row;
        if (k < p) {
          src = b * t + offsets_[i] + k;
        } else if (k < p + n) {
          src = i * t + real[i][k - p];
        }
        idx[i * new_t + k] = src;
        nm[i * new_t + k] = k < p + n;
      }
    }
    const at::Tensor soft = soft_.to(hidden->device(), hidden->scalar_type());
    const at::Tensor table =
        at::cat({hidden->reshape({b * t, e}), soft, at::zeros({1, e}, soft.options())}, 0);
    *hidden = table.index_select(0, index.to(hidden->device())).view({b, new_t, e});
    *mask = new_mask.to(mask->device());
  }

 private:
  std::vector<int64_t> lengths_;  // per row: P (0 without a prompt)
  std::vector<int64_t> offsets_;  // per row: first row of its prompt in soft_
  at::Tensor soft_;               // [S, E]: the distinct prompts, concatenated; undefined when none
};

}  // namespace

absl::StatusOr<std::unique_ptr<Method>> CreatePrompt(MethodSpec spec, const model::Model& model,
                                                     const MethodLimits& limits) {
  spec.kind = MethodKind::kPrompt;
  DS_RETURN_IF_ERROR(CheckConfigKeys(spec, {"num_virtual_tokens"}));
  DS_ASSIGN_OR_RETURN(const int64_t p,
                      ConfigPositiveInt(spec, "num_virtual_tokens", limits.max_virtual_tokens, /*fallback=*/-1));
  if (p >= model.info().max_sequence_length) {
    return absl::InvalidArgumentError(absl::StrCat("prompt: \"num_virtual_tokens\" ", p,
                                                   " leaves no room for a token in the model's maximum length of ",
                                                   model.info().max_sequence_length));
  }
  const model::ModuleInfo* embedding = nullptr;
  for (const model::ModuleInfo& m : model.modules()) {
    if (m.name == kEmbeddingModule && m.kind == model::ModuleKind::kEmbedding) embedding = &m;
  }
  if (embedding == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("prompt: model ", model.info().name, " has no ",
                                                   kEmbeddingModule, " module"));
  }
  // The token embedding width (BERT reports it as out_features, use-lite as in_features).
  const int64_t e = embedding->out_features > 0 ? embedding->out_features : embedding->in_features;
  std::set<std::string> used;
  DS_ASSIGN_OR_RETURN(at::Tensor t, RequireTensor(spec, kTensorName, {p, e}, &used));
  DS_RETURN_IF_ERROR(CheckNoUnexpectedTensors(spec, used));
  auto method = std::make_unique<PromptMethod>();
  method->num_virtual_tokens_ = p;
  method->model_key_ = ModelKey(model);
  DS_ASSIGN_OR_RETURN(method->embeddings_, ToModelDevice(t, model));
  method->bytes_ = method->embeddings_.nbytes();
  spec.config["num_virtual_tokens"] = p;
  spec.tensors = {{kTensorName, t}};
  method->spec_ = std::move(spec);
  return std::unique_ptr<Method>(std::move(method));
}

absl::StatusOr<std::unique_ptr<MethodBatch>> MakePromptBatch(const std::vector<const Method*>& rows,
                                                             const model::Model& model) {
  const std::string key = ModelKey(model);
  std::vector<int64_t> lengths(rows.size(), 0), offsets(rows.size(), 0);
  std::vector<const PromptMethod*> distinct;
  std::vector<int64_t> distinct_offset;
  int64_t total = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    if (rows[i] == nullptr) continue;
    const auto* m = dynamic_cast<const PromptMethod*>(rows[i]);
    if (m == nullptr) return absl::InvalidArgumentError(absl::StrCat("row ", i, " does not carry a prompt"));
    if (m->model_key_ != key) {
      return absl::InvalidArgumentError(
          absl::StrCat("row ", i, "'s prompt was created for another model, dtype or device"));
    }
    auto it = std::find(distinct.begin(), distinct.end(), m);
    if (it == distinct.end()) {
      distinct.push_back(m);
      distinct_offset.push_back(total);
      total += m->num_virtual_tokens_;
      it = distinct.end() - 1;
    }
    lengths[i] = m->num_virtual_tokens_;
    offsets[i] = distinct_offset[it - distinct.begin()];
  }
  at::Tensor soft;
  if (!distinct.empty()) {
    std::vector<at::Tensor> parts;
    for (const PromptMethod* m : distinct) parts.push_back(m->embeddings_);
    DS_ASSIGN_OR_RETURN(soft, TorchCall([&] { return parts.size() == 1 ? parts[0] : at::cat(parts, 0); },
                                        "stacking prompts"));
  }
  return std::unique_ptr<MethodBatch>(new PromptBatch(std::move(lengths), std::move(offsets), std::move(soft)));
}

}  // namespace delta
}  // namespace deltaserve
