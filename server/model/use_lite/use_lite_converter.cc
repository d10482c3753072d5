#include "server/model/use_lite/use_lite_converter.h"

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <utility>
#include <vector>

#include <ATen/ops/empty.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"
#include "server/common/file_util.h"
#include "server/common/status_macros.h"
#include "server/common/torch_status.h"
#include "server/model/safetensors.h"
#include "server/model/use_lite/use_lite_tokenizer.h"

namespace deltaserve {
namespace model {
namespace {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "TF.js weight shards are little-endian");

// Graph node name prefixes of the USE-lite TF.js graph.
constexpr char kKona[] = "module_apply_default/Encoder_en/KonaTransformer/";
constexpr char kHidden[] = "module_apply_default/Encoder_en/hidden_layers/";

// The graph of model.json: node name -> (op, data inputs without ":N" output suffixes).
class Graph {
 public:
  static absl::StatusOr<Graph> Parse(const std::string& model_json) {
    nlohmann::json root = nlohmann::json::parse(model_json, nullptr, /*allow_exceptions=*/false);
    if (root.is_discarded() || !root.is_object()) return absl::InvalidArgumentError("model.json is not a JSON object");
    auto topology = root.find("modelTopology");
    if (topology == root.end() || !topology->is_object() || !topology->contains("node") ||
        !(*topology)["node"].is_array()) {
      return absl::InvalidArgumentError("model.json has no modelTopology.node array (not a TF.js graph model)");
    }
    Graph graph;
    for (const nlohmann::json& node : (*topology)["node"]) {
      if (!node.is_object() || !node.contains("name") || !node["name"].is_string() || !node.contains("op") ||
          !node["op"].is_string()) {
        return absl::InvalidArgumentError("model.json: a graph node lacks a string name or op");
      }
      Node n;
      n.op = node["op"].get<std::string>();
      if (node.contains("input") && node["input"].is_array()) {
        for (const nlohmann::json& input : node["input"]) {
          if (!input.is_string()) return absl::InvalidArgumentError("model.json: a node input is not a string");
          std::string name = input.get<std::string>();
          if (absl::StartsWith(name, "^")) continue;  // control dependency
          const size_t colon = name.rfind(':');
          if (colon != std::string::npos) name.resize(colon);
          n.inputs.push_back(std::move(name));
        }
      }
      graph.nodes_[node["name"].get<std::string>()] = std::move(n);
    }
    return graph;
  }

  bool Has(const std::string& name) const { return nodes_.count(name) > 0; }

