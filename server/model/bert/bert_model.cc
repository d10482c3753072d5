#include "server/model/bert/bert_model.h"

#include <sys/stat.h>

#include <cmath>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>
#include <utility>
#include <vector>

#include <ATen/Context.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/embedding.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/layer_norm.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/sqrt.h>
#include <ATen/ops/zeros.h>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "c10/core/GradMode.h"
#include "c10/core/InferenceMode.h"
#include "c10/util/BFloat16.h"
#include "nlohmann/json.hpp"
#include "server/common/file_util.h"
#include "server/common/sha256.h"
#include "server/common/status_macros.h"
#include "server/common/torch_status.h"
#include "server/model/bert/wordpiece_tokenizer.h"
#include "server/model/safetensors.h"

namespace deltaserve {
namespace model {
namespace {

enum class Activation { kGeluErf, kGeluTanh, kRelu, kSilu };

struct BertConfig {
  std::string model_type;
  int64_t vocab_size = 30522;
  int64_t hidden_size = 768;
  int64_t embedding_size = 768;  // ELECTRA's embedding width; == hidden_size elsewhere
  int64_t num_layers = 12;
  int64_t num_heads = 12;
  int64_t intermediate_size = 3072;
  int64_t max_position_embeddings = 512;
  int64_t type_vocab_size = 2;
  double layer_norm_eps = 1e-12;
  int64_t pad_token_id = 0;
  std::string hidden_act = "gelu";
  Activation activation = Activation::kGeluErf;
  bool roberta_positions = false;  // positions start at pad_token_id + 1
  int64_t max_sequence_length = 512;
};

absl::Status ReadPositiveInt(const nlohmann::json& j, const char* key, const std::string& path, int64_t* out,
                             bool allow_zero = false) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_number_integer() || it->get<int64_t>() < (allow_zero ? 0 : 1) ||
      it->get<int64_t>() > (int64_t{1} << 31)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": \"", key, "\" must be a ", allow_zero ? "non-negative" : "positive", " integer"));
  }
  *out = it->get<int64_t>();
  return absl::OkStatus();
}

absl::StatusOr<BertConfig> ParseConfig(const std::string& path) {
  DS_ASSIGN_OR_RETURN(nlohmann::json j, ReadJsonObject(path));
  BertConfig c;
  auto type = j.find("model_type");
  if (type == j.end() || !type->is_string()) {
    return absl::InvalidArgumentError(absl::StrCat(path, " has no string \"model_type\""));
  }
  c.model_type = type->get<std::string>();
  if (c.model_type == "roberta" || c.model_type == "xlm-roberta" || c.model_type == "camembert") {
    c.roberta_positions = true;
    c.pad_token_id = 1;
    c.vocab_size = 50265;
    c.max_position_embeddings = 514;
    c.type_vocab_size = 1;
    c.layer_norm_eps = 1e-5;
  } else if (c.model_type != "bert" && c.model_type != "electra") {
    return absl::UnimplementedError(absl::StrCat(path, ": model_type \"", c.model_type,
                                                 "\" is not in the bert family (bert, roberta, xlm-roberta, "
                                                 "camembert, electra)"));
  }
  DS_RETURN_IF_ERROR(ReadPositiveInt(j, "vocab_size", path, &c.vocab_size));
  DS_RETURN_IF_ERROR(ReadPositiveInt(j, "hidden_size", path, &c.hidden_size));
  c.embedding_size = c.hidden_size;
  DS_RETURN_IF_ERROR(ReadPositiveInt(j, "embedding_size", path, &c.embedding_size));
  DS_RETURN_IF_ERROR(ReadPositiveInt(j, "num_hidden_layers", path, &c.num_layers));
  DS_RETURN_IF_ERROR(ReadPositiveInt(j, "num_attention_heads", path, &c.num_heads));
  DS_RETURN_IF_ERROR(ReadPositiveInt(j, "intermediate_size", path, &c.intermediate_size));
  DS_RETURN_IF_ERROR(ReadPositiveInt(j, "max_position_embeddings", path, &c.max_position_embeddings));
  DS_RETURN_IF_ERROR(ReadPositiveInt(j, "type_vocab_size", path, &c.type_vocab_size));
  DS_RETURN_IF_ERROR(ReadPositiveInt(j, "pad_token_id", path, &c.pad_token_id, /*allow_zero=*/true));
  auto eps = j.find("layer_norm_eps");
  if (eps != j.end() && !eps->is_null()) {
    if (!eps->is_number() || !(eps->get<double>() > 0) || !std::isfinite(eps->get<double>())) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": \"layer_norm_eps\" must be a positive number"));
    }
    c.layer_norm_eps = eps->get<double>();
  }
  auto act = j.find("hidden_act");
  if (act != j.end() && !act->is_null()) {
    if (!act->is_string()) return absl::InvalidArgumentError(absl::StrCat(path, ": \"hidden_act\" must be a string"));
    c.hidden_act = act->get<std::string>();
  }
  if (c.hidden_act == "gelu") {
    c.activation = Activation::kGeluErf;
  } else if (c.hidden_act == "gelu_new" || c.hidden_act == "gelu_pytorch_tanh" || c.hidden_act == "gelu_fast") {
    c.activation = Activation::kGeluTanh;
  } else if (c.hidden_act == "relu") {
    c.activation = Activation::kRelu;
  } else if (c.hidden_act == "silu" || c.hidden_act == "swish") {
    c.activation = Activation::kSilu;
  } else {
    return absl::UnimplementedError(absl::StrCat(path, ": hidden_act \"", c.hidden_act,
                                                 "\" is not supported (gelu, gelu_new, gelu_pytorch_tanh, "
                                                 "gelu_fast, relu, silu, swish)"));
  }
  auto pos_type = j.find("position_embedding_type");
  if (pos_type != j.end() && !pos_type->is_null() && *pos_type != "absolute") {
    return absl::UnimplementedError(absl::StrCat(path, ": position_embedding_type ", pos_type->dump(),
                                                 " is not supported (only \"absolute\")"));
  }
  if (c.hidden_size % c.num_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": hidden_size ", c.hidden_size,
                                                   " is not a multiple of num_attention_heads ", c.num_heads));
  }
  if (c.roberta_positions) {
    c.max_sequence_length = c.max_position_embeddings - c.pad_token_id - 1;
    if (c.max_sequence_length < 1) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": max_position_embeddings ", c.max_position_embeddings,
                                                     " leaves no positions after pad_token_id ", c.pad_token_id));
    }
  } else {
    c.max_sequence_length = c.max_position_embeddings;
  }
  return c;
}

