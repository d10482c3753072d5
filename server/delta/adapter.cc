// Bottleneck adapters: the sequential adapter (Houlsby et al. 2019; Pfeiffer et al. 2020 placement) on a
// sub-layer's output, h' = h + s * up(act(down(h))), and the parallel adapter (He et al. 2022), which reads the
// sub-layer's input x instead: h' = h + s * up(act(down(x))).
//
// Batching. Per target block, the rows that carry an adapter there form segments of consecutive rows with the same
// adapter; each segment's rows get two GEMMs with that adapter's own weights (no per-batch copies of them), added
// into the block output in place. Segments run on the intra-op threads in parallel (ForEachSegmentPiece); rows
// without an adapter there are unchanged.
#include <ATen/TensorOperators.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/tanh.h>

#include <algorithm>
#include <map>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/common/status_macros.h"
#include "server/common/torch_status.h"
#include "server/delta/methods_internal.h"

namespace deltaserve {
namespace delta {
namespace {

enum class Activation { kRelu, kGelu, kTanh, kSwish };

absl::StatusOr<Activation> ParseActivation(const std::string& name, MethodKind kind) {
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "tanh") return Activation::kTanh;
  if (name == "swish") return Activation::kSwish;
  return absl::InvalidArgumentError(absl::StrCat(MethodKindName(kind), ": \"activation\" \"", name,
                                                 "\" is not supported (relu, gelu, tanh, swish)"));
}

at::Tensor Activate(Activation act, const at::Tensor& x) {
  switch (act) {
    case Activation::kRelu: return at::relu(x);
    case Activation::kGelu: return at::gelu(x);
    case Activation::kTanh: return at::tanh(x);
    case Activation::kSwish: return at::silu(x);
  }
  return x;
}

// One adapter on one target block, on the model's device in its compute dtype.
struct AdapterModule {
  int64_t in = 0;          // width of what down() reads: the block's (sequential) or its sub-layer input's
  int64_t out = 0;         // the block's width
  int64_t bottleneck = 0;
  std::string input_module;  // parallel: the linear whose input is the sub-layer input
  at::Tensor down_w;       // [b, in]
  at::Tensor down_b;       // [b]
  at::Tensor up_w;         // [out, b], times scaling
  at::Tensor up_b;         // [out], times scaling
};

class AdapterMethod : public Method {
 public:
  MethodKind kind() const override { return spec_.kind; }
  const MethodSpec& spec() const override { return spec_; }
  int64_t bytes() const override { return bytes_; }

