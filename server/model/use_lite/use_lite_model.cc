#include "server/model/use_lite/use_lite_model.h"

#include <sys/stat.h>

#include <fstream>
#include <set>
#include <sstream>
#include <utility>
#include <vector>

#include <ATen/Context.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/embedding.h>
#include <ATen/ops/layer_norm.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/softmax.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"
#include "server/common/file_util.h"
#include "server/common/sha256.h"
#include "server/common/logging.h"
#include "server/common/status_macros.h"
#include "server/common/torch_status.h"
#include "server/model/safetensors.h"
#include "server/model/use_lite/use_lite_tokenizer.h"

namespace deltaserve {
namespace model {
namespace {

bool FileExists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

bool IsDirectory(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

// Typed access to config.json with errors that name the file and the key.
class Config {
 public:
  Config(std::string path, nlohmann::json json) : path_(std::move(path)), json_(std::move(json)) {}

  absl::StatusOr<int64_t> Int(const nlohmann::json& obj, const std::string& key, const std::string& where,
                              int64_t min, int64_t max) const {
    auto it = obj.find(key);
    if (it == obj.end() || !it->is_number_integer()) {
      return absl::InvalidArgumentError(absl::StrCat(path_, ": ", where, "\"", key, "\" must be an integer"));
    }
    const int64_t v = it->get<int64_t>();
    if (v < min || v > max) {
      return absl::InvalidArgumentError(
          absl::StrCat(path_, ": ", where, "\"", key, "\" = ", v, " is outside [", min, ", ", max, "]"));
    }
    return v;
  }
  absl::StatusOr<double> Double(const nlohmann::json& obj, const std::string& key, const std::string& where) const {
    auto it = obj.find(key);
    if (it == obj.end() || !it->is_number()) {
      return absl::InvalidArgumentError(absl::StrCat(path_, ": ", where, "\"", key, "\" must be a number"));
    }
    return it->get<double>();
  }
  absl::StatusOr<bool> Bool(const nlohmann::json& obj, const std::string& key, const std::string& where) const {
    auto it = obj.find(key);
    if (it == obj.end() || !it->is_boolean()) {
      return absl::InvalidArgumentError(absl::StrCat(path_, ": ", where, "\"", key, "\" must be true or false"));
    }
    return it->get<bool>();
  }
  std::string String(const std::string& key, const std::string& fallback) const {
    auto it = json_.find(key);
    return it != json_.end() && it->is_string() ? it->get<std::string>() : fallback;
  }
  const nlohmann::json& json() const { return json_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  nlohmann::json json_;
};

constexpr int64_t kMaxDim = 1 << 16;

struct LayerWeights {
  int64_t input_size = 0;
  int64_t hidden_size = 0;
  int64_t num_heads = 0;
  int64_t head_dim = 0;
  int64_t intermediate_size = 0;
  double attention_scale = 0;
  bool residual_projection = false;

  at::Tensor ln1_w, ln1_b;
  at::Tensor res_w, res_b;
  at::Tensor qkv_w, qkv_b;  // fused [3d, d] / [3d]; query/key/value parameters are views into these
  at::Tensor qkv_part_w[3], qkv_part_b[3];  // those views (the very tensors parameters() holds)
  at::Tensor out_w, out_b;
  at::Tensor ln2_w, ln2_b;
  at::Tensor ffn1_w, ffn1_b;
  at::Tensor ffn2_w, ffn2_b;

  ModuleInfo ln1, res, query, key, value, attention, out_dense, attention_block, ln2, ffn1, ffn2, ffn_block;
};

class UseLiteModel : public Model {
 public:
  const ModelInfo& info() const override { return info_; }
  const Tokenizer& tokenizer() const override { return *tokenizer_; }
  const std::vector<ModuleInfo>& modules() const override { return modules_; }
  const std::map<std::string, at::Tensor>& parameters() const override { return parameters_; }
  absl::StatusOr<ForwardOutput> Forward(const ForwardInput& input, ForwardHooks* hooks) const override;
  absl::StatusOr<ForwardOutput> ForwardTrainable(const ForwardInput& input, ForwardHooks* hooks) const override;

  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& dir, const ModelOptions& options);

 private:
  absl::Status ValidateInput(const ForwardInput& input) const;
  // `trainable`: the autograd-friendly variant of ForwardTrainable (the caller sets the grad modes).
  absl::StatusOr<ForwardOutput> Run(const ForwardInput& input, ForwardHooks* hooks, bool trainable) const;

  ModelInfo info_;
  std::unique_ptr<UseLiteTokenizer> tokenizer_;
  std::vector<ModuleInfo> modules_;
  std::map<std::string, at::Tensor> parameters_;

  at::Device device_ = at::kCPU;
  c10::ScalarType dtype_ = at::kFloat;
  int64_t embedding_size_ = 0;
  double token_embedding_multiplier_ = 2.0;
  double layer_norm_eps_ = 1e-6;
  double attention_mask_bias_ = -1e9;
  double l2_eps_ = 1e-12;
  at::Tensor word_embeddings_;   // [V, E], compute dtype
  at::Tensor inv_timescales_;    // [E/2], float32
  std::vector<LayerWeights> layers_;
  at::Tensor pool_w_, pool_b_;
  ModuleInfo embedding_module_, pooler_module_;
};

ModuleInfo MakeModule(std::string name, ModuleKind kind, int64_t layer, int64_t in, int64_t out, bool bias) {
  ModuleInfo m;
  m.name = std::move(name);
  m.kind = kind;
  m.layer = layer;
  m.in_features = in;
  m.out_features = out;
  m.has_bias = bias;
  return m;
}

absl::StatusOr<std::unique_ptr<Model>> UseLiteModel::Load(const std::string& dir, const ModelOptions& options) {
  if (!IsDirectory(dir)) {
    return absl::NotFoundError(absl::StrCat("use-lite model directory ", dir, " does not exist or is not a directory ",
                                            "(run scripts/get_use_lite.sh)"));
  }
  std::unique_ptr<UseLiteModel> model(new UseLiteModel());

  // Options.
  if (options.dtype == "float32") {
    model->dtype_ = at::kFloat;
  } else if (options.dtype == "bfloat16") {
    model->dtype_ = at::kBFloat16;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("unsupported dtype \"", options.dtype, "\" (use \"float32\" or \"bfloat16\")"));
  }
  {
    absl::StatusOr<at::Device> device = TorchCall([&] { return at::Device(options.device); }, "device");
    if (!device.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("unknown device \"", options.device,
                                                     "\" (use \"cpu\", \"cuda\" or \"cuda:N\")"));
    }
    if (!device->is_cpu() && !device->is_cuda()) {
      return absl::InvalidArgumentError(absl::StrCat("unsupported device \"", options.device, "\""));
    }
    if (device->is_cuda() && !at::hasCUDA()) {
      return absl::FailedPreconditionError(
          absl::StrCat("device \"", options.device, "\" requested but CUDA is not available"));
    }
    model->device_ = *device;
  }