// Sentence-transformers pooling.
struct PoolingConfig {
  bool cls = false;
  bool max = false;
  bool mean = false;
  bool mean_sqrt_len = false;
  bool normalize = false;
  int64_t num_modes() const { return int64_t{cls} + max + mean + mean_sqrt_len; }
  std::string Name() const {
    std::vector<std::string> parts;
    if (cls) parts.push_back("cls");
    if (max) parts.push_back("max");
    if (mean) parts.push_back("mean");
    if (mean_sqrt_len) parts.push_back("mean_sqrt_len");
    std::string name = absl::StrJoin(parts, "+");
    if (normalize) name += "+l2";
    return name;
  }
};

absl::Status ReadPoolingConfig(const std::string& path, PoolingConfig* pooling) {
  DS_ASSIGN_OR_RETURN(nlohmann::json j, ReadJsonObject(path));
  auto flag = [&](const char* key, bool* out) -> absl::Status {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) return absl::OkStatus();
    if (!it->is_boolean()) return absl::InvalidArgumentError(absl::StrCat(path, ": \"", key, "\" must be a bool"));
    *out = it->get<bool>();
    return absl::OkStatus();
  };
  DS_RETURN_IF_ERROR(flag("pooling_mode_cls_token", &pooling->cls));
  DS_RETURN_IF_ERROR(flag("pooling_mode_max_tokens", &pooling->max));
  DS_RETURN_IF_ERROR(flag("pooling_mode_mean_tokens", &pooling->mean));
  DS_RETURN_IF_ERROR(flag("pooling_mode_mean_sqrt_len_tokens", &pooling->mean_sqrt_len));
  for (const char* unsupported : {"pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken"}) {
    bool on = false;
    DS_RETURN_IF_ERROR(flag(unsupported, &on));
    if (on) return absl::UnimplementedError(absl::StrCat(path, ": ", unsupported, " is not supported"));
  }
  auto mode = j.find("pooling_mode");  // older / hand-written configs
  if (mode != j.end() && mode->is_string() && pooling->num_modes() == 0) {
    const std::string m = mode->get<std::string>();
    if (m == "cls") {
      pooling->cls = true;
    } else if (m == "mean") {
      pooling->mean = true;
    } else if (m == "max") {
      pooling->max = true;
    } else {
      return absl::UnimplementedError(absl::StrCat(path, ": pooling_mode \"", m, "\" is not supported"));
    }
  }
  if (pooling->num_modes() == 0) {
    return absl::InvalidArgumentError(absl::StrCat(path, " enables no pooling mode"));
  }
  return absl::OkStatus();
}

absl::StatusOr<PoolingConfig> ReadPooling(const std::string& dir) {
  PoolingConfig pooling;
  const std::string modules_path = dir + "/modules.json";
  if (FileExists(modules_path)) {
    absl::StatusOr<nlohmann::json> parsed = ReadJsonFile(modules_path);
    if (!parsed.ok() && parsed.status().code() != absl::StatusCode::kInvalidArgument) return parsed.status();
    const nlohmann::json modules = parsed.ok() ? *std::move(parsed) : nlohmann::json();
    if (!modules.is_array()) {
      return absl::InvalidArgumentError(absl::StrCat(modules_path, " is not a JSON array"));
    }
    bool have_pooling = false;
    for (const auto& m : modules) {
      const std::string type = (m.is_object() && m.contains("type") && m["type"].is_string())
                                   ? m["type"].get<std::string>() : "";
      const std::string path = (m.is_object() && m.contains("path") && m["path"].is_string())
                                   ? m["path"].get<std::string>() : "";
      if (absl::EndsWith(type, "models.Transformer")) continue;
      if (absl::EndsWith(type, "models.Pooling")) {
        if (path.empty() || path.find("..") != std::string::npos) {
          return absl::InvalidArgumentError(absl::StrCat(modules_path, ": Pooling module has no usable \"path\""));
        }
        DS_RETURN_IF_ERROR(ReadPoolingConfig(dir + "/" + path + "/config.json", &pooling));
        have_pooling = true;
        continue;
      }
      if (absl::EndsWith(type, "models.Normalize")) {
        pooling.normalize = true;
        continue;
      }
      return absl::UnimplementedError(absl::StrCat(modules_path, ": module type \"", type,
                                                   "\" is not supported (Transformer, Pooling, Normalize)"));
    }
    if (!have_pooling) pooling.cls = true;
    return pooling;
  }
  const std::string pooling_path = dir + "/1_Pooling/config.json";
  if (FileExists(pooling_path)) {
    DS_RETURN_IF_ERROR(ReadPoolingConfig(pooling_path, &pooling));
    return pooling;
  }
  pooling.cls = true;
  return pooling;
}

