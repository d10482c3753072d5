#include "server/model/use_lite/use_lite_model.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <ATen/core/grad_mode.h>
#include <ATen/ops/allclose.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/full.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/zeros.h>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/model/model_loader.h"
#include "server/model/safetensors.h"
#include "tests/model/use_lite/test_paths.h"

namespace deltaserve {
namespace model {
namespace {

using ::testing::HasSubstr;

struct Reference {
  std::vector<std::string> sentences;
  std::vector<std::vector<int64_t>> ids;
  std::vector<std::vector<float>> embeddings;
};

Reference LoadReference(const std::string& file) {
  const nlohmann::json j = nlohmann::json::parse(testing::ReadFileOrDie(testing::TestDataDir() + "/" + file));
  Reference ref;
  ref.sentences = j["sentences"].get<std::vector<std::string>>();
  ref.ids = j["token_ids"].get<std::vector<std::vector<int64_t>>>();
  ref.embeddings = j["embeddings"].get<std::vector<std::vector<float>>>();
  return ref;
}

// Right-padded batch of id rows (padding id 0).
ForwardInput MakeBatch(const std::vector<std::vector<int64_t>>& rows) {
  size_t length = 0;
  for (const auto& r : rows) length = std::max(length, r.size());
  const int64_t b = static_cast<int64_t>(rows.size()), t = static_cast<int64_t>(length);
  ForwardInput input;
  input.input_ids = at::zeros({b, t}, at::kLong);
  input.attention_mask = at::zeros({b, t}, at::kBool);
  auto ids = input.input_ids.accessor<int64_t, 2>();
  auto mask = input.attention_mask.accessor<bool, 2>();
  for (int64_t i = 0; i < b; ++i) {
    for (size_t j = 0; j < rows[i].size(); ++j) {
      ids[i][j] = rows[i][j];
      mask[i][j] = true;
    }
  }
  return input;
}

double Cosine(const at::Tensor& row, const std::vector<float>& ref) {
  const at::Tensor a = row.to(at::kDouble).contiguous();
  const double* p = a.data_ptr<double>();
  double dot = 0, na = 0, nb = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    dot += p[i] * ref[i];
    na += p[i] * p[i];
    nb += static_cast<double>(ref[i]) * ref[i];
  }
  return dot / std::sqrt(na * nb);
}

class UseLiteModelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string dir = testing::UseLiteModelDir();
    if (dir.empty()) return;
    auto model = LoadUseLiteModel(dir, ModelOptions());
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = model->release();
  }
  static void TearDownTestSuite() {
    delete model_;
    model_ = nullptr;
  }
  void SetUp() override {
    if (model_ == nullptr) GTEST_SKIP() << testing::kNoModelMessage;
  }
  static Model* model_;
};
Model* UseLiteModelTest::model_ = nullptr;

TEST_F(UseLiteModelTest, InfoDescribesTheConvertedModel) {
  const ModelInfo& info = model_->info();
  EXPECT_EQ(info.family, "use-lite");
  EXPECT_EQ(info.vocab_size, 8002);
  EXPECT_EQ(info.hidden_size, 512);
  EXPECT_EQ(info.embedding_dim, 512);
  EXPECT_EQ(info.num_layers, 2);
  EXPECT_EQ(info.num_heads, 4);
  EXPECT_EQ(info.max_sequence_length, 128);
  EXPECT_EQ(info.pooling, "mean+tanh+l2");
  EXPECT_EQ(info.dtype, "float32");
  EXPECT_EQ(info.device, "cpu");
  EXPECT_GT(info.num_parameters, 6900000);
  EXPECT_LT(info.num_parameters, 7100000);
  EXPECT_EQ(model_->tokenizer().vocab_size(), 8000);
}

