// PEFT interop: adapters written by hand in PEFT's save_pretrained layout (adapter_config.json +
// adapter_model.safetensors with PEFT's exact keys), imported for the tiny BERT and checked against independent
// references (merged weights, hand-built prefixes / prompts, the HF head formula); export + import round trips;
// every unsupported option and malformed input gives the right code and a message that names it.
#include "server/delta/peft.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <cmath>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/common/file_util.h"
#include "server/common/sha256.h"
#include "server/delta/delta_batch.h"
#include "server/delta/delta_pack.h"
#include "server/model/safetensors.h"
#include "tests/delta/delta_test_util.h"

namespace deltaserve {
namespace delta {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using testing::MakeTempDir;
using testing::RandomRows;
using testing::RandomTensor;
using testing::RunRows;

constexpr char kBase[] = "base_model.model.";

// A PEFT adapter directory's contents.
struct PeftFiles {
  nlohmann::json config = nlohmann::json::object();
  std::map<std::string, at::Tensor> tensors;
  std::map<std::string, std::string> metadata = {{"format", "pt"}};
};

std::string Write(const PeftFiles& files) {
  const std::string dir = MakeTempDir("peft_test");
  std::ofstream(dir + "/adapter_config.json") << files.config.dump(2);
  const absl::Status st = model::WriteSafetensors(dir + "/adapter_model.safetensors", files.tensors, files.metadata);
  EXPECT_TRUE(st.ok()) << st;
  return dir;
}

const model::ModuleInfo& Module(const model::Model& model, const std::string& name) {
  for (const auto& m : model.modules()) {
    if (m.name == name) return m;
  }
  ADD_FAILURE() << "no module " << name;
  return model.modules().front();
}

const std::vector<std::string> kLoraModules = {
    "encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value",
    "encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.value", "encoder.layer.1.output.dense"};

// A LoRA adapter as PEFT saves it: keys "base_model.model.<prefix><module>.lora_A.weight" [r, in] and
// ".lora_B.weight" [out, r].
PeftFiles LoraFiles(const model::Model& model, const std::string& prefix, int64_t r, double alpha, uint64_t seed,
                    const std::vector<std::string>& modules = kLoraModules) {
  PeftFiles f;
  f.config = {{"peft_type", "LORA"},
              {"task_type", "FEATURE_EXTRACTION"},
              {"r", r},
              {"lora_alpha", alpha},
              {"lora_dropout", 0.1},
              {"target_modules", {"query", "value", "output.dense"}},
              {"bias", "none"},
              {"fan_in_fan_out", false},
              {"inference_mode", true},
              {"base_model_name_or_path", "tiny-bert"},
              {"init_lora_weights", true},
              {"use_rslora", false},
              {"use_dora", false},
              {"rank_pattern", nlohmann::json::object()},
              {"alpha_pattern", nlohmann::json::object()},
              {"modules_to_save", nullptr}};
  for (const std::string& name : modules) {
    const model::ModuleInfo& m = Module(model, name);
    f.tensors[absl::StrCat(kBase, prefix, name, ".lora_A.weight")] =
        RandomTensor({r, m.in_features}, 1.0 / std::sqrt(static_cast<double>(m.in_features)), seed++);
    f.tensors[absl::StrCat(kBase, prefix, name, ".lora_B.weight")] = RandomTensor({m.out_features, r}, 0.1, seed++);
  }
  return f;
}

absl::StatusOr<PackContents> Import(const PeftFiles& files, const PeftImportOptions& options = {}) {
  return ImportPeft(Write(files), *testing::TinyBert(), options);
}

PackContents ImportOk(const PeftFiles& files, const PeftImportOptions& options = {}) {
  absl::StatusOr<PackContents> c = Import(files, options);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *c : PackContents{};
}

const MethodSpec* FindMethod(const PackContents& c, MethodKind kind) {
  for (const MethodSpec& m : c.methods) {
    if (m.kind == kind) return &m;
  }
  return nullptr;
}

// The independent reference: each listed linear recomputed from the backbone's weights,
//   y = out_scale * linear(in_scale * x, W + delta_w, bias (replaced when given)).
class ReferenceLinears : public model::ForwardHooks {
 public:
  explicit ReferenceLinears(const model::Model& model) : model_(model) {}

  std::map<std::string, at::Tensor> delta_w, bias, in_scale, out_scale;