// Reads tensors out of model.safetensors by their un-prefixed HF names, checking presence and shape.
class TensorSource {
 public:
  TensorSource(const SafetensorsFile* file, std::string prefix) : file_(file), prefix_(std::move(prefix)) {}

  absl::StatusOr<at::Tensor> Get(const std::string& name, std::vector<int64_t> shape,
                                 const char* alt_suffix = nullptr) const {
    std::string full = prefix_ + name;
    if (!file_->contains(full) && alt_suffix != nullptr) {
      // LayerNorm weight/bias saved as gamma/beta by old TF conversions.
      const std::string base = full.substr(0, full.rfind('.') + 1);
      if (file_->contains(base + alt_suffix)) full = base + alt_suffix;
    }
    if (!file_->contains(full)) {
      return absl::NotFoundError(absl::StrCat(file_->path(), ": tensor \"", full, "\" is missing"));
    }
    DS_ASSIGN_OR_RETURN(SafetensorsEntry entry, file_->entry(full));
    if (entry.dtype != SafetensorsDtype::kF32 && entry.dtype != SafetensorsDtype::kF16 &&
        entry.dtype != SafetensorsDtype::kBF16) {
      return absl::InvalidArgumentError(
          absl::StrCat(file_->path(), ": tensor \"", full, "\" is not a float tensor (F32, F16 or BF16)"));
    }
    if (entry.shape != shape) {
      return absl::InvalidArgumentError(absl::StrCat(file_->path(), ": tensor \"", full, "\" has shape ",
                                                     ShapeString(entry.shape), ", expected ", ShapeString(shape),
                                                     " (from config.json)"));
    }
    return file_->Load(full, at::kFloat);
  }

 private:
  const SafetensorsFile* file_;
  std::string prefix_;
};

struct LinearWeights {
  at::Tensor weight;
  at::Tensor bias;
  size_t module = 0;  // index into modules_
};

struct NormWeights {
  at::Tensor weight;
  at::Tensor bias;
  size_t module = 0;
};

struct LayerWeights {
  at::Tensor qkv_weight;  // [3H, H]: query, key, value
  at::Tensor qkv_bias;    // [3H]
  at::Tensor qkv_part_w[3], qkv_part_b[3];  // views into those (the very tensors parameters() holds)
  size_t query = 0, key = 0, value = 0, attention = 0, attention_block = 0, output_block = 0;
  LinearWeights attention_output;
  NormWeights attention_norm;
  LinearWeights intermediate;
  LinearWeights output;
  NormWeights output_norm;
};

class BertModel : public Model {
 public:
  const ModelInfo& info() const override { return info_; }
  const Tokenizer& tokenizer() const override { return *tokenizer_; }
  const std::vector<ModuleInfo>& modules() const override { return modules_; }
  const std::map<std::string, at::Tensor>& parameters() const override { return parameters_; }
  absl::StatusOr<ForwardOutput> Forward(const ForwardInput& input, ForwardHooks* hooks) const override;
  absl::StatusOr<ForwardOutput> ForwardTrainable(const ForwardInput& input, ForwardHooks* hooks) const override;

  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& dir, const ModelOptions& options);

 private:
  BertModel() = default;
  absl::Status ValidateInput(const ForwardInput& input) const;
  // `trainable`: ForwardTrainable's autograd-friendly variant (no inference mode, no in-place ops on tensors
  // autograd may save, weights read through the tensors parameters() holds).
  absl::Status Run(const ForwardInput& input, ForwardHooks* hooks, bool trainable, ForwardOutput* out) const;
  size_t AddModule(ModuleInfo m) {
    modules_.push_back(std::move(m));
    return modules_.size() - 1;
  }
  // Converts a CPU float32 weight to the model's device and dtype and records it as a parameter.
  at::Tensor Place(const std::string& name, const at::Tensor& cpu) {
    at::Tensor t = cpu.to(device_, dtype_).contiguous();
    parameters_[name] = t;
    return t;
  }
  at::Tensor Activate(const at::Tensor& x) const;
  at::Tensor AttentionMask(const at::Tensor& key_mask) const;

  BertConfig config_;
  PoolingConfig pooling_;
  ModelInfo info_;
  std::unique_ptr<WordPieceTokenizer> tokenizer_;
  std::vector<ModuleInfo> modules_;
  std::map<std::string, at::Tensor> parameters_;
  at::Device device_{at::kCPU};
  at::ScalarType dtype_ = at::kFloat;

  at::Tensor word_embeddings_;
  at::Tensor position_embeddings_;
  at::Tensor token_type_embeddings_;  // [type_vocab_size, E]
  at::Tensor token_type_row0_;        // [E]: token type 0 (a view of the above)
  size_t word_embeddings_module_ = 0;
  NormWeights embeddings_norm_;
  bool has_projection_ = false;
  LinearWeights projection_;
  std::vector<LayerWeights> layers_;
};

