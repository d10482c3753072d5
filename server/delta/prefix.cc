// Prefix tuning (Li & Liang 2021): per attention module, P learned key and value vectors that every query of the
// row also attends to (PEFT's past_key_values; queries are not changed).
//
// Batching. Per attention module, the distinct prefixes among the rows that carry one there are stacked, padded
// to the longest (Pmax), behind an all-zero entry for rows without; at the hook one index_select gives every
// row's [NH, Pmax, DH] prefix, which is concatenated before the keys / values, and the key mask gets Pmax leading
// slots: true on a row's own prefix positions, false on padding slots and for rows without a prefix (so their
// attention is exactly the base model's).
#include <ATen/TensorOperators.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <map>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/common/status_macros.h"
#include "server/common/torch_status.h"
#include "server/delta/methods_internal.h"

namespace deltaserve {
namespace delta {
namespace {

// One prefix on one attention module, on the model's device in its compute dtype.
struct PrefixModule {
  int64_t num_heads = 0;
  int64_t head_dim = 0;
  at::Tensor keys;    // [NH, P, DH]
  at::Tensor values;  // [NH, P, DH]
};

class PrefixMethod : public Method {
 public:
  MethodKind kind() const override { return MethodKind::kPrefix; }
  const MethodSpec& spec() const override { return spec_; }
  int64_t bytes() const override { return bytes_; }

  MethodSpec spec_;
  int64_t bytes_ = 0;
  int64_t num_virtual_tokens_ = 0;
  std::string model_key_;
  std::map<std::string, PrefixModule> modules_;  // by attention module name
};

struct AttentionPlan {
  at::Tensor keys;     // [D+1, NH, Pmax, DH]; entry 0 is zeros (rows without a prefix here)
  at::Tensor values;   // [D+1, NH, Pmax, DH]
  at::Tensor entry;    // [B] int64: each row's entry
  at::Tensor mask;     // [B, Pmax] bool
};

class PrefixBatch : public MethodBatch {
 public:
  PrefixBatch(int64_t num_rows, std::unordered_map<std::string, AttentionPlan> plans)
      : MethodBatch(num_rows), plans_(std::move(plans)) {}

  void OnAttentionKeyValue(const model::ModuleInfo& attention, at::Tensor* keys, at::Tensor* values,
                           at::Tensor* key_mask) override {
    auto it = plans_.find(attention.name);
    if (it == plans_.end()) return;
    const AttentionPlan& plan = it->second;
    if (keys->dim() != 4 || keys->size(0) != plan.entry.size(0) || keys->size(1) != plan.keys.size(1) ||
        keys->size(3) != plan.keys.size(3)) {
      return;  // not the batch this plan was made for (never on valid use)
    }
    const at::Tensor k = plan.keys.index_select(0, plan.entry).to(keys->scalar_type());
    const at::Tensor v = plan.values.index_select(0, plan.entry).to(values->scalar_type());
    *keys = at::cat({k, *keys}, 2);
    *values = at::cat({v, *values}, 2);
    *key_mask = at::cat({plan.mask.to(key_mask->device()), *key_mask}, 1);
  }