  // config.json.
  const std::string config_path = dir + "/config.json";
  absl::StatusOr<nlohmann::json> parsed = ReadJsonObject(config_path);
  if (absl::IsNotFound(parsed.status())) {
    return absl::NotFoundError(absl::StrCat(config_path, " is missing (run scripts/get_use_lite.sh)"));
  }
  if (!parsed.ok()) return parsed.status();
  nlohmann::json json = *std::move(parsed);
  Config config(config_path, std::move(json));
  const nlohmann::json& c = config.json();
  if (config.String("model_type", "") != "use-lite") {
    return absl::InvalidArgumentError(absl::StrCat(config_path, ": \"model_type\" is not \"use-lite\""));
  }
  DS_ASSIGN_OR_RETURN(const int64_t vocab_size, config.Int(c, "vocab_size", "", 1, int64_t{1} << 24));
  DS_ASSIGN_OR_RETURN(const int64_t emb_size, config.Int(c, "embedding_size", "", 2, kMaxDim));
  DS_ASSIGN_OR_RETURN(const int64_t hidden_size, config.Int(c, "hidden_size", "", 1, kMaxDim));
  DS_ASSIGN_OR_RETURN(const int64_t embedding_dim, config.Int(c, "embedding_dim", "", 1, kMaxDim));
  DS_ASSIGN_OR_RETURN(const int64_t num_layers, config.Int(c, "num_hidden_layers", "", 1, 256));
  DS_ASSIGN_OR_RETURN(const int64_t max_len, config.Int(c, "max_position_embeddings", "", 1, kMaxDim));
  DS_ASSIGN_OR_RETURN(const int64_t num_timescales, config.Int(c, "num_timescales", "", 1, kMaxDim));
  DS_ASSIGN_OR_RETURN(model->token_embedding_multiplier_, config.Double(c, "token_embedding_multiplier", ""));
  DS_ASSIGN_OR_RETURN(model->layer_norm_eps_, config.Double(c, "layer_norm_eps", ""));
  DS_ASSIGN_OR_RETURN(model->attention_mask_bias_, config.Double(c, "attention_mask_bias", ""));
  DS_ASSIGN_OR_RETURN(model->l2_eps_, config.Double(c, "l2_normalize_eps", ""));
  if (2 * num_timescales != emb_size) {
    return absl::InvalidArgumentError(
        absl::StrCat(config_path, ": 2 * \"num_timescales\" must equal \"embedding_size\""));
  }
  if (model->layer_norm_eps_ <= 0 || model->l2_eps_ <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(config_path, ": epsilons must be positive"));
  }
  auto layers_it = c.find("layers");
  if (layers_it == c.end() || !layers_it->is_array() || static_cast<int64_t>(layers_it->size()) != num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat(config_path, ": \"layers\" must be an array of \"num_hidden_layers\" objects"));
  }
  model->embedding_size_ = emb_size;
  int64_t width = emb_size;
  for (int64_t l = 0; l < num_layers; ++l) {
    const nlohmann::json& lc = (*layers_it)[l];
    const std::string where = absl::StrCat("layers[", l, "].");
    if (!lc.is_object()) return absl::InvalidArgumentError(absl::StrCat(config_path, ": layers[", l, "] is not an object"));
    LayerWeights layer;
    DS_ASSIGN_OR_RETURN(layer.input_size, config.Int(lc, "input_size", where, 1, kMaxDim));
    DS_ASSIGN_OR_RETURN(layer.hidden_size, config.Int(lc, "hidden_size", where, 1, kMaxDim));
    DS_ASSIGN_OR_RETURN(layer.num_heads, config.Int(lc, "num_attention_heads", where, 1, 1024));
    DS_ASSIGN_OR_RETURN(layer.head_dim, config.Int(lc, "attention_head_size", where, 1, kMaxDim));
    DS_ASSIGN_OR_RETURN(layer.intermediate_size, config.Int(lc, "intermediate_size", where, 1, 1 << 20));
    DS_ASSIGN_OR_RETURN(layer.attention_scale, config.Double(lc, "attention_scale", where));
    DS_ASSIGN_OR_RETURN(layer.residual_projection, config.Bool(lc, "residual_projection", where));
    if (layer.input_size != width || layer.num_heads * layer.head_dim != layer.input_size ||
        (!layer.residual_projection && layer.hidden_size != layer.input_size)) {
      return absl::InvalidArgumentError(absl::StrCat(config_path, ": layers[", l, "] sizes are inconsistent"));
    }
    width = layer.hidden_size;
    model->layers_.push_back(std::move(layer));
  }
  if (width != hidden_size) {
    return absl::InvalidArgumentError(absl::StrCat(config_path, ": \"hidden_size\" differs from the last layer's"));
  }