  absl::Status Expect(const std::string& name, absl::string_view op) const {
    auto it = nodes_.find(name);
    if (it == nodes_.end()) return absl::InvalidArgumentError(absl::StrCat("model.json: graph node ", name, " is missing"));
    if (it->second.op != op) {
      return absl::InvalidArgumentError(
          absl::StrCat("model.json: graph node ", name, " is ", it->second.op, ", expected ", op));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<std::string> Input(const std::string& name, size_t index) const {
    auto it = nodes_.find(name);
    if (it == nodes_.end()) return absl::InvalidArgumentError(absl::StrCat("model.json: graph node ", name, " is missing"));
    if (index >= it->second.inputs.size()) {
      return absl::InvalidArgumentError(absl::StrCat("model.json: graph node ", name, " has no input ", index));
    }
    return it->second.inputs[index];
  }

  absl::Status ExpectInputs(const std::string& name, const std::vector<std::string>& inputs) const {
    auto it = nodes_.find(name);
    if (it == nodes_.end()) return absl::InvalidArgumentError(absl::StrCat("model.json: graph node ", name, " is missing"));
    if (it->second.inputs != inputs) {
      return absl::InvalidArgumentError(absl::StrCat("model.json: graph node ", name, " has inputs [",
                                                     absl::StrJoin(it->second.inputs, ", "), "], expected [",
                                                     absl::StrJoin(inputs, ", "), "]"));
    }
    return absl::OkStatus();
  }

 private:
  struct Node {
    std::string op;
    std::vector<std::string> inputs;
  };
  std::map<std::string, Node> nodes_;
};

class WeightTable {
 public:
  explicit WeightTable(const std::map<std::string, at::Tensor>& weights) : weights_(weights) {}

  absl::StatusOr<at::Tensor> Get(const std::string& name, const std::vector<int64_t>& shape) const {
    auto it = weights_.find(name);
    if (it == weights_.end()) {
      return absl::InvalidArgumentError(absl::StrCat("model.json: weight ", name, " is not in the weightsManifest"));
    }
    const std::vector<int64_t> actual(it->second.sizes().begin(), it->second.sizes().end());
    if (actual != shape) {
      return absl::InvalidArgumentError(
          absl::StrCat("model.json: weight ", name, " has shape ", ShapeString(actual), ", expected ", ShapeString(shape)));
    }
    return it->second;
  }

  // A weight whose shape is not known in advance; `rank` is checked.
  absl::StatusOr<at::Tensor> GetRank(const std::string& name, int64_t rank) const {
    auto it = weights_.find(name);
    if (it == weights_.end()) {
      return absl::InvalidArgumentError(absl::StrCat("model.json: weight ", name, " is not in the weightsManifest"));
    }
    if (it->second.dim() != rank || it->second.scalar_type() != at::kFloat) {
      return absl::InvalidArgumentError(
          absl::StrCat("model.json: weight ", name, " is not a rank-", rank, " float32 tensor"));
    }
    return it->second;
  }

  absl::StatusOr<double> Float(const std::string& name) const {
    DS_ASSIGN_OR_RETURN(at::Tensor t, Get(name, {}));
    if (t.scalar_type() != at::kFloat) return absl::InvalidArgumentError(absl::StrCat("weight ", name, " is not float32"));
    return static_cast<double>(t.data_ptr<float>()[0]);
  }

  absl::StatusOr<int64_t> Int(const std::string& name) const {
    DS_ASSIGN_OR_RETURN(at::Tensor t, Get(name, {}));
    if (t.scalar_type() != at::kInt) return absl::InvalidArgumentError(absl::StrCat("weight ", name, " is not int32"));
    return static_cast<int64_t>(t.data_ptr<int32_t>()[0]);
  }

 private:
  const std::map<std::string, at::Tensor>& weights_;
};

// A [in, out] kernel as a Linear weight [out, in].
at::Tensor AsLinearWeight(const at::Tensor& kernel) { return kernel.t().contiguous(); }

struct LayerNormNames {
  std::string scale, bias, eps;
};

absl::StatusOr<LayerNormNames> LayerNormWeights(const Graph& graph, const std::string& prefix) {
  // layer_norm: mean, sub_1, Square, Mean_1, add (+eps), Rsqrt, mul (scale * rsqrt), mul_1, add_1 (+bias).
  DS_RETURN_IF_ERROR(graph.Expect(prefix + "Rsqrt", "Rsqrt"));
  DS_RETURN_IF_ERROR(graph.Expect(prefix + "Square", "Square"));
  LayerNormNames names;
  DS_ASSIGN_OR_RETURN(names.scale, graph.Input(prefix + "mul", 0));
  DS_ASSIGN_OR_RETURN(names.bias, graph.Input(prefix + "add_1", 1));
  DS_ASSIGN_OR_RETURN(names.eps, graph.Input(prefix + "add", 1));
  return names;
}

}  // namespace

absl::StatusOr<std::map<std::string, at::Tensor>> ReadTfjsWeights(const std::string& tfjs_dir) {
  const std::string model_path = tfjs_dir + "/model.json";
  DS_ASSIGN_OR_RETURN(std::string text, ReadFileToString(model_path));
  nlohmann::json root = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded() || !root.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(model_path, " is not a JSON object"));
  }
  auto manifest = root.find("weightsManifest");
  if (manifest == root.end() || !manifest->is_array() || manifest->empty()) {
    return absl::InvalidArgumentError(absl::StrCat(model_path, " has no weightsManifest array"));
  }
  std::map<std::string, at::Tensor> weights;
  for (size_t g = 0; g < manifest->size(); ++g) {
    const nlohmann::json& group = (*manifest)[g];
    const std::string where = absl::StrCat(model_path, ": weightsManifest[", g, "]");
    if (!group.is_object() || !group.contains("paths") || !group["paths"].is_array() || !group.contains("weights") ||
        !group["weights"].is_array()) {
      return absl::InvalidArgumentError(absl::StrCat(where, " lacks a paths or weights array"));
    }
    // The group's weights are one stream over its shards in order.
    std::string stream;
    std::vector<std::pair<std::string, uint64_t>> shard_ends;  // shard path, stream offset after it
    for (const nlohmann::json& p : group["paths"]) {
      if (!p.is_string()) return absl::InvalidArgumentError(absl::StrCat(where, ": a path is not a string"));
      const std::string rel = p.get<std::string>();
      if (rel.empty() || rel[0] == '/' || absl::StrContains(rel, "..")) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": shard path '", rel, "' is not a plain relative name"));
      }
      const std::string path = tfjs_dir + "/" + rel;
      DS_ASSIGN_OR_RETURN(std::string shard, ReadFileToString(path));
      stream += shard;
      shard_ends.emplace_back(path, stream.size());
    }
    uint64_t offset = 0;
    for (const nlohmann::json& w : group["weights"]) {
      if (!w.is_object() || !w.contains("name") || !w["name"].is_string() || !w.contains("shape") ||
          !w["shape"].is_array() || !w.contains("dtype") || !w["dtype"].is_string()) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": a weight lacks a string name, shape array or dtype"));
      }
      const std::string name = w["name"].get<std::string>();
      if (w.contains("quantization")) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": weight ", name, " is quantised (not supported)"));
      }
      const std::string dtype = w["dtype"].get<std::string>();
      c10::ScalarType type;
      if (dtype == "float32") {
        type = at::kFloat;
      } else if (dtype == "int32") {
        type = at::kInt;
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": weight ", name, " has dtype ", dtype, " (only float32 and int32 are supported)"));
      }
      std::vector<int64_t> shape;
      uint64_t count = 1;
      for (const nlohmann::json& d : w["shape"]) {
        if (!d.is_number_integer() || d.get<int64_t>() < 0 || d.get<int64_t>() > (int64_t{1} << 32)) {
          return absl::InvalidArgumentError(absl::StrCat(where, ": weight ", name, " has an invalid shape"));
        }
        shape.push_back(d.get<int64_t>());
        count *= static_cast<uint64_t>(shape.back());
        if (count > (uint64_t{1} << 34)) {
          return absl::InvalidArgumentError(absl::StrCat(where, ": weight ", name, " is implausibly large"));
        }
      }
      const uint64_t bytes = count * 4;
      if (offset + bytes > stream.size()) {
        return absl::InvalidArgumentError(absl::StrCat(
            where, ": the shards hold ", stream.size(), " bytes but weight ", name, " ", ShapeString(shape),
            " needs bytes [", offset, ", ", offset + bytes, ") (truncated or missing shard, last shard ",
            shard_ends.empty() ? std::string("none") : shard_ends.back().first, ")"));
      }
      if (weights.count(name)) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": weight ", name, " appears twice"));
      }
      DS_ASSIGN_OR_RETURN(at::Tensor t, TorchCall([&] { return at::empty(shape, at::TensorOptions().dtype(type)); },
                                                  "allocating a weight"));
      if (bytes > 0) std::memcpy(t.data_ptr(), stream.data() + offset, bytes);
      weights.emplace(name, std::move(t));
      offset += bytes;
    }
    if (offset != stream.size()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": the shards hold ", stream.size(),
                                                     " bytes but the manifest describes ", offset,
                                                     " (extra or wrong shard data)"));
    }
  }
  return weights;
}