  void OnLinear(const model::ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override {
    const std::string& n = module.name;
    if (!delta_w.count(n) && !bias.count(n) && !in_scale.count(n) && !out_scale.count(n)) return;
    at::Tensor w = model_.parameters().at(n + ".weight");
    at::Tensor b = model_.parameters().at(n + ".bias");
    if (delta_w.count(n)) w = w + delta_w.at(n);
    if (bias.count(n)) b = bias.at(n);
    at::Tensor x = in_scale.count(n) ? input * in_scale.at(n) : input;
    at::Tensor y = at::linear(x, w, b);
    if (out_scale.count(n)) y = y * out_scale.at(n);
    *output = y;
  }

 private:
  const model::Model& model_;
};

// Largest |difference| between the pack's forward on `rows` and the reference hooks' forward.
double PackVsReference(const PackContents& contents, model::ForwardHooks* reference,
                       const std::vector<std::vector<int64_t>>& rows) {
  const model::Model& model = *testing::TinyBert();
  c10::InferenceMode guard;
  auto pack = DeltaPack::FromContents(contents, model, {});
  EXPECT_TRUE(pack.ok()) << pack.status();
  if (!pack.ok()) return 1e9;
  std::vector<const DeltaPack*> packs(rows.size(), pack->get());
  auto hooks = DeltaBatch::Create(packs, model);
  EXPECT_TRUE(hooks.ok()) << hooks.status();
  if (!hooks.ok()) return 1e9;
  auto got = RunRows(model, rows, hooks->get());
  auto want = RunRows(model, rows, reference);
  EXPECT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(want.ok()) << want.status();
  if (!got.ok() || !want.ok()) return 1e9;
  EXPECT_EQ(got->hidden_states.sizes(), want->hidden_states.sizes());
  if (got->hidden_states.sizes() != want->hidden_states.sizes()) return 1e9;
  const at::Tensor mask = want->attention_mask.unsqueeze(-1);
  const double hidden = ((got->hidden_states - want->hidden_states) * mask).abs().max().item<double>();
  const double pooled = (got->pooled - want->pooled).abs().max().item<double>();
  return std::max(hidden, pooled);
}

// Largest |difference| between the base model and the reference hooks on `rows`: a comparison with the
// reference only means something when this is large.
double BaseVsReference(model::ForwardHooks* reference, const std::vector<std::vector<int64_t>>& rows) {
  const model::Model& model = *testing::TinyBert();
  c10::InferenceMode guard;
  auto base = RunRows(model, rows, nullptr);
  auto ref = RunRows(model, rows, reference);
  EXPECT_TRUE(base.ok() && ref.ok());
  if (!base.ok() || !ref.ok()) return 0;
  return (base->pooled - ref->pooled).abs().max().item<double>();
}

// The merged-weight reference of a PEFT LoRA adapter with scale `s`.
std::unique_ptr<ReferenceLinears> MergedLora(const PeftFiles& f, const std::string& prefix, double s,
                                             const std::vector<std::string>& modules = kLoraModules) {
  auto ref = std::make_unique<ReferenceLinears>(*testing::TinyBert());
  for (const std::string& name : modules) {
    const at::Tensor a = f.tensors.at(absl::StrCat(kBase, prefix, name, ".lora_A.weight"));
    const at::Tensor b = f.tensors.at(absl::StrCat(kBase, prefix, name, ".lora_B.weight"));
    ref->delta_w[name] = at::matmul(b, a) * s;
  }
  return ref;
}

std::vector<std::vector<int64_t>> Rows() { return RandomRows(*testing::TinyBert(), 3, 2, 9, 77); }

void ExpectStatus(const absl::Status& st, absl::StatusCode code, const std::vector<std::string>& parts) {
  EXPECT_EQ(st.code(), code) << st;
  for (const std::string& p : parts) EXPECT_THAT(std::string(st.message()), HasSubstr(p));
}

class PeftTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = testing::TinyBert();
    ASSERT_NE(model_, nullptr);
  }
  std::shared_ptr<const model::Model> model_;
};

// ----------------------------------------------------------------------------------------------------- LoRA

TEST_F(PeftTest, LoraImportMatchesMergedWeights) {
  const PeftFiles f = LoraFiles(*model_, "", 4, 8, 10);
  const PackContents c = ImportOk(f);
  ASSERT_EQ(c.methods.size(), 1u);
  const MethodSpec& lora = c.methods[0];
  EXPECT_EQ(lora.kind, MethodKind::kLora);
  EXPECT_EQ(lora.config["rank"], 4);
  EXPECT_EQ(lora.config["alpha"].get<double>(), 8.0);
  EXPECT_EQ(lora.config["targets"], nlohmann::json(std::vector<std::string>(kLoraModules)));
  EXPECT_FALSE(c.head.has_value());
  EXPECT_EQ(c.manifest.backbone_fingerprint, model_->info().fingerprint);
  EXPECT_EQ(c.manifest.backbone_family, "bert");
  EXPECT_EQ(c.manifest.provenance["imported_from"], "peft");
  EXPECT_EQ(c.manifest.provenance["peft_type"], "LORA");
  EXPECT_EQ(c.manifest.provenance["base_model_name_or_path"], "tiny-bert");
  EXPECT_EQ(c.manifest.provenance["task_type"], "FEATURE_EXTRACTION");
  auto ref = MergedLora(f, "", 8.0 / 4);
  EXPECT_GT(BaseVsReference(ref.get(), Rows()), 1e-2);
  EXPECT_LT(PackVsReference(c, ref.get(), Rows()), 1e-5);
}

TEST_F(PeftTest, LoraKeysWithModelPrefixGiveTheSameMethod) {
  const PackContents plain = ImportOk(LoraFiles(*model_, "", 4, 8, 10));
  const PeftFiles prefixed_files = LoraFiles(*model_, "bert.", 4, 8, 10);
  const PackContents prefixed = ImportOk(prefixed_files);
  ASSERT_EQ(plain.methods.size(), 1u);
  ASSERT_EQ(prefixed.methods.size(), 1u);
  EXPECT_EQ(plain.methods[0].config, prefixed.methods[0].config);
  ASSERT_EQ(plain.methods[0].tensors.size(), prefixed.methods[0].tensors.size());
  for (const auto& [name, t] : plain.methods[0].tensors) {
    EXPECT_TRUE(at::equal(t, prefixed.methods[0].tensors.at(name))) << name;
  }
  EXPECT_EQ(prefixed.manifest.provenance["module_prefix"], "bert.");
  auto ref = MergedLora(prefixed_files, "bert.", 2.0);
  EXPECT_LT(PackVsReference(prefixed, ref.get(), Rows()), 1e-5);
}

TEST_F(PeftTest, LoraKeysWithoutBaseModelPrefixAreAccepted) {
  PeftFiles f = LoraFiles(*model_, "", 2, 4, 30);
  PeftFiles bare = f;
  bare.tensors.clear();
  for (const auto& [k, t] : f.tensors) bare.tensors[k.substr(sizeof(kBase) - 1)] = t;
  const PackContents c = ImportOk(bare);
  auto ref = MergedLora(f, "", 2.0);
  EXPECT_LT(PackVsReference(c, ref.get(), Rows()), 1e-5);
}

TEST_F(PeftTest, FanInFanOutKeepsTheNnLinearLayoutOfTheFactors) {
  // PEFT's lora_A / lora_B are nn.Linear in both cases; fan_in_fan_out only transposes the merged delta of a
  // Conv1D base layer (and PEFT resets it to false for nn.Linear targets such as BERT's).
  PeftFiles f = LoraFiles(*model_, "bert.", 4, 16, 50);
  f.config["fan_in_fan_out"] = true;
  const PackContents c = ImportOk(f);
  EXPECT_EQ(c.manifest.provenance["fan_in_fan_out"], true);
  EXPECT_THAT(c.manifest.provenance["notes"].dump(), HasSubstr("fan_in_fan_out"));
  auto ref = MergedLora(f, "bert.", 16.0 / 4);
  EXPECT_LT(PackVsReference(c, ref.get(), Rows()), 1e-5);

  // Factors stored transposed are not PEFT's layout: the key and its shape are named.
  PeftFiles transposed = f;
  const std::string key = absl::StrCat(kBase, "bert.encoder.layer.1.output.dense.lora_A.weight");
  transposed.tensors[key] = f.tensors.at(key).t().contiguous();  // [64, 4] instead of [4, 64]
  ExpectStatus(Import(transposed).status(), absl::StatusCode::kInvalidArgument,
               {"adapter_model.safetensors", key, "[64,4]", "expected [r, 64]"});
}

TEST_F(PeftTest, RsloraScaleIsExpressedThroughAlpha) {
  PeftFiles f = LoraFiles(*model_, "", 4, 8, 70);
  f.config["use_rslora"] = true;
  const PackContents c = ImportOk(f);
  ASSERT_EQ(c.methods.size(), 1u);
  // PEFT: s = 8 / sqrt(4) = 4; ours: alpha / r = 4 -> alpha 16.
  EXPECT_DOUBLE_EQ(c.methods[0].config["alpha"].get<double>(), 16.0);
  EXPECT_EQ(c.manifest.provenance["use_rslora"], true);
  EXPECT_EQ(c.manifest.provenance["lora_alpha"].get<double>(), 8.0);
  auto ref = MergedLora(f, "", 8.0 / std::sqrt(4.0));
  EXPECT_LT(PackVsReference(c, ref.get(), Rows()), 1e-5);
}

TEST_F(PeftTest, RankAndAlphaPatternsGivingOneValueAreSupported) {
  PeftFiles f = LoraFiles(*model_, "bert.", 4, 8, 90);
  f.config["r"] = 2;
  f.config["lora_alpha"] = 3;
  f.config["rank_pattern"] = {{"query", 4}, {"value", 4}, {"dense", 4}};
  f.config["alpha_pattern"] = {{"layer\\.[01]\\..*", 8}};
  const PackContents c = ImportOk(f);
  ASSERT_EQ(c.methods.size(), 1u);
  EXPECT_EQ(c.methods[0].config["rank"], 4);
  EXPECT_EQ(c.methods[0].config["alpha"].get<double>(), 8.0);
  auto ref = MergedLora(f, "bert.", 2.0);
  EXPECT_LT(PackVsReference(c, ref.get(), Rows()), 1e-5);
}

TEST_F(PeftTest, RankPatternWithSeveralRanksIsUnimplemented) {
  PeftFiles f = LoraFiles(*model_, "", 4, 8, 110, {"encoder.layer.0.attention.self.query"});
  PeftFiles g = LoraFiles(*model_, "", 2, 8, 120, {"encoder.layer.0.attention.self.value"});
  f.tensors.insert(g.tensors.begin(), g.tensors.end());
  f.config["rank_pattern"] = {{"value", 2}};
  ExpectStatus(Import(f).status(), absl::StatusCode::kUnimplemented, {"rank_pattern", "one rank"});
  // Without rank_pattern the second rank contradicts r: a malformed file.
  f.config["rank_pattern"] = nlohmann::json::object();
  ExpectStatus(Import(f).status(), absl::StatusCode::kInvalidArgument,
               {"encoder.layer.0.attention.self.value.lora_A.weight", "rank 2", "rank 4"});
}

TEST_F(PeftTest, AlphaPatternWithSeveralScalesIsUnimplemented) {
  PeftFiles f = LoraFiles(*model_, "", 4, 8, 130);
  f.config["alpha_pattern"] = {{"encoder.layer.1.output.dense", 32}};
  ExpectStatus(Import(f).status(), absl::StatusCode::kUnimplemented, {"alpha_pattern", "one alpha"});
}

TEST_F(PeftTest, LoraBiasAllBecomesBitFitDeltas) {
  PeftFiles f = LoraFiles(*model_, "bert.", 4, 8, 150);
  f.config["bias"] = "all";
  const auto& params = model_->parameters();
  // PEFT saves the full trained biases: of the LoRA-wrapped layers under ".base_layer.bias", of others as they are.
  const std::string q = "encoder.layer.0.attention.self.query", ln = "encoder.layer.1.output.LayerNorm",
                    ffn = "encoder.layer.0.intermediate.dense", same = "encoder.layer.1.attention.output.dense";
  const at::Tensor dq = RandomTensor({32}, 0.1, 160), dln = RandomTensor({32}, 0.1, 161),
                   dffn = RandomTensor({64}, 0.1, 162);
  f.tensors[absl::StrCat(kBase, "bert.", q, ".base_layer.bias")] = params.at(q + ".bias") + dq;
  f.tensors[absl::StrCat(kBase, "bert.", ln, ".bias")] = params.at(ln + ".bias") + dln;
  f.tensors[absl::StrCat(kBase, "bert.", ffn, ".bias")] = params.at(ffn + ".bias") + dffn;
  f.tensors[absl::StrCat(kBase, "bert.", same, ".bias")] = params.at(same + ".bias").clone();
  f.tensors[absl::StrCat(kBase, "bert.pooler.dense.bias")] = RandomTensor({32}, 0.1, 163);
  const PackContents c = ImportOk(f);
  ASSERT_EQ(c.methods.size(), 2u);
  const MethodSpec* bitfit = FindMethod(c, MethodKind::kBitFit);
  ASSERT_NE(bitfit, nullptr);
  EXPECT_EQ(bitfit->config["targets"], nlohmann::json({q, ffn, ln}));
  EXPECT_TRUE(at::allclose(bitfit->tensors.at(q + ".bias"), dq, 0, 1e-6));
  EXPECT_TRUE(at::allclose(bitfit->tensors.at(ln + ".bias"), dln, 0, 1e-6));
  EXPECT_EQ(c.manifest.provenance["bias"], "all");
  EXPECT_THAT(c.manifest.provenance["notes"].dump(), AllOf(HasSubstr("equal the backbone"), HasSubstr("pooler")));

  // Reference: merged LoRA weights with the saved biases (the layer norm's bias added to its output).
  auto ref = MergedLora(f, "bert.", 2.0);
  ref->bias[q] = f.tensors.at(absl::StrCat(kBase, "bert.", q, ".base_layer.bias"));
  ref->bias[ffn] = f.tensors.at(absl::StrCat(kBase, "bert.", ffn, ".bias"));
  class WithLayerNorm : public model::ForwardHooks {
   public:
    WithLayerNorm(ReferenceLinears* linears, std::string ln, at::Tensor delta)
        : linears_(linears), ln_(std::move(ln)), delta_(std::move(delta)) {}
    void OnLinear(const model::ModuleInfo& m, const at::Tensor& in, at::Tensor* out) override {
      linears_->OnLinear(m, in, out);
    }
    void OnLayerNorm(const model::ModuleInfo& m, const at::Tensor& in, at::Tensor* out) override {
      if (m.name == ln_) *out = *out + delta_;
    }

   private:
    ReferenceLinears* linears_;
    std::string ln_;
    at::Tensor delta_;
  } reference(ref.get(), ln, dln);
  EXPECT_GT(BaseVsReference(&reference, Rows()), 1e-2);
  EXPECT_LT(PackVsReference(c, &reference, Rows()), 1e-5);
}

TEST_F(PeftTest, BiasTensorsNeedABiasOption) {
  PeftFiles f = LoraFiles(*model_, "", 4, 8, 170);
  const std::string key = absl::StrCat(kBase, "encoder.layer.0.attention.self.query.base_layer.bias");
  f.tensors[key] = RandomTensor({32}, 0.1, 171);
  ExpectStatus(Import(f).status(), absl::StatusCode::kInvalidArgument, {key, "bias \"none\""});
}

// ----------------------------------------------------------------------------------------------------- IA3

TEST_F(PeftTest, Ia3ImportMatchesScaledReference) {
  PeftFiles f;
  f.config = {{"peft_type", "IA3"},
              {"task_type", "FEATURE_EXTRACTION"},
              {"target_modules", {"key", "value", "output.dense"}},
              {"feedforward_modules", {"output.dense"}},
              {"fan_in_fan_out", false},
              {"inference_mode", true},
              {"init_ia3_weights", true}};
  auto ref = std::make_unique<ReferenceLinears>(*model_);
  uint64_t seed = 200;
  for (int l = 0; l < 2; ++l) {
    for (const char* kv : {"key", "value"}) {
      const std::string name = absl::StrCat("encoder.layer.", l, ".attention.self.", kv);
      const at::Tensor s = at::ones({32, 1}) + RandomTensor({32, 1}, 0.2, seed++);  // [out, 1]
      // PEFT's key: the ParameterDict entry with the adapter name removed (no ".weight").
      f.tensors[absl::StrCat(kBase, "bert.", name, ".ia3_l")] = s;
      ref->out_scale[name] = s.reshape({-1});
    }
    const std::string ff = absl::StrCat("encoder.layer.", l, ".output.dense");
    const at::Tensor s = at::ones({1, 64}) + RandomTensor({1, 64}, 0.2, seed++);  // [1, in]
    f.tensors[absl::StrCat(kBase, "bert.", ff, ".ia3_l.weight")] = s;  // the spelling with ".weight" works too
    ref->in_scale[ff] = s.reshape({-1});
  }
  const PackContents c = ImportOk(f);
  ASSERT_EQ(c.methods.size(), 1u);
  EXPECT_EQ(c.methods[0].kind, MethodKind::kIa3);
  EXPECT_EQ(c.methods[0].config["feedforward"],
            nlohmann::json({"encoder.layer.0.output.dense", "encoder.layer.1.output.dense"}));
  EXPECT_EQ(c.methods[0].config["targets"].size(), 6u);
  EXPECT_EQ(c.methods[0].tensors.at("encoder.layer.0.attention.self.key.ia3_l").dim(), 1);
  EXPECT_GT(BaseVsReference(ref.get(), Rows()), 1e-2);
  EXPECT_LT(PackVsReference(c, ref.get(), Rows()), 1e-5);
}

TEST_F(PeftTest, Ia3WrongShapeNamesTheKey) {
  PeftFiles f;
  f.config = {{"peft_type", "IA3"}, {"target_modules", {"key"}}, {"feedforward_modules", nlohmann::json::array()}};
  const std::string key = absl::StrCat(kBase, "encoder.layer.0.attention.self.key.ia3_l");
  f.tensors[key] = at::ones({32});
  ExpectStatus(Import(f).status(), absl::StatusCode::kInvalidArgument, {key, "[32]", "[32, 1]", "[1, 32]"});
}

// ------------------------------------------------------------------------------------------- prompt tuning

// Reference for one row: the soft tokens spliced in front of the token embeddings by hand.
class PrependPrompt : public model::ForwardHooks {
 public:
  explicit PrependPrompt(at::Tensor prompt) : prompt_(std::move(prompt)) {}
  void OnTokenEmbeddings(at::Tensor* hidden, at::Tensor* mask) override {
    const int64_t p = prompt_.size(0);
    *hidden = at::cat({prompt_.unsqueeze(0).to(hidden->scalar_type()), *hidden}, 1);
    *mask = at::cat({at::ones({1, p}, mask->options()), *mask}, 1);
  }