TEST_F(UseLiteModelTest, ModulesAndParametersUseStableDottedNames) {
  std::vector<std::string> names;
  for (const ModuleInfo& m : model_->modules()) names.push_back(m.name);
  const std::vector<std::string> expected_prefix = {
      "embeddings.word_embeddings",
      "encoder.layer.0.attention.LayerNorm",
      "encoder.layer.0.residual.dense",
      "encoder.layer.0.attention.self.query",
      "encoder.layer.0.attention.self.key",
      "encoder.layer.0.attention.self.value",
      "encoder.layer.0.attention.self",
      "encoder.layer.0.attention.output.dense",
      "encoder.layer.0.attention.output",
      "encoder.layer.0.intermediate.LayerNorm",
      "encoder.layer.0.intermediate.dense",
      "encoder.layer.0.output.dense",
      "encoder.layer.0.output",
      "encoder.layer.1.attention.LayerNorm",
  };
  ASSERT_GE(names.size(), expected_prefix.size());
  EXPECT_EQ(std::vector<std::string>(names.begin(), names.begin() + expected_prefix.size()), expected_prefix);
  EXPECT_EQ(names.back(), "pooler.dense");
  EXPECT_EQ(names.size(), 1u + 12u + 11u + 1u);

  const auto& params = model_->parameters();
  int64_t linear_count = 0;
  for (const ModuleInfo& m : model_->modules()) {
    if (m.kind == ModuleKind::kLinear) {
      ++linear_count;
      ASSERT_TRUE(params.count(m.name + ".weight")) << m.name;
      ASSERT_TRUE(params.count(m.name + ".bias")) << m.name;
      EXPECT_EQ(params.at(m.name + ".weight").sizes(), at::IntArrayRef({m.out_features, m.in_features})) << m.name;
    }
    if (m.kind == ModuleKind::kAttention) {
      EXPECT_EQ(m.num_heads * m.head_dim, m.out_features);
    }
  }
  EXPECT_EQ(linear_count, 7 + 6 + 1);
  EXPECT_EQ(params.at("embeddings.word_embeddings.weight").sizes(), at::IntArrayRef({8002, 256}));
  EXPECT_EQ(params.at("encoder.layer.1.attention.self.value.weight").sizes(), at::IntArrayRef({512, 512}));
  int64_t total = 0;
  for (const auto& [name, t] : params) total += t.numel();
  EXPECT_EQ(total, model_->info().num_parameters);
}

TEST_F(UseLiteModelTest, EmbeddingsMatchUpstreamReference) {
  const Reference ref = LoadReference("reference_embeddings.json");
  double min_cos = 1;
  for (size_t i = 0; i < ref.sentences.size(); ++i) {
    auto ids = model_->tokenizer().Encode(ref.sentences[i]);
    ASSERT_TRUE(ids.ok());
    ASSERT_EQ(*ids, ref.ids[i]);
    auto out = model_->Forward(MakeBatch({*ids}), nullptr);
    ASSERT_TRUE(out.ok()) << out.status();
    ASSERT_EQ(out->pooled.sizes(), at::IntArrayRef({1, 512}));
    EXPECT_EQ(out->pooled.scalar_type(), at::kFloat);
    const double cos = Cosine(out->pooled[0], ref.embeddings[i]);
    EXPECT_GE(cos, 0.9999) << ref.sentences[i];
    min_cos = std::min(min_cos, cos);
  }
  std::printf("min cosine vs upstream (reference_embeddings.json): %.9f (1 - cos = %.3g)\n", min_cos, 1 - min_cos);
}

TEST_F(UseLiteModelTest, EdgeCaseEmbeddingsMatchUpstream) {
  const Reference ref = LoadReference("extra_reference.json");
  const int64_t max_len = model_->info().max_sequence_length;
  const at::Tensor pooler_bias = model_->parameters().at("pooler.dense.bias").to(at::kDouble);
  double min_cos = 1;
  for (size_t i = 0; i < ref.sentences.size(); ++i) {
    auto ids = model_->tokenizer().Encode(ref.sentences[i]);
    ASSERT_TRUE(ids.ok());
    ASSERT_EQ(*ids, ref.ids[i]) << i;
    at::Tensor pooled;
    if (ids->empty()) {
      // No tokens: upstream's mean is 0, so its embedding is l2_normalize(tanh(pooler bias)).
      pooled = pooler_bias.tanh().unsqueeze(0);
    } else {
      auto out = model_->Forward(MakeBatch({model_->tokenizer().Truncate(*ids, max_len)}), nullptr);
      ASSERT_TRUE(out.ok()) << out.status();
      pooled = out->pooled;
    }
    const double cos = Cosine(pooled[0], ref.embeddings[i]);
    EXPECT_GE(cos, 0.9999) << i << ": " << ref.sentences[i];
    min_cos = std::min(min_cos, cos);
  }
  std::printf("min cosine vs upstream (extra_reference.json): %.9f (1 - cos = %.3g)\n", min_cos, 1 - min_cos);
}