absl::StatusOr<UseLiteConversion> ConvertUseLiteWeights(const std::string& model_json,
                                                        const std::map<std::string, at::Tensor>& tfjs_weights,
                                                        const UseLiteConvertOptions& options) {
  DS_ASSIGN_OR_RETURN(Graph graph, Graph::Parse(model_json));
  WeightTable w(tfjs_weights);
  UseLiteConversion out;
  std::map<std::string, at::Tensor>& t = out.tensors;
  nlohmann::json config;
  const std::string kona = kKona;
  const std::string hidden = kHidden;
  const std::string stack = kona + "Encode/TransformerStack/";

  // Input: ClipToMaxLength keeps positions < max_length.
  DS_RETURN_IF_ERROR(graph.Expect(kona + "ClipToMaxLength/Less", "Less"));
  DS_ASSIGN_OR_RETURN(std::string clip_name, graph.Input(kona + "ClipToMaxLength/Less", 1));
  DS_ASSIGN_OR_RETURN(int64_t max_length, w.Int(clip_name));
  if (max_length <= 0) return absl::InvalidArgumentError("model.json: ClipToMaxLength is not positive");

  // Token embeddings.
  DS_RETURN_IF_ERROR(graph.Expect(kona + "Encode/embedding_lookup", "GatherV2"));
  DS_ASSIGN_OR_RETURN(std::string emb_name, graph.Input(kona + "Encode/embedding_lookup", 0));
  DS_ASSIGN_OR_RETURN(at::Tensor emb, w.GetRank(emb_name, 2));
  const int64_t vocab = emb.size(0);
  const int64_t emb_size = emb.size(1);
  t["embeddings.word_embeddings.weight"] = emb.contiguous();

  // Timing signal: [sin(pos * inv_timescales), cos(pos * inv_timescales)] added to the embeddings, and the sum
  // added to the embeddings once more (Layer_0/add = Scatter(embeddings) + Scatter(embeddings + timing)).
  const std::string timing = stack + "Layer_0/AddTimingSignal/";
  DS_RETURN_IF_ERROR(graph.Expect(timing + "TimingSignal/Sin", "Sin"));
  DS_RETURN_IF_ERROR(graph.Expect(timing + "TimingSignal/Cos", "Cos"));
  DS_RETURN_IF_ERROR(graph.Expect(timing + "TimingSignal/concat", "ConcatV2"));
  {
    DS_ASSIGN_OR_RETURN(std::string sin_in, graph.Input(timing + "TimingSignal/concat", 0));
    DS_ASSIGN_OR_RETURN(std::string cos_in, graph.Input(timing + "TimingSignal/concat", 1));
    if (sin_in != timing + "TimingSignal/Sin" || cos_in != timing + "TimingSignal/Cos") {
      return absl::InvalidArgumentError("model.json: the timing signal is not concat(sin, cos)");
    }
  }
  DS_ASSIGN_OR_RETURN(std::string inv_name, graph.Input(timing + "TimingSignal/mul_2", 1));
  DS_ASSIGN_OR_RETURN(at::Tensor inv, w.GetRank(inv_name, 2));
  if (inv.size(0) != 1 || 2 * inv.size(1) != emb_size) {
    return absl::InvalidArgumentError("model.json: timing-signal timescales do not match the embedding width");
  }
  t["embeddings.timing_signal.inv_timescales"] = inv.reshape({inv.size(1)}).contiguous();
  DS_RETURN_IF_ERROR(graph.ExpectInputs(timing + "add", {timing + "Gather/GatherNd", timing + "TimingSignal/concat"}));
  DS_RETURN_IF_ERROR(graph.ExpectInputs(timing + "Gather/GatherNd",
                                        {kona + "Encode/Scatter/ScatterNd", stack + "Layer_1/TransformerLayer/FFN/StoreMask/ToInt32"}));
  DS_RETURN_IF_ERROR(graph.ExpectInputs(stack + "Layer_0/add",
                                        {kona + "Encode/Scatter/ScatterNd", timing + "Scatter/ScatterNd"}));
  const double token_embedding_multiplier = 2.0;

  // Transformer layers.
  double layer_norm_eps = -1;
  nlohmann::json layers = nlohmann::json::array();
  std::string previous_output = stack + "Layer_0/add";
  int64_t width = emb_size;
  int64_t num_layers = 0;
  double mask_bias = 0;
  for (int64_t l = 0;; ++l) {
    const std::string tl = absl::StrCat(stack, "Layer_", l, "/TransformerLayer/");
    if (!graph.Has(tl + "MultiheadAttention/qkv_transform_single/Conv2D")) break;
    ++num_layers;
    const std::string mha = tl + "MultiheadAttention/";
    const std::string p = absl::StrCat("encoder.layer.", l, ".");
    nlohmann::json layer;
    layer["input_size"] = width;

    auto layer_norm = [&](const std::string& graph_prefix, const std::string& module,
                          int64_t size) -> absl::Status {
      DS_ASSIGN_OR_RETURN(LayerNormNames n, LayerNormWeights(graph, graph_prefix));
      DS_ASSIGN_OR_RETURN(at::Tensor scale, w.Get(n.scale, {size}));
      DS_ASSIGN_OR_RETURN(at::Tensor bias, w.Get(n.bias, {size}));
      DS_ASSIGN_OR_RETURN(double eps, w.Float(n.eps));
      if (layer_norm_eps >= 0 && eps != layer_norm_eps) {
        return absl::InvalidArgumentError("model.json: the layer norms use different epsilons");
      }
      layer_norm_eps = eps;
      t[module + ".weight"] = scale.contiguous();
      t[module + ".bias"] = bias.contiguous();
      return absl::OkStatus();
    };

    // Pre-attention layer norm.
    DS_ASSIGN_OR_RETURN(std::string ln_in, graph.Input(tl + "layer_prepostprocess/layer_norm/Mean", 0));
    if (ln_in != previous_output) {
      return absl::InvalidArgumentError(absl::StrCat("model.json: layer ", l, " does not read the previous output"));
    }
    DS_RETURN_IF_ERROR(layer_norm(tl + "layer_prepostprocess/layer_norm/", p + "attention.LayerNorm", width));

    // Fused qkv projection (a 1x1 Conv2D), split into query/key/value.
    DS_RETURN_IF_ERROR(graph.Expect(mha + "qkv_transform_single/Conv2D", "Conv2D"));
    DS_ASSIGN_OR_RETURN(std::string qkv_name, graph.Input(mha + "qkv_transform_single/Conv2D", 1));
    DS_ASSIGN_OR_RETURN(at::Tensor qkv, w.Get(qkv_name, {1, 1, width, 3 * width}));
    DS_ASSIGN_OR_RETURN(std::string qkv_bias_name, graph.Input(mha + "qkv_transform_single/BiasAdd", 1));
    DS_ASSIGN_OR_RETURN(at::Tensor qkv_bias, w.Get(qkv_bias_name, {3 * width}));
    DS_ASSIGN_OR_RETURN(std::string split_name, graph.Input(mha + "split", 1));
    DS_ASSIGN_OR_RETURN(at::Tensor split, w.Get(split_name, {3}));
    for (int i = 0; i < 3; ++i) {
      if (split.data_ptr<int32_t>()[i] != width) {
        return absl::InvalidArgumentError(absl::StrCat("model.json: layer ", l, " does not split qkv evenly"));
      }
    }
    const at::Tensor kernel = qkv.reshape({width, 3 * width});
    const char* parts[] = {"query", "key", "value"};
    for (int i = 0; i < 3; ++i) {
      t[p + "attention.self." + parts[i] + ".weight"] = AsLinearWeight(kernel.narrow(1, i * width, width));
      t[p + "attention.self." + parts[i] + ".bias"] = qkv_bias.narrow(0, i * width, width).contiguous();
    }

    // Heads: split_last_dimension reshapes [B, T, d] to [B, T, heads, head_dim].
    const std::string heads_shape = mha + "split_heads/split_last_dimension/Reshape/shape";
    DS_ASSIGN_OR_RETURN(std::string heads_name, graph.Input(heads_shape, 2));
    DS_ASSIGN_OR_RETURN(std::string head_dim_name, graph.Input(heads_shape, 3));
    DS_ASSIGN_OR_RETURN(int64_t heads, w.Int(heads_name));
    DS_ASSIGN_OR_RETURN(int64_t head_dim, w.Int(head_dim_name));
    if (heads <= 0 || head_dim <= 0 || heads * head_dim != width) {
      return absl::InvalidArgumentError(absl::StrCat("model.json: layer ", l, " heads x head_dim != width"));
    }
    DS_ASSIGN_OR_RETURN(std::string scale_name, graph.Input(mha + "mul", 1));
    DS_ASSIGN_OR_RETURN(double scale, w.Float(scale_name));
    // The padding bias: (1 - mask) * mask_bias added to the scores.
    const std::string dpa = mha + "DotProductAttention/BaseDotProductAttention/";
    DS_RETURN_IF_ERROR(graph.Expect(dpa + "Softmax", "Softmax"));
    DS_ASSIGN_OR_RETURN(std::string bias1, graph.Input(dpa + "add", 1));
    DS_ASSIGN_OR_RETURN(std::string bias2, graph.Input(bias1, 0));
    DS_ASSIGN_OR_RETURN(std::string bias3, graph.Input(bias2, 0));
    DS_RETURN_IF_ERROR(graph.Expect(bias3, "Mul"));
    DS_ASSIGN_OR_RETURN(std::string bias_value_name, graph.Input(bias3, 1));
    DS_ASSIGN_OR_RETURN(mask_bias, w.Float(bias_value_name));

    // Output projection d -> hidden.
    DS_ASSIGN_OR_RETURN(std::string out_name, graph.Input(mha + "output_transform_single/Conv2D", 1));
    DS_ASSIGN_OR_RETURN(at::Tensor out_kernel, w.GetRank(out_name, 4));
    const int64_t hidden_size = out_kernel.size(3);
    if (out_kernel.size(0) != 1 || out_kernel.size(1) != 1 || out_kernel.size(2) != width) {
      return absl::InvalidArgumentError(absl::StrCat("model.json: layer ", l, " output_transform has a bad shape"));
    }
    DS_ASSIGN_OR_RETURN(std::string out_bias_name, graph.Input(mha + "output_transform_single/BiasAdd", 1));
    DS_ASSIGN_OR_RETURN(at::Tensor out_bias, w.Get(out_bias_name, {hidden_size}));
    t[p + "attention.output.dense.weight"] = AsLinearWeight(out_kernel.reshape({width, hidden_size}));
    t[p + "attention.output.dense.bias"] = out_bias.contiguous();

    // Residual: the layer input, or its projection (AdjustResidualInput/dense) when the width changes.
    const std::string residual = tl + "AdjustResidualInput/";
    const bool projection = graph.Has(residual + "dense/MatMul");
    if (projection) {
      DS_ASSIGN_OR_RETURN(std::string dense_name, graph.Input(residual + "dense/MatMul", 1));
      DS_ASSIGN_OR_RETURN(at::Tensor dense, w.Get(dense_name, {width, hidden_size}));
      DS_ASSIGN_OR_RETURN(std::string dense_bias_name, graph.Input(residual + "dense/BiasAdd", 1));
      DS_ASSIGN_OR_RETURN(at::Tensor dense_bias, w.Get(dense_bias_name, {hidden_size}));
      t[p + "residual.dense.weight"] = AsLinearWeight(dense);
      t[p + "residual.dense.bias"] = dense_bias.contiguous();
      DS_RETURN_IF_ERROR(graph.ExpectInputs(tl + "layer_postprocess/add",
                                            {mha + "Squeeze_1", residual + "Scatter/ScatterNd"}));
    } else {
      if (hidden_size != width) {
        return absl::InvalidArgumentError(absl::StrCat("model.json: layer ", l, " changes width without a projection"));
      }
      DS_RETURN_IF_ERROR(graph.ExpectInputs(tl + "layer_postprocess/add", {mha + "Squeeze_1", previous_output}));
    }

    // FFN on the real tokens: layer norm, conv1 (dense + ReLU), conv2, residual add.
    const std::string ffn = tl + "FFN/";
    DS_RETURN_IF_ERROR(layer_norm(ffn + "layer_prepostprocess/layer_norm/", p + "intermediate.LayerNorm", hidden_size));
    DS_RETURN_IF_ERROR(graph.Expect(ffn + "conv1/Relu", "Relu"));
    DS_ASSIGN_OR_RETURN(std::string conv1_name, graph.Input(ffn + "conv1/Tensordot/MatMul", 1));
    DS_ASSIGN_OR_RETURN(at::Tensor conv1, w.GetRank(conv1_name, 2));
    const int64_t intermediate = conv1.size(1);
    if (conv1.size(0) != hidden_size) {
      return absl::InvalidArgumentError(absl::StrCat("model.json: layer ", l, " conv1 has a bad shape"));
    }
    DS_ASSIGN_OR_RETURN(std::string conv1_bias_name, graph.Input(ffn + "conv1/BiasAdd", 1));
    DS_ASSIGN_OR_RETURN(at::Tensor conv1_bias, w.Get(conv1_bias_name, {intermediate}));
    DS_ASSIGN_OR_RETURN(std::string conv2_name, graph.Input(ffn + "conv2/Tensordot/MatMul", 1));
    DS_ASSIGN_OR_RETURN(at::Tensor conv2, w.Get(conv2_name, {intermediate, hidden_size}));
    DS_ASSIGN_OR_RETURN(std::string conv2_bias_name, graph.Input(ffn + "conv2/BiasAdd", 1));
    DS_ASSIGN_OR_RETURN(at::Tensor conv2_bias, w.Get(conv2_bias_name, {hidden_size}));
    t[p + "intermediate.dense.weight"] = AsLinearWeight(conv1);
    t[p + "intermediate.dense.bias"] = conv1_bias.contiguous();
    t[p + "output.dense.weight"] = AsLinearWeight(conv2);
    t[p + "output.dense.bias"] = conv2_bias.contiguous();
    DS_RETURN_IF_ERROR(graph.ExpectInputs(ffn + "layer_postprocess/add",
                                          {ffn + "Scatter/ScatterNd", tl + "layer_postprocess/add"}));

    layer["hidden_size"] = hidden_size;
    layer["num_attention_heads"] = heads;
    layer["attention_head_size"] = head_dim;
    layer["attention_scale"] = scale;
    layer["intermediate_size"] = intermediate;
    layer["residual_projection"] = projection;
    layers.push_back(layer);
    previous_output = ffn + "layer_postprocess/add";
    width = hidden_size;
  }
  if (num_layers == 0) return absl::InvalidArgumentError("model.json: no KonaTransformer layers found");

  // Pooling: masked mean over tokens, tanh layer, L2 normalisation.
  DS_RETURN_IF_ERROR(graph.ExpectInputs(kona + "mul", {previous_output, kona + "ExpandDims"}));
  DS_RETURN_IF_ERROR(graph.Expect(kona + "div", "RealDiv"));
  DS_RETURN_IF_ERROR(graph.Expect(hidden + "tanh_layer_0/Tanh", "Tanh"));
  DS_ASSIGN_OR_RETURN(std::string tanh_in, graph.Input(hidden + "tanh_layer_0/MatMul", 0));
  if (tanh_in != kona + "div") return absl::InvalidArgumentError("model.json: the tanh layer does not read the mean");
  DS_ASSIGN_OR_RETURN(std::string tanh_name, graph.Input(hidden + "tanh_layer_0/MatMul", 1));
  DS_ASSIGN_OR_RETURN(at::Tensor tanh_w, w.GetRank(tanh_name, 2));
  if (tanh_w.size(0) != width) return absl::InvalidArgumentError("model.json: the tanh layer has a bad shape");
  const int64_t embedding_dim = tanh_w.size(1);
  DS_ASSIGN_OR_RETURN(std::string tanh_bias_name, graph.Input(hidden + "tanh_layer_0/BiasAdd", 1));
  DS_ASSIGN_OR_RETURN(at::Tensor tanh_b, w.Get(tanh_bias_name, {embedding_dim}));
  t["pooler.dense.weight"] = AsLinearWeight(tanh_w);
  t["pooler.dense.bias"] = tanh_b.contiguous();
  DS_RETURN_IF_ERROR(graph.Expect(hidden + "l2_normalize/Rsqrt", "Rsqrt"));
  DS_ASSIGN_OR_RETURN(std::string l2_name, graph.Input(hidden + "l2_normalize/Maximum", 1));
  DS_ASSIGN_OR_RETURN(double l2_eps, w.Float(l2_name));

  config["model_type"] = "use-lite";
  config["architecture"] = "KonaTransformer";
  config["name"] = options.name;
  config["source"] = options.source;
  config["vocab_size"] = vocab;
  config["embedding_size"] = emb_size;
  config["hidden_size"] = width;
  config["embedding_dim"] = embedding_dim;
  config["num_hidden_layers"] = num_layers;
  config["num_attention_heads"] = layers[0]["num_attention_heads"];
  config["intermediate_size"] = layers[num_layers - 1]["intermediate_size"];
  config["max_position_embeddings"] = max_length;
  config["num_timescales"] = inv.size(1);
  config["token_embedding_multiplier"] = token_embedding_multiplier;
  config["layer_norm_eps"] = layer_norm_eps;
  config["attention_mask_bias"] = mask_bias;
  config["l2_normalize_eps"] = l2_eps;
  config["pooling"] = "mean+tanh+l2";
  config["layers"] = layers;
  out.config_json = config.dump(2) + "\n";
  return out;
}