  MethodSpec spec_;
  int64_t bytes_ = 0;
  Activation activation_ = Activation::kRelu;
  std::string model_key_;
  std::map<std::string, AdapterModule> modules_;  // by block name
};

const model::ModuleInfo* FindModule(const model::Model& model, const std::string& name) {
  for (const model::ModuleInfo& m : model.modules()) {
    if (m.name == name) return &m;
  }
  return nullptr;
}

absl::StatusOr<std::unique_ptr<Method>> CreateAdapterImpl(MethodSpec spec, const model::Model& model,
                                                          const MethodLimits& limits, bool parallel) {
  const MethodKind kind = parallel ? MethodKind::kParallelAdapter : MethodKind::kAdapter;
  spec.kind = kind;
  const char* kname = MethodKindName(kind);
  const std::vector<std::string> known =
      parallel ? std::vector<std::string>{"bottleneck", "activation", "targets", "scaling"}
               : std::vector<std::string>{"bottleneck", "activation", "placement", "targets", "scaling"};
  DS_RETURN_IF_ERROR(CheckConfigKeys(spec, known));
  DS_ASSIGN_OR_RETURN(const int64_t bottleneck,
                      ConfigPositiveInt(spec, "bottleneck", limits.max_bottleneck, /*fallback=*/-1));
  DS_ASSIGN_OR_RETURN(const std::string activation_name, ConfigString(spec, "activation", "relu"));
  DS_ASSIGN_OR_RETURN(const Activation activation, ParseActivation(activation_name, kind));
  DS_ASSIGN_OR_RETURN(const double scaling, ConfigNumber(spec, "scaling", 1.0));

  // Targets.
  const std::vector<model::ModuleKind> block_kind = {model::ModuleKind::kBlockOutput};
  const char* block_what = "block output modules";
  std::vector<const model::ModuleInfo*> targets;
  std::string placement;
  const bool has_targets = spec.config.contains("targets") && !spec.config["targets"].is_null();
  if (parallel) {
    DS_ASSIGN_OR_RETURN(std::vector<std::string> patterns,
                        TargetPatterns(spec, {R"(re:encoder\.layer\.[0-9]+\.output)"}));
    DS_ASSIGN_OR_RETURN(targets, ResolveMethodTargets(spec, patterns, model, block_kind, block_what));
  } else {
    DS_ASSIGN_OR_RETURN(placement, ConfigString(spec, "placement", "houlsby"));
    std::vector<const model::ModuleInfo*> placed;
    if (placement == "houlsby" || placement == "pfeiffer") {
      // Houlsby: both sub-layer outputs of every layer; Pfeiffer: the feed-forward one only. Exact names, so
      // that "output" never also picks "attention.output".
      for (const model::ModuleInfo& m : model.modules()) {
        if (m.kind != model::ModuleKind::kBlockOutput) continue;
        if (placement == "pfeiffer" && m.name != absl::StrCat("encoder.layer.", m.layer, ".output")) continue;
        placed.push_back(&m);
      }
      if (placed.empty()) {
        return absl::InvalidArgumentError(absl::StrCat(kname, ": placement \"", placement, "\" finds no block "
                                                       "output module in model ", model.info().name));
      }
    } else if (placement != "custom") {
      return absl::InvalidArgumentError(absl::StrCat(kname, ": \"placement\" \"", placement,
                                                     "\" is not supported (houlsby, pfeiffer, custom)"));
    }
    if (placement == "custom" && !has_targets) {
      return absl::InvalidArgumentError(absl::StrCat(kname, ": placement \"custom\" needs \"targets\""));
    }
    if (has_targets) {
      DS_ASSIGN_OR_RETURN(std::vector<std::string> patterns, TargetPatterns(spec, {}));
      DS_ASSIGN_OR_RETURN(targets, ResolveMethodTargets(spec, patterns, model, block_kind, block_what));
      // A canonical spec carries both its placement and the resolved targets: they must agree.
      const std::vector<std::string> names = SortedNames(targets), placed_names = SortedNames(placed);
      if (placement != "custom" && names != placed_names) {
        return absl::InvalidArgumentError(
            absl::StrCat(kname, ": \"targets\" [", absl::StrJoin(names, ", "), "] differ from placement \"",
                         placement, "\" (", absl::StrJoin(placed_names, ", "),
                         "); use placement \"custom\" for other targets"));
      }
    } else {
      targets = placed;
    }
  }

  auto method = std::make_unique<AdapterMethod>();
  method->activation_ = activation;
  method->model_key_ = ModelKey(model);
  std::set<std::string> used;
  std::map<std::string, at::Tensor> canonical;
  for (const model::ModuleInfo* block : targets) {
    AdapterModule m;
    m.bottleneck = bottleneck;
    m.out = block->in_features;
    m.in = block->in_features;
    if (parallel) {
      const model::ModuleInfo* input =
          block->sublayer_input.empty() ? nullptr : FindModule(model, block->sublayer_input);
      if (input == nullptr || input->kind != model::ModuleKind::kLinear) {
        return absl::InvalidArgumentError(
            absl::StrCat(kname, ": block ", block->name, " has no sub-layer input to read"));
      }
      m.input_module = input->name;
      m.in = input->in_features;
    }
    if (m.in <= 0 || m.out <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(kname, ": block ", block->name, " has no known width"));
    }
    const std::string p = block->name;
    DS_ASSIGN_OR_RETURN(at::Tensor down_w, RequireTensor(spec, p + ".down.weight", {bottleneck, m.in}, &used));
    DS_ASSIGN_OR_RETURN(at::Tensor down_b, RequireTensor(spec, p + ".down.bias", {bottleneck}, &used));
    DS_ASSIGN_OR_RETURN(at::Tensor up_w, RequireTensor(spec, p + ".up.weight", {m.out, bottleneck}, &used));
    DS_ASSIGN_OR_RETURN(at::Tensor up_b, RequireTensor(spec, p + ".up.bias", {m.out}, &used));
    canonical[p + ".down.weight"] = down_w;
    canonical[p + ".down.bias"] = down_b;
    canonical[p + ".up.weight"] = up_w;
    canonical[p + ".up.bias"] = up_b;
    DS_ASSIGN_OR_RETURN(m.down_w, ToModelDevice(down_w, model));
    DS_ASSIGN_OR_RETURN(m.down_b, ToModelDevice(down_b, model));
    DS_ASSIGN_OR_RETURN(at::Tensor up_w_scaled, TorchCall([&] { return up_w * scaling; }, "scaling an adapter"));
    DS_ASSIGN_OR_RETURN(at::Tensor up_b_scaled, TorchCall([&] { return up_b * scaling; }, "scaling an adapter"));
    DS_ASSIGN_OR_RETURN(m.up_w, ToModelDevice(up_w_scaled, model));
    DS_ASSIGN_OR_RETURN(m.up_b, ToModelDevice(up_b_scaled, model));
    method->bytes_ += m.down_w.nbytes() + m.down_b.nbytes() + m.up_w.nbytes() + m.up_b.nbytes();
    method->modules_[block->name] = std::move(m);
  }
  DS_RETURN_IF_ERROR(CheckNoUnexpectedTensors(spec, used));