absl::StatusOr<at::Device> ParseDevice(const std::string& device) {
  at::Device d(at::kCPU);
  try {
    d = at::Device(device);
  } catch (const std::exception&) {
    return absl::InvalidArgumentError(absl::StrCat("device \"", device, "\" is not a device (cpu, cuda, cuda:N)"));
  }
  if (d.is_cuda()) {
    if (!at::globalContext().hasCUDA()) {
      return absl::InvalidArgumentError(absl::StrCat("device \"", device, "\": this machine has no CUDA device"));
    }
  } else if (!d.is_cpu()) {
    return absl::InvalidArgumentError(absl::StrCat("device \"", device, "\" is not supported (cpu, cuda, cuda:N)"));
  }
  return d;
}

absl::StatusOr<std::unique_ptr<Model>> BertModel::Load(const std::string& dir, const ModelOptions& options) {
  std::unique_ptr<BertModel> m(new BertModel());
  DS_ASSIGN_OR_RETURN(m->device_, ParseDevice(options.device));
  if (options.dtype == "float32") {
    m->dtype_ = at::kFloat;
  } else if (options.dtype == "bfloat16") {
    m->dtype_ = at::kBFloat16;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("dtype \"", options.dtype, "\" is not supported (float32, bfloat16)"));
  }
  DS_ASSIGN_OR_RETURN(m->config_, ParseConfig(dir + "/config.json"));
  const BertConfig& c = m->config_;
  DS_ASSIGN_OR_RETURN(m->pooling_, ReadPooling(dir));
  DS_ASSIGN_OR_RETURN(m->tokenizer_, WordPieceTokenizer::FromDirectory(dir));
  if (m->tokenizer_->vocab_size() > c.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(dir, ": the tokenizer has ", m->tokenizer_->vocab_size(),
                                                   " tokens but config.json vocab_size is ", c.vocab_size));
  }

  const std::string weights_path = dir + "/model.safetensors";
  if (!FileExists(weights_path)) {
    std::string hint;
    if (FileExists(dir + "/model.safetensors.index.json")) hint = " (sharded checkpoints are not supported)";
    else if (FileExists(dir + "/pytorch_model.bin")) hint = " (pytorch_model.bin is not supported: convert it)";
    return absl::NotFoundError(absl::StrCat(weights_path, " is missing", hint));
  }
  DS_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::Open(weights_path));
  // The model prefix: the shortest one in front of embeddings.word_embeddings.weight.
  const std::string anchor = "embeddings.word_embeddings.weight";
  std::string prefix;
  bool found = false;
  for (const std::string& name : file->names()) {
    if (!absl::EndsWith(name, anchor)) continue;
    std::string p = name.substr(0, name.size() - anchor.size());
    if (!p.empty() && p.back() != '.') continue;
    if (!found || p.size() < prefix.size()) prefix = p;
    found = true;
  }
  if (!found) {
    return absl::NotFoundError(absl::StrCat(weights_path, ": tensor \"", anchor,
                                            "\" is missing (looked for it with any prefix such as \"bert.\")"));
  }
  TensorSource src(file.get(), prefix);
  const int64_t E = c.embedding_size, H = c.hidden_size, I = c.intermediate_size;
  const int64_t NH = c.num_heads, DH = H / NH;

  // Embeddings.
  {
    ModuleInfo word{"embeddings.word_embeddings", ModuleKind::kEmbedding, -1, E, E};
    m->word_embeddings_module_ = m->AddModule(word);
    ModuleInfo pos{"embeddings.position_embeddings", ModuleKind::kEmbedding, -1, E, E};
    m->AddModule(pos);
    ModuleInfo type{"embeddings.token_type_embeddings", ModuleKind::kEmbedding, -1, E, E};
    m->AddModule(type);
    ModuleInfo norm{"embeddings.LayerNorm", ModuleKind::kLayerNorm, -1, E, E, true};
    norm.eps = c.layer_norm_eps;
    m->embeddings_norm_.module = m->AddModule(norm);
  }
  DS_ASSIGN_OR_RETURN(at::Tensor word, src.Get("embeddings.word_embeddings.weight", {c.vocab_size, E}));
  DS_ASSIGN_OR_RETURN(at::Tensor pos, src.Get("embeddings.position_embeddings.weight",
                                              {c.max_position_embeddings, E}));
  DS_ASSIGN_OR_RETURN(at::Tensor type, src.Get("embeddings.token_type_embeddings.weight", {c.type_vocab_size, E}));
  DS_ASSIGN_OR_RETURN(at::Tensor ln_w, src.Get("embeddings.LayerNorm.weight", {E}, "gamma"));
  DS_ASSIGN_OR_RETURN(at::Tensor ln_b, src.Get("embeddings.LayerNorm.bias", {E}, "beta"));
  DS_RETURN_IF_ERROR(TorchCallVoid(
      [&] {
        m->word_embeddings_ = m->Place("embeddings.word_embeddings.weight", word);
        m->position_embeddings_ = m->Place("embeddings.position_embeddings.weight", pos);
        at::Tensor t = m->Place("embeddings.token_type_embeddings.weight", type);
        m->token_type_embeddings_ = t;
        m->token_type_row0_ = t[0];
        m->embeddings_norm_.weight = m->Place("embeddings.LayerNorm.weight", ln_w);
        m->embeddings_norm_.bias = m->Place("embeddings.LayerNorm.bias", ln_b);
      },
      absl::StrCat(weights_path, ": placing embeddings on ", options.device)));
  if (E != H) {
    m->has_projection_ = true;
    ModuleInfo proj{"embeddings_project", ModuleKind::kLinear, -1, E, H, true};
    m->projection_.module = m->AddModule(proj);
    DS_ASSIGN_OR_RETURN(at::Tensor w, src.Get("embeddings_project.weight", {H, E}));
    DS_ASSIGN_OR_RETURN(at::Tensor b, src.Get("embeddings_project.bias", {H}));
    DS_RETURN_IF_ERROR(TorchCallVoid(
        [&] {
          m->projection_.weight = m->Place("embeddings_project.weight", w);
          m->projection_.bias = m->Place("embeddings_project.bias", b);
        },
        "placing embeddings_project"));
  }

  // Encoder layers.
  m->layers_.resize(static_cast<size_t>(c.num_layers));
  for (int64_t n = 0; n < c.num_layers; ++n) {
    LayerWeights& L = m->layers_[static_cast<size_t>(n)];
    const std::string p = absl::StrCat("encoder.layer.", n, ".");
    auto linear = [&](const std::string& name, int64_t in, int64_t out) {
      ModuleInfo info{p + name, ModuleKind::kLinear, n, in, out, true};
      return m->AddModule(info);
    };
    auto norm = [&](const std::string& name) {
      ModuleInfo info{p + name, ModuleKind::kLayerNorm, n, H, H, true};
      info.eps = c.layer_norm_eps;
      return m->AddModule(info);
    };
    auto block = [&](const std::string& name, const std::string& sublayer_input) {
      ModuleInfo info{p + name, ModuleKind::kBlockOutput, n, H, H};
      info.sublayer_input = p + sublayer_input;
      return m->AddModule(info);
    };
    L.query = linear("attention.self.query", H, H);
    L.key = linear("attention.self.key", H, H);
    L.value = linear("attention.self.value", H, H);
    {
      ModuleInfo info{p + "attention.self", ModuleKind::kAttention, n, H, H};
      info.num_heads = NH;
      info.head_dim = DH;
      L.attention = m->AddModule(info);
    }
    L.attention_output.module = linear("attention.output.dense", H, H);
    L.attention_block = block("attention.output", "attention.self.query");
    L.attention_norm.module = norm("attention.output.LayerNorm");
    L.intermediate.module = linear("intermediate.dense", H, I);
    L.output.module = linear("output.dense", I, H);
    L.output_block = block("output", "intermediate.dense");
    L.output_norm.module = norm("output.LayerNorm");

    std::vector<at::Tensor> qkv_w, qkv_b;
    for (const char* name : {"query", "key", "value"}) {
      DS_ASSIGN_OR_RETURN(at::Tensor w, src.Get(p + "attention.self." + name + ".weight", {H, H}));
      DS_ASSIGN_OR_RETURN(at::Tensor b, src.Get(p + "attention.self." + name + ".bias", {H}));
      qkv_w.push_back(w);
      qkv_b.push_back(b);
    }
    struct Pending {
      LinearWeights* linear;
      NormWeights* norm;
      std::string name;
      int64_t out, in;
    };
    const std::vector<Pending> pending = {
        {&L.attention_output, nullptr, "attention.output.dense", H, H},
        {nullptr, &L.attention_norm, "attention.output.LayerNorm", H, 0},
        {&L.intermediate, nullptr, "intermediate.dense", I, H},
        {&L.output, nullptr, "output.dense", H, I},
        {nullptr, &L.output_norm, "output.LayerNorm", H, 0},
    };
    std::vector<std::pair<at::Tensor, at::Tensor>> loaded;
    for (const Pending& q : pending) {
      if (q.linear != nullptr) {
        DS_ASSIGN_OR_RETURN(at::Tensor w, src.Get(p + q.name + ".weight", {q.out, q.in}));
        DS_ASSIGN_OR_RETURN(at::Tensor b, src.Get(p + q.name + ".bias", {q.out}));
        loaded.emplace_back(w, b);
      } else {
        DS_ASSIGN_OR_RETURN(at::Tensor w, src.Get(p + q.name + ".weight", {q.out}, "gamma"));
        DS_ASSIGN_OR_RETURN(at::Tensor b, src.Get(p + q.name + ".bias", {q.out}, "beta"));
        loaded.emplace_back(w, b);
      }
    }
    DS_RETURN_IF_ERROR(TorchCallVoid(
        [&] {
          L.qkv_weight = at::cat(qkv_w, 0).to(m->device_, m->dtype_).contiguous();
          L.qkv_bias = at::cat(qkv_b, 0).to(m->device_, m->dtype_).contiguous();
          const char* names[] = {"query", "key", "value"};
          for (int64_t k = 0; k < 3; ++k) {
            const std::string base = p + "attention.self." + names[k];
            L.qkv_part_w[k] = L.qkv_weight.narrow(0, k * H, H);
            L.qkv_part_b[k] = L.qkv_bias.narrow(0, k * H, H);
            m->parameters_[base + ".weight"] = L.qkv_part_w[k];
            m->parameters_[base + ".bias"] = L.qkv_part_b[k];
          }
          for (size_t k = 0; k < pending.size(); ++k) {
            const Pending& q = pending[k];
            at::Tensor w = m->Place(p + q.name + ".weight", loaded[k].first);
            at::Tensor b = m->Place(p + q.name + ".bias", loaded[k].second);
            if (q.linear != nullptr) {
              q.linear->weight = w;
              q.linear->bias = b;
            } else {
              q.norm->weight = w;
              q.norm->bias = b;
            }
          }
        },
        absl::StrCat(weights_path, ": placing layer ", n, " on ", options.device)));
  }

  ModelInfo& info = m->info_;
  info.family = "bert";
  std::string name = dir;
  while (name.size() > 1 && name.back() == '/') name.pop_back();
  info.name = name.substr(name.rfind('/') == std::string::npos ? 0 : name.rfind('/') + 1);
  info.vocab_size = c.vocab_size;
  info.hidden_size = H;
  info.embedding_dim = H * m->pooling_.num_modes();
  info.num_layers = c.num_layers;
  info.num_heads = NH;
  info.max_sequence_length = c.max_sequence_length;
  int64_t num_parameters = 0;
  for (const auto& [pname, t] : m->parameters_) num_parameters += t.numel();
  info.num_parameters = num_parameters;
  info.pooling = m->pooling_.Name();
  info.dtype = options.dtype;
  DS_ASSIGN_OR_RETURN(info.fingerprint, FileSha256Digest(weights_path));
  info.device = m->device_.str();
  return std::unique_ptr<Model>(std::move(m));
}