 private:
  at::Tensor prompt_;
};

TEST_F(PeftTest, PromptTuningImportMatchesPrependedEmbeddings) {
  PeftFiles f;
  f.config = {{"peft_type", "PROMPT_TUNING"},
              {"task_type", "FEATURE_EXTRACTION"},
              {"num_virtual_tokens", 3},
              {"token_dim", 32},
              {"num_transformer_submodules", 1},
              {"num_attention_heads", 4},
              {"num_layers", 2},
              {"prompt_tuning_init", "TEXT"},
              {"prompt_tuning_init_text", "classify"},
              {"tokenizer_name_or_path", "tiny-bert"}};
  const at::Tensor prompt = RandomTensor({3, 32}, 0.5, 300);
  f.tensors["prompt_embeddings"] = prompt;
  const PackContents c = ImportOk(f);
  ASSERT_EQ(c.methods.size(), 1u);
  EXPECT_EQ(c.methods[0].kind, MethodKind::kPrompt);
  EXPECT_EQ(c.methods[0].config["num_virtual_tokens"], 3);
  EXPECT_TRUE(at::equal(c.methods[0].tensors.at("prompt_embeddings"), prompt));
  EXPECT_EQ(c.manifest.provenance["prompt_tuning_init"], "TEXT");
  for (const auto& row : Rows()) {
    PrependPrompt reference(prompt);
    EXPECT_LT(PackVsReference(c, &reference, {row}), 1e-5);
  }
}

TEST_F(PeftTest, PTuningImportsItsEncodedPromptsAsPromptTuning) {
  PeftFiles f;
  f.config = {{"peft_type", "P_TUNING"},
              {"num_virtual_tokens", 2},
              {"token_dim", 32},
              {"num_transformer_submodules", 1},
              {"encoder_reparameterization_type", "MLP"},
              {"encoder_hidden_size", 16}};
  const at::Tensor prompt = RandomTensor({2, 32}, 0.5, 310);
  f.tensors["prompt_embeddings"] = prompt;
  const PackContents c = ImportOk(f);
  ASSERT_EQ(c.methods.size(), 1u);
  PrependPrompt reference(prompt);
  EXPECT_LT(PackVsReference(c, &reference, {Rows()[0]}), 1e-5);
}

TEST_F(PeftTest, PromptTuningOptionsThatNeedMoreAreUnimplemented) {
  PeftFiles f;
  f.config = {
      {"peft_type", "PROMPT_TUNING"}, {"num_virtual_tokens", 2}, {"token_dim", 32}, {"num_transformer_submodules", 2}};
  f.tensors["prompt_embeddings"] = RandomTensor({4, 32}, 0.5, 320);
  ExpectStatus(Import(f).status(), absl::StatusCode::kUnimplemented, {"num_transformer_submodules", "2"});
  f.config["num_transformer_submodules"] = 1;
  f.config["prompt_tuning_init"] = "FROM_THE_FUTURE";
  ExpectStatus(Import(f).status(), absl::StatusCode::kUnimplemented, {"prompt_tuning_init", "FROM_THE_FUTURE"});
  f.config["prompt_tuning_init"] = "RANDOM";
  ExpectStatus(Import(f).status(), absl::StatusCode::kInvalidArgument, {"prompt_embeddings", "[4,32]", "[2, 32]"});
  f.config["token_dim"] = 16;
  ExpectStatus(Import(f).status(), absl::StatusCode::kInvalidArgument, {"token_dim", "16", "32"});
}

// ------------------------------------------------------------------------------------------- prefix tuning

constexpr int64_t kP = 3, kL = 2, kNH = 4, kDH = 8, kH = kNH * kDH;

// The value PrefixFiles stores for (virtual token p, layer l, key/value kv, head h, dim d): distinct everywhere.
float PrefixValue(int64_t p, int64_t l, int64_t kv, int64_t h, int64_t d) {
  return static_cast<float>(1000 * l + 100 * kv + 10 * h + p + 0.01 * d);
}

// prompt_embeddings [P, L*2*H] laid out as PEFT's get_prompt reads it: [P, 2L, NH, DH] with index 2l = keys.
PeftFiles PrefixFiles() {
  PeftFiles f;
  f.config = {{"peft_type", "PREFIX_TUNING"},
              {"task_type", "FEATURE_EXTRACTION"},
              {"num_virtual_tokens", kP},
              {"token_dim", kH},
              {"num_transformer_submodules", 1},
              {"num_attention_heads", kNH},
              {"num_layers", kL},
              {"encoder_hidden_size", kH},
              {"prefix_projection", false},
              {"inference_mode", true}};
  at::Tensor e = at::empty({kP, 2 * kL, kNH, kDH});
  auto a = e.accessor<float, 4>();
  for (int64_t p = 0; p < kP; ++p) {
    for (int64_t j = 0; j < 2 * kL; ++j) {
      for (int64_t h = 0; h < kNH; ++h) {
        for (int64_t d = 0; d < kDH; ++d) a[p][j][h][d] = PrefixValue(p, j / 2, j % 2, h, d);
      }
    }
  }
  f.tensors["prompt_embeddings"] = e.reshape({kP, 2 * kL * kH}).contiguous();
  return f;
}

TEST_F(PeftTest, PrefixTuningPutsKeysAndValuesInTheRightLayerAndHead) {
  const PackContents c = ImportOk(PrefixFiles());
  ASSERT_EQ(c.methods.size(), 1u);
  const MethodSpec& prefix = c.methods[0];
  EXPECT_EQ(prefix.kind, MethodKind::kPrefix);
  EXPECT_EQ(prefix.config["num_virtual_tokens"], kP);
  for (int64_t l = 0; l < kL; ++l) {
    for (int64_t kv = 0; kv < 2; ++kv) {
      const std::string name =
          absl::StrCat("encoder.layer.", l, ".attention.self.", kv == 0 ? "prefix_keys" : "prefix_values");
      ASSERT_TRUE(prefix.tensors.count(name)) << name;
      const at::Tensor t = prefix.tensors.at(name);
      ASSERT_EQ(t.sizes(), (std::vector<int64_t>{kP, kH}));
      auto a = t.accessor<float, 2>();
      for (int64_t p = 0; p < kP; ++p) {
        for (int64_t h = 0; h < kNH; ++h) {
          for (int64_t d = 0; d < kDH; ++d) {
            ASSERT_EQ(a[p][h * kDH + d], PrefixValue(p, l, kv, h, d)) << name << " p=" << p << " h=" << h;
          }
        }
      }
    }
  }
  EXPECT_THAT(c.manifest.provenance["notes"].dump(), HasSubstr("positions"));
}

// Reference: PEFT's get_prompt written out (view, permute([2,0,3,1,4]), split(2)) and the per-layer
// (key, value) pair concatenated before the keys / values, as HF BERT's self-attention does with past_key_value.
class PeftPastKeyValues : public model::ForwardHooks {
 public:
  explicit PeftPastKeyValues(const at::Tensor& prompt_embeddings) {
    const at::Tensor pkv = prompt_embeddings.view({1, kP, 2 * kL, kNH, kDH}).permute({2, 0, 3, 1, 4});
    layers_ = pkv.split(2);  // per layer [2, 1, NH, P, DH]
  }
  void OnAttentionKeyValue(const model::ModuleInfo& attention, at::Tensor* keys, at::Tensor* values,
                           at::Tensor* key_mask) override {
    const at::Tensor& kv = layers_.at(attention.layer);
    const int64_t b = keys->size(0);
    *keys = at::cat({kv[0].expand({b, kNH, kP, kDH}).to(keys->scalar_type()), *keys}, 2);
    *values = at::cat({kv[1].expand({b, kNH, kP, kDH}).to(values->scalar_type()), *values}, 2);
    *key_mask = at::cat({at::ones({b, kP}, key_mask->options()), *key_mask}, 1);
  }

