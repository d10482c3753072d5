#include "tests/delta/delta_test_util.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <system_error>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "server/common/status_macros.h"
#include "server/delta/delta_batch.h"
#include "server/model/model_loader.h"
#include "server/model/safetensors.h"

namespace deltaserve {
namespace delta {
namespace testing {
namespace {

std::string SourceDir() {
  const char* env = std::getenv("DS_SOURCE_DIR");
  return env != nullptr && *env ? std::string(env) : std::string(DS_SOURCE_DIR);
}

bool Exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

class ParameterHidingModel : public model::Model {
 public:
  ParameterHidingModel(std::shared_ptr<const model::Model> inner, const std::string& hidden)
      : inner_(std::move(inner)), parameters_(inner_->parameters()) {
    parameters_.erase(hidden);
  }
  const model::ModelInfo& info() const override { return inner_->info(); }
  const model::Tokenizer& tokenizer() const override { return inner_->tokenizer(); }
  const std::vector<model::ModuleInfo>& modules() const override { return inner_->modules(); }
  const std::map<std::string, at::Tensor>& parameters() const override { return parameters_; }
  absl::StatusOr<model::ForwardOutput> Forward(const model::ForwardInput& input,
                                               model::ForwardHooks* hooks) const override {
    return inner_->Forward(input, hooks);
  }
  absl::StatusOr<model::ForwardOutput> ForwardTrainable(const model::ForwardInput& input,
                                                        model::ForwardHooks* hooks) const override {
    return inner_->ForwardTrainable(input, hooks);
  }

 private:
  std::shared_ptr<const model::Model> inner_;
  std::map<std::string, at::Tensor> parameters_;  // the inner model's tensors (same storage), one left out
};

std::string WriteTinyBert() {
  char tmpl[] = "/tmp/tinybert.XXXXXX";
  const std::string dir = ::mkdtemp(tmpl);
  const int64_t H = 32, L = 2, F = 64, P = 64;
  const std::vector<std::string> words = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the",  "a",    "cat",
                                          "dog",   "sat",   "on",    "mat",   "hello",  "world", "!",    ",",
                                          ".",     "is",    "was",   "big",   "small",  "red",  "blue", "house",
                                          "tree",  "run",   "##s",   "##ing", "and",    "good", "bad",  "movie",
                                          "film",  "great", "awful", "love",  "hate",   "this", "it",   "very"};
  const int64_t V = static_cast<int64_t>(words.size());
  std::ofstream(dir + "/vocab.txt") << [&] {
    std::string s;
    for (const auto& w : words) s += w + "\n";
    return s;
  }();
  std::ofstream(dir + "/config.json") << absl::StrCat(
      R"({"model_type": "bert", "vocab_size": )", V, R"(, "hidden_size": )", H, R"(, "num_hidden_layers": )", L,
      R"(, "num_attention_heads": 4, "intermediate_size": )", F, R"(, "max_position_embeddings": )", P,
      R"(, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu"})");
  std::map<std::string, at::Tensor> t;
  uint64_t seed = 1;
  auto rnd = [&](std::vector<int64_t> shape, double scale) { return RandomTensor(shape, scale, seed++); };
  t["embeddings.word_embeddings.weight"] = rnd({V, H}, 0.5);
  t["embeddings.position_embeddings.weight"] = rnd({P, H}, 0.1);
  t["embeddings.token_type_embeddings.weight"] = rnd({2, H}, 0.1);
  t["embeddings.LayerNorm.weight"] = at::ones({H}) + rnd({H}, 0.1);
  t["embeddings.LayerNorm.bias"] = rnd({H}, 0.1);
  for (int64_t l = 0; l < L; ++l) {
    const std::string p = absl::StrCat("encoder.layer.", l, ".");
    for (const char* n : {"attention.self.query", "attention.self.key", "attention.self.value",
                          "attention.output.dense"}) {
      t[p + n + ".weight"] = rnd({H, H}, 0.2);
      t[p + n + ".bias"] = rnd({H}, 0.05);
    }
    t[p + "intermediate.dense.weight"] = rnd({F, H}, 0.2);
    t[p + "intermediate.dense.bias"] = rnd({F}, 0.05);
    t[p + "output.dense.weight"] = rnd({H, F}, 0.2);
    t[p + "output.dense.bias"] = rnd({H}, 0.05);
    for (const char* n : {"attention.output.LayerNorm", "output.LayerNorm"}) {
      t[p + n + ".weight"] = at::ones({H}) + rnd({H}, 0.1);
      t[p + n + ".bias"] = rnd({H}, 0.1);
    }
  }
  if (!model::WriteSafetensors(dir + "/model.safetensors", t).ok()) return "";
  return dir;
}

}  // namespace

std::shared_ptr<const model::Model> WithoutParameter(std::shared_ptr<const model::Model> model,
                                                     const std::string& hidden) {
  return std::make_shared<ParameterHidingModel>(std::move(model), hidden);
}

at::Tensor RandomTensor(const std::vector<int64_t>& shape, double scale, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.f, static_cast<float>(scale));
  at::Tensor out = at::empty(shape, at::kFloat);
  float* p = out.data_ptr<float>();
  for (int64_t i = 0; i < out.numel(); ++i) p[i] = dist(rng);
  return out;
}

