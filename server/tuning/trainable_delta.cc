// TrainableDelta: the delta methods and the head in training form. Each method kind is a Piece (a ForwardHooks)
// computing, out of place, what its serving MethodBatch (server/delta/<kind>.cc) computes in place for a row that
// carries it. Validation and canonical specs come from the serving code itself (delta::CreateMethod,
// delta::Head::Create), so a spec is accepted or refused here exactly as the pack it exports would be.
#include "server/tuning/trainable_delta.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <cmath>
#include <set>
#include <unordered_map>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "server/common/status_macros.h"
#include "server/common/torch_status.h"
#include "server/delta/head.h"
#include "server/delta/module_patterns.h"

namespace deltaserve {
namespace tuning {

using delta::MethodKind;
using model::ModuleInfo;
using model::ModuleKind;

namespace {

// Largest dense layer of a head.
constexpr int64_t kMaxHeadHidden = 1 << 16;

// The serving defaults (server/delta/<kind>.cc). Only used to know which tensors to create before
// delta::CreateMethod, which is the authority: a mismatch fails there (and in the tests).
const char kIa3FeedForwardPattern[] = "re:.*\\.layer\\.[0-9]+\\.output\\.dense";
const char kParallelAdapterDefault[] = R"(re:encoder\.layer\.[0-9]+\.output)";
const char kWordEmbeddings[] = "embeddings.word_embeddings";

// An initial value recipe for one tensor.
enum class Init { kZeros, kOnes, kKaimingUniform, kNormal001, kTokenEmbeddings, kPrefixKeys, kPrefixValues };

struct TensorPlan {
  std::string name;  // spec tensor name
  std::vector<int64_t> shape;
  Init init = Init::kZeros;
  std::string module;  // kPrefix*: the attention module
};

const ModuleInfo* FindModule(const model::Model& model, const std::string& name) {
  for (const ModuleInfo& m : model.modules()) {
    if (m.name == name) return &m;
  }
  return nullptr;
}

std::vector<std::string> StringList(const nlohmann::json& config, const char* key,
                                    const std::vector<std::string>& fallback) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null() || !it->is_array()) return fallback;
  std::vector<std::string> out;
  for (const auto& v : *it) {
    if (v.is_string()) out.push_back(v.get<std::string>());
  }
  return out;
}

int64_t IntOr(const nlohmann::json& config, const char* key, int64_t fallback) {
  auto it = config.find(key);
  return it != config.end() && it->is_number_integer() ? it->get<int64_t>() : fallback;
}

double NumberOr(const nlohmann::json& config, const char* key, double fallback) {
  auto it = config.find(key);
  return it != config.end() && it->is_number() ? it->get<double>() : fallback;
}

std::string StringOr(const nlohmann::json& config, const char* key, const std::string& fallback) {
  auto it = config.find(key);
  return it != config.end() && it->is_string() ? it->get<std::string>() : fallback;
}

// Module names of `model` of `kinds` matched by `patterns`, deduplicated, in module order.
absl::StatusOr<std::vector<const ModuleInfo*>> Resolve(const std::vector<std::string>& patterns,
                                                       const model::Model& model,
                                                       const std::vector<ModuleKind>& kinds) {
  DS_ASSIGN_OR_RETURN(std::vector<const ModuleInfo*> found, delta::ResolveTargets(patterns, model, kinds));
  std::vector<const ModuleInfo*> out;
  std::set<std::string> seen;
  for (const ModuleInfo* m : found) {
    if (seen.insert(m->name).second) out.push_back(m);
  }
  return out;
}

// The tensors a (validated) method config needs on `model`, with their initial values' recipes.
absl::StatusOr<std::vector<TensorPlan>> PlanTensors(const delta::MethodSpec& spec, const model::Model& model) {
  const nlohmann::json& c = spec.config.is_object() ? spec.config : nlohmann::json::object();
  std::vector<TensorPlan> plan;
  switch (spec.kind) {
    case MethodKind::kLora: {
      const int64_t rank = IntOr(c, "rank", 8);
      DS_ASSIGN_OR_RETURN(auto modules, Resolve(StringList(c, "targets", {"query", "value"}), model,
                                                {ModuleKind::kLinear}));
      for (const ModuleInfo* m : modules) {
        plan.push_back({m->name + ".lora_A", {rank, m->in_features}, Init::kKaimingUniform, ""});
        plan.push_back({m->name + ".lora_B", {m->out_features, rank}, Init::kZeros, ""});
      }
      break;
    }
    case MethodKind::kBitFit: {
      DS_ASSIGN_OR_RETURN(auto modules, Resolve(StringList(c, "targets", {"re:.*"}), model,
                                                {ModuleKind::kLinear, ModuleKind::kLayerNorm}));
      for (const ModuleInfo* m : modules) {
        const int64_t width = m->kind == ModuleKind::kLinear ? m->out_features : m->in_features;
        plan.push_back({m->name + ".bias", {width}, Init::kZeros, ""});
      }
      break;
    }
    case MethodKind::kLnTuning: {
      DS_ASSIGN_OR_RETURN(auto modules, Resolve(StringList(c, "targets", {"re:.*"}), model,
                                                {ModuleKind::kLayerNorm}));
      for (const ModuleInfo* m : modules) {
        plan.push_back({m->name + ".weight", {m->in_features}, Init::kZeros, ""});
        plan.push_back({m->name + ".bias", {m->in_features}, Init::kZeros, ""});
      }
      break;
    }
    case MethodKind::kIa3: {
      DS_ASSIGN_OR_RETURN(auto modules,
                          Resolve(StringList(c, "targets", {"key", "value", kIa3FeedForwardPattern}), model,
                                  {ModuleKind::kLinear}));
      const std::vector<std::string> ff = StringList(c, "feedforward", {kIa3FeedForwardPattern});
      for (const ModuleInfo* m : modules) {
        bool is_ff = false;
        for (const std::string& p : ff) is_ff = is_ff || delta::PatternMatches(p, m->name);
        plan.push_back({m->name + ".ia3_l", {is_ff ? m->in_features : m->out_features}, Init::kOnes, ""});
      }
      break;
    }
    case MethodKind::kParallelAdapter:
    case MethodKind::kAdapter: {
      const bool parallel = spec.kind == MethodKind::kParallelAdapter;
      const int64_t bottleneck = IntOr(c, "bottleneck", 1);
      std::vector<const ModuleInfo*> blocks;
      const bool has_targets = c.contains("targets") && !c["targets"].is_null();
      if (parallel || has_targets) {
        DS_ASSIGN_OR_RETURN(blocks, Resolve(StringList(c, "targets", {kParallelAdapterDefault}), model,
                                            {ModuleKind::kBlockOutput}));
      } else {
        const std::string placement = StringOr(c, "placement", "houlsby");
        for (const ModuleInfo& m : model.modules()) {
          if (m.kind != ModuleKind::kBlockOutput) continue;
          if (placement == "pfeiffer" && m.name != absl::StrCat("encoder.layer.", m.layer, ".output")) continue;
          blocks.push_back(&m);
        }
      }
      for (const ModuleInfo* b : blocks) {
        int64_t in = b->in_features;
        if (parallel) {
          const ModuleInfo* input = FindModule(model, b->sublayer_input);
          if (input != nullptr) in = input->in_features;
        }
        plan.push_back({b->name + ".down.weight", {bottleneck, in}, Init::kNormal001, ""});
        plan.push_back({b->name + ".down.bias", {bottleneck}, Init::kZeros, ""});
        plan.push_back({b->name + ".up.weight", {b->in_features, bottleneck}, Init::kZeros, ""});
        plan.push_back({b->name + ".up.bias", {b->in_features}, Init::kZeros, ""});
      }
      break;
    }
    case MethodKind::kPrefix: {
      const int64_t p = IntOr(c, "num_virtual_tokens", 1);
      std::vector<std::string> defaults;
      for (const ModuleInfo& m : model.modules()) {
        if (m.kind == ModuleKind::kAttention) defaults.push_back(m.name);
      }
      DS_ASSIGN_OR_RETURN(auto modules, Resolve(StringList(c, "targets", defaults), model,
                                                {ModuleKind::kAttention}));
      for (const ModuleInfo* m : modules) {
        const int64_t width = m->num_heads * m->head_dim;
        plan.push_back({m->name + ".prefix_keys", {p, width}, Init::kPrefixKeys, m->name});
        plan.push_back({m->name + ".prefix_values", {p, width}, Init::kPrefixValues, m->name});
      }
      break;
    }
    case MethodKind::kPrompt: {
      const int64_t p = IntOr(c, "num_virtual_tokens", 1);
      const ModuleInfo* embedding = FindModule(model, kWordEmbeddings);
      if (embedding == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat("prompt: model has no ", kWordEmbeddings, " module"));
      }
      const int64_t e = embedding->out_features > 0 ? embedding->out_features : embedding->in_features;
      plan.push_back({"prompt_embeddings", {p, e}, Init::kTokenEmbeddings, ""});
      break;
    }
  }
  return plan;
}