at::Tensor BertModel::Activate(const at::Tensor& x) const {
  switch (config_.activation) {
    case Activation::kGeluErf:
      return at::gelu(x);
    case Activation::kGeluTanh:
      return at::gelu(x, "tanh");
    case Activation::kRelu:
      return at::relu(x);
    case Activation::kSilu:
      return at::silu(x);
  }
  return x;
}

// [B,1,1,Tk] additive mask: 0 where attended, the dtype's lowest value elsewhere (as HF does).
at::Tensor BertModel::AttentionMask(const at::Tensor& key_mask) const {
  const double lowest = dtype_ == at::kBFloat16 ? static_cast<double>(std::numeric_limits<c10::BFloat16>::lowest())
                                                : static_cast<double>(std::numeric_limits<float>::lowest());
  at::Tensor add = at::zeros(key_mask.sizes(), at::TensorOptions().dtype(dtype_).device(device_));
  add.masked_fill_(key_mask.logical_not(), lowest);
  return add.view({key_mask.size(0), 1, 1, key_mask.size(1)});
}

absl::Status BertModel::ValidateInput(const ForwardInput& input) const {
  return ValidateForwardInput(input, config_.vocab_size, config_.max_sequence_length);
}

absl::StatusOr<ForwardOutput> BertModel::Forward(const ForwardInput& input, ForwardHooks* hooks) const {
  DS_RETURN_IF_ERROR(ValidateInput(input));
  ForwardOutput out;
  absl::Status inner;
  DS_RETURN_IF_ERROR(TorchCallVoid(
      [&] {
        c10::InferenceMode inference_mode;
        inner = Run(input, hooks, /*trainable=*/false, &out);
      },
      "bert forward"));
  DS_RETURN_IF_ERROR(inner);
  return out;
}