absl::Status ConvertUseLiteDirectory(const std::string& tfjs_dir, const std::string& out_dir,
                                     const UseLiteConvertOptions& options) {
  DS_ASSIGN_OR_RETURN(std::string model_json, ReadFileToString(tfjs_dir + "/model.json"));
  DS_ASSIGN_OR_RETURN(auto weights, ReadTfjsWeights(tfjs_dir));
  DS_ASSIGN_OR_RETURN(UseLiteConversion conversion, ConvertUseLiteWeights(model_json, weights, options));
  const std::string vocab_path = tfjs_dir + "/vocab.json";
  DS_ASSIGN_OR_RETURN(std::string vocab, ReadFileToString(vocab_path));
  DS_ASSIGN_OR_RETURN(auto tokenizer, UseLiteTokenizer::FromJson(vocab, vocab_path));
  const int64_t vocab_rows = conversion.tensors.at("embeddings.word_embeddings.weight").size(0);
  if (tokenizer->vocab_size() > vocab_rows) {
    return absl::InvalidArgumentError(absl::StrCat(vocab_path, " has ", tokenizer->vocab_size(),
                                                   " pieces but the embedding table only ", vocab_rows, " rows"));
  }
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) return absl::PermissionDeniedError(absl::StrCat("cannot create ", out_dir, ": ", ec.message()));
  DS_RETURN_IF_ERROR(WriteSafetensors(out_dir + "/model.safetensors", conversion.tensors,
                                      {{"format", "pt"}, {"source", options.source}}));
  DS_RETURN_IF_ERROR(WriteFileAtomically(out_dir + "/vocab.json", vocab));
  // config.json last: its presence marks a complete directory.
  DS_RETURN_IF_ERROR(WriteFileAtomically(out_dir + "/config.json", conversion.config_json));
  return absl::OkStatus();
}

}  // namespace model
}  // namespace deltaserve
