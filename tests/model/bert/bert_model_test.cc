// BertModel against an independent plain-torch reference (make_tiny_bert.py, run at test time with
// /usr/bin/python3; skipped when it cannot import torch).
#include "server/model/bert/bert_model.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <ATen/TensorOperators.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/isfinite.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/model/model_loader.h"
#include "server/model/safetensors.h"

namespace deltaserve {
namespace model {
namespace {

using ::testing::HasSubstr;

std::string SourceDir() {
  const char* env = std::getenv("DS_SOURCE_DIR");
  return env != nullptr ? env : DS_SOURCE_DIR;
}

std::string ReadText(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

void WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

// Copies the small files of a model directory (not model.safetensors) into a fresh directory.
std::string CopyModelDir(const std::string& from, const std::string& to) {
  ::mkdir(to.c_str(), 0755);
  for (const char* name : {"config.json", "vocab.txt", "tokenizer_config.json", "modules.json"}) {
    const std::string src = from + "/" + name;
    if (::access(src.c_str(), R_OK) == 0) WriteText(to + "/" + name, ReadText(src));
  }
  return to;
}

double MaxAbsDiff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

// Max |a - b| over the real tokens ([B,T,H] with a [B,T] mask).
double MaxAbsDiffMasked(const at::Tensor& a, const at::Tensor& b, const at::Tensor& mask) {
  at::Tensor m = mask.to(at::kDouble).unsqueeze(-1);
  return ((a.to(at::kDouble) - b.to(at::kDouble)) * m).abs().max().item<double>();
}

class BertModelTest : public ::testing::Test {
 protected:
  // The reference models are generated once per script version into the build tree
  // (DS_BINARY_DIR/tests/model/bert/tiny_models_<hash of the script>), so the many test processes ctest starts share
  // them; a fresh directory is renamed into place, so concurrent processes never see a half-written one. Variants
  // a test writes go to a per-process scratch directory.
  static void SetUpTestSuite() {
    const std::string script = SourceDir() + "/tests/model/bert/make_tiny_bert.py";
    const std::string text = ReadText(script);
    ASSERT_FALSE(text.empty()) << script;
    const char* binary_env = std::getenv("DS_BINARY_DIR");
    const std::string binary_dir = binary_env != nullptr ? binary_env : DS_BINARY_DIR;
    const std::string cache = absl::StrCat(binary_dir, "/tests/model/bert");
    std::system(absl::StrCat("mkdir -p ", cache).c_str());
    root_ = new std::string(absl::StrCat(cache, "/tiny_models_", absl::Hex(std::hash<std::string>()(text))));
    if (::access((*root_ + "/electra/reference.json").c_str(), R_OK) != 0) {
      if (std::system("/usr/bin/python3 -c 'import torch' >/dev/null 2>&1") != 0) {
        skip_reason_ = new std::string("/usr/bin/python3 cannot import torch (install python3-torch)");
        return;
      }
      char tmpl[PATH_MAX];
      snprintf(tmpl, sizeof(tmpl), "%s/tiny_models_tmp_XXXXXX", cache.c_str());
      const char* fresh = ::mkdtemp(tmpl);
      ASSERT_NE(fresh, nullptr);
      const std::string cmd = absl::StrCat("/usr/bin/python3 ", script, " ", fresh);
      ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
      if (::rename(fresh, root_->c_str()) != 0) {  // another process won the race
        std::system(absl::StrCat("rm -rf ", fresh).c_str());
      }
    }
    char scratch[] = "/tmp/bert_model_test_XXXXXX";
    const char* dir = ::mkdtemp(scratch);
    ASSERT_NE(dir, nullptr);
    scratch_ = new std::string(dir);
  }
  static void TearDownTestSuite() {
    if (scratch_ != nullptr) {
      std::system(absl::StrCat("rm -rf ", *scratch_).c_str());
      delete scratch_;
      scratch_ = nullptr;
    }
    delete root_;
    root_ = nullptr;
  }
  void SetUp() override {
    if (skip_reason_ != nullptr) GTEST_SKIP() << *skip_reason_;
    ASSERT_NE(root_, nullptr);
    ASSERT_NE(scratch_, nullptr);
  }

  // A generated reference model.
  static std::string Dir(const std::string& name) { return *root_ + "/" + name; }
  // A directory for a variant a test writes.
  static std::string Scratch(const std::string& name) { return *scratch_ + "/" + name; }

  static std::unique_ptr<Model> Load(const std::string& name, const std::string& dtype = "float32") {
    ModelOptions options;
    options.dtype = dtype;
    auto m = LoadBertModel(Dir(name), options);
    EXPECT_TRUE(m.ok()) << m.status();
    return m.ok() ? std::move(m).value() : nullptr;
  }

  struct Case {
    ForwardInput input;
    at::Tensor hidden;
    at::Tensor pooled;
  };
  static std::vector<Case> Cases(const std::string& name) {
    auto file = SafetensorsFile::Open(Dir(name) + "/reference.safetensors");
    EXPECT_TRUE(file.ok()) << file.status();
    std::vector<Case> cases;
    if (!file.ok()) return cases;
    for (int i = 0; (*file)->contains(absl::StrCat("case", i, ".input_ids")); ++i) {
      const std::string p = absl::StrCat("case", i, ".");
      Case c;
      c.input.input_ids = (*file)->Load(p + "input_ids", at::kLong).value();
      c.input.attention_mask = (*file)->Load(p + "attention_mask", at::kLong).value().to(at::kBool);
      c.hidden = (*file)->Load(p + "hidden", at::kFloat).value();
      c.pooled = (*file)->Load(p + "pooled", at::kFloat).value();
      cases.push_back(std::move(c));
    }
    return cases;
  }

  // Runs every reference case and returns the largest differences seen.
  static void ExpectMatchesReference(const std::string& name, const std::string& dtype, double tolerance) {
    auto model = Load(name, dtype);
    ASSERT_NE(model, nullptr);
    double worst_hidden = 0, worst_pooled = 0;
    const auto cases = Cases(name);
    ASSERT_GE(cases.size(), 4u);
    for (size_t i = 0; i < cases.size(); ++i) {
      const Case& c = cases[i];
      auto out = model->Forward(c.input, nullptr);
      ASSERT_TRUE(out.ok()) << out.status();
      EXPECT_EQ(out->hidden_states.scalar_type(), at::kFloat);
      EXPECT_EQ(out->pooled.scalar_type(), at::kFloat);
      ASSERT_EQ(out->hidden_states.sizes(), c.hidden.sizes());
      ASSERT_EQ(out->pooled.sizes(), c.pooled.sizes());
      worst_hidden = std::max(worst_hidden, MaxAbsDiffMasked(out->hidden_states, c.hidden, c.input.attention_mask));
      worst_pooled = std::max(worst_pooled, MaxAbsDiff(out->pooled, c.pooled));
    }
    std::cout << name << " (" << dtype << "): max |diff| hidden " << worst_hidden << ", pooled " << worst_pooled
              << "\n";
    EXPECT_LE(worst_hidden, tolerance);
    EXPECT_LE(worst_pooled, tolerance);
  }

  static std::string* root_;
  static std::string* scratch_;
  static std::string* skip_reason_;
};

std::string* BertModelTest::root_ = nullptr;
std::string* BertModelTest::scratch_ = nullptr;
std::string* BertModelTest::skip_reason_ = nullptr;

TEST_F(BertModelTest, TinyBertMatchesReference) { ExpectMatchesReference("bert", "float32", 1e-5); }

TEST_F(BertModelTest, TinyRobertaWithMeanPoolingMatchesReference) {
  ExpectMatchesReference("roberta", "float32", 1e-5);
}

TEST_F(BertModelTest, TinyElectraWithProjectionAndHalfWeightsMatchesReference) {
  ExpectMatchesReference("electra", "float32", 1e-5);
}

TEST_F(BertModelTest, Bfloat16StaysCloseToReference) {
  for (const char* name : {"bert", "roberta"}) ExpectMatchesReference(name, "bfloat16", 0.1);
  auto model = Load("bert", "bfloat16");
  ASSERT_NE(model, nullptr);
  EXPECT_EQ(model->info().dtype, "bfloat16");
  EXPECT_EQ(model->parameters().at("encoder.layer.0.output.dense.weight").scalar_type(), at::kBFloat16);
}

TEST_F(BertModelTest, EncodedSentencesMatchReference) {
  for (const char* name : {"bert", "roberta"}) {
    auto model = Load(name);
    ASSERT_NE(model, nullptr);
    nlohmann::json ref = nlohmann::json::parse(ReadText(Dir(name) + "/reference.json"));
    const auto cases = Cases(name);
    const size_t first = ref["num_cases"].get<size_t>();
    ASSERT_EQ(cases.size(), first + ref["sentences"].size());
    for (size_t i = 0; i < ref["sentences"].size(); ++i) {
      const auto& s = ref["sentences"][i];
      auto ids = model->tokenizer().Encode(s["text"].get<std::string>());
      ASSERT_TRUE(ids.ok()) << ids.status();
      EXPECT_EQ(*ids, s["ids"].get<std::vector<int64_t>>()) << s["text"];
      ForwardInput in;
      in.input_ids = at::tensor(*ids, at::kLong).unsqueeze(0);
      in.attention_mask = at::ones({1, static_cast<int64_t>(ids->size())}, at::kBool);
      auto out = model->Forward(in, nullptr);
      ASSERT_TRUE(out.ok()) << out.status();
      EXPECT_LE(MaxAbsDiff(out->hidden_states, cases[first + i].hidden), 1e-5) << name << " " << s["text"];
      EXPECT_LE(MaxAbsDiff(out->pooled, cases[first + i].pooled), 1e-5) << name << " " << s["text"];
    }
  }
}

TEST_F(BertModelTest, PaddedRowEqualsSoloRow) {
  for (const char* name : {"bert", "roberta", "electra"}) {
    auto model = Load(name);
    ASSERT_NE(model, nullptr);
    const Case batch = Cases(name)[0];
    auto out = model->Forward(batch.input, nullptr);
    ASSERT_TRUE(out.ok()) << out.status();
    for (int64_t b = 0; b < batch.input.input_ids.size(0); ++b) {
      const int64_t len = batch.input.attention_mask[b].sum().item<int64_t>();
      ForwardInput solo;
      solo.input_ids = batch.input.input_ids[b].narrow(0, 0, len).unsqueeze(0).contiguous();
      solo.attention_mask = at::ones({1, len}, at::kBool);
      auto one = model->Forward(solo, nullptr);
      ASSERT_TRUE(one.ok()) << one.status();
      EXPECT_LE(MaxAbsDiff(out->hidden_states[b].narrow(0, 0, len), one->hidden_states[0]), 1e-5) << name << b;
      EXPECT_LE(MaxAbsDiff(out->pooled[b], one->pooled[0]), 1e-5) << name << " row " << b;
    }
    // Extra padding on the right changes nothing either.
    ForwardInput wider;
    const int64_t B = batch.input.input_ids.size(0);
    wider.input_ids = at::cat({batch.input.input_ids, at::zeros({B, 3}, at::kLong)}, 1);
    wider.attention_mask = at::cat({batch.input.attention_mask, at::zeros({B, 3}, at::kBool)}, 1);
    auto w = model->Forward(wider, nullptr);
    ASSERT_TRUE(w.ok()) << w.status();
    EXPECT_LE(MaxAbsDiff(w->pooled, out->pooled), 1e-5) << name;
  }
}

// Hooks that handle packed tokens: record the layouts announced and the leading size of each linear output.
class PackedShapeHooks : public ForwardHooks {
 public:
  bool SupportsPackedTokens() const override { return true; }
  void OnTokenLayout(const TokenLayout& layout) override { layouts.push_back(layout); }
  void OnLinear(const ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override {
    leading[module.name] = output->size(0);
  }
  void OnLayerNorm(const ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override {
    leading[module.name] = output->size(0);
  }
  std::vector<TokenLayout> layouts;
  std::map<std::string, int64_t> leading;
};

TEST_F(BertModelTest, PackedForwardEqualsPaddedForward) {
  for (const char* name : {"bert", "roberta", "electra"}) {
    auto model = Load(name);
    ASSERT_NE(model, nullptr);
    ForwardInput input = Cases(name)[0].input;
    const int64_t real = input.attention_mask.sum().item<int64_t>();
    ASSERT_LT(real, input.attention_mask.numel()) << "the reference batch has no padding";
    auto padded = model->Forward(input, nullptr);
    input.pack_tokens = true;
    auto packed = model->Forward(input, nullptr);
    PackedShapeHooks hooks;
    auto hooked = model->Forward(input, &hooks);
    ASSERT_TRUE(padded.ok() && packed.ok() && hooked.ok()) << name;
    EXPECT_LE(MaxAbsDiff(packed->pooled, padded->pooled), 1e-5) << name;
    EXPECT_TRUE(at::equal(packed->pooled, hooked->pooled)) << name;
    const at::Tensor real_mask = input.attention_mask.unsqueeze(-1).to(at::kFloat);
    EXPECT_LE(MaxAbsDiff(packed->hidden_states.mul(real_mask), padded->hidden_states.mul(real_mask)), 1e-5) << name;
    ASSERT_EQ(hooks.layouts.size(), 1u) << name;
    EXPECT_TRUE(hooks.layouts[0].packed());
    EXPECT_EQ(hooks.layouts[0].tokens(), real);
    EXPECT_EQ(hooks.leading.at("embeddings.LayerNorm"), real) << name;
    EXPECT_EQ(hooks.leading.at("encoder.layer.0.output.dense"), real) << name;
  }
}

TEST_F(BertModelTest, ForwardTrainableEqualsForward) {
  for (const char* name : {"bert", "roberta", "electra"}) {
    auto model = Load(name);
    ASSERT_NE(model, nullptr);
    for (const Case& c : Cases(name)) {
      auto out = model->Forward(c.input, nullptr);
      auto trained = model->ForwardTrainable(c.input, nullptr);
      ASSERT_TRUE(out.ok()) << out.status();
      ASSERT_TRUE(trained.ok()) << trained.status();
      ASSERT_EQ(trained->hidden_states.sizes(), out->hidden_states.sizes());
      EXPECT_LE(MaxAbsDiff(trained->hidden_states, out->hidden_states), 1e-6) << name;
      EXPECT_LE(MaxAbsDiff(trained->pooled, out->pooled), 1e-6) << name;
      EXPECT_FALSE(trained->pooled.requires_grad()) << name << ": the backbone's weights do not require grad";
    }
  }
}

// Full fine-tuning of a private copy: requires_grad on every parameter (the query / key / value views of the fused
// projection included) and a backward pass reach every parameter; the gradient matches a finite difference.
TEST_F(BertModelTest, ForwardTrainableGivesGradientsToWeightsThatRequireThem) {
  for (const char* name : {"bert", "electra"}) {
    auto model = Load(name);
    ASSERT_NE(model, nullptr);
    const Case c = Cases(name)[0];
    auto before = model->Forward(c.input, nullptr);
    ASSERT_TRUE(before.ok()) << before.status();
    for (const auto& [pname, t] : model->parameters()) const_cast<at::Tensor&>(t).requires_grad_(true);
    const at::Tensor probe = at::randn(before->pooled.sizes(), at::kFloat);
    auto loss_of = [&](const ForwardOutput& out) { return out.pooled.mul(probe).sum(); };
    auto trained = model->ForwardTrainable(c.input, nullptr);
    ASSERT_TRUE(trained.ok()) << trained.status();
    EXPECT_LE(MaxAbsDiff(trained->pooled, before->pooled), 1e-6) << name;
    at::Tensor loss = loss_of(*trained);
    loss.backward();
    for (const auto& [pname, t] : model->parameters()) {
      ASSERT_TRUE(t.grad().defined()) << name << " " << pname;
      EXPECT_TRUE(t.grad().isfinite().all().item<bool>()) << name << " " << pname;
    }
    const at::Tensor& query = model->parameters().at("encoder.layer.0.attention.self.query.weight");
    const at::Tensor& types = model->parameters().at("embeddings.token_type_embeddings.weight");
    EXPECT_GT(query.grad().abs().max().item<double>(), 0) << name;
    EXPECT_GT(types.grad()[0].abs().max().item<double>(), 0) << name;
    EXPECT_EQ(types.grad()[1].abs().max().item<double>(), 0) << name << ": token type 1 is never used";
    // d loss / d query[0][0] by central difference (the forward under inference mode sees the updated weight).
    const double g = query.grad()[0][0].item<double>();
    const double h = 1e-2;
    double loss_at[2];
    for (int side = 0; side < 2; ++side) {
      {
        at::NoGradGuard no_grad;
        query[0][0].add_(side == 0 ? h : -2 * h);
      }
      auto out = model->Forward(c.input, nullptr);
      ASSERT_TRUE(out.ok()) << out.status();
      loss_at[side] = loss_of(*out).item<double>();
    }
    {
      at::NoGradGuard no_grad;
      query[0][0].add_(h);
    }
    const double numeric = (loss_at[0] - loss_at[1]) / (2 * h);
    EXPECT_NEAR(g, numeric, 2e-2 * std::max(1.0, std::abs(numeric))) << name;
  }
}

TEST_F(BertModelTest, BadInputsAreInvalidArgument) {
  auto model = Load("bert");
  ASSERT_NE(model, nullptr);
  const int64_t vocab = model->info().vocab_size;
  auto forward = [&](at::Tensor ids, at::Tensor mask) { return model->Forward({ids, mask}, nullptr).status(); };
  auto ok_ids = at::tensor(std::vector<int64_t>{2, 5, 3}, at::kLong).unsqueeze(0);
  auto ok_mask = at::ones({1, 3}, at::kBool);
  EXPECT_TRUE(forward(ok_ids, ok_mask).ok());
  const auto kInvalid = absl::StatusCode::kInvalidArgument;
  EXPECT_EQ(forward(ok_ids.to(at::kInt), ok_mask).code(), kInvalid);                      // int32 ids
  EXPECT_EQ(forward(ok_ids, ok_mask.to(at::kLong)).code(), kInvalid);                     // non-bool mask
  EXPECT_EQ(forward(ok_ids[0], ok_mask[0]).code(), kInvalid);                             // 1-D
  EXPECT_EQ(forward(ok_ids, at::ones({1, 2}, at::kBool)).code(), kInvalid);               // shape mismatch
  EXPECT_EQ(forward(at::zeros({0, 3}, at::kLong), at::ones({0, 3}, at::kBool)).code(), kInvalid);  // empty
  EXPECT_EQ(forward(at::tensor(std::vector<int64_t>{2, -1, 3}, at::kLong).unsqueeze(0), ok_mask).code(), kInvalid);
  EXPECT_EQ(forward(at::tensor(std::vector<int64_t>{2, vocab, 3}, at::kLong).unsqueeze(0), ok_mask).code(),
            kInvalid);
  auto no_first = ok_mask.clone();
  no_first[0][0].fill_(false);
  EXPECT_EQ(forward(ok_ids, no_first).code(), kInvalid);
  const int64_t too_long = model->info().max_sequence_length + 1;
  EXPECT_EQ(forward(at::full({1, too_long}, 5, at::kLong), at::ones({1, too_long}, at::kBool)).code(), kInvalid);
  const int64_t longest = model->info().max_sequence_length;
  EXPECT_TRUE(forward(at::full({1, longest}, 5, at::kLong), at::ones({1, longest}, at::kBool)).ok());
  EXPECT_EQ(forward(at::Tensor(), ok_mask).code(), kInvalid);
}

TEST_F(BertModelTest, RobertaMaxSequenceLengthLeavesRoomForPaddingIdx) {
  auto model = Load("roberta");
  ASSERT_NE(model, nullptr);
  EXPECT_EQ(model->info().max_sequence_length, 14 - 2);
  const int64_t n = model->info().max_sequence_length;
  EXPECT_TRUE(model->Forward({at::full({1, n}, 5, at::kLong), at::ones({1, n}, at::kBool)}, nullptr).ok());
  EXPECT_EQ(model->Forward({at::full({1, n + 1}, 5, at::kLong), at::ones({1, n + 1}, at::kBool)}, nullptr)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(BertModelTest, ReportsInfoModulesAndParameters) {
  auto model = Load("bert");
  ASSERT_NE(model, nullptr);
  const ModelInfo& info = model->info();
  EXPECT_EQ(info.family, "bert");
  EXPECT_EQ(info.name, "bert");
  EXPECT_EQ(info.hidden_size, 32);
  EXPECT_EQ(info.embedding_dim, 32);
  EXPECT_EQ(info.num_layers, 2);
  EXPECT_EQ(info.num_heads, 4);
  EXPECT_EQ(info.max_sequence_length, 16);
  EXPECT_EQ(info.vocab_size, model->tokenizer().vocab_size() + 4);
  EXPECT_EQ(info.pooling, "cls");
  EXPECT_EQ(info.dtype, "float32");
  EXPECT_EQ(info.device, "cpu");

  std::vector<std::string> names;
  for (const ModuleInfo& m : model->modules()) names.push_back(m.name);
  const std::vector<std::string> want_prefix = {
      "embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings",
      "embeddings.LayerNorm", "encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key",
      "encoder.layer.0.attention.self.value", "encoder.layer.0.attention.self",
      "encoder.layer.0.attention.output.dense", "encoder.layer.0.attention.output",
      "encoder.layer.0.attention.output.LayerNorm", "encoder.layer.0.intermediate.dense",
      "encoder.layer.0.output.dense", "encoder.layer.0.output", "encoder.layer.0.output.LayerNorm",
      "encoder.layer.1.attention.self.query"};
  ASSERT_GE(names.size(), want_prefix.size());
  EXPECT_EQ(std::vector<std::string>(names.begin(), names.begin() + want_prefix.size()), want_prefix);
  EXPECT_EQ(names.size(), 4u + 2 * 11u);
  const ModuleInfo& attention = model->modules()[7];
  EXPECT_EQ(attention.kind, ModuleKind::kAttention);
  EXPECT_EQ(attention.num_heads, 4);
  EXPECT_EQ(attention.head_dim, 8);
  EXPECT_EQ(attention.layer, 0);
  const ModuleInfo& inter = model->modules()[11];
  EXPECT_EQ(inter.kind, ModuleKind::kLinear);
  EXPECT_EQ(inter.in_features, 32);
  EXPECT_EQ(inter.out_features, 37);
  EXPECT_TRUE(inter.has_bias);
  EXPECT_EQ(model->modules()[9].kind, ModuleKind::kBlockOutput);

  // Every parameter is named after a module; q/k/v match the checkpoint.
  const auto& params = model->parameters();
  int64_t total = 0;
  for (const auto& [name, t] : params) {
    total += t.numel();
    const std::string module = name.substr(0, name.rfind('.'));
    EXPECT_NE(std::find(names.begin(), names.end(), module), names.end()) << name;
  }
  EXPECT_EQ(total, info.num_parameters);
  auto file = SafetensorsFile::Open(Dir("bert") + "/model.safetensors");
  ASSERT_TRUE(file.ok());
  for (const char* name : {"encoder.layer.1.attention.self.key.weight", "encoder.layer.1.attention.self.value.bias",
                           "embeddings.LayerNorm.weight", "encoder.layer.0.output.dense.weight"}) {
    ASSERT_EQ(params.count(name), 1u) << name;
    at::Tensor want = (*file)->Load(std::string("bert.") + name, at::kFloat).value();
    EXPECT_EQ(MaxAbsDiff(params.at(name), want), 0.0) << name;
  }
  EXPECT_EQ(params.count("pooler.dense.weight"), 0u);
}

// Records the hook calls; optionally changes things.
class RecordingHooks : public ForwardHooks {
 public:
  void OnTokenEmbeddings(at::Tensor* hidden, at::Tensor* mask) override {
    calls.push_back("tokens");
    token_shape = hidden->sizes().vec();
  }
  void OnLinear(const ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override {
    calls.push_back(module.name);
    EXPECT_EQ(input.size(-1), module.in_features) << module.name;
    EXPECT_EQ(output->size(-1), module.out_features) << module.name;
  }
  void OnLayerNorm(const ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override {
    calls.push_back(module.name);
    EXPECT_EQ(input.sizes(), output->sizes());
  }
  void OnAttentionKeyValue(const ModuleInfo& attention, at::Tensor* keys, at::Tensor* values,
                           at::Tensor* key_mask) override {
    calls.push_back(attention.name);
    EXPECT_EQ(keys->dim(), 4);
    EXPECT_EQ(keys->size(1), attention.num_heads);
    EXPECT_EQ(keys->size(3), attention.head_dim);
    EXPECT_EQ(key_mask->size(1), keys->size(2));
  }
  void OnBlockOutput(const ModuleInfo& block, at::Tensor* hidden) override { calls.push_back(block.name); }

  std::vector<std::string> calls;
  std::vector<int64_t> token_shape;
};

TEST_F(BertModelTest, HooksSeeEveryModuleInForwardOrderAndNoOpHooksChangeNothing) {
  for (const char* name : {"bert", "electra"}) {
    auto model = Load(name);
    ASSERT_NE(model, nullptr);
    const Case c = Cases(name)[0];
    auto plain = model->Forward(c.input, nullptr);
    ASSERT_TRUE(plain.ok());
    RecordingHooks hooks;
    auto hooked = model->Forward(c.input, &hooks);
    ASSERT_TRUE(hooked.ok()) << hooked.status();
    EXPECT_EQ(MaxAbsDiff(plain->hidden_states, hooked->hidden_states), 0.0);
    EXPECT_EQ(MaxAbsDiff(plain->pooled, hooked->pooled), 0.0);
    std::vector<std::string> want = {"tokens"};
    for (const ModuleInfo& m : model->modules()) {
      if (m.kind != ModuleKind::kEmbedding) want.push_back(m.name);
    }
    EXPECT_EQ(hooks.calls, want) << name;
    ASSERT_EQ(hooks.token_shape.size(), 3u);
    EXPECT_EQ(hooks.token_shape[2], model->parameters().at("embeddings.word_embeddings.weight").size(1));
  }
}

// Prefix-tuning-style: prepends P key/value rows. Masked out they change nothing; attended they do.
class PrefixHooks : public ForwardHooks {
 public:
  explicit PrefixHooks(bool attend) : attend_(attend) {}
  void OnAttentionKeyValue(const ModuleInfo& attention, at::Tensor* keys, at::Tensor* values,
                           at::Tensor* key_mask) override {
    const int64_t B = keys->size(0), NH = keys->size(1), DH = keys->size(3), P = 2;
    at::Tensor pk = at::randn({B, NH, P, DH}, keys->options());
    at::Tensor pv = at::randn({B, NH, P, DH}, values->options());
    *keys = at::cat({pk, *keys}, 2);
    *values = at::cat({pv, *values}, 2);
    *key_mask = at::cat({at::full({B, P}, attend_, key_mask->options()), *key_mask}, 1);
  }

 private:
  bool attend_;
};

TEST_F(BertModelTest, AttentionKeyValueHookCanPrependMaskedOrAttendedPrefixes) {
  auto model = Load("bert");
  ASSERT_NE(model, nullptr);
  const Case c = Cases("bert")[0];
  auto plain = model->Forward(c.input, nullptr);
  ASSERT_TRUE(plain.ok());
  PrefixHooks masked(false), attended(true);
  auto m = model->Forward(c.input, &masked);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_LE(MaxAbsDiffMasked(m->hidden_states, plain->hidden_states, c.input.attention_mask), 1e-5);
  auto a = model->Forward(c.input, &attended);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_GT(MaxAbsDiff(a->pooled, plain->pooled), 1e-3);
}

// Prompt-tuning-style: inserts a masked column after [CLS]; the real tokens keep their positions and states.
class InsertPaddingHooks : public ForwardHooks {
 public:
  void OnTokenEmbeddings(at::Tensor* hidden, at::Tensor* mask) override {
    const int64_t B = hidden->size(0);
    at::Tensor filler = at::randn({B, 1, hidden->size(2)}, hidden->options());
    *hidden = at::cat({hidden->narrow(1, 0, 1), filler, hidden->narrow(1, 1, hidden->size(1) - 1)}, 1);
    *mask = at::cat({mask->narrow(1, 0, 1), at::zeros({B, 1}, mask->options()),
                     mask->narrow(1, 1, mask->size(1) - 1)}, 1);
  }
};

class BadShapeHooks : public ForwardHooks {
 public:
  void OnTokenEmbeddings(at::Tensor* hidden, at::Tensor* mask) override { *mask = mask->narrow(1, 0, 1); }
};

TEST_F(BertModelTest, TokenEmbeddingHookCanSpliceTokensAndPositionsFollowTheMask) {
  for (const char* name : {"bert", "roberta"}) {
    auto model = Load(name);
    ASSERT_NE(model, nullptr);
    const Case c = Cases(name)[0];
    auto plain = model->Forward(c.input, nullptr);
    ASSERT_TRUE(plain.ok());
    InsertPaddingHooks hooks;
    auto spliced = model->Forward(c.input, &hooks);
    ASSERT_TRUE(spliced.ok()) << spliced.status();
    const int64_t T = c.input.input_ids.size(1);
    ASSERT_EQ(spliced->hidden_states.size(1), T + 1);
    ASSERT_EQ(spliced->attention_mask.size(1), T + 1);
    at::Tensor real = at::cat({spliced->hidden_states.narrow(1, 0, 1), spliced->hidden_states.narrow(1, 2, T - 1)}, 1);
    EXPECT_LE(MaxAbsDiffMasked(real, plain->hidden_states, c.input.attention_mask), 1e-5) << name;
    EXPECT_LE(MaxAbsDiff(spliced->pooled, plain->pooled), 1e-5) << name;
  }
  auto model = Load("bert");
  BadShapeHooks bad;
  EXPECT_EQ(model->Forward(Cases("bert")[0].input, &bad).status().code(), absl::StatusCode::kInvalidArgument);
}

// Adds 1 to every value projection: the output must change (the per-module slices are live).
class ValueShiftHooks : public ForwardHooks {
 public:
  void OnLinear(const ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override {
    if (module.name.find("attention.self.value") != std::string::npos) *output = *output + 1.0;
  }
};

TEST_F(BertModelTest, LinearHookChangesTheOutput) {
  auto model = Load("bert");
  ASSERT_NE(model, nullptr);
  const Case c = Cases("bert")[0];
  auto plain = model->Forward(c.input, nullptr);
  ValueShiftHooks hooks;
  auto shifted = model->Forward(c.input, &hooks);
  ASSERT_TRUE(plain.ok() && shifted.ok());
  EXPECT_GT(MaxAbsDiff(plain->pooled, shifted->pooled), 1e-3);
}

TEST_F(BertModelTest, LoadsThroughLoadModel) {
  ModelOptions options;
  for (const char* name : {"bert", "roberta", "electra"}) {
    auto model = LoadModel(Dir(name), options);
    ASSERT_TRUE(model.ok()) << model.status();
    EXPECT_EQ((*model)->info().family, "bert");
    const Case c = Cases(name)[0];
    auto out = (*model)->Forward(c.input, nullptr);
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_LE(MaxAbsDiff(out->pooled, c.pooled), 1e-5) << name;
  }
  auto roberta = LoadModel(Dir("roberta"), options);
  ASSERT_TRUE(roberta.ok());
  EXPECT_EQ((*roberta)->info().pooling, "mean+l2");
}

TEST_F(BertModelTest, ConcurrentForwardsAgree) {
  auto model = Load("bert");
  ASSERT_NE(model, nullptr);
  const auto cases = Cases("bert");
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 10; ++i) {
        const Case& c = cases[(t + i) % cases.size()];
        auto out = model->Forward(c.input, nullptr);
        if (!out.ok() || MaxAbsDiff(out->pooled, c.pooled) > 1e-5) failures++;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
}

TEST_F(BertModelTest, MissingOrMisshapenTensorIsAClearError) {
  auto file = SafetensorsFile::Open(Dir("bert") + "/model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  std::map<std::string, at::Tensor> tensors;
  for (const std::string& name : (*file)->names()) tensors[name] = (*file)->Load(name, at::kFloat).value();

  const std::string missing = CopyModelDir(Dir("bert"), Scratch("missing_tensor"));
  auto without = tensors;
  without.erase("bert.encoder.layer.1.intermediate.dense.bias");
  ASSERT_TRUE(WriteSafetensors(missing + "/model.safetensors", without).ok());
  auto m = LoadBertModel(missing, ModelOptions());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(m.status().message()), HasSubstr("bert.encoder.layer.1.intermediate.dense.bias"));
  EXPECT_THAT(std::string(m.status().message()), HasSubstr("model.safetensors"));

  const std::string misshapen = CopyModelDir(Dir("bert"), Scratch("wrong_shape"));
  auto reshaped = tensors;
  reshaped["bert.encoder.layer.0.attention.self.key.weight"] = at::zeros({32, 31});
  ASSERT_TRUE(WriteSafetensors(misshapen + "/model.safetensors", reshaped).ok());
  m = LoadBertModel(misshapen, ModelOptions());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(m.status().message()), HasSubstr("bert.encoder.layer.0.attention.self.key.weight"));
  EXPECT_THAT(std::string(m.status().message()), HasSubstr("[32,31]"));

  const std::string no_weights = CopyModelDir(Dir("bert"), Scratch("no_weights"));
  m = LoadBertModel(no_weights, ModelOptions());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(m.status().message()), HasSubstr("model.safetensors"));

  const std::string no_anchor = CopyModelDir(Dir("bert"), Scratch("no_word_embeddings"));
  auto anchorless = tensors;
  anchorless.erase("bert.embeddings.word_embeddings.weight");
  ASSERT_TRUE(WriteSafetensors(no_anchor + "/model.safetensors", anchorless).ok());
  m = LoadBertModel(no_anchor, ModelOptions());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(m.status().message()), HasSubstr("embeddings.word_embeddings.weight"));
}

TEST_F(BertModelTest, MissingVocabIsNotFound) {
  const std::string dir = CopyModelDir(Dir("bert"), Scratch("no_vocab"));
  ::unlink((dir + "/vocab.txt").c_str());
  WriteText(dir + "/model.safetensors", ReadText(Dir("bert") + "/model.safetensors"));
  auto m = LoadBertModel(dir, ModelOptions());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(m.status().message()), HasSubstr("vocab.txt"));
}

TEST_F(BertModelTest, BadConfigAndOptionsAreClearErrors) {
  const std::string base = Dir("bert");
  const std::string weights = ReadText(base + "/model.safetensors");
  nlohmann::json config = nlohmann::json::parse(ReadText(base + "/config.json"));
  auto load_with = [&](const std::string& name, const nlohmann::json& c) {
    const std::string dir = CopyModelDir(base, Scratch(name));
    WriteText(dir + "/config.json", c.dump());
    WriteText(dir + "/model.safetensors", weights);
    return LoadBertModel(dir, ModelOptions()).status();
  };
  auto c = config;
  c["hidden_act"] = "mish";
  auto s = load_with("bad_act", c);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(s.message()), HasSubstr("mish"));
  c = config;
  c["num_attention_heads"] = 5;
  EXPECT_EQ(load_with("bad_heads", c).code(), absl::StatusCode::kInvalidArgument);
  c = config;
  c["hidden_size"] = "big";
  s = load_with("bad_hidden", c);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("config.json"));
  c = config;
  c["hidden_size"] = 64;  // tensors are 32 wide
  s = load_with("wrong_width", c);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("expected"));
  c = config;
  c["position_embedding_type"] = "relative_key";
  EXPECT_EQ(load_with("relative", c).code(), absl::StatusCode::kUnimplemented);

  ModelOptions options;
  options.dtype = "float16";
  EXPECT_EQ(LoadBertModel(base, options).status().code(), absl::StatusCode::kInvalidArgument);
  options = ModelOptions();
  options.device = "banana";
  EXPECT_EQ(LoadBertModel(base, options).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(BertModelTest, UnsupportedSentenceTransformersModuleIsUnimplemented) {
  const std::string dir = CopyModelDir(Dir("roberta"), Scratch("with_dense"));
  WriteText(dir + "/model.safetensors", ReadText(Dir("roberta") + "/model.safetensors"));
  ::mkdir((dir + "/1_Pooling").c_str(), 0755);
  WriteText(dir + "/1_Pooling/config.json", ReadText(Dir("roberta") + "/1_Pooling/config.json"));
  WriteText(dir + "/modules.json", R"([{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "path": "2_Dense", "type": "sentence_transformers.models.Dense"}])");
  auto m = LoadBertModel(dir, ModelOptions());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(m.status().message()), HasSubstr("Dense"));
}

}  // namespace
}  // namespace model
}  // namespace deltaserve