  nlohmann::json config = spec.config;
  config["bottleneck"] = bottleneck;
  config["activation"] = activation_name;
  config["scaling"] = scaling;
  config["targets"] = SortedNames(targets);
  if (!parallel) config["placement"] = placement;
  spec.config = std::move(config);
  spec.tensors = std::move(canonical);
  method->spec_ = std::move(spec);
  return std::unique_ptr<Method>(std::move(method));
}

// A run of consecutive rows that carry the same adapter at a block.
struct AdapterSegment {
  int64_t first = 0;
  int64_t count = 0;
  const AdapterModule* adapter = nullptr;
  Activation activation = Activation::kRelu;
};

struct BlockPlan {
  std::vector<AdapterSegment> segments;  // in row order
  int64_t in = 0;                        // width of what down() reads
};

// Adds each carrying row's adapter, applied to its row of `input`, to its row of `*hidden`, in place (on a copy
// when something else may hold `*hidden`). `input` may be `*hidden` itself (sequential adapters): each piece
// reads its rows before it writes them. Both are per-token hook tensors in `layout`.
void ApplyPlan(const BlockPlan& plan, const model::TokenLayout& layout, const at::Tensor& input,
               at::Tensor* hidden) {
  const bool in_place = Exclusive(*hidden);  // before x, which may share its storage
  const at::Tensor x = input.contiguous();
  if (!in_place) *hidden = hidden->clone(at::MemoryFormat::Contiguous);
  ForEachSegmentPiece(plan.segments, layout.rows(), x, [&](const AdapterSegment& s) {
    const AdapterModule& m = *s.adapter;
    const at::Tensor xs = layout.Rows(x, s.first, s.count);
    const at::Tensor z = Activate(s.activation, at::addmm(m.down_b, xs, m.down_w.t()));  // [tokens, b]
    layout.Rows(*hidden, s.first, s.count).addmm_(z, m.up_w.t()).add_(m.up_b);
  });
}

// Plans every block that some row targets: its segments.
absl::StatusOr<std::unordered_map<std::string, BlockPlan>> PlanBlocks(const std::vector<const Method*>& rows,
                                                                      const model::Model& model, MethodKind kind) {
  const std::string key = ModelKey(model);
  std::unordered_map<std::string, BlockPlan> plans;
  for (size_t i = 0; i < rows.size(); ++i) {
    if (rows[i] == nullptr) continue;
    const auto* m = dynamic_cast<const AdapterMethod*>(rows[i]);
    if (m == nullptr || m->kind() != kind) {
      return absl::InvalidArgumentError(absl::StrCat("row ", i, " does not carry a ", MethodKindName(kind)));
    }
    if (m->model_key_ != key) {
      return absl::InvalidArgumentError(absl::StrCat("row ", i, "'s ", MethodKindName(kind),
                                                     " was created for another model, dtype or device"));
    }
    const int64_t row = static_cast<int64_t>(i);
    for (const auto& [name, adapter] : m->modules_) {
      BlockPlan& plan = plans[name];
      plan.in = adapter.in;
      std::vector<AdapterSegment>& segments = plan.segments;
      if (!segments.empty() && segments.back().adapter == &adapter &&
          segments.back().first + segments.back().count == row) {
        ++segments.back().count;
      } else {
        segments.push_back({row, 1, &adapter, m->activation_});
      }
    }
  }
  return plans;
}

class AdapterBatch : public MethodBatch {
 public:
  AdapterBatch(int64_t num_rows, std::unordered_map<std::string, BlockPlan> plans)
      : MethodBatch(num_rows), plans_(std::move(plans)) {}