// Captures the keys and values the backbone computes at some attention modules.
class KeyValueCapture : public model::ForwardHooks {
 public:
  explicit KeyValueCapture(std::set<std::string> names) : names_(std::move(names)) {}
  void OnAttentionKeyValue(const ModuleInfo& attention, at::Tensor* keys, at::Tensor* values,
                           at::Tensor* key_mask) override {
    if (!names_.count(attention.name)) return;
    // [1, NH, T, DH] -> [T, NH * DH], float32 CPU.
    auto flat = [](const at::Tensor& t) {
      return t.select(0, 0).permute({1, 0, 2}).reshape({t.size(2), -1}).to(at::kCPU, at::kFloat).clone();
    };
    keys_[attention.name].push_back(flat(*keys));
    values_[attention.name].push_back(flat(*values));
  }
  std::set<std::string> names_;
  std::map<std::string, std::vector<at::Tensor>> keys_, values_;
};

// Random vocabulary token ids: [n] int64.
at::Tensor RandomTokens(const model::Model& model, int64_t n, at::Generator& gen) {
  return at::randint(0, model.info().vocab_size, {n}, gen, at::TensorOptions().dtype(at::kLong));
}

// The initial values of `plan` (float32 CPU), drawn from `gen` in plan order.
absl::StatusOr<std::map<std::string, at::Tensor>> InitialValues(const std::vector<TensorPlan>& plan,
                                                                const model::Model& model, at::Generator& gen) {
  std::map<std::string, at::Tensor> out;
  // Prefix: one forward pass over random tokens per attention module set (chunked to the model's length).
  std::set<std::string> prefix_modules;
  int64_t prefix_tokens = 0;
  for (const TensorPlan& t : plan) {
    if (t.init == Init::kPrefixKeys) {
      prefix_modules.insert(t.module);
      prefix_tokens = t.shape[0];
    }
  }
  KeyValueCapture capture(prefix_modules);
  if (!prefix_modules.empty()) {
    const int64_t max_len = std::max<int64_t>(1, model.info().max_sequence_length);
    for (int64_t done = 0; done < prefix_tokens; done += max_len) {
      const int64_t n = std::min(max_len, prefix_tokens - done);
      model::ForwardInput input;
      input.input_ids = RandomTokens(model, n, gen).unsqueeze(0);
      input.attention_mask = at::ones({1, n}, at::kBool);
      DS_ASSIGN_OR_RETURN(model::ForwardOutput ignored, model.Forward(input, &capture));
      (void)ignored;
    }
  }
  DS_RETURN_IF_ERROR(TorchCallVoid(
      [&] {
        for (const TensorPlan& t : plan) {
          at::Tensor v;
          switch (t.init) {
            case Init::kZeros: v = at::zeros(t.shape, at::kFloat); break;
            case Init::kOnes: v = at::ones(t.shape, at::kFloat); break;
            case Init::kKaimingUniform: {
              // PEFT / nn.Linear: kaiming_uniform_(a = sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in)).
              const double bound = 1.0 / std::sqrt(static_cast<double>(t.shape.back()));
              v = at::empty(t.shape, at::kFloat).uniform_(-bound, bound, gen);
              break;
            }
            case Init::kNormal001: v = at::empty(t.shape, at::kFloat).normal_(0.0, 0.01, gen); break;
            case Init::kTokenEmbeddings: {
              const at::Tensor& table = model.parameters().at(std::string(kWordEmbeddings) + ".weight");
              const at::Tensor ids = RandomTokens(model, t.shape[0], gen).to(table.device());
              v = table.index_select(0, ids).to(at::kCPU, at::kFloat).clone();
              break;
            }
            case Init::kPrefixKeys:
            case Init::kPrefixValues: {
              auto& parts = (t.init == Init::kPrefixKeys ? capture.keys_ : capture.values_)[t.module];
              v = parts.size() == 1 ? parts[0] : at::cat(parts, 0);
              break;
            }
          }
          out[t.name] = v.contiguous();
        }
      },
      "initializing delta tensors"));
  return out;
}