std::shared_ptr<const model::Model> UseLite() {
  static std::shared_ptr<const model::Model>* model = [] {
    const char* env = std::getenv("DS_USE_LITE_DIR");
    const std::string dir = env != nullptr && *env ? std::string(env) : SourceDir() + "/models/use-lite";
    auto* out = new std::shared_ptr<const model::Model>();
    if (Exists(dir + "/model.safetensors")) {
      auto m = model::LoadModel(dir, {});
      if (m.ok()) *out = std::move(*m);
    }
    return out;
  }();
  return *model;
}

std::shared_ptr<const model::Model> TinyBert(const std::string& dtype) {
  static std::string* dir = new std::string(WriteTinyBert());
  static std::map<std::string, std::shared_ptr<const model::Model>>* cache =
      new std::map<std::string, std::shared_ptr<const model::Model>>();
  auto it = cache->find(dtype);
  if (it != cache->end()) return it->second;
  model::ModelOptions options;
  options.dtype = dtype;
  auto m = model::LoadModel(*dir, options);
  std::shared_ptr<const model::Model> out = m.ok() ? std::shared_ptr<const model::Model>(std::move(*m)) : nullptr;
  (*cache)[dtype] = out;
  return out;
}

std::vector<NamedModel> TestModels() {
  std::vector<NamedModel> out;
  if (auto bert = TinyBert()) out.push_back({"tiny-bert", bert});
  if (auto lite = UseLite()) out.push_back({"use-lite", lite});
  return out;
}

std::vector<std::vector<int64_t>> RandomRows(const model::Model& model, int n, int64_t min_len, int64_t max_len,
                                             uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int64_t vocab = std::min<int64_t>(model.tokenizer().vocab_size(), model.info().vocab_size);
  std::uniform_int_distribution<int64_t> len(min_len, max_len);
  std::uniform_int_distribution<int64_t> id(1, vocab - 1);
  std::vector<std::vector<int64_t>> rows(n);
  for (auto& row : rows) {
    const int64_t l = len(rng);
    for (int64_t i = 0; i < l; ++i) row.push_back(id(rng));
  }
  return rows;
}

absl::StatusOr<model::ForwardOutput> RunRows(const model::Model& model, const std::vector<std::vector<int64_t>>& rows,
                                             model::ForwardHooks* hooks, bool pack) {
  int64_t t = 0;
  for (const auto& r : rows) t = std::max<int64_t>(t, r.size());
  const int64_t b = static_cast<int64_t>(rows.size());
  model::ForwardInput input;
  input.pack_tokens = pack;
  input.input_ids = at::zeros({b, t}, at::kLong);
  input.attention_mask = at::zeros({b, t}, at::kBool);
  for (int64_t i = 0; i < b; ++i) {
    for (size_t j = 0; j < rows[i].size(); ++j) {
      input.input_ids[i][j] = rows[i][j];
      input.attention_mask[i][j] = true;
    }
  }
  return model.Forward(input, hooks);
}

double RowDiff(const model::ForwardOutput& batch, int64_t row, int64_t batch_lead, const model::ForwardOutput& solo,
               int64_t solo_lead, int64_t len) {
  double diff = (batch.pooled[row] - solo.pooled[0]).abs().max().item<double>();
  at::Tensor hb = batch.hidden_states[row].narrow(0, batch_lead, len);
  at::Tensor hs = solo.hidden_states[0].narrow(0, solo_lead, len);
  return std::max(diff, (hb - hs).abs().max().item<double>());
}

absl::StatusOr<double> MaxBatchVsSoloDiff(const model::Model& model, MethodKind kind,
                                          const std::vector<std::vector<int64_t>>& rows,
                                          const std::vector<const Method*>& methods) {
  c10::InferenceMode guard;
  double worst = 0;
  for (bool pack : {false, true}) {
    DS_ASSIGN_OR_RETURN(std::unique_ptr<MethodBatch> hooks, MakeMethodBatch(kind, methods, model));
    DS_ASSIGN_OR_RETURN(model::ForwardOutput batch, RunRows(model, rows, hooks.get(), pack));
    for (size_t i = 0; i < rows.size(); ++i) {
      DS_ASSIGN_OR_RETURN(std::unique_ptr<MethodBatch> solo_hooks, MakeMethodBatch(kind, {methods[i]}, model));
      DS_ASSIGN_OR_RETURN(model::ForwardOutput solo, RunRows(model, {rows[i]}, solo_hooks.get()));
      worst = std::max(worst, RowDiff(batch, static_cast<int64_t>(i), hooks->LeadingVirtualTokens(i), solo,
                                      solo_hooks->LeadingVirtualTokens(0), static_cast<int64_t>(rows[i].size())));
    }
  }
  return worst;
}