TEST_F(UseLiteModelTest, PaddedBatchRowsEqualSoloRuns) {
  const Reference ref = LoadReference("reference_embeddings.json");
  auto batch = model_->Forward(MakeBatch(ref.ids), nullptr);
  ASSERT_TRUE(batch.ok()) << batch.status();
  ASSERT_EQ(batch->hidden_states.size(0), 6);
  ASSERT_EQ(batch->hidden_states.size(2), 512);
  double max_diff = 0;
  for (size_t i = 0; i < ref.ids.size(); ++i) {
    auto solo = model_->Forward(MakeBatch({ref.ids[i]}), nullptr);
    ASSERT_TRUE(solo.ok());
    const int64_t n = static_cast<int64_t>(ref.ids[i].size());
    const double pooled_diff = batch->pooled[i].sub(solo->pooled[0]).abs().max().item<double>();
    const double hidden_diff =
        batch->hidden_states[i].narrow(0, 0, n).sub(solo->hidden_states[0]).abs().max().item<double>();
    EXPECT_LE(pooled_diff, 1e-5) << i;
    EXPECT_LE(hidden_diff, 1e-4) << i;
    // Padding positions of hidden_states are zero.
    if (n < batch->hidden_states.size(1)) {
      EXPECT_EQ(batch->hidden_states[i].narrow(0, n, batch->hidden_states.size(1) - n).abs().max().item<float>(), 0);
    }
    max_diff = std::max(max_diff, pooled_diff);
  }
  std::printf("max |padded - solo| of pooled: %.3g\n", max_diff);
}

TEST_F(UseLiteModelTest, ForwardTrainableEqualsForward) {
  const Reference ref = LoadReference("reference_embeddings.json");
  const ForwardInput input = MakeBatch(ref.ids);
  auto out = model_->Forward(input, nullptr);
  auto trained = model_->ForwardTrainable(input, nullptr);
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_TRUE(trained.ok()) << trained.status();
  ASSERT_EQ(trained->hidden_states.sizes(), out->hidden_states.sizes());
  EXPECT_LE(trained->pooled.sub(out->pooled).abs().max().item<double>(), 1e-6);
  // |h| reaches ~30: relative to the magnitude.
  EXPECT_LE(trained->hidden_states.sub(out->hidden_states).abs().max().item<double>(), 1e-6 * 32);
  EXPECT_FALSE(trained->pooled.requires_grad()) << "the backbone's weights do not require grad";
}

// Full fine-tuning of a private copy: requires_grad on the parameters (the query / key / value views of the fused
// projection included) and a backward pass reach them; the gradient matches a finite difference.
TEST_F(UseLiteModelTest, ForwardTrainableGivesGradientsToWeightsThatRequireThem) {
  auto loaded = LoadUseLiteModel(testing::UseLiteModelDir(), ModelOptions());
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  std::unique_ptr<Model> model = std::move(loaded).value();
  const Reference ref = LoadReference("reference_embeddings.json");
  const ForwardInput input = MakeBatch(ref.ids);
  auto before = model->Forward(input, nullptr);
  ASSERT_TRUE(before.ok()) << before.status();
  const std::vector<std::string> names = {
      "encoder.layer.0.attention.self.key.weight", "encoder.layer.0.attention.self.value.bias",
      "encoder.layer.1.output.dense.weight", "embeddings.word_embeddings.weight", "pooler.dense.bias"};
  for (const std::string& name : names) const_cast<at::Tensor&>(model->parameters().at(name)).requires_grad_(true);
  at::Tensor probe = at::zeros(before->pooled.sizes(), at::kFloat);
  probe.select(1, 0).fill_(1);
  probe.select(1, 7).fill_(-2);
  auto loss_of = [&](const ForwardOutput& out) { return out.pooled.mul(probe).sum(); };
  auto trained = model->ForwardTrainable(input, nullptr);
  ASSERT_TRUE(trained.ok()) << trained.status();
  EXPECT_LE(trained->pooled.sub(before->pooled).abs().max().item<double>(), 1e-6);
  loss_of(*trained).backward();
  for (const auto& [name, t] : model->parameters()) {
    const bool trains = std::find(names.begin(), names.end(), name) != names.end();
    EXPECT_EQ(t.grad().defined(), trains) << name;
    if (!trains) continue;
    EXPECT_TRUE(t.grad().isfinite().all().item<bool>()) << name;
    EXPECT_GT(t.grad().abs().max().item<double>(), 0) << name;
  }
  const at::Tensor& key = model->parameters().at(names[0]);
  const double g = key.grad()[3][5].item<double>();
  const double h = 1e-2;
  double loss_at[2];
  for (int side = 0; side < 2; ++side) {
    {
      at::NoGradGuard no_grad;
      key[3][5].add_(side == 0 ? h : -2 * h);
    }
    auto out = model->Forward(input, nullptr);
    ASSERT_TRUE(out.ok()) << out.status();
    loss_at[side] = loss_of(*out).item<double>();
  }
  const double numeric = (loss_at[0] - loss_at[1]) / (2 * h);
  EXPECT_NEAR(g, numeric, 2e-2 * std::max(std::abs(numeric), 1e-3)) << "finite difference " << numeric;
}