  // model.safetensors.
  const std::string weights_path = dir + "/model.safetensors";
  if (!FileExists(weights_path)) {
    return absl::NotFoundError(absl::StrCat(weights_path, " is missing (run scripts/get_use_lite.sh)"));
  }
  DS_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::Open(weights_path));
  std::set<std::string> used;
  auto load = [&](const std::string& name, std::vector<int64_t> shape,
                  c10::ScalarType dtype) -> absl::StatusOr<at::Tensor> {
    if (!file->contains(name)) {
      return absl::NotFoundError(absl::StrCat(weights_path, ": tensor ", name, " is missing"));
    }
    DS_ASSIGN_OR_RETURN(SafetensorsEntry entry, file->entry(name));
    if (entry.shape != shape) {
      return absl::InvalidArgumentError(absl::StrCat(weights_path, ": tensor ", name, " has shape ",
                                                     ShapeString(entry.shape), ", expected ", ShapeString(shape)));
    }
    absl::StatusOr<at::Tensor> t = file->Load(name, at::kFloat);
    if (!t.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(weights_path, ": tensor ", name, ": ", t.status().message()));
    }
    used.insert(name);
    return TorchCall([&] { return t->to(model->device_, dtype).contiguous(); }, absl::StrCat("moving ", name));
  };
  const c10::ScalarType dt = model->dtype_;
  DS_ASSIGN_OR_RETURN(model->word_embeddings_, load("embeddings.word_embeddings.weight", {vocab_size, emb_size}, dt));
  DS_ASSIGN_OR_RETURN(model->inv_timescales_,
                      load("embeddings.timing_signal.inv_timescales", {num_timescales}, at::kFloat));
  model->parameters_["embeddings.word_embeddings.weight"] = model->word_embeddings_;
  model->embedding_module_ =
      MakeModule("embeddings.word_embeddings", ModuleKind::kEmbedding, -1, emb_size, emb_size, false);
  model->modules_.push_back(model->embedding_module_);

  for (int64_t l = 0; l < num_layers; ++l) {
    LayerWeights& L = model->layers_[l];
    const std::string p = absl::StrCat("encoder.layer.", l, ".");
    const int64_t d = L.input_size, h = L.hidden_size, f = L.intermediate_size;
    auto linear = [&](const std::string& module, int64_t in, int64_t out, at::Tensor* w,
                      at::Tensor* b) -> absl::Status {
      DS_ASSIGN_OR_RETURN(*w, load(module + ".weight", {out, in}, dt));
      DS_ASSIGN_OR_RETURN(*b, load(module + ".bias", {out}, dt));
      model->parameters_[module + ".weight"] = *w;
      model->parameters_[module + ".bias"] = *b;
      return absl::OkStatus();
    };
    auto norm = [&](const std::string& module, int64_t size, at::Tensor* w, at::Tensor* b) -> absl::Status {
      DS_ASSIGN_OR_RETURN(*w, load(module + ".weight", {size}, dt));
      DS_ASSIGN_OR_RETURN(*b, load(module + ".bias", {size}, dt));
      model->parameters_[module + ".weight"] = *w;
      model->parameters_[module + ".bias"] = *b;
      return absl::OkStatus();
    };

    L.ln1 = MakeModule(p + "attention.LayerNorm", ModuleKind::kLayerNorm, l, d, 0, true);
    L.ln1.eps = model->layer_norm_eps_;
    DS_RETURN_IF_ERROR(norm(L.ln1.name, d, &L.ln1_w, &L.ln1_b));
    model->modules_.push_back(L.ln1);
    if (L.residual_projection) {
      L.res = MakeModule(p + "residual.dense", ModuleKind::kLinear, l, d, h, true);
      DS_RETURN_IF_ERROR(linear(L.res.name, d, h, &L.res_w, &L.res_b));
      model->modules_.push_back(L.res);
    }
    // query/key/value: loaded separately, fused into one [3d, d] weight; the parameters are views into it.
    std::vector<at::Tensor> ws, bs;
    const char* parts[] = {"query", "key", "value"};
    ModuleInfo* infos[] = {&L.query, &L.key, &L.value};
    for (int i = 0; i < 3; ++i) {
      *infos[i] = MakeModule(p + "attention.self." + parts[i], ModuleKind::kLinear, l, d, d, true);
      DS_ASSIGN_OR_RETURN(at::Tensor w, load(infos[i]->name + ".weight", {d, d}, dt));
      DS_ASSIGN_OR_RETURN(at::Tensor b, load(infos[i]->name + ".bias", {d}, dt));
      ws.push_back(w);
      bs.push_back(b);
      model->modules_.push_back(*infos[i]);
    }
    DS_ASSIGN_OR_RETURN(L.qkv_w, TorchCall([&] { return at::cat(ws, 0); }, "fusing qkv"));
    DS_ASSIGN_OR_RETURN(L.qkv_b, TorchCall([&] { return at::cat(bs, 0); }, "fusing qkv"));
    for (int i = 0; i < 3; ++i) {
      L.qkv_part_w[i] = L.qkv_w.narrow(0, i * d, d);
      L.qkv_part_b[i] = L.qkv_b.narrow(0, i * d, d);
      model->parameters_[infos[i]->name + ".weight"] = L.qkv_part_w[i];
      model->parameters_[infos[i]->name + ".bias"] = L.qkv_part_b[i];
    }
    L.attention = MakeModule(p + "attention.self", ModuleKind::kAttention, l, d, d, false);
    L.attention.num_heads = L.num_heads;
    L.attention.head_dim = L.head_dim;
    model->modules_.push_back(L.attention);
    L.out_dense = MakeModule(p + "attention.output.dense", ModuleKind::kLinear, l, d, h, true);
    DS_RETURN_IF_ERROR(linear(L.out_dense.name, d, h, &L.out_w, &L.out_b));
    model->modules_.push_back(L.out_dense);
    L.attention_block = MakeModule(p + "attention.output", ModuleKind::kBlockOutput, l, h, 0, false);
    L.attention_block.sublayer_input = L.query.name;
    model->modules_.push_back(L.attention_block);
    L.ln2 = MakeModule(p + "intermediate.LayerNorm", ModuleKind::kLayerNorm, l, h, 0, true);
    L.ln2.eps = model->layer_norm_eps_;
    DS_RETURN_IF_ERROR(norm(L.ln2.name, h, &L.ln2_w, &L.ln2_b));
    model->modules_.push_back(L.ln2);
    L.ffn1 = MakeModule(p + "intermediate.dense", ModuleKind::kLinear, l, h, f, true);
    DS_RETURN_IF_ERROR(linear(L.ffn1.name, h, f, &L.ffn1_w, &L.ffn1_b));
    model->modules_.push_back(L.ffn1);
    L.ffn2 = MakeModule(p + "output.dense", ModuleKind::kLinear, l, f, h, true);
    DS_RETURN_IF_ERROR(linear(L.ffn2.name, f, h, &L.ffn2_w, &L.ffn2_b));
    model->modules_.push_back(L.ffn2);
    L.ffn_block = MakeModule(p + "output", ModuleKind::kBlockOutput, l, h, 0, false);
    L.ffn_block.sublayer_input = L.ffn1.name;
    model->modules_.push_back(L.ffn_block);
  }
  model->pooler_module_ = MakeModule("pooler.dense", ModuleKind::kLinear, -1, hidden_size, embedding_dim, true);
  DS_ASSIGN_OR_RETURN(model->pool_w_, load("pooler.dense.weight", {embedding_dim, hidden_size}, dt));
  DS_ASSIGN_OR_RETURN(model->pool_b_, load("pooler.dense.bias", {embedding_dim}, dt));
  model->parameters_["pooler.dense.weight"] = model->pool_w_;
  model->parameters_["pooler.dense.bias"] = model->pool_b_;
  model->modules_.push_back(model->pooler_module_);
  for (const std::string& name : file->names()) {
    if (!used.count(name)) DS_LOG(WARNING) << weights_path << ": ignoring unexpected tensor " << name;
  }

  // vocab.json.
  DS_ASSIGN_OR_RETURN(model->tokenizer_, UseLiteTokenizer::FromFile(dir + "/vocab.json"));
  if (model->tokenizer_->vocab_size() > vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(dir, "/vocab.json has ", model->tokenizer_->vocab_size(),
                                                   " pieces, more than the ", vocab_size, " embedding rows"));
  }

  ModelInfo& info = model->info_;
  info.family = "use-lite";
  info.name = config.String("name", "use-lite");
  info.vocab_size = vocab_size;
  info.hidden_size = hidden_size;
  info.embedding_dim = embedding_dim;
  info.num_layers = num_layers;
  info.num_heads = model->layers_.back().num_heads;
  info.max_sequence_length = max_len;
  int64_t count = 0;
  for (const auto& [name, t] : model->parameters_) count += t.numel();
  info.num_parameters = count;
  info.pooling = config.String("pooling", "mean+tanh+l2");
  info.dtype = options.dtype;
  info.device = model->device_.str();
  DS_ASSIGN_OR_RETURN(info.fingerprint, FileSha256Digest(weights_path));
  return std::unique_ptr<Model>(std::move(model));
}