  void OnBlockOutput(const model::ModuleInfo& block, at::Tensor* hidden) override {
    auto it = plans_.find(block.name);
    if (it == plans_.end()) return;
    CheckRows(*hidden, layout(), block, "adapter");
    ApplyPlan(it->second, layout(), *hidden, hidden);
  }

 private:
  std::unordered_map<std::string, BlockPlan> plans_;
};

class ParallelAdapterBatch : public MethodBatch {
 public:
  ParallelAdapterBatch(int64_t num_rows, std::unordered_map<std::string, BlockPlan> plans,
                       std::unordered_map<std::string, std::vector<std::string>> blocks_reading)
      : MethodBatch(num_rows), plans_(std::move(plans)), blocks_reading_(std::move(blocks_reading)) {}

  void OnLinear(const model::ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override {
    auto it = blocks_reading_.find(module.name);
    if (it == blocks_reading_.end()) return;
    for (const std::string& block : it->second) captured_[block] = input;
  }

  void OnBlockOutput(const model::ModuleInfo& block, at::Tensor* hidden) override {
    auto it = plans_.find(block.name);
    if (it == plans_.end()) return;
    auto cap = captured_.find(block.name);
    if (cap == captured_.end()) return;  // the model did not show this sub-layer's input (never on valid models)
    const at::Tensor input = std::move(cap->second);
    captured_.erase(cap);
    if (input.dim() != hidden->dim() || input.size(0) != hidden->size(0) || input.size(-1) != it->second.in) return;
    CheckRows(*hidden, layout(), block, "parallel_adapter");
    ApplyPlan(it->second, layout(), input, hidden);
  }

 private:
  std::unordered_map<std::string, BlockPlan> plans_;
  std::unordered_map<std::string, std::vector<std::string>> blocks_reading_;  // linear name -> blocks
  std::unordered_map<std::string, at::Tensor> captured_;                      // block name -> sub-layer input
};

}  // namespace

absl::StatusOr<std::unique_ptr<Method>> CreateAdapter(MethodSpec spec, const model::Model& model,
                                                      const MethodLimits& limits) {
  return CreateAdapterImpl(std::move(spec), model, limits, /*parallel=*/false);
}

absl::StatusOr<std::unique_ptr<MethodBatch>> MakeAdapterBatch(const std::vector<const Method*>& rows,
                                                              const model::Model& model) {
  DS_ASSIGN_OR_RETURN(auto plans, PlanBlocks(rows, model, MethodKind::kAdapter));
  return std::unique_ptr<MethodBatch>(new AdapterBatch(static_cast<int64_t>(rows.size()), std::move(plans)));
}

absl::StatusOr<std::unique_ptr<Method>> CreateParallelAdapter(MethodSpec spec, const model::Model& model,
                                                              const MethodLimits& limits) {
  return CreateAdapterImpl(std::move(spec), model, limits, /*parallel=*/true);
}

absl::StatusOr<std::unique_ptr<MethodBatch>> MakeParallelAdapterBatch(const std::vector<const Method*>& rows,
                                                                      const model::Model& model) {
  DS_ASSIGN_OR_RETURN(auto plans, PlanBlocks(rows, model, MethodKind::kParallelAdapter));
  std::unordered_map<std::string, std::vector<std::string>> blocks_reading;
  for (const auto& [block, plan] : plans) {
    const model::ModuleInfo* info = FindModule(model, block);
    if (info == nullptr || info->sublayer_input.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("parallel_adapter: block ", block, " has no sub-layer input"));
    }
    blocks_reading[info->sublayer_input].push_back(block);
  }
  return std::unique_ptr<MethodBatch>(
      new ParallelAdapterBatch(static_cast<int64_t>(rows.size()), std::move(plans), std::move(blocks_reading)));
}

}  // namespace delta
}  // namespace deltaserve