 private:
  std::vector<at::Tensor> layers_;
};

TEST_F(PeftTest, PrefixTuningMatchesPeftPastKeyValues) {
  PeftFiles f = PrefixFiles();
  f.tensors["prompt_embeddings"] = RandomTensor({kP, 2 * kL * kH}, 0.5, 400);  // realistic magnitudes
  const PackContents c = ImportOk(f);
  PeftPastKeyValues reference(f.tensors["prompt_embeddings"]);
  EXPECT_GT(BaseVsReference(&reference, Rows()), 1e-2);
  EXPECT_LT(PackVsReference(c, &reference, Rows()), 1e-5);
}

TEST_F(PeftTest, PrefixProjectionWithoutProjectedPrefixesIsUnimplemented) {
  PeftFiles f = PrefixFiles();
  f.config["prefix_projection"] = true;
  // Saved in training mode, PEFT runs the MLP before saving: the projected prefixes import fine.
  const PackContents c = ImportOk(f);
  EXPECT_EQ(c.manifest.provenance["prefix_projection"], true);
  // The un-projected token embeddings [P, token_dim] cannot be used without the MLP.
  f.tensors["prompt_embeddings"] = RandomTensor({kP, kH}, 0.5, 410);
  ExpectStatus(Import(f).status(), absl::StatusCode::kUnimplemented,
               {"prefix_projection", "save the projected prefixes"});
}

TEST_F(PeftTest, PrefixTuningLayoutMismatchesAreInvalid) {
  PeftFiles f = PrefixFiles();
  f.config["num_layers"] = 3;
  ExpectStatus(Import(f).status(), absl::StatusCode::kInvalidArgument, {"num_layers", "3", "2 attention layers"});
  f = PrefixFiles();
  f.config["num_attention_heads"] = 2;
  ExpectStatus(Import(f).status(), absl::StatusCode::kInvalidArgument, {"num_attention_heads", "4 heads of 8"});
  f = PrefixFiles();
  f.config["num_transformer_submodules"] = 2;
  ExpectStatus(Import(f).status(), absl::StatusCode::kUnimplemented, {"num_transformer_submodules"});
  f = PrefixFiles();
  f.tensors["prompt_embeddings"] = RandomTensor({kP + 1, 2 * kL * kH}, 0.5, 420);
  ExpectStatus(Import(f).status(), absl::StatusCode::kInvalidArgument, {"prompt_embeddings", "[4,128]", "[3, 128]"});
}

// ----------------------------------------------------------------------------------------------------- heads

// A base checkpoint holding the HF pooler (as BertForSequenceClassification's model.safetensors does).
std::string WritePooler(const at::Tensor& w, const at::Tensor& b) {
  const std::string path = MakeTempDir("peft_test") + "/model.safetensors";
  EXPECT_TRUE(model::WriteSafetensors(path, {{"bert.pooler.dense.weight", w},
                                             {"bert.pooler.dense.bias", b},
                                             {"bert.embeddings.word_embeddings.weight", at::zeros({4, 32})}})
                  .ok());
  return path;
}

at::Tensor Pooled(const model::Model& model) {
  c10::InferenceMode guard;
  auto out = RunRows(model, Rows(), nullptr);
  EXPECT_TRUE(out.ok()) << out.status();
  return out.ok() ? out->pooled : at::Tensor();
}

TEST_F(PeftTest, BertClassifierWithPoolerIsReproducedExactly) {
  PeftFiles f = LoraFiles(*model_, "bert.", 4, 8, 500);
  f.config["task_type"] = "SEQ_CLS";
  f.config["modules_to_save"] = {"classifier", "score"};
  const at::Tensor cw = RandomTensor({3, 32}, 0.3, 510), cb = RandomTensor({3}, 0.1, 511);
  f.tensors[absl::StrCat(kBase, "classifier.weight")] = cw;
  f.tensors[absl::StrCat(kBase, "classifier.bias")] = cb;
  const at::Tensor pw = RandomTensor({32, 32}, 0.2, 512), pb = RandomTensor({32}, 0.1, 513);
  PeftImportOptions options;
  options.base_checkpoint = WritePooler(pw, pb);
  options.labels = {"neg", "neutral", "pos"};
  const PackContents c = ImportOk(f, options);
  ASSERT_TRUE(c.head.has_value());
  EXPECT_EQ(c.head->config["labels"], nlohmann::json({"neg", "neutral", "pos"}));
  EXPECT_EQ(c.head->config["activation"], "tanh");
  EXPECT_EQ(c.manifest.provenance["head_exact"], true);
  EXPECT_EQ(c.manifest.provenance["head_pooler_from"], "base_checkpoint");

  // HF: logits = classifier(tanh(pooler.dense(CLS state))); the tiny BERT pools the raw CLS state.
  ASSERT_EQ(model_->info().pooling, "cls");
  auto head = Head::Create(*c.head, *model_);
  ASSERT_TRUE(head.ok()) << head.status();
  const at::Tensor pooled = Pooled(*model_);
  auto logits = (*head)->Apply(pooled);
  ASSERT_TRUE(logits.ok()) << logits.status();
  const at::Tensor want = at::linear(at::tanh(at::linear(pooled, pw, pb)), cw, cb);
  EXPECT_LT((*logits - want).abs().max().item<double>(), 1e-5);
}

TEST_F(PeftTest, BertClassifierWithoutPoolerIsSkippedUnlessRequested) {
  PeftFiles f = LoraFiles(*model_, "bert.", 4, 8, 520);
  // The older modules_to_save spelling.
  f.tensors[absl::StrCat(kBase, "classifier.modules_to_save.default.weight")] = RandomTensor({2, 32}, 0.3, 521);
  f.tensors[absl::StrCat(kBase, "classifier.modules_to_save.default.bias")] = RandomTensor({2}, 0.1, 522);
  f.tensors[absl::StrCat(kBase, "classifier.original_module.weight")] = RandomTensor({2, 32}, 0.3, 523);
  f.tensors[absl::StrCat(kBase, "classifier.original_module.bias")] = RandomTensor({2}, 0.1, 524);
  const PackContents skipped = ImportOk(f);
  EXPECT_FALSE(skipped.head.has_value());
  EXPECT_THAT(skipped.manifest.provenance["notes"].dump(), AllOf(HasSubstr("not imported"), HasSubstr("pooler")));

  PeftImportOptions options;
  options.import_head = true;
  const PackContents forced = ImportOk(f, options);
  ASSERT_TRUE(forced.head.has_value());
  EXPECT_EQ(forced.head->config["labels"], nlohmann::json({"LABEL_0", "LABEL_1"}));
  EXPECT_FALSE(forced.head->tensors.count("dense.weight"));
  EXPECT_EQ(forced.manifest.provenance["head_exact"], false);

  options.skip_head = true;
  EXPECT_FALSE(ImportOk(f, options).head.has_value());

  options.skip_head = false;
  options.labels = {"a", "b", "c"};
  ExpectStatus(Import(f, options).status(), absl::StatusCode::kInvalidArgument, {"3 labels", "2 outputs"});
}

TEST_F(PeftTest, RobertaStyleClassifierImportsAsDenseTanhHead) {
  PeftFiles f;
  f.config = {{"peft_type", "PROMPT_TUNING"},    {"task_type", "SEQ_CLS"},
              {"num_virtual_tokens", 2},         {"token_dim", 32},
              {"num_transformer_submodules", 1}, {"modules_to_save", {"classifier"}}};
  f.tensors["prompt_embeddings"] = RandomTensor({2, 32}, 0.5, 530);
  const at::Tensor dw = RandomTensor({32, 32}, 0.2, 531), db = RandomTensor({32}, 0.1, 532),
                   ow = RandomTensor({1, 32}, 0.2, 533), ob = RandomTensor({1}, 0.1, 534);
  f.tensors[absl::StrCat(kBase, "classifier.dense.weight")] = dw;
  f.tensors[absl::StrCat(kBase, "classifier.dense.bias")] = db;
  f.tensors[absl::StrCat(kBase, "classifier.out_proj.weight")] = ow;
  f.tensors[absl::StrCat(kBase, "classifier.out_proj.bias")] = ob;
  const PackContents c = ImportOk(f);
  ASSERT_TRUE(c.head.has_value());
  EXPECT_EQ(c.head->config["type"], "regression");  // one output and no labels
  EXPECT_EQ(c.manifest.provenance["head_exact"], true);
  auto head = Head::Create(*c.head, *model_);
  ASSERT_TRUE(head.ok()) << head.status();
  const at::Tensor pooled = Pooled(*model_);
  auto got = (*head)->Apply(pooled);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_LT((*got - at::linear(at::tanh(at::linear(pooled, dw, db)), ow, ob)).abs().max().item<double>(), 1e-5);
}

// ------------------------------------------------------------------------------------------------ round trip

TEST_F(PeftTest, ExportThenImportGivesTheSamePack) {
  PackContents pack;
  pack.manifest.name = "sst2-lora";
  pack.manifest.backbone_family = "bert";
  pack.manifest.backbone_fingerprint = model_->info().fingerprint;
  pack.manifest.provenance = {{"trainer", "unit test"}, {"metrics", {{"accuracy", 0.5}}}};
  MethodSpec lora;
  lora.kind = MethodKind::kLora;
  lora.config = {{"rank", 3}, {"alpha", 5.5}, {"targets", {"query", "encoder.layer.1.intermediate.dense"}}};
  uint64_t seed = 600;
  for (const char* name : {"encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query",
                           "encoder.layer.1.intermediate.dense"}) {
    const model::ModuleInfo& m = Module(*model_, name);
    lora.tensors[absl::StrCat(name, ".lora_A")] = RandomTensor({3, m.in_features}, 0.2, seed++);
    lora.tensors[absl::StrCat(name, ".lora_B")] = RandomTensor({m.out_features, 3}, 0.2, seed++);
  }
  pack.methods.push_back(lora);
  auto bound = DeltaPack::FromContents(pack, *model_, {});
  ASSERT_TRUE(bound.ok()) << bound.status();
  PackContents canonical;
  canonical.manifest = (*bound)->manifest();
  canonical.methods.push_back((*bound)->methods()[0]->spec());
  auto canonical_bytes = SerializePack(canonical);
  ASSERT_TRUE(canonical_bytes.ok()) << canonical_bytes.status();

  for (const std::string prefix : {"", "bert."}) {
    SCOPED_TRACE(prefix);
    const std::string dir = MakeTempDir("peft_test") + "/exported";  // created by the export
    PeftExportOptions options;
    options.base_model_name_or_path = "tiny-bert";
    options.module_prefix = prefix;
    ASSERT_TRUE(ExportPeftLora(pack, *model_, dir, options).ok());

    // PEFT's layout.
    auto config = ReadJsonObject(dir + "/adapter_config.json");
    ASSERT_TRUE(config.ok()) << config.status();
    EXPECT_EQ((*config)["peft_type"], "LORA");
    EXPECT_EQ((*config)["r"], 3);
    EXPECT_EQ((*config)["lora_alpha"].get<double>(), 5.5);
    EXPECT_EQ((*config)["task_type"], "FEATURE_EXTRACTION");
    EXPECT_EQ((*config)["base_model_name_or_path"], "tiny-bert");
    EXPECT_EQ((*config)["inference_mode"], true);
    EXPECT_EQ((*config)["bias"], "none");
    EXPECT_EQ((*config)["fan_in_fan_out"], false);
    EXPECT_EQ((*config)["target_modules"],
              nlohmann::json({"encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query",
                              "encoder.layer.1.intermediate.dense"}));
    auto weights = model::SafetensorsFile::Open(dir + "/adapter_model.safetensors");
    ASSERT_TRUE(weights.ok()) << weights.status();
    EXPECT_EQ((*weights)->names().size(), 6u);
    const std::string key =
        absl::StrCat("base_model.model.", prefix, "encoder.layer.1.intermediate.dense.lora_A.weight");
    ASSERT_TRUE((*weights)->contains(key)) << key;
    EXPECT_EQ((*weights)->entry(key)->shape, (std::vector<int64_t>{3, 32}));
    EXPECT_EQ((*weights)->metadata().at("format"), "pt");

    auto back = ImportPeft(dir, *model_, {});
    ASSERT_TRUE(back.ok()) << back.status();
    auto bytes = SerializePack(*back);
    ASSERT_TRUE(bytes.ok()) << bytes.status();
    EXPECT_TRUE(*bytes == *canonical_bytes);
    EXPECT_EQ(Sha256Digest(*bytes), (*bound)->digest());
  }
}

TEST_F(PeftTest, ExportOfOtherMethodsIsUnimplemented) {
  PackContents pack = ImportOk(LoraFiles(*model_, "", 2, 2, 700));
  MethodSpec bitfit;
  bitfit.kind = MethodKind::kBitFit;
  bitfit.config = {{"targets", {"encoder.layer.0.output.dense"}}};
  bitfit.tensors["encoder.layer.0.output.dense.bias"] = RandomTensor({32}, 0.1, 701);
  PackContents with_bitfit = pack;
  with_bitfit.methods.push_back(bitfit);
  ExpectStatus(ExportPeftLora(with_bitfit, *model_, MakeTempDir("peft_test"), {}), absl::StatusCode::kUnimplemented,
               {"LoRA packs only", "bitfit"});
  PackContents prefix_only = ImportOk(PrefixFiles());
  ExpectStatus(ExportPeftLora(prefix_only, *model_, MakeTempDir("peft_test"), {}), absl::StatusCode::kUnimplemented,
               {"prefix"});
  PackContents with_head = pack;
  with_head.head = HeadSpec{};
  with_head.head->config = {{"type", "regression"}};
  with_head.head->tensors["out.weight"] = RandomTensor({1, 32}, 0.1, 702);
  with_head.head->tensors["out.bias"] = RandomTensor({1}, 0.1, 703);
  ExpectStatus(ExportPeftLora(with_head, *model_, MakeTempDir("peft_test"), {}), absl::StatusCode::kUnimplemented,
               {"head"});
  PeftExportOptions options;
  options.skip_head = true;
  EXPECT_TRUE(ExportPeftLora(with_head, *model_, MakeTempDir("peft_test"), options).ok());
  // The wrong backbone is refused before anything is written.
  PackContents other = pack;
  other.manifest.backbone_fingerprint = "sha256:" + std::string(64, 'a');
  EXPECT_EQ(ExportPeftLora(other, *model_, MakeTempDir("peft_test"), {}).code(), absl::StatusCode::kFailedPrecondition);
}

// ------------------------------------------------------------------------------------ unsupported options

TEST_F(PeftTest, UnsupportedLoraOptionsAreUnimplementedAndNamed) {
  struct Case {
    const char* option;
    nlohmann::json value;
  };
  for (const Case& c : std::vector<Case>{{"use_dora", true},
                                         {"lora_bias", true},
                                         {"init_lora_weights", "pissa_niter_4"},
                                         {"init_lora_weights", "olora"},
                                         {"layer_replication", {{0, 2}}},
                                         {"trainable_token_indices", {1, 2}},
                                         {"target_modules", {"query", "word_embeddings"}},
                                         {"target_modules", ".*embeddings.*"}}) {
    PeftFiles f = LoraFiles(*model_, "", 2, 2, 800);
    f.config[c.option] = c.value;
    ExpectStatus(Import(f).status(), absl::StatusCode::kUnimplemented, {c.option, "adapter_config.json"});
  }
}

TEST_F(PeftTest, UnsupportedTensorsAreUnimplementedAndNamed) {
  struct Case {
    std::string key;
    std::vector<int64_t> shape;
    std::string says;
  };
  for (const Case& c :
       std::vector<Case>{{"base_model.model.encoder.layer.0.attention.self.query.lora_magnitude_vector", {32}, "DoRA"},
                         {"base_model.model.embeddings.word_embeddings.lora_embedding_A", {2, 40}, "embedding"},
                         {"base_model.model.encoder.layer.0.attention.self.query.lora_B.bias", {32}, "lora_bias"},
                         {"base_model.model.encoder.layer.0.output.LayerNorm.weight", {32}, "modules_to_save"}}) {
    PeftFiles f = LoraFiles(*model_, "", 2, 2, 810);
    f.tensors[c.key] = RandomTensor(c.shape, 0.1, 811);
    ExpectStatus(Import(f).status(), absl::StatusCode::kUnimplemented, {c.key, c.says});
  }
}

TEST_F(PeftTest, BackboneModulesInModulesToSaveAreUnimplemented) {
  PeftFiles f = LoraFiles(*model_, "bert.", 2, 2, 815);
  f.config["modules_to_save"] = {"classifier", "LayerNorm"};
  const std::string key = absl::StrCat(kBase, "bert.encoder.layer.1.output.LayerNorm.bias");
  f.tensors[key] = RandomTensor({32}, 0.1, 816);
  ExpectStatus(Import(f).status(), absl::StatusCode::kUnimplemented, {key, "modules_to_save"});
}

TEST_F(PeftTest, UnknownPeftTypeListsTheSupportedOnes) {
  PeftFiles f = LoraFiles(*model_, "", 2, 2, 820);
  f.config["peft_type"] = "LOHA";
  ExpectStatus(Import(f).status(), absl::StatusCode::kUnimplemented,
               {"peft_type", "LOHA", "LORA, IA3, PROMPT_TUNING, P_TUNING, PREFIX_TUNING"});
}

// ------------------------------------------------------------------------------------------ malformed input

TEST_F(PeftTest, MalformedConfigIsInvalidAndNamesFileAndKey) {
  const std::string dir = Write(LoraFiles(*model_, "", 2, 2, 900));
  std::ofstream(dir + "/adapter_config.json") << "{\"peft_type\": \"LORA\", ";
  ExpectStatus(ImportPeft(dir, *model_, {}).status(), absl::StatusCode::kInvalidArgument,
               {"adapter_config.json", "not valid JSON"});
  std::ofstream(dir + "/adapter_config.json") << "[1, 2]";
  ExpectStatus(ImportPeft(dir, *model_, {}).status(), absl::StatusCode::kInvalidArgument,
               {"adapter_config.json", "not a JSON object"});

  PeftFiles f = LoraFiles(*model_, "", 2, 2, 900);
  f.config.erase("peft_type");
  ExpectStatus(Import(f).status(), absl::StatusCode::kInvalidArgument, {"adapter_config.json", "\"peft_type\""});
  f = LoraFiles(*model_, "", 2, 2, 900);
  f.config["r"] = "two";
  ExpectStatus(Import(f).status(), absl::StatusCode::kInvalidArgument, {"\"r\"", "positive integer"});
  f = LoraFiles(*model_, "", 2, 2, 900);
  f.config["use_rslora"] = "yes";
  ExpectStatus(Import(f).status(), absl::StatusCode::kInvalidArgument, {"\"use_rslora\""});
  f = LoraFiles(*model_, "", 2, 2, 900);
  f.config["bias"] = "some";
  ExpectStatus(Import(f).status(), absl::StatusCode::kInvalidArgument, {"\"bias\"", "some"});
  f = LoraFiles(*model_, "", 2, 2, 900);
  f.config["rank_pattern"] = {{"(query", 2}};
  ExpectStatus(Import(f).status(), absl::StatusCode::kInvalidArgument, {"rank_pattern", "(query"});
}

TEST_F(PeftTest, MissingOrMalformedWeightsFile) {
  const std::string dir = Write(LoraFiles(*model_, "", 2, 2, 910));
  std::ofstream(dir + "/adapter_model.safetensors") << "not a safetensors file at all";
  ExpectStatus(ImportPeft(dir, *model_, {}).status(), absl::StatusCode::kInvalidArgument,
               {"adapter_model.safetensors"});
  ASSERT_EQ(std::remove((dir + "/adapter_model.safetensors").c_str()), 0);
  ExpectStatus(ImportPeft(dir, *model_, {}).status(), absl::StatusCode::kNotFound, {"adapter_model.safetensors"});
  std::ofstream(dir + "/adapter_model.bin") << "pickle";
  ExpectStatus(ImportPeft(dir, *model_, {}).status(), absl::StatusCode::kUnimplemented, {"adapter_model.bin"});
  ExpectStatus(ImportPeft(MakeTempDir("peft_test") + "/nothing", *model_, {}).status(), absl::StatusCode::kNotFound,
               {"adapter_config.json"});
}

TEST_F(PeftTest, MalformedTensorsAreInvalidAndNamed) {
  const std::string q = absl::StrCat(kBase, "encoder.layer.0.attention.self.query");
  // A factor without its partner.
  PeftFiles f = LoraFiles(*model_, "", 2, 2, 920);
  f.tensors.erase(q + ".lora_B.weight");
  ExpectStatus(Import(f).status(), absl::StatusCode::kInvalidArgument, {q + ".lora_A.weight", "lora_B"});
  // B of the wrong shape.
  f = LoraFiles(*model_, "", 2, 2, 920);
  f.tensors[q + ".lora_B.weight"] = RandomTensor({32, 3}, 0.1, 921);
  ExpectStatus(Import(f).status(), absl::StatusCode::kInvalidArgument, {q + ".lora_B.weight", "[32,3]", "[32, 2]"});
  // A key of no known form.
  f = LoraFiles(*model_, "", 2, 2, 920);
  f.tensors["base_model.model.something.else"] = RandomTensor({2}, 0.1, 922);
  ExpectStatus(Import(f).status(), absl::StatusCode::kInvalidArgument, {"something.else"});
  // A tensor of another method.
  f = LoraFiles(*model_, "", 2, 2, 920);
  f.tensors[q + ".ia3_l"] = RandomTensor({32, 1}, 0.1, 923);
  ExpectStatus(Import(f).status(), absl::StatusCode::kInvalidArgument, {q + ".ia3_l", "LORA"});
  // NaN in a factor (found when the pack is bound).
  f = LoraFiles(*model_, "", 2, 2, 920);
  f.tensors[q + ".lora_A.weight"].view({-1})[0].fill_(std::nanf(""));
  EXPECT_EQ(Import(f).status().code(), absl::StatusCode::kInvalidArgument);
  // No LoRA tensors at all.
  f = LoraFiles(*model_, "", 2, 2, 920);
  f.tensors.clear();
  f.tensors["prompt_embeddings"] = RandomTensor({2, 32}, 0.1, 924);
  ExpectStatus(Import(f).status(), absl::StatusCode::kInvalidArgument, {"prompt_embeddings", "LORA"});
}

TEST_F(PeftTest, UnknownModuleNamesTheKeyAndTheClosestModules) {
  PeftFiles f = LoraFiles(*model_, "bert.", 2, 2, 930);
  const std::string key = absl::StrCat(kBase, "bert.encoder.layer.7.attention.self.query.lora_A.weight");
  f.tensors[key] = RandomTensor({2, 32}, 0.1, 931);
  f.tensors[absl::StrCat(kBase, "bert.encoder.layer.7.attention.self.query.lora_B.weight")] =
      RandomTensor({32, 2}, 0.1, 932);
  ExpectStatus(Import(f).status(), absl::StatusCode::kInvalidArgument,
               {key, "not a module", "closest: encoder.layer.0.attention.self.query"});
}

TEST_F(PeftTest, ImportChecksTheLimitsAndUsesTheGivenName) {
  PeftImportOptions options;
  options.name = "my-adapter";
  const PackContents c = ImportOk(LoraFiles(*model_, "", 4, 8, 940), options);
  EXPECT_EQ(c.manifest.name, "my-adapter");
  options.limits.methods.max_rank = 2;
  ExpectStatus(Import(LoraFiles(*model_, "", 4, 8, 940), options).status(), absl::StatusCode::kInvalidArgument,
               {"rank"});
}

// use-lite's module names line up with PEFT's BERT-style names for LoRA.
TEST_F(PeftTest, UseLiteLoraImports) {
  auto lite = testing::UseLite();
  if (lite == nullptr) GTEST_SKIP() << "models/use-lite is not present";
  PeftFiles f;
  f.config = {{"peft_type", "LORA"}, {"r", 2}, {"lora_alpha", 4}, {"target_modules", {"query"}}};
  for (const char* name : {"encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"}) {
    const model::ModuleInfo& m = Module(*lite, name);
    f.tensors[absl::StrCat(kBase, name, ".lora_A.weight")] = RandomTensor({2, m.in_features}, 0.1, 950);
    f.tensors[absl::StrCat(kBase, name, ".lora_B.weight")] = RandomTensor({m.out_features, 2}, 0.1, 951);
  }
  auto c = ImportPeft(Write(f), *lite, {});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->manifest.backbone_family, "use-lite");
  EXPECT_EQ(c->methods[0].config["targets"].size(), 2u);
  // Its layers have different head sizes: no single PEFT prefix layout fits.
  PeftFiles prefix = PrefixFiles();
  EXPECT_EQ(ImportPeft(Write(prefix), *lite, {}).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace delta
}  // namespace deltaserve