absl::StatusOr<double> MaxPackBatchVsSoloDiff(const model::Model& model,
                                              const std::vector<std::vector<int64_t>>& rows,
                                              const std::vector<const DeltaPack*>& packs) {
  c10::InferenceMode guard;
  double worst = 0;
  for (bool pack : {false, true}) {
    DS_ASSIGN_OR_RETURN(std::unique_ptr<DeltaBatch> hooks, DeltaBatch::Create(packs, model));
    DS_ASSIGN_OR_RETURN(model::ForwardOutput batch, RunRows(model, rows, hooks.get(), pack));
    for (size_t i = 0; i < rows.size(); ++i) {
      DS_ASSIGN_OR_RETURN(std::unique_ptr<DeltaBatch> solo_hooks, DeltaBatch::Create({packs[i]}, model));
      DS_ASSIGN_OR_RETURN(model::ForwardOutput solo, RunRows(model, {rows[i]}, solo_hooks.get()));
      const int64_t lead = hooks ? hooks->LeadingVirtualTokens(i) : 0;
      const int64_t solo_lead = solo_hooks ? solo_hooks->LeadingVirtualTokens(0) : 0;
      worst = std::max(worst, RowDiff(batch, static_cast<int64_t>(i), lead, solo, solo_lead,
                                      static_cast<int64_t>(rows[i].size())));
    }
  }
  return worst;
}

std::unique_ptr<Method> CreateOrFail(MethodSpec spec, const model::Model& model, const MethodLimits& limits) {
  auto m = CreateMethod(std::move(spec), model, limits);
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? std::move(*m) : nullptr;
}

std::unique_ptr<MethodBatch> MakeBatchOrFail(MethodKind kind, const std::vector<const Method*>& rows,
                                             const model::Model& model) {
  auto b = MakeMethodBatch(kind, rows, model);
  EXPECT_TRUE(b.ok()) << b.status();
  return b.ok() ? std::move(*b) : nullptr;
}

model::ForwardOutput ForwardOrFail(const model::Model& model, const std::vector<std::vector<int64_t>>& rows,
                                   model::ForwardHooks* hooks) {
  auto out = RunRows(model, rows, hooks);
  EXPECT_TRUE(out.ok()) << out.status();
  return out.ok() ? *out : model::ForwardOutput{};
}

double MaxDiff(const model::ForwardOutput& a, const model::ForwardOutput& b) {
  return std::max((a.pooled - b.pooled).abs().max().item<double>(),
                  (a.hidden_states - b.hidden_states).abs().max().item<double>());
}

double BatchTolerance(const model::Model& model, MethodKind kind, const std::vector<std::vector<int64_t>>& rows,
                      double floor, double factor) {
  auto base = MaxBatchVsSoloDiff(model, kind, rows, std::vector<const Method*>(rows.size(), nullptr));
  EXPECT_TRUE(base.ok()) << base.status();
  return std::max(floor, factor * base.value_or(0));
}

void ExpectInvalid(const MethodSpec& spec, const model::Model& model, const std::string& needle,
                   const MethodLimits& limits) {
  auto m = CreateMethod(spec, model, limits);
  ASSERT_FALSE(m.ok()) << "accepted; expected an error naming " << needle;
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument) << m.status();
  EXPECT_NE(m.status().message().find(needle), std::string::npos) << m.status() << " (expected " << needle << ")";
}

const model::ModuleInfo* FindModule(const model::Model& model, const std::string& name) {
  for (const auto& m : model.modules()) {
    if (m.name == name) return &m;
  }
  return nullptr;
}

namespace {

// Directories made by MakeTempDir, removed when the tests end.
std::vector<std::string>* TempDirs() {
  static auto* dirs = new std::vector<std::string>();
  return dirs;
}

class RemoveTempDirs : public ::testing::Environment {
 public:
  void TearDown() override {
    for (const std::string& dir : *TempDirs()) {
      std::error_code ignored;
      std::filesystem::remove_all(dir, ignored);
    }
  }
};

}  // namespace

std::string MakeTempDir(const std::string& prefix) {
  static ::testing::Environment* const remove_temp_dirs = ::testing::AddGlobalTestEnvironment(new RemoveTempDirs);
  (void)remove_temp_dirs;
  std::string tmpl = "/tmp/" + prefix + ".XXXXXX";
  const char* dir = ::mkdtemp(tmpl.data());
  EXPECT_NE(dir, nullptr);
  if (dir == nullptr) return "/tmp";
  TempDirs()->push_back(dir);
  return dir;
}

}  // namespace testing
}  // namespace delta
}  // namespace deltaserve