TEST_F(UseLiteModelTest, OutOfRangeIdIsInvalidArgument) {
  for (int64_t bad : {int64_t{-1}, int64_t{8002}, int64_t{1} << 40}) {
    auto out = model_->Forward(MakeBatch({{34, bad, 6}}), nullptr);
    EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(std::string(out.status().message()), HasSubstr("vocabulary"));
  }
}

TEST_F(UseLiteModelTest, TooLongInputIsInvalidArgument) {
  auto ok = model_->Forward(MakeBatch({std::vector<int64_t>(128, 9)}), nullptr);
  EXPECT_TRUE(ok.ok()) << ok.status();
  auto out = model_->Forward(MakeBatch({std::vector<int64_t>(129, 9)}), nullptr);
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(out.status().message()), HasSubstr("128"));
}

TEST_F(UseLiteModelTest, EmptyMaskRowIsInvalidArgument) {
  ForwardInput input = MakeBatch({{34, 6}, {}});
  auto out = model_->Forward(input, nullptr);
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(UseLiteModelTest, MalformedTensorsAreInvalidArgument) {
  ForwardInput input = MakeBatch({{34, 6}});
  ForwardInput wrong_dtype = input;
  wrong_dtype.input_ids = input.input_ids.to(at::kInt);
  EXPECT_EQ(model_->Forward(wrong_dtype, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  ForwardInput wrong_mask = input;
  wrong_mask.attention_mask = input.attention_mask.to(at::kLong);
  EXPECT_EQ(model_->Forward(wrong_mask, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  ForwardInput wrong_shape = input;
  wrong_shape.attention_mask = at::ones({1, 3}, at::kBool);
  EXPECT_EQ(model_->Forward(wrong_shape, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  ForwardInput undefined;
  EXPECT_EQ(model_->Forward(undefined, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  ForwardInput empty = input;
  empty.input_ids = at::zeros({1, 0}, at::kLong);
  empty.attention_mask = at::zeros({1, 0}, at::kBool);
  EXPECT_EQ(model_->Forward(empty, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
}

// Records every hook call and changes nothing.
class RecordingHooks : public ForwardHooks {
 public:
  void OnTokenEmbeddings(at::Tensor* hidden, at::Tensor* mask) override {
    calls.push_back("embeddings " + std::to_string(hidden->size(2)));
  }
  void OnLinear(const ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override {
    calls.push_back("linear " + module.name);
    EXPECT_EQ(input.size(-1), module.in_features) << module.name;
    EXPECT_EQ(output->size(-1), module.out_features) << module.name;
  }
  void OnLayerNorm(const ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override {
    calls.push_back("layer_norm " + module.name);
    EXPECT_EQ(output->size(-1), module.in_features);
  }
  void OnAttentionKeyValue(const ModuleInfo& attention, at::Tensor* keys, at::Tensor* values,
                           at::Tensor* key_mask) override {
    calls.push_back("kv " + attention.name);
    EXPECT_EQ(keys->size(1), attention.num_heads);
    EXPECT_EQ(keys->size(3), attention.head_dim);
    EXPECT_EQ(values->sizes(), keys->sizes());
    EXPECT_EQ(key_mask->size(1), keys->size(2));
  }
  void OnBlockOutput(const ModuleInfo& block, at::Tensor* hidden) override {
    calls.push_back("block " + block.name);
    EXPECT_EQ(hidden->size(-1), block.in_features);
  }
  std::vector<std::string> calls;
};

TEST_F(UseLiteModelTest, NoOpHooksSeeEveryHookPointAndChangeNothing) {
  const ForwardInput input = MakeBatch({{34, 2280, 3744, 6}, {16, 241}});
  auto plain = model_->Forward(input, nullptr);
  RecordingHooks hooks;
  auto hooked = model_->Forward(input, &hooks);
  ASSERT_TRUE(plain.ok() && hooked.ok());
  EXPECT_TRUE(at::equal(plain->pooled, hooked->pooled));
  const std::vector<std::string> layer0 = {
      "embeddings 256",
      "layer_norm encoder.layer.0.attention.LayerNorm",
      "linear encoder.layer.0.residual.dense",
      "linear encoder.layer.0.attention.self.query",
      "linear encoder.layer.0.attention.self.key",
      "linear encoder.layer.0.attention.self.value",
      "kv encoder.layer.0.attention.self",
      "linear encoder.layer.0.attention.output.dense",
      "block encoder.layer.0.attention.output",
      "layer_norm encoder.layer.0.intermediate.LayerNorm",
      "linear encoder.layer.0.intermediate.dense",
      "linear encoder.layer.0.output.dense",
      "block encoder.layer.0.output",
  };
  ASSERT_EQ(hooks.calls.size(), 13u + 11u + 1u);
  EXPECT_EQ(std::vector<std::string>(hooks.calls.begin(), hooks.calls.begin() + 13), layer0);
  EXPECT_EQ(hooks.calls.back(), "linear pooler.dense");
}

// Hooks that handle packed tokens: record the layout and the leading size of every per-token tensor they see.
class PackedShapeHooks : public ForwardHooks {
 public:
  bool SupportsPackedTokens() const override { return true; }
  void OnTokenLayout(const TokenLayout& layout) override { layouts.push_back(layout); }
  void OnLinear(const ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override {
    leading[module.name] = output->size(0);
    EXPECT_EQ(input.size(0), output->size(0)) << module.name;
  }
  void OnLayerNorm(const ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override {
    leading[module.name] = output->size(0);
  }
  void OnBlockOutput(const ModuleInfo& block, at::Tensor* hidden) override { leading[block.name] = hidden->size(0); }
  std::vector<TokenLayout> layouts;
  std::map<std::string, int64_t> leading;
};

TEST_F(UseLiteModelTest, PackedForwardEqualsPaddedForward) {
  ForwardInput input = MakeBatch({{34, 2280, 3744, 6, 17, 99, 5}, {16, 241}, {7}, {8, 9, 10, 11}});
  auto padded = model_->Forward(input, nullptr);
  input.pack_tokens = true;
  auto packed = model_->Forward(input, nullptr);
  PackedShapeHooks hooks;
  auto packed_hooks = model_->Forward(input, &hooks);
  ASSERT_TRUE(padded.ok() && packed.ok() && packed_hooks.ok());
  EXPECT_LE(packed->pooled.sub(padded->pooled).abs().max().item<float>(), 1e-5);
  EXPECT_TRUE(at::equal(packed->pooled, packed_hooks->pooled));
  // Hidden states: equal at real tokens (relative to use-lite's magnitudes), zero at padding in both.
  const at::Tensor states_diff = packed->hidden_states.sub(padded->hidden_states).abs();
  EXPECT_LE(states_diff.max().item<float>(), 1e-5 * padded->hidden_states.abs().max().item<float>());
  EXPECT_TRUE(at::equal(packed->attention_mask, input.attention_mask));

  // The hooks saw the 14 real tokens, not 4 x 7 padded positions; the pooler one row each.
  ASSERT_EQ(hooks.layouts.size(), 2u);
  EXPECT_TRUE(hooks.layouts[0].packed());
  EXPECT_EQ(hooks.layouts[0].tokens(), 14);
  EXPECT_FALSE(hooks.layouts[1].packed());
  EXPECT_EQ(hooks.leading.at("encoder.layer.0.attention.self.query"), 14);
  EXPECT_EQ(hooks.leading.at("encoder.layer.1.output.dense"), 14);
  EXPECT_EQ(hooks.leading.at("encoder.layer.0.attention.LayerNorm"), 14);
  EXPECT_EQ(hooks.leading.at("encoder.layer.1.output"), 14);
  EXPECT_EQ(hooks.leading.at("pooler.dense"), 4);
}

TEST_F(UseLiteModelTest, HooksThatDoNotHandlePackedTokensSeeThePaddedBatch) {
  ForwardInput input = MakeBatch({{34, 2280, 3744, 6}, {16, 241}});
  input.pack_tokens = true;
  class PaddedOnly : public PackedShapeHooks {
    bool SupportsPackedTokens() const override { return false; }
  } padded_only;
  ASSERT_TRUE(model_->Forward(input, &padded_only).ok());
  EXPECT_TRUE(padded_only.layouts.empty());
  EXPECT_EQ(padded_only.leading.at("encoder.layer.0.attention.self.query"), 2);
  PackedShapeHooks packing;
  // Nor does a batch without padding pack.
  input = MakeBatch({{34, 2280}, {16, 241}});
  input.pack_tokens = true;
  ASSERT_TRUE(model_->Forward(input, &packing).ok());
  ASSERT_FALSE(packing.layouts.empty());
  EXPECT_FALSE(packing.layouts[0].packed());
  EXPECT_EQ(packing.leading.at("encoder.layer.0.attention.self.query"), 2);
}

// Trainable hooks that work in either layout: a bias delta on one linear and a scale on one block output, leaves
// that require grad.
class TrainableBiasAndScaleHooks : public ForwardHooks {
 public:
  TrainableBiasAndScaleHooks()
      : bias(at::full({512}, 0.01).requires_grad_()), scale(at::full({512}, 1.1).requires_grad_()) {}
  bool SupportsPackedTokens() const override { return true; }
  void OnTokenLayout(const TokenLayout& layout) override { packed = packed || layout.packed(); }
  void OnLinear(const ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override {
    if (module.name == "encoder.layer.1.attention.self.value") *output = output->add(bias);
  }
  void OnBlockOutput(const ModuleInfo& block, at::Tensor* hidden) override {
    if (block.name == "encoder.layer.0.output") *hidden = hidden->mul(scale);
  }
  at::Tensor bias, scale;
  bool packed = false;
};

TEST_F(UseLiteModelTest, PackedTrainableForwardGivesThePaddedGradients) {
  ForwardInput input = MakeBatch({{34, 2280, 3744, 6, 17, 99, 5}, {16, 241}, {7}});
  TrainableBiasAndScaleHooks padded_hooks, packed_hooks;
  auto padded = model_->ForwardTrainable(input, &padded_hooks);
  input.pack_tokens = true;
  auto packed = model_->ForwardTrainable(input, &packed_hooks);
  ASSERT_TRUE(padded.ok() && packed.ok());
  EXPECT_FALSE(padded_hooks.packed);
  EXPECT_TRUE(packed_hooks.packed);
  EXPECT_LE(packed->pooled.sub(padded->pooled).abs().max().item<float>(), 1e-5);
  padded->pooled.mul(at::arange(512, at::kFloat)).sum().backward();
  packed->pooled.mul(at::arange(512, at::kFloat)).sum().backward();
  for (auto [a, b] : {std::make_pair(&padded_hooks.bias, &packed_hooks.bias),
                      std::make_pair(&padded_hooks.scale, &packed_hooks.scale)}) {
    ASSERT_TRUE(a->grad().defined() && b->grad().defined());
    const float magnitude = a->grad().abs().max().item<float>();
    EXPECT_GT(magnitude, 0);
    EXPECT_LE(a->grad().sub(b->grad()).abs().max().item<float>(), 1e-4 * magnitude);
  }
}

// Scales the value projection's output of one layer: the result must change, and scaling by 1 must not.
class ScaleValueHooks : public ForwardHooks {
 public:
  explicit ScaleValueHooks(double scale) : scale_(scale) {}
  void OnLinear(const ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override {
    if (module.name == "encoder.layer.1.attention.self.value") *output = output->mul(scale_);
  }

 private:
  double scale_;
};

TEST_F(UseLiteModelTest, LinearHookOutputFeedsTheForward) {
  const ForwardInput input = MakeBatch({{34, 2280, 3744, 6}});
  auto plain = model_->Forward(input, nullptr);
  ScaleValueHooks identity(1.0), doubled(2.0);
  auto same = model_->Forward(input, &identity);
  auto changed = model_->Forward(input, &doubled);
  ASSERT_TRUE(plain.ok() && same.ok() && changed.ok());
  EXPECT_TRUE(at::allclose(plain->pooled, same->pooled, 0, 1e-6));
  EXPECT_GT(plain->pooled.sub(changed->pooled).abs().max().item<float>(), 1e-3);
}

// Prepends one real token's embedding at the front of each row (prompt-tuning style splice), which must equal
// running the model on the ids with that token prepended.
class PrependTokenHooks : public ForwardHooks {
 public:
  explicit PrependTokenHooks(at::Tensor row) : row_(std::move(row)) {}
  void OnTokenEmbeddings(at::Tensor* hidden, at::Tensor* mask) override {
    const int64_t b = hidden->size(0);
    *hidden = at::cat({row_.view({1, 1, -1}).expand({b, 1, row_.size(0)}), *hidden}, 1);
    *mask = at::cat({at::ones({b, 1}, at::kBool), *mask}, 1);
  }

 private:
  at::Tensor row_;
};

TEST_F(UseLiteModelTest, SplicedTokensKeepPositionsFromTheMask) {
  const at::Tensor table = model_->parameters().at("embeddings.word_embeddings.weight");
  PrependTokenHooks hooks(table[16]);
  auto spliced = model_->Forward(MakeBatch({{241, 43, 888, 6}, {241}}), &hooks);
  auto direct = model_->Forward(MakeBatch({{16, 241, 43, 888, 6}, {16, 241}}), nullptr);
  ASSERT_TRUE(spliced.ok()) << spliced.status();
  ASSERT_TRUE(direct.ok());
  EXPECT_EQ(spliced->attention_mask.size(1), 5);
  EXPECT_LE(spliced->pooled.sub(direct->pooled).abs().max().item<double>(), 1e-5);
}

TEST_F(UseLiteModelTest, Bfloat16StaysCloseToFloat32) {
  auto bf16 = LoadUseLiteModel(testing::UseLiteModelDir(), ModelOptions{"cpu", "bfloat16"});
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  EXPECT_EQ((*bf16)->info().dtype, "bfloat16");
  const Reference ref = LoadReference("reference_embeddings.json");
  auto out = (*bf16)->Forward(MakeBatch(ref.ids), nullptr);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->pooled.scalar_type(), at::kFloat);
  EXPECT_EQ(out->hidden_states.scalar_type(), at::kFloat);
  for (size_t i = 0; i < ref.ids.size(); ++i) EXPECT_GE(Cosine(out->pooled[i], ref.embeddings[i]), 0.99) << i;
}

TEST_F(UseLiteModelTest, LoadModelPicksUseLiteFromConfig) {
  auto model = LoadModel(testing::UseLiteModelDir(), ModelOptions());
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->info().family, "use-lite");
}

TEST(UseLiteModelLoadTest, BadOptionsAreRejected) {
  const std::string dir = testing::UseLiteModelDir();
  if (dir.empty()) GTEST_SKIP() << testing::kNoModelMessage;
  EXPECT_EQ(LoadUseLiteModel(dir, ModelOptions{"cpu", "float16"}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LoadUseLiteModel(dir, ModelOptions{"tpu:7", "float32"}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// A scratch copy of the converted model directory that a test may damage.
class ScratchModelDir {
 public:
  explicit ScratchModelDir(const std::string& source) {
    char tmpl[] = "/tmp/use_lite_model_test.XXXXXX";
    path_ = ::mkdtemp(tmpl);
    for (const char* f : {"config.json", "model.safetensors", "vocab.json"}) {
      std::filesystem::copy_file(source + "/" + f, path_ + "/" + f);
    }
  }
  ~ScratchModelDir() { std::filesystem::remove_all(path_); }
  const std::string& path() const { return path_; }
  void Write(const std::string& file, const std::string& contents) {
    std::ofstream out(path_ + "/" + file, std::ios::binary | std::ios::trunc);
    out << contents;
  }

 private:
  std::string path_;
};

TEST(UseLiteModelLoadTest, MissingDirectoryOrFilesAreNotFound) {
  auto missing = LoadUseLiteModel("/nonexistent/use-lite", ModelOptions());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  const std::string dir = testing::UseLiteModelDir();
  if (dir.empty()) GTEST_SKIP() << testing::kNoModelMessage;
  for (const char* file : {"config.json", "model.safetensors", "vocab.json"}) {
    ScratchModelDir scratch(dir);
    std::filesystem::remove(scratch.path() + "/" + file);
    auto model = LoadUseLiteModel(scratch.path(), ModelOptions());
    EXPECT_EQ(model.status().code(), absl::StatusCode::kNotFound) << file;
    EXPECT_THAT(std::string(model.status().message()), HasSubstr(file));
  }
}

TEST(UseLiteModelLoadTest, CorruptFilesAreInvalidArgumentNamingTheProblem) {
  const std::string dir = testing::UseLiteModelDir();
  if (dir.empty()) GTEST_SKIP() << testing::kNoModelMessage;
  {
    ScratchModelDir scratch(dir);
    scratch.Write("config.json", "{not json");
    auto model = LoadUseLiteModel(scratch.path(), ModelOptions());
    EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(model.status().message()), HasSubstr("config.json"));
  }
  {
    ScratchModelDir scratch(dir);
    nlohmann::json config = nlohmann::json::parse(testing::ReadFileOrDie(dir + "/config.json"));
    config.erase("layer_norm_eps");
    scratch.Write("config.json", config.dump());
    auto model = LoadUseLiteModel(scratch.path(), ModelOptions());
    EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(model.status().message()), HasSubstr("layer_norm_eps"));
  }
  {
    // A config that promises a wider embedding than model.safetensors holds: a shape error naming the tensor.
    ScratchModelDir scratch(dir);
    nlohmann::json config = nlohmann::json::parse(testing::ReadFileOrDie(dir + "/config.json"));
    config["vocab_size"] = 9000;
    scratch.Write("config.json", config.dump());
    auto model = LoadUseLiteModel(scratch.path(), ModelOptions());
    EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(model.status().message()), HasSubstr("embeddings.word_embeddings.weight"));
  }
  {
    ScratchModelDir scratch(dir);
    const std::string weights = testing::ReadFileOrDie(dir + "/model.safetensors");
    scratch.Write("model.safetensors", weights.substr(0, weights.size() / 2));
    auto model = LoadUseLiteModel(scratch.path(), ModelOptions());
    EXPECT_FALSE(model.ok());
    EXPECT_THAT(std::string(model.status().message()), HasSubstr("model.safetensors"));
  }
  {
    // A tensor missing from model.safetensors: NOT_FOUND naming it.
    ScratchModelDir scratch(dir);
    auto file = SafetensorsFile::Open(dir + "/model.safetensors");
    ASSERT_TRUE(file.ok()) << file.status();
    std::map<std::string, at::Tensor> tensors;
    for (const std::string& name : (*file)->names()) {
      if (name != "encoder.layer.1.output.dense.bias") tensors[name] = *(*file)->Load(name, at::kFloat);
    }
    ASSERT_TRUE(WriteSafetensors(scratch.path() + "/model.safetensors", tensors).ok());
    auto model = LoadUseLiteModel(scratch.path(), ModelOptions());
    EXPECT_EQ(model.status().code(), absl::StatusCode::kNotFound);
    EXPECT_THAT(std::string(model.status().message()), HasSubstr("encoder.layer.1.output.dense.bias"));
  }
  {
    ScratchModelDir scratch(dir);
    scratch.Write("vocab.json", "[1, 2]");
    auto model = LoadUseLiteModel(scratch.path(), ModelOptions());
    EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(model.status().message()), HasSubstr("vocab.json"));
  }
}

}  // namespace
}  // namespace model
}  // namespace deltaserve