 private:
  std::unordered_map<std::string, AttentionPlan> plans_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Method>> CreatePrefix(MethodSpec spec, const model::Model& model,
                                                     const MethodLimits& limits) {
  spec.kind = MethodKind::kPrefix;
  DS_RETURN_IF_ERROR(CheckConfigKeys(spec, {"num_virtual_tokens", "targets"}));
  DS_ASSIGN_OR_RETURN(const int64_t p,
                      ConfigPositiveInt(spec, "num_virtual_tokens", limits.max_virtual_tokens, /*fallback=*/-1));
  std::vector<std::string> defaults;
  for (const model::ModuleInfo& m : model.modules()) {
    if (m.kind == model::ModuleKind::kAttention) defaults.push_back(m.name);
  }
  DS_ASSIGN_OR_RETURN(std::vector<std::string> patterns, TargetPatterns(spec, defaults));
  DS_ASSIGN_OR_RETURN(std::vector<const model::ModuleInfo*> attentions,
                      ResolveMethodTargets(spec, patterns, model, {model::ModuleKind::kAttention},
                                           "attention modules"));

  auto method = std::make_unique<PrefixMethod>();
  method->num_virtual_tokens_ = p;
  method->model_key_ = ModelKey(model);
  std::set<std::string> used;
  std::map<std::string, at::Tensor> canonical;
  for (const model::ModuleInfo* attention : attentions) {
    const int64_t nh = attention->num_heads, dh = attention->head_dim;
    if (nh <= 0 || dh <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("prefix: attention ", attention->name, " has no head layout"));
    }
    PrefixModule m;
    m.num_heads = nh;
    m.head_dim = dh;
    for (const char* which : {"prefix_keys", "prefix_values"}) {
      const std::string name = absl::StrCat(attention->name, ".", which);
      DS_ASSIGN_OR_RETURN(at::Tensor t, RequireTensor(spec, name, {p, nh * dh}, &used));
      canonical[name] = t;
      // [P, NH*DH] -> [NH, P, DH], the layout of one row's keys.
      DS_ASSIGN_OR_RETURN(at::Tensor heads,
                          TorchCall([&] { return t.view({p, nh, dh}).permute({1, 0, 2}).contiguous(); },
                                    "splitting a prefix into heads"));
      DS_ASSIGN_OR_RETURN(at::Tensor placed, ToModelDevice(heads, model));
      method->bytes_ += placed.nbytes();
      (std::string(which) == "prefix_keys" ? m.keys : m.values) = placed;
    }
    method->modules_[attention->name] = std::move(m);
  }
  DS_RETURN_IF_ERROR(CheckNoUnexpectedTensors(spec, used));
  spec.config["num_virtual_tokens"] = p;
  spec.config["targets"] = SortedNames(attentions);
  spec.tensors = std::move(canonical);
  method->spec_ = std::move(spec);
  return std::unique_ptr<Method>(std::move(method));
}

absl::StatusOr<std::unique_ptr<MethodBatch>> MakePrefixBatch(const std::vector<const Method*>& rows,
                                                             const model::Model& model) {
  const std::string key = ModelKey(model);
  std::vector<const PrefixMethod*> methods(rows.size(), nullptr);
  for (size_t i = 0; i < rows.size(); ++i) {
    if (rows[i] == nullptr) continue;
    const auto* m = dynamic_cast<const PrefixMethod*>(rows[i]);
    if (m == nullptr) return absl::InvalidArgumentError(absl::StrCat("row ", i, " does not carry a prefix"));
    if (m->model_key_ != key) {
      return absl::InvalidArgumentError(
          absl::StrCat("row ", i, "'s prefix was created for another model, dtype or device"));
    }
    methods[i] = m;
  }
  const int64_t batch = static_cast<int64_t>(rows.size());
  std::unordered_map<std::string, AttentionPlan> plans;
  DS_RETURN_IF_ERROR(TorchCallVoid(
      [&] {
        const c10::Device device(model.info().device);
        std::map<std::string, std::vector<int64_t>> by_module;  // attention -> carrying rows
        for (int64_t i = 0; i < batch; ++i) {
          if (methods[i] == nullptr) continue;
          for (const auto& [name, m] : methods[i]->modules_) by_module[name].push_back(i);
        }
        for (const auto& [name, row_list] : by_module) {
          std::vector<const PrefixMethod*> distinct;
          std::vector<int64_t> entry(batch, 0);
          int64_t pmax = 0;
          for (int64_t r : row_list) {
            auto it = std::find(distinct.begin(), distinct.end(), methods[r]);
            entry[r] = (it - distinct.begin()) + 1;
            if (it == distinct.end()) distinct.push_back(methods[r]);
            pmax = std::max(pmax, methods[r]->num_virtual_tokens_);
          }
          const PrefixModule& first = distinct[0]->modules_.at(name);
          const auto opts = first.keys.options();
          std::vector<at::Tensor> keys = {at::zeros({first.num_heads, pmax, first.head_dim}, opts)};
          std::vector<at::Tensor> values = {keys[0]};
          for (const PrefixMethod* d : distinct) {
            const PrefixModule& m = d->modules_.at(name);
            const int64_t pad = pmax - d->num_virtual_tokens_;
            if (pad == 0) {
              keys.push_back(m.keys);
              values.push_back(m.values);
            } else {
              const at::Tensor zeros = at::zeros({m.num_heads, pad, m.head_dim}, opts);
              keys.push_back(at::cat({m.keys, zeros}, 1));
              values.push_back(at::cat({m.values, zeros}, 1));
            }
          }
          at::Tensor mask = at::zeros({batch, pmax}, at::kBool);
          bool* mp = mask.data_ptr<bool>();
          for (int64_t r : row_list) {
            std::fill(mp + r * pmax, mp + r * pmax + methods[r]->num_virtual_tokens_, true);
          }
          AttentionPlan plan;
          plan.keys = at::stack(keys, 0);
          plan.values = at::stack(values, 0);
          plan.entry = IndexTensor(entry, device);
          plan.mask = mask.to(device);
          plans[name] = std::move(plan);
        }
      },
      "planning a prefix batch"));
  return std::unique_ptr<MethodBatch>(new PrefixBatch(static_cast<int64_t>(rows.size()), std::move(plans)));
}

}  // namespace delta
}  // namespace deltaserve