// True when `status` is CreateMethod's "tensor ... is missing" for `kind`: every check of the config came first.
bool IsMissingTensor(const absl::Status& status, MethodKind kind) {
  return status.code() == absl::StatusCode::kInvalidArgument &&
         absl::StartsWith(status.message(), absl::StrCat(delta::MethodKindName(kind), ": tensor \"")) &&
         absl::EndsWith(status.message(), "\" is missing");
}

at::Tensor Activate(const std::string& name, const at::Tensor& x) {
  if (name == "relu") return at::relu(x);
  if (name == "gelu") return at::gelu(x);
  if (name == "tanh") return at::tanh(x);
  if (name == "swish") return at::silu(x);
  return x;
}

// `t` in the dtype of `like` (a no-op, without an autograd node, when they agree).
at::Tensor As(const at::Tensor& t, const at::Tensor& like) { return t.to(like.scalar_type()); }

}  // namespace

// One method kind in training form.
class TrainableDelta::Piece : public model::ForwardHooks {
 public:
  Piece(MethodKind kind, nlohmann::json config, std::map<std::string, at::Tensor> tensors)
      : kind_(kind), config_(std::move(config)), tensors_(std::move(tensors)) {}
  MethodKind kind() const { return kind_; }
  const nlohmann::json& config() const { return config_; }
  // Spec tensor name -> parameter.
  const std::map<std::string, at::Tensor>& tensors() const { return tensors_; }
  virtual int64_t leading_virtual_tokens() const { return 0; }