absl::StatusOr<ForwardOutput> BertModel::ForwardTrainable(const ForwardInput& input, ForwardHooks* hooks) const {
  DS_RETURN_IF_ERROR(ValidateInput(input));
  ForwardOutput out;
  absl::Status inner;
  DS_RETURN_IF_ERROR(TorchCallVoid(
      [&] {
        c10::InferenceMode no_inference(/*enabled=*/false);
        c10::AutoGradMode grad(/*enabled=*/true);
        inner = Run(input, hooks, /*trainable=*/true, &out);
      },
      "bert trainable forward"));
  DS_RETURN_IF_ERROR(inner);
  return out;
}

absl::Status BertModel::Run(const ForwardInput& input, ForwardHooks* hooks, bool trainable,
                            ForwardOutput* out) const {
  const BertConfig& c = config_;
  const int64_t H = c.hidden_size, E = c.embedding_size, NH = c.num_heads, DH = H / NH;
  const double scale = std::sqrt(static_cast<double>(DH));
  at::Tensor ids = input.input_ids.to(device_);
  at::Tensor mask = input.attention_mask.to(device_);
  if (trainable) {
    // Autograd cannot save inference tensors (inputs made under inference mode) for the backward pass.
    if (ids.is_inference()) ids = ids.clone();
    if (mask.is_inference()) mask = mask.clone();
  }
  const int64_t B = ids.size(0);

  at::Tensor x = at::embedding(word_embeddings_, ids);  // [B,T,E]
  if (hooks != nullptr) {
    hooks->OnTokenEmbeddings(&x, &mask);
    if (!x.defined() || x.dim() != 3 || x.size(0) != B || x.size(2) != E || !mask.defined() || mask.dim() != 2 ||
        mask.scalar_type() != at::kBool || mask.size(0) != B || mask.size(1) != x.size(1) || x.size(1) < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("OnTokenEmbeddings hook left hidden ", x.defined() ? ShapeString(x.sizes()) : "undefined",
                       " and mask ", mask.defined() ? ShapeString(mask.sizes()) : "undefined",
                       "; expected [B,T,", E, "] and [B,T] bool with B = ", B));
    }
    x = x.to(device_, dtype_);
    mask = mask.to(device_);
  }
  // Position ids from the mask: a row keeps its positions wherever padding (or spliced tokens) sit.
  at::Tensor counts = mask.to(at::kLong).cumsum(1);  // real tokens up to and including t
  at::Tensor positions;
  if (c.roberta_positions) {
    positions = counts * mask.to(at::kLong) + c.pad_token_id;
  } else {
    positions = (counts - 1).clamp_min(0);
  }
  if (hooks != nullptr) {
    const int64_t longest = counts.select(1, counts.size(1) - 1).max().item<int64_t>();
    if (longest > c.max_sequence_length) {
      return absl::InvalidArgumentError(absl::StrCat("after the OnTokenEmbeddings hook a row has ", longest,
                                                     " real tokens, more than the model's maximum of ",
                                                     c.max_sequence_length));
    }
  }
  // Trainable: the row taken now, so that it tracks a token-type table that requires grad.
  x = x + (trainable ? token_type_embeddings_.select(0, 0) : token_type_row0_);
  x = x + at::embedding(position_embeddings_, positions);
  // Packed: the per-token layers run on the real tokens only ([N, ...]); attention unpacks to [B, T, ...].
  const int64_t T = x.size(1);
  const TokenLayout layout = PlanTokenLayout(input, mask, hooks);
  const bool pack = layout.packed();
  if (pack) x = layout.Pack(x);
  if (hooks != nullptr && hooks->SupportsPackedTokens()) hooks->OnTokenLayout(layout);
  {
    at::Tensor pre = x;
    x = at::layer_norm(pre, {E}, embeddings_norm_.weight, embeddings_norm_.bias, c.layer_norm_eps);
    if (hooks != nullptr) hooks->OnLayerNorm(modules_[embeddings_norm_.module], pre, &x);
  }
  if (has_projection_) {
    at::Tensor in = x;
    if (hooks != nullptr) hooks->OnLinearInput(modules_[projection_.module], &in);
    x = at::linear(in, projection_.weight, projection_.bias);
    if (hooks != nullptr) hooks->OnLinear(modules_[projection_.module], in, &x);
  }
  const at::Tensor shared_mask = hooks == nullptr ? AttentionMask(mask) : at::Tensor();

  for (const LayerWeights& L : layers_) {
    at::Tensor qkv_w = L.qkv_weight, qkv_b = L.qkv_bias;
    if (trainable) {
      // A caller training the weights themselves set requires_grad on the query/key/value views: fuse those, so
      // that gradients reach them (the fused tensors do not track the views).
      bool any = false;
      for (int k = 0; k < 3; ++k) any = any || L.qkv_part_w[k].requires_grad() || L.qkv_part_b[k].requires_grad();
      if (any) {
        qkv_w = at::cat({L.qkv_part_w[0], L.qkv_part_w[1], L.qkv_part_w[2]}, 0);
        qkv_b = at::cat({L.qkv_part_b[0], L.qkv_part_b[1], L.qkv_part_b[2]}, 0);
      }
    }
    at::Tensor qkv = at::linear(x, qkv_w, qkv_b);  // [B,T,3H]
    at::Tensor q = qkv.narrow(-1, 0, H);
    at::Tensor k = qkv.narrow(-1, H, H);
    at::Tensor v = qkv.narrow(-1, 2 * H, H);
    if (hooks != nullptr) {
      hooks->OnLinear(modules_[L.query], x, &q);
      hooks->OnLinear(modules_[L.key], x, &k);
      hooks->OnLinear(modules_[L.value], x, &v);
    }
    if (pack) layout.UnpackSlices(qkv, {&q, &k, &v});
    auto split_heads = [&](const at::Tensor& t) {
      return t.reshape({B, T, NH, DH}).transpose(1, 2);  // [B,NH,T,DH]
    };
    q = split_heads(q);
    k = split_heads(k);
    v = split_heads(v);
    at::Tensor add_mask = shared_mask;
    if (hooks != nullptr) {
      at::Tensor key_mask = mask;
      hooks->OnAttentionKeyValue(modules_[L.attention], &k, &v, &key_mask);
      if (!k.defined() || !v.defined() || k.dim() != 4 || k.sizes() != v.sizes() || k.size(0) != B ||
          k.size(1) != NH || k.size(3) != DH || !key_mask.defined() || key_mask.dim() != 2 ||
          key_mask.scalar_type() != at::kBool || key_mask.size(0) != B || key_mask.size(1) != k.size(2)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "OnAttentionKeyValue hook of ", modules_[L.attention].name, " left keys ",
            k.defined() ? ShapeString(k.sizes()) : "undefined", ", values ",
            v.defined() ? ShapeString(v.sizes()) : "undefined", " and key mask ",
            key_mask.defined() ? ShapeString(key_mask.sizes()) : "undefined", "; expected [", B, ",", NH,
            ",Tk,", DH, "] twice and [", B, ",Tk] bool"));
      }
      add_mask = AttentionMask(key_mask.to(device_));
    }
    at::Tensor scores = at::matmul(q, k.transpose(-1, -2));  // [B,NH,T,Tk]
    if (trainable) {
      scores = scores / scale + add_mask;
    } else {
      scores.div_(scale);
      scores.add_(add_mask);
    }
    at::Tensor probs = at::softmax(scores, -1);
    at::Tensor context = at::matmul(probs, v).transpose(1, 2).reshape({B, T, H});
    if (pack) context = layout.Pack(context);
    if (hooks != nullptr) hooks->OnLinearInput(modules_[L.attention_output.module], &context);

    at::Tensor attn = at::linear(context, L.attention_output.weight, L.attention_output.bias);
    if (hooks != nullptr) {
      hooks->OnLinear(modules_[L.attention_output.module], context, &attn);
      hooks->OnBlockOutput(modules_[L.attention_block], &attn);
    }
    at::Tensor pre = attn + x;
    x = at::layer_norm(pre, {H}, L.attention_norm.weight, L.attention_norm.bias, c.layer_norm_eps);
    if (hooks != nullptr) hooks->OnLayerNorm(modules_[L.attention_norm.module], pre, &x);

    at::Tensor ffn_in = x;
    if (hooks != nullptr) hooks->OnLinearInput(modules_[L.intermediate.module], &ffn_in);
    at::Tensor inter = at::linear(ffn_in, L.intermediate.weight, L.intermediate.bias);
    if (hooks != nullptr) hooks->OnLinear(modules_[L.intermediate.module], ffn_in, &inter);
    inter = Activate(inter);
    if (hooks != nullptr) hooks->OnLinearInput(modules_[L.output.module], &inter);
    at::Tensor ffn = at::linear(inter, L.output.weight, L.output.bias);
    if (hooks != nullptr) {
      hooks->OnLinear(modules_[L.output.module], inter, &ffn);
      hooks->OnBlockOutput(modules_[L.output_block], &ffn);
    }
    pre = ffn + x;
    x = at::layer_norm(pre, {H}, L.output_norm.weight, L.output_norm.bias, c.layer_norm_eps);
    if (hooks != nullptr) hooks->OnLayerNorm(modules_[L.output_norm.module], pre, &x);
  }

  at::Tensor hidden = (pack ? layout.Unpack(x) : x).to(at::kFloat);
  std::vector<at::Tensor> parts;
  const at::Tensor weights = mask.unsqueeze(-1).to(at::kFloat);  // [B,T,1]
  const at::Tensor counts_f = weights.sum(1).clamp_min(1e-9);     // [B,1]
  if (pooling_.cls) parts.push_back(hidden.select(1, 0));
  if (pooling_.max) parts.push_back(hidden.masked_fill(mask.unsqueeze(-1).logical_not(), -1e9).amax(1));
  if (pooling_.mean || pooling_.mean_sqrt_len) {
    at::Tensor sum = (hidden * weights).sum(1);
    if (pooling_.mean) parts.push_back(sum / counts_f);
    if (pooling_.mean_sqrt_len) parts.push_back(sum / counts_f.sqrt());
  }
  at::Tensor pooled = parts.size() == 1 ? parts[0] : at::cat(parts, 1);
  if (pooling_.normalize) {
    pooled = pooled / pooled.norm(2, {1}, /*keepdim=*/true).clamp_min(1e-12);
  }
  out->hidden_states = hidden;
  out->attention_mask = mask;
  out->pooled = pooled.contiguous();
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Model>> LoadBertModel(const std::string& dir, const ModelOptions& options) {
  std::unique_ptr<Model> model;
  absl::Status inner;
  // Any LibTorch exception while loading (out of memory on the device, ...) becomes a status.
  DS_RETURN_IF_ERROR(TorchCallVoid(
      [&] {
        auto loaded = BertModel::Load(dir, options);
        if (loaded.ok()) {
          model = std::move(loaded).value();
        } else {
          inner = loaded.status();
        }
      },
      absl::StrCat("loading bert model from ", dir)));
  DS_RETURN_IF_ERROR(inner);
  return model;
}

}  // namespace model
}  // namespace deltaserve