absl::Status UseLiteModel::ValidateInput(const ForwardInput& input) const {
  return ValidateForwardInput(input, info_.vocab_size, info_.max_sequence_length);
}

absl::StatusOr<ForwardOutput> UseLiteModel::Forward(const ForwardInput& input, ForwardHooks* hooks) const {
  DS_RETURN_IF_ERROR(ValidateInput(input));
  absl::StatusOr<absl::StatusOr<ForwardOutput>> out = TorchCall(
      [&] {
        c10::InferenceMode guard;
        return Run(input, hooks, /*trainable=*/false);
      },
      "use-lite forward");
  if (!out.ok()) return out.status();
  return *std::move(out);
}

absl::StatusOr<ForwardOutput> UseLiteModel::ForwardTrainable(const ForwardInput& input, ForwardHooks* hooks) const {
  DS_RETURN_IF_ERROR(ValidateInput(input));
  absl::StatusOr<absl::StatusOr<ForwardOutput>> out = TorchCall(
      [&] {
        c10::InferenceMode no_inference(/*enabled=*/false);
        c10::AutoGradMode grad(/*enabled=*/true);
        return Run(input, hooks, /*trainable=*/true);
      },
      "use-lite trainable forward");
  if (!out.ok()) return out.status();
  return *std::move(out);
}