 protected:
  const at::Tensor& T(const std::string& name) const { return tensors_.at(name); }
  std::vector<std::string> Targets() const { return StringList(config_, "targets", {}); }

 private:
  MethodKind kind_;
  nlohmann::json config_;
  std::map<std::string, at::Tensor> tensors_;
};

namespace {

using Piece = TrainableDelta::Piece;

// LoRA: y += (alpha / r) * (x A^T) B^T.
class LoraPiece : public Piece {
 public:
  using Piece::Piece;
  void Init() {
    scaling_ = NumberOr(config(), "alpha", 8) / static_cast<double>(IntOr(config(), "rank", 8));
    for (const std::string& m : Targets()) targets_[m] = {T(m + ".lora_A"), T(m + ".lora_B")};
  }
  void OnLinear(const ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override {
    auto it = targets_.find(module.name);
    if (it == targets_.end()) return;
    const at::Tensor low = at::linear(input, As(it->second.first, input));
    *output = output->add(at::linear(low, As(it->second.second, input)), scaling_);
  }

 private:
  double scaling_ = 1;
  std::unordered_map<std::string, std::pair<at::Tensor, at::Tensor>> targets_;  // module -> (A, B)
};

// BitFit: a bias delta added to linear and layer-norm outputs.
class BitFitPiece : public Piece {
 public:
  using Piece::Piece;
  void Init() {
    for (const std::string& m : Targets()) biases_[m] = T(m + ".bias");
  }
  void OnLinear(const ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override { Add(module, output); }
  void OnLayerNorm(const ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override {
    Add(module, output);
  }

 private:
  void Add(const ModuleInfo& module, at::Tensor* output) {
    auto it = biases_.find(module.name);
    if (it != biases_.end()) *output = output->add(As(it->second, *output));
  }
  std::unordered_map<std::string, at::Tensor> biases_;
};

// LN-tuning: y += normalized(x) * dgain + dbias.
class LnTuningPiece : public Piece {
 public:
  using Piece::Piece;
  void Init(const model::Model& model) {
    for (const std::string& m : Targets()) {
      const ModuleInfo* info = FindModule(model, m);
      targets_[m] = {T(m + ".weight"), T(m + ".bias"), info != nullptr ? info->eps : 1e-12};
    }
  }
  void OnLayerNorm(const ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override {
    auto it = targets_.find(module.name);
    if (it == targets_.end()) return;
    const Target& t = it->second;
    const at::Tensor normalized = at::layer_norm(input, {input.size(-1)}, {}, {}, t.eps);
    *output = output->add(normalized.mul(As(t.gain, normalized)).add(As(t.bias, normalized)));
  }

 private:
  struct Target {
    at::Tensor gain, bias;
    double eps = 0;
  };
  std::unordered_map<std::string, Target> targets_;
};

// (IA)^3: scales the outputs of the targets, or the inputs of the feed-forward ones.
class Ia3Piece : public Piece {
 public:
  using Piece::Piece;
  void Init() {
    const std::vector<std::string> ff = StringList(config(), "feedforward", {});
    for (const std::string& m : Targets()) {
      const bool is_ff = std::find(ff.begin(), ff.end(), m) != ff.end();
      (is_ff ? input_scales_ : output_scales_)[m] = T(m + ".ia3_l");
    }
  }
  void OnLinearInput(const ModuleInfo& module, at::Tensor* input) override { Scale(input_scales_, module, input); }
  void OnLinear(const ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override {
    Scale(output_scales_, module, output);
  }

 private:
  static void Scale(const std::unordered_map<std::string, at::Tensor>& scales, const ModuleInfo& module,
                    at::Tensor* t) {
    auto it = scales.find(module.name);
    if (it != scales.end()) *t = t->mul(As(it->second, *t));
  }
  std::unordered_map<std::string, at::Tensor> input_scales_, output_scales_;
};

// Sequential adapters h' = h + s * up(act(down(h))) and parallel adapters h' = h + s * up(act(down(x))), x the
// sub-layer's input (captured where its first linear reads it).
class AdapterPiece : public Piece {
 public:
  using Piece::Piece;
  void Init(const model::Model& model) {
    scaling_ = NumberOr(config(), "scaling", 1.0);
    activation_ = StringOr(config(), "activation", "relu");
    const bool parallel = kind() == MethodKind::kParallelAdapter;
    for (const std::string& b : Targets()) {
      blocks_[b] = {T(b + ".down.weight"), T(b + ".down.bias"), T(b + ".up.weight"), T(b + ".up.bias")};
      if (parallel) {
        const ModuleInfo* info = FindModule(model, b);
        if (info != nullptr) reading_[info->sublayer_input].push_back(b);
      }
    }
  }
  void OnLinear(const ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override {
    auto it = reading_.find(module.name);
    if (it == reading_.end()) return;
    for (const std::string& block : it->second) captured_[block] = input;
  }
  void OnBlockOutput(const ModuleInfo& block, at::Tensor* hidden) override {
    auto it = blocks_.find(block.name);
    if (it == blocks_.end()) return;
    at::Tensor x = *hidden;
    if (kind() == MethodKind::kParallelAdapter) {
      auto cap = captured_.find(block.name);
      if (cap == captured_.end()) return;
      x = std::move(cap->second);
      captured_.erase(cap);
    }
    const Weights& w = it->second;
    const at::Tensor z = Activate(activation_, at::linear(x, As(w.down_w, x), As(w.down_b, x)));
    *hidden = hidden->add(at::linear(z, As(w.up_w, z), As(w.up_b, z)), scaling_);
  }

 private:
  struct Weights {
    at::Tensor down_w, down_b, up_w, up_b;
  };
  double scaling_ = 1;
  std::string activation_;
  std::unordered_map<std::string, Weights> blocks_;
  std::unordered_map<std::string, std::vector<std::string>> reading_;  // linear -> parallel blocks reading its input
  std::unordered_map<std::string, at::Tensor> captured_;               // block -> its sub-layer input
};

// Prefix tuning: P keys and values before each targeted attention's own.
class PrefixPiece : public Piece {
 public:
  using Piece::Piece;
  void Init() {
    for (const std::string& m : Targets()) targets_[m] = {T(m + ".prefix_keys"), T(m + ".prefix_values")};
  }
  void OnAttentionKeyValue(const ModuleInfo& attention, at::Tensor* keys, at::Tensor* values,
                           at::Tensor* key_mask) override {
    auto it = targets_.find(attention.name);
    if (it == targets_.end()) return;
    const int64_t b = keys->size(0), nh = keys->size(1), dh = keys->size(3);
    // [P, NH*DH] -> [B, NH, P, DH].
    auto heads = [&](const at::Tensor& t, const at::Tensor& like) {
      const int64_t p = t.size(0);
      return As(t, like).view({p, nh, dh}).permute({1, 0, 2}).unsqueeze(0).expand({b, nh, p, dh});
    };
    const at::Tensor k = heads(it->second.first, *keys);
    const at::Tensor v = heads(it->second.second, *values);
    *keys = at::cat({k, *keys}, 2);
    *values = at::cat({v, *values}, 2);
    *key_mask = at::cat({at::ones({b, k.size(2)}, key_mask->options()), *key_mask}, 1);
  }

 private:
  std::unordered_map<std::string, std::pair<at::Tensor, at::Tensor>> targets_;
};

// Prompt tuning: P soft tokens before each row's real tokens (serving's layout: soft tokens, real tokens in
// order, then padding).
class PromptPiece : public Piece {
 public:
  using Piece::Piece;
  int64_t leading_virtual_tokens() const override { return T("prompt_embeddings").size(0); }
  void OnTokenEmbeddings(at::Tensor* hidden, at::Tensor* mask) override {
    const at::Tensor& soft = T("prompt_embeddings");
    const int64_t b = hidden->size(0), t = hidden->size(1), e = hidden->size(2), p = soft.size(0);
    const at::Tensor host_mask = mask->to(at::kCPU, at::kBool).contiguous();
    const bool* m = host_mask.data_ptr<bool>();
    std::vector<std::vector<int64_t>> real(b);
    int64_t new_t = 1;
    for (int64_t i = 0; i < b; ++i) {
      for (int64_t j = 0; j < t; ++j) {
        if (m[i * t + j]) real[i].push_back(j);
      }
      new_t = std::max<int64_t>(new_t, p + static_cast<int64_t>(real[i].size()));
    }
    const int64_t zero_row = b * t + p;
    at::Tensor index = at::empty({b * new_t}, at::kLong);
    at::Tensor new_mask = at::zeros({b, new_t}, at::kBool);
    int64_t* idx = index.data_ptr<int64_t>();
    bool* nm = new_mask.data_ptr<bool>();
    for (int64_t i = 0; i < b; ++i) {
      const int64_t n = static_cast<int64_t>(real[i].size());
      for (int64_t k = 0; k < new_t; ++k) {
        int64_t src = zero_row;
        if (k < p) {
          src = b * t + k;
        } else if (k < p + n) {
          src = i * t + real[i][k - p];
        }
        idx[i * new_t + k] = src;
        nm[i * new_t + k] = k < p + n;
      }
    }
    const at::Tensor s = soft.to(hidden->device(), hidden->scalar_type());
    const at::Tensor table = at::cat({hidden->reshape({b * t, e}), s, at::zeros({1, e}, s.options())}, 0);
    *hidden = table.index_select(0, index.to(hidden->device())).view({b, new_t, e});
    *mask = new_mask.to(mask->device());
  }
};

}  // namespace

TrainableDelta::TrainableDelta() = default;
TrainableDelta::~TrainableDelta() = default;

absl::StatusOr<std::unique_ptr<TrainableDelta>> TrainableDelta::Create(const TrainableSpec& spec,
                                                                       const model::Model& model, uint64_t seed) {
  std::unique_ptr<TrainableDelta> d(new TrainableDelta());
  const model::ModelInfo& info = model.info();
  d->backbone_family_ = info.family;
  d->backbone_fingerprint_ = info.fingerprint;
  d->embedding_dim_ = info.embedding_dim;
  const delta::MethodLimits limits = delta::PackLimits().methods;
  const c10::Device device(info.device);

  std::vector<const delta::MethodSpec*> methods;
  {
    std::set<MethodKind> seen;
    for (const delta::MethodSpec& m : spec.methods) {
      if (!seen.insert(m.kind).second) {
        return absl::InvalidArgumentError(absl::StrCat("delta pack: method \"", delta::MethodKindName(m.kind),
                                                       "\" appears twice (one of each kind)"));
      }
      methods.push_back(&m);
    }
    std::sort(methods.begin(), methods.end(),
              [](const delta::MethodSpec* a, const delta::MethodSpec* b) { return a->kind < b->kind; });
  }

  at::Generator gen = at::detail::createCPUGenerator(seed);
  // A parameter: a float32 leaf on the model's device that requires grad.
  auto make_parameter = [&](const at::Tensor& cpu) {
    return TorchCall([&] { return cpu.to(device, at::kFloat).clone().detach().requires_grad_(true); },
                     "placing a trainable tensor");
  };

  for (const delta::MethodSpec* m : methods) {
    const MethodKind kind = m->kind;
    delta::MethodSpec bare;
    bare.kind = kind;
    bare.config = m->config;
    // 1. The serving validation of the config and targets: the first error a pack with this config would get,
    //    unless it is the (expected) missing tensor.
    {
      absl::StatusOr<std::unique_ptr<delta::Method>> probe = delta::CreateMethod(bare, model, limits);
      if (!probe.ok() && !IsMissingTensor(probe.status(), kind)) return probe.status();
    }
    // 2. The tensors and their initial values.
    DS_ASSIGN_OR_RETURN(std::vector<TensorPlan> plan, PlanTensors(bare, model));
    DS_ASSIGN_OR_RETURN(bare.tensors, InitialValues(plan, model, gen));
    // 3. The canonical spec (defaults filled, targets resolved), from the serving code.
    absl::StatusOr<std::unique_ptr<delta::Method>> method = delta::CreateMethod(bare, model, limits);
    if (!method.ok()) {
      return absl::InternalError(absl::StrCat("the initial ", delta::MethodKindName(kind),
                                              " tensors do not fit the serving method: ",
                                              method.status().message()));
    }
    const delta::MethodSpec& canonical = (*method)->spec();
    std::map<std::string, at::Tensor> tensors;
    for (const auto& [name, value] : canonical.tensors) {
      DS_ASSIGN_OR_RETURN(tensors[name], make_parameter(value));
    }
    std::unique_ptr<Piece> piece;
    switch (kind) {
      case MethodKind::kLora: {
        auto p = std::make_unique<LoraPiece>(kind, canonical.config, tensors);
        p->Init();
        piece = std::move(p);
        break;
      }
      case MethodKind::kBitFit: {
        auto p = std::make_unique<BitFitPiece>(kind, canonical.config, tensors);
        p->Init();
        piece = std::move(p);
        break;
      }
      case MethodKind::kLnTuning: {
        auto p = std::make_unique<LnTuningPiece>(kind, canonical.config, tensors);
        p->Init(model);
        piece = std::move(p);
        break;
      }
      case MethodKind::kIa3: {
        auto p = std::make_unique<Ia3Piece>(kind, canonical.config, tensors);
        p->Init();
        piece = std::move(p);
        break;
      }
      case MethodKind::kParallelAdapter:
      case MethodKind::kAdapter: {
        auto p = std::make_unique<AdapterPiece>(kind, canonical.config, tensors);
        p->Init(model);
        piece = std::move(p);
        break;
      }
      case MethodKind::kPrefix: {
        auto p = std::make_unique<PrefixPiece>(kind, canonical.config, tensors);
        p->Init();
        piece = std::move(p);
        break;
      }
      case MethodKind::kPrompt:
        piece = std::make_unique<PromptPiece>(kind, canonical.config, tensors);
        break;
    }
    for (const auto& [name, t] : tensors) {
      d->parameters_.emplace_back(absl::StrCat(delta::MethodKindName(kind), "/", name), t);
    }
    d->pieces_.push_back(std::move(piece));
  }

  // The pack must fit the packs' size limit (checked again by Export's reader; better refused now than after
  // training).
  {
    int64_t bytes = 0;
    for (const auto& [name, t] : d->parameters_) bytes += t.numel() * 4;
    const delta::PackLimits pack_limits;
    if (bytes > pack_limits.max_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("delta pack: the methods' tensors take ", bytes,
                                                     " bytes, over the pack limit of ", pack_limits.max_bytes));
    }
  }

  // The head.
  const HeadConfig& h = spec.head;
  if (h.hidden < 0 || h.hidden > kMaxHeadHidden) {
    return absl::InvalidArgumentError(
        absl::StrCat("head: \"hidden\" must be in [0, ", kMaxHeadHidden, "], got ", h.hidden));
  }
  delta::HeadSpec head;
  head.config = nlohmann::json::object();
  head.config["type"] = h.type;
  if (h.type == "classification" || !h.labels.empty()) head.config["labels"] = h.labels;
  head.config["activation"] = h.activation;
  const int64_t n = h.type == "classification" ? std::max<int64_t>(1, static_cast<int64_t>(h.labels.size())) : 1;
  const int64_t d_in = h.hidden > 0 ? h.hidden : info.embedding_dim;
  DS_RETURN_IF_ERROR(TorchCallVoid(
      [&] {
        if (h.hidden > 0) {
          head.tensors["dense.weight"] = at::empty({h.hidden, info.embedding_dim}, at::kFloat).normal_(0, 0.02, gen);
          head.tensors["dense.bias"] = at::zeros({h.hidden}, at::kFloat);
        }
        head.tensors["out.weight"] = at::empty({n, d_in}, at::kFloat).normal_(0, 0.02, gen);
        head.tensors["out.bias"] = at::zeros({n}, at::kFloat);
      },
      "initializing the head"));
  DS_ASSIGN_OR_RETURN(std::unique_ptr<delta::Head> checked, delta::Head::Create(head, model));
  if (checked->type() == delta::Head::Type::kClassification && checked->labels().size() < 2) {
    return absl::InvalidArgumentError(absl::StrCat("head: classification needs at least 2 labels, got ",
                                                   checked->labels().size()));
  }
  d->head_spec_.config = checked->spec().config;
  if (h.hidden > 0) d->head_activation_ = h.activation;
  for (const auto& [name, value] : checked->spec().tensors) {
    DS_ASSIGN_OR_RETURN(at::Tensor t, make_parameter(value));
    if (name == "dense.weight") d->dense_w_ = t;
    if (name == "dense.bias") d->dense_b_ = t;
    if (name == "out.weight") d->out_w_ = t;
    if (name == "out.bias") d->out_b_ = t;
    d->parameters_.emplace_back(kHeadPrefix + name, t);
  }
  std::sort(d->parameters_.begin(), d->parameters_.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  return d;
}

int64_t TrainableDelta::num_parameters() const {
  int64_t n = 0;
  for (const auto& [name, t] : parameters_) n += t.numel();
  return n;
}

int64_t TrainableDelta::leading_virtual_tokens() const {
  int64_t n = 0;
  for (const auto& p : pieces_) n += p->leading_virtual_tokens();
  return n;
}

absl::StatusOr<at::Tensor> TrainableDelta::HeadForward(const at::Tensor& pooled) const {
  const int64_t D = embedding_dim_;
  if (!pooled.defined() || pooled.dim() != 2 || pooled.size(1) != D) {
    return absl::InvalidArgumentError(absl::StrCat(
        "head: embeddings have shape ", pooled.defined() ? ShapeString(pooled.sizes()) : "undefined",
        ", expected [N, ", D, "]"));
  }
  return TorchCall(
      [&] {
        at::Tensor x = pooled.to(out_w_.device(), at::kFloat);
        if (dense_w_.defined()) x = Activate(head_activation_, at::linear(x, dense_w_, dense_b_));
        return at::linear(x, out_w_, out_b_);
      },
      "head forward");
}

absl::StatusOr<delta::PackContents> TrainableDelta::Export(delta::PackManifest manifest) const {
  delta::PackContents contents;
  contents.manifest = std::move(manifest);
  contents.manifest.backbone_family = backbone_family_;
  contents.manifest.backbone_fingerprint = backbone_fingerprint_;
  auto value = [](const at::Tensor& t) {
    return TorchCall([&] { return t.detach().to(at::kCPU, at::kFloat).contiguous().clone(); }, "exporting a tensor");
  };
  for (const auto& piece : pieces_) {
    delta::MethodSpec spec;
    spec.kind = piece->kind();
    spec.config = piece->config();
    for (const auto& [name, t] : piece->tensors()) {
      DS_ASSIGN_OR_RETURN(spec.tensors[name], value(t));
    }
    contents.methods.push_back(std::move(spec));
  }
  delta::HeadSpec head;
  head.config = head_spec_.config;
  const std::pair<const char*, const at::Tensor*> head_tensors[] = {
      {"dense.weight", &dense_w_}, {"dense.bias", &dense_b_}, {"out.weight", &out_w_}, {"out.bias", &out_b_}};
  for (const auto& [name, t] : head_tensors) {
    if (!t->defined()) continue;
    DS_ASSIGN_OR_RETURN(head.tensors[name], value(*t));
  }
  contents.head = std::move(head);
  return contents;
}

absl::Status TrainableDelta::LoadValues(const std::map<std::string, at::Tensor>& values) {
  for (const auto& [name, t] : parameters_) {
    auto it = values.find(name);
    if (it == values.end() || !it->second.defined()) {
      return absl::InvalidArgumentError(absl::StrCat("trainable delta: no value for parameter \"", name, "\""));
    }
    if (it->second.sizes() != t.sizes()) {
      return absl::InvalidArgumentError(absl::StrCat("trainable delta: parameter \"", name, "\" has shape ",
                                                     ShapeString(t.sizes()), ", the value ",
                                                     ShapeString(it->second.sizes())));
    }
  }
  return TorchCallVoid(
      [&] {
        at::NoGradGuard no_grad;
        for (auto& [name, t] : parameters_) t.copy_(values.at(name));
      },
      "loading trainable delta values");
}

void TrainableDelta::OnTokenEmbeddings(at::Tensor* hidden, at::Tensor* mask) {
  for (const auto& p : pieces_) p->OnTokenEmbeddings(hidden, mask);
}
void TrainableDelta::OnLinearInput(const model::ModuleInfo& module, at::Tensor* input) {
  for (const auto& p : pieces_) p->OnLinearInput(module, input);
}
void TrainableDelta::OnLinear(const model::ModuleInfo& module, const at::Tensor& input, at::Tensor* output) {
  for (const auto& p : pieces_) p->OnLinear(module, input, output);
}
void TrainableDelta::OnLayerNorm(const model::ModuleInfo& module, const at::Tensor& input, at::Tensor* output) {
  for (const auto& p : pieces_) p->OnLayerNorm(module, input, output);
}
void TrainableDelta::OnAttentionKeyValue(const model::ModuleInfo& attention, at::Tensor* keys, at::Tensor* values,
                                         at::Tensor* key_mask) {
  for (const auto& p : pieces_) p->OnAttentionKeyValue(attention, keys, values, key_mask);
}
void TrainableDelta::OnBlockOutput(const model::ModuleInfo& block, at::Tensor* hidden) {
  for (const auto& p : pieces_) p->OnBlockOutput(block, hidden);
}

}  // namespace tuning
}  // namespace deltaserve