absl::StatusOr<ForwardOutput> UseLiteModel::Run(const ForwardInput& input, ForwardHooks* hooks,
                                                 bool trainable) const {
  const int64_t batch = input.input_ids.size(0);
  at::Tensor ids = input.input_ids.to(device_);
  at::Tensor mask = input.attention_mask.to(device_);
  if (trainable) {
    // Autograd cannot save inference tensors (inputs made under inference mode) for the backward pass.
    if (ids.is_inference()) ids = ids.clone();
    if (mask.is_inference()) mask = mask.clone();
  }

  at::Tensor hidden = at::embedding(word_embeddings_, ids);  // [B,T,E]
  if (hooks != nullptr) {
    hooks->OnTokenEmbeddings(&hidden, &mask);
    if (!hidden.defined() || hidden.dim() != 3 || hidden.size(0) != batch || hidden.size(2) != embedding_size_ ||
        !mask.defined() || mask.dim() != 2 || mask.scalar_type() != at::kBool || mask.size(0) != batch ||
        mask.size(1) != hidden.size(1)) {
      return absl::InternalError("OnTokenEmbeddings hook left hidden/mask with inconsistent shapes");
    }
    hidden = hidden.to(dtype_);
  }
  const int64_t length = hidden.size(1);
  const at::Tensor mask3 = mask.unsqueeze(-1).to(dtype_);  // [B,T,1]

  // Timing signal at each real token's position among the real tokens of its row.
  const at::Tensor positions = mask.to(at::kLong).cumsum(1).sub(1).clamp_min(0).to(at::kFloat);  // [B,T]
  const at::Tensor angles = positions.unsqueeze(-1).mul(inv_timescales_);                        // [B,T,E/2]
  const at::Tensor timing = at::cat({angles.sin(), angles.cos()}, -1).to(dtype_);
  at::Tensor x = hidden.mul(token_embedding_multiplier_).add(timing).mul(mask3);

  // Packed: the per-token layers run on the real tokens only ([N, ...]); attention unpacks to [B, T, ...].
  const TokenLayout layout = PlanTokenLayout(input, mask, hooks);
  const bool pack = layout.packed();
  if (pack) x = layout.Pack(x);
  if (hooks != nullptr && hooks->SupportsPackedTokens()) hooks->OnTokenLayout(layout);

  for (const LayerWeights& L : layers_) {
    const int64_t d = L.input_size;
    at::Tensor h = at::layer_norm(x, {d}, L.ln1_w, L.ln1_b, layer_norm_eps_);
    if (hooks != nullptr) hooks->OnLayerNorm(L.ln1, x, &h);

    at::Tensor residual = x;
    if (L.residual_projection) {
      at::Tensor res_in = x;
      if (hooks != nullptr) hooks->OnLinearInput(L.res, &res_in);
      residual = at::linear(res_in, L.res_w, L.res_b);
      if (hooks != nullptr) hooks->OnLinear(L.res, res_in, &residual);
      if (!pack) residual = residual.mul(mask3);
    }

    at::Tensor qkv_w = L.qkv_w, qkv_b = L.qkv_b;
    if (trainable) {
      // A caller training the weights themselves set requires_grad on the query/key/value views: fuse those, so
      // that gradients reach them (the fused tensors do not track the views).
      bool any = false;
      for (int i = 0; i < 3; ++i) any = any || L.qkv_part_w[i].requires_grad() || L.qkv_part_b[i].requires_grad();
      if (any) {
        qkv_w = at::cat({L.qkv_part_w[0], L.qkv_part_w[1], L.qkv_part_w[2]}, 0);
        qkv_b = at::cat({L.qkv_part_b[0], L.qkv_part_b[1], L.qkv_part_b[2]}, 0);
      }
    }
    const at::Tensor qkv = at::linear(h, qkv_w, qkv_b);  // [B,T,3d]
    at::Tensor q = qkv.narrow(-1, 0, d);
    at::Tensor k = qkv.narrow(-1, d, d);
    at::Tensor v = qkv.narrow(-1, 2 * d, d);
    if (hooks != nullptr) {
      hooks->OnLinear(L.query, h, &q);
      hooks->OnLinear(L.key, h, &k);
      hooks->OnLinear(L.value, h, &v);
    }
    if (pack) layout.UnpackSlices(qkv, {&q, &k, &v});
    auto split_heads = [&](const at::Tensor& t) {
      return t.reshape({batch, length, L.num_heads, L.head_dim}).transpose(1, 2);  // [B,NH,T,DH]
    };
    q = split_heads(q);
    k = split_heads(k);
    v = split_heads(v);
    at::Tensor key_mask = mask;
    if (hooks != nullptr) {
      hooks->OnAttentionKeyValue(L.attention, &k, &v, &key_mask);
      if (!k.defined() || !v.defined() || k.dim() != 4 || v.dim() != 4 || k.size(2) != v.size(2) ||
          !key_mask.defined() || key_mask.dim() != 2 || key_mask.scalar_type() != at::kBool ||
          key_mask.size(0) != batch || key_mask.size(1) != k.size(2)) {
        return absl::InternalError(
            absl::StrCat("OnAttentionKeyValue hook for ", L.attention.name, " left inconsistent keys/values/mask"));
      }
    }
    at::Tensor scores = at::matmul(q.mul(L.attention_scale), k.transpose(-1, -2));  // [B,NH,T,Tk]
    const at::Tensor bias = key_mask.logical_not().to(dtype_).mul(attention_mask_bias_).unsqueeze(1).unsqueeze(1);
    scores = scores.add(bias);
    const at::Tensor probs = dtype_ == at::kFloat ? at::softmax(scores, -1)
                                                  : at::softmax(scores, -1, at::kFloat).to(dtype_);
    at::Tensor context = at::matmul(probs, v).transpose(1, 2).reshape({batch, length, d});
    if (pack) context = layout.Pack(context);
    if (hooks != nullptr) hooks->OnLinearInput(L.out_dense, &context);
    at::Tensor attention = at::linear(context, L.out_w, L.out_b);
    if (hooks != nullptr) {
      hooks->OnLinear(L.out_dense, context, &attention);
      hooks->OnBlockOutput(L.attention_block, &attention);
    }
    x = attention.add(residual);

    at::Tensor h2 = at::layer_norm(x, {L.hidden_size}, L.ln2_w, L.ln2_b, layer_norm_eps_);
    if (hooks != nullptr) hooks->OnLayerNorm(L.ln2, x, &h2);
    if (hooks != nullptr) hooks->OnLinearInput(L.ffn1, &h2);
    at::Tensor inner = at::linear(h2, L.ffn1_w, L.ffn1_b);
    if (hooks != nullptr) hooks->OnLinear(L.ffn1, h2, &inner);
    inner = inner.relu();
    if (hooks != nullptr) hooks->OnLinearInput(L.ffn2, &inner);
    at::Tensor ffn = at::linear(inner, L.ffn2_w, L.ffn2_b);
    if (hooks != nullptr) hooks->OnLinear(L.ffn2, inner, &ffn);
    if (!pack) ffn = ffn.mul(mask3);  // the graph runs the FFN on real tokens only (GatherNd / ScatterNd)
    if (hooks != nullptr) hooks->OnBlockOutput(L.ffn_block, &ffn);
    x = x.add(ffn);
  }

  ForwardOutput out;
  const at::Tensor states = (pack ? layout.Unpack(x) : x.mul(mask3)).to(at::kFloat);  // [B,T,H], zero at padding
  if (pack && hooks != nullptr) hooks->OnTokenLayout(TokenLayout::Padded(batch));  // the pooler: one per row
  const at::Tensor count = mask.sum(1, /*keepdim=*/true).clamp_min(1).to(at::kFloat);  // [B,1]
  at::Tensor mean = states.sum(1).div(count).to(dtype_);                              // [B,H]
  if (hooks != nullptr) hooks->OnLinearInput(pooler_module_, &mean);
  at::Tensor pooled = at::linear(mean, pool_w_, pool_b_);
  if (hooks != nullptr) hooks->OnLinear(pooler_module_, mean, &pooled);
  pooled = pooled.to(at::kFloat).tanh();
  pooled = pooled.mul(pooled.square().sum(-1, /*keepdim=*/true).clamp_min(l2_eps_).rsqrt());
  out.hidden_states = states;
  out.attention_mask = mask;
  out.pooled = pooled;
  return out;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Model>> LoadUseLiteModel(const std::string& dir, const ModelOptions& options) {
  return UseLiteModel::Load(dir, options);
}

}  // namespace model
}  // namespace deltaserve
