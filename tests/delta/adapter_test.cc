// Sequential (Houlsby / Pfeiffer / custom placement) and parallel bottleneck adapters: mixed batches equal each
// row alone, zero up-projections are the identity, one row equals a naive reference hook, bad packs are refused,
// bfloat16 runs.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/delta/method.h"
#include "tests/delta/delta_test_util.h"

namespace deltaserve {
namespace delta {
namespace {

using testing::BatchTolerance;
using testing::CreateOrFail;
using testing::ExpectInvalid;
using testing::FindModule;
using testing::MaxBatchVsSoloDiff;
using testing::RandomRows;
using testing::RandomTensor;
using testing::RunRows;
using testing::TestModels;
using testing::TinyBert;

std::vector<std::string> BlockNames(const model::Model& model, bool ffn_only) {
  std::vector<std::string> out;
  for (const auto& m : model.modules()) {
    if (m.kind != model::ModuleKind::kBlockOutput) continue;
    if (ffn_only && m.name != absl::StrCat("encoder.layer.", m.layer, ".output")) continue;
    out.push_back(m.name);
  }
  return out;
}

struct AdapterOptions {
  bool parallel = false;
  int64_t bottleneck = 8;
  std::string activation;  // empty: default
  std::string placement;   // empty: default
  std::vector<std::string> targets;  // tensors are made for these blocks; config "targets" set when custom
  bool set_targets = false;
  double scaling = std::numeric_limits<double>::quiet_NaN();  // NaN: default
  double up_scale = 1.0;
  uint64_t seed = 1;
};

MethodSpec AdapterSpec(const model::Model& model, const AdapterOptions& o) {
  MethodSpec spec;
  spec.kind = o.parallel ? MethodKind::kParallelAdapter : MethodKind::kAdapter;
  spec.config["bottleneck"] = o.bottleneck;
  if (!o.activation.empty()) spec.config["activation"] = o.activation;
  if (!o.placement.empty()) spec.config["placement"] = o.placement;
  if (o.set_targets) spec.config["targets"] = o.targets;
  if (!std::isnan(o.scaling)) spec.config["scaling"] = o.scaling;
  uint64_t seed = o.seed * 1000;
  for (const std::string& block : o.targets) {
    const model::ModuleInfo* info = FindModule(model, block);
    EXPECT_NE(info, nullptr) << block;
    if (info == nullptr) continue;
    const int64_t out = info->in_features;
    const int64_t in = o.parallel ? FindModule(model, info->sublayer_input)->in_features : out;
    const int64_t b = o.bottleneck;
    spec.tensors[block + ".down.weight"] = RandomTensor({b, in}, 1.0 / std::sqrt(double(in)), seed++);
    spec.tensors[block + ".down.bias"] = RandomTensor({b}, 0.1, seed++);
    spec.tensors[block + ".up.weight"] = RandomTensor({out, b}, o.up_scale / std::sqrt(double(b)), seed++);
    spec.tensors[block + ".up.bias"] = RandomTensor({out}, 0.1 * o.up_scale, seed++);
  }
  return spec;
}

// Relative 1e-5 of the largest magnitude in `want` (at least 1e-5).
double ReferenceTolerance(const model::ForwardOutput& want) {
  return 1e-5 * std::max(1.0, want.hidden_states.abs().max().item<double>());
}

// Several different adapters of one kind for `model`, different sizes, activations and placements.
std::vector<std::unique_ptr<Method>> MixedAdapters(const model::Model& model, bool parallel, uint64_t seed) {
  std::vector<std::unique_ptr<Method>> out;
  const std::vector<std::string> all = BlockNames(model, false), ffn = BlockNames(model, true);
  AdapterOptions a;
  a.parallel = parallel;
  a.seed = seed;
  // Two relu adapters of different bottlenecks (the stacked path), everywhere.
  a.targets = parallel ? all : all;
  a.set_targets = parallel;
  a.bottleneck = 8;
  out.push_back(CreateOrFail(AdapterSpec(model, a), model));
  a.bottleneck = 3;
  a.scaling = 2.0;
  a.seed = seed + 1;
  out.push_back(CreateOrFail(AdapterSpec(model, a), model));
  // A gelu one on the feed-forward blocks only (Pfeiffer / the parallel default).
  a = AdapterOptions();
  a.parallel = parallel;
  a.seed = seed + 2;
  a.targets = ffn;
  if (!parallel) a.placement = "pfeiffer";
  a.activation = "gelu";
  a.bottleneck = 16;
  out.push_back(CreateOrFail(AdapterSpec(model, a), model));
  // A tanh one on layer 0's attention block only (custom), scaled.
  a = AdapterOptions();
  a.parallel = parallel;
  a.seed = seed + 3;
  a.targets = {"encoder.layer.0.attention.output"};
  a.set_targets = true;
  if (!parallel) a.placement = "custom";
  a.activation = "tanh";
  a.bottleneck = 4;
  a.scaling = 0.5;
  out.push_back(CreateOrFail(AdapterSpec(model, a), model));
  // A swish one everywhere.
  a = AdapterOptions();
  a.parallel = parallel;
  a.seed = seed + 4;
  a.targets = all;
  a.set_targets = parallel;
  a.activation = "swish";
  a.bottleneck = 5;
  out.push_back(CreateOrFail(AdapterSpec(model, a), model));
  return out;
}

class AdapterTest : public ::testing::TestWithParam<bool> {};  // param: parallel

TEST_P(AdapterTest, MixedBatchEqualsEachRowAlone) {
  const bool parallel = GetParam();
  const MethodKind kind = parallel ? MethodKind::kParallelAdapter : MethodKind::kAdapter;
  for (const auto& [name, model] : TestModels()) {
    for (uint64_t seed : {1, 2, 3}) {
      SCOPED_TRACE(absl::StrCat(name, " seed ", seed));
      auto adapters = MixedAdapters(*model, parallel, seed * 10);
      ASSERT_EQ(adapters.size(), 5u);
      for (const auto& a : adapters) ASSERT_NE(a, nullptr);
      const auto rows = RandomRows(*model, 11, 1, 14, seed);
      std::vector<const Method*> methods = {adapters[0].get(), nullptr,           adapters[2].get(),
                                            adapters[1].get(), adapters[3].get(), adapters[0].get(),
                                            nullptr,           adapters[4].get(), adapters[2].get(),
                                            adapters[1].get(), adapters[3].get()};
      const double tol = BatchTolerance(*model, kind, rows, 1e-5, 3);
      auto diff = MaxBatchVsSoloDiff(*model, kind, rows, methods);
      ASSERT_TRUE(diff.ok()) << diff.status();
      EXPECT_LE(*diff, tol);
      std::printf("[%s %s seed %d] mixed batch vs solo: max diff %.3g (bound %.3g)\n", MethodKindName(kind),
                  name.c_str(), static_cast<int>(seed), *diff, tol);
      // One adapter on some rows (the gather path) and on every row (the whole-batch path).
      const std::vector<std::vector<int64_t>> four = {rows[0], rows[1], rows[2], rows[3]};
      const double tol4 = BatchTolerance(*model, kind, four, 1e-5, 3);
      const std::vector<const Method*> one = {adapters[1].get(), nullptr, adapters[1].get(), nullptr};
      diff = MaxBatchVsSoloDiff(*model, kind, four, one);
      ASSERT_TRUE(diff.ok()) << diff.status();
      EXPECT_LE(*diff, tol4);
      const std::vector<const Method*> every(4, adapters[2].get());
      diff = MaxBatchVsSoloDiff(*model, kind, four, every);
      ASSERT_TRUE(diff.ok()) << diff.status();
      EXPECT_LE(*diff, tol4);
    }
  }
}

TEST_P(AdapterTest, ChangesTheOutput) {
  const bool parallel = GetParam();
  const MethodKind kind = parallel ? MethodKind::kParallelAdapter : MethodKind::kAdapter;
  c10::InferenceMode guard;
  for (const auto& [name, model] : TestModels()) {
    SCOPED_TRACE(name);
    auto adapters = MixedAdapters(*model, parallel, 7);
    const auto rows = RandomRows(*model, 5, 2, 10, 7);
    auto plain = RunRows(*model, rows, nullptr);
    ASSERT_TRUE(plain.ok());
    for (const auto& a : adapters) {
      auto hooks = MakeMethodBatch(kind, std::vector<const Method*>(rows.size(), a.get()), *model);
      ASSERT_TRUE(hooks.ok()) << hooks.status();
      auto out = RunRows(*model, rows, hooks->get());
      ASSERT_TRUE(out.ok());
      EXPECT_GT((out->pooled - plain->pooled).abs().max().item<double>(), 1e-3);
    }
  }
}

TEST_P(AdapterTest, ZeroUpProjectionIsIdentity) {
  const bool parallel = GetParam();
  const MethodKind kind = parallel ? MethodKind::kParallelAdapter : MethodKind::kAdapter;
  c10::InferenceMode guard;
  for (const auto& [name, model] : TestModels()) {
    SCOPED_TRACE(name);
    AdapterOptions o;
    o.parallel = parallel;
    o.targets = BlockNames(*model, false);
    o.set_targets = true;
    o.placement = parallel ? "" : "custom";
    o.up_scale = 0;
    o.bottleneck = 6;
    o.activation = "gelu";
    auto zero = CreateOrFail(AdapterSpec(*model, o), *model);
    o.bottleneck = 2;
    o.activation = "relu";
    o.seed = 2;
    auto zero2 = CreateOrFail(AdapterSpec(*model, o), *model);
    ASSERT_NE(zero, nullptr);
    ASSERT_NE(zero2, nullptr);
    const auto rows = RandomRows(*model, 6, 1, 12, 3);
    auto plain = RunRows(*model, rows, nullptr);
    ASSERT_TRUE(plain.ok());
    auto hooks = MakeMethodBatch(kind, {zero.get(), zero2.get(), nullptr, zero.get(), zero2.get(), zero.get()},
                                 *model);
    ASSERT_TRUE(hooks.ok()) << hooks.status();
    auto out = RunRows(*model, rows, hooks->get());
    ASSERT_TRUE(out.ok());
    const at::Tensor mask = plain->attention_mask.unsqueeze(-1);
    const double dh = ((out->hidden_states - plain->hidden_states) * mask).abs().max().item<double>();
    const double dp = (out->pooled - plain->pooled).abs().max().item<double>();
    EXPECT_LE(dh, 1e-6);
    EXPECT_LE(dp, 1e-6);
  }
}

// A naive adapter: per target, hidden + s * up(act(down(x))) with the spec's float32 tensors, x = the block
// output (sequential) or the sub-layer input (parallel).
class NaiveAdapter : public model::ForwardHooks {
 public:
  NaiveAdapter(const MethodSpec& spec, const model::Model& model, bool parallel, std::string activation,
               double scaling)
      : spec_(spec), model_(model), parallel_(parallel), activation_(std::move(activation)), scaling_(scaling) {}

  void OnLinear(const model::ModuleInfo& module, const at::Tensor& input, at::Tensor* output) override {
    inputs_[module.name] = input;
  }
  void OnBlockOutput(const model::ModuleInfo& block, at::Tensor* hidden) override {
    auto it = spec_.tensors.find(block.name + ".down.weight");
    if (it == spec_.tensors.end()) return;
    const at::Tensor x = (parallel_ ? inputs_.at(block.sublayer_input) : *hidden).to(at::kFloat);
    at::Tensor z = at::linear(x, it->second, spec_.tensors.at(block.name + ".down.bias"));
    if (activation_ == "relu") z = at::relu(z);
    if (activation_ == "gelu") z = at::gelu(z);
    if (activation_ == "tanh") z = at::tanh(z);
    if (activation_ == "swish") z = z * at::sigmoid(z);
    const at::Tensor up = at::linear(z, spec_.tensors.at(block.name + ".up.weight"),
                                     spec_.tensors.at(block.name + ".up.bias"));
    *hidden = *hidden + up * scaling_;
  }

 private:
  const MethodSpec& spec_;
  const model::Model& model_;
  bool parallel_;
  std::string activation_;
  double scaling_;
  std::map<std::string, at::Tensor> inputs_;
};

TEST_P(AdapterTest, OneRowEqualsNaiveReference) {
  const bool parallel = GetParam();
  const MethodKind kind = parallel ? MethodKind::kParallelAdapter : MethodKind::kAdapter;
  c10::InferenceMode guard;
  for (const auto& [name, model] : TestModels()) {
    for (const char* activation : {"relu", "gelu", "tanh", "swish"}) {
      SCOPED_TRACE(absl::StrCat(name, " ", activation));
      AdapterOptions o;
      o.parallel = parallel;
      o.targets = BlockNames(*model, false);
      o.set_targets = true;
      o.placement = parallel ? "" : "custom";
      o.activation = activation;
      o.bottleneck = 7;
      o.scaling = 0.75;
      o.seed = 5;
      const MethodSpec spec = AdapterSpec(*model, o);
      auto method = CreateOrFail(spec, *model);
      ASSERT_NE(method, nullptr);
      const auto rows = RandomRows(*model, 1, 9, 9, 11);
      NaiveAdapter naive(spec, *model, parallel, activation, 0.75);
      auto want = RunRows(*model, rows, &naive);
      ASSERT_TRUE(want.ok()) << want.status();
      auto hooks = MakeMethodBatch(kind, {method.get()}, *model);
      ASSERT_TRUE(hooks.ok());
      auto got = RunRows(*model, rows, hooks->get());
      ASSERT_TRUE(got.ok());
      const double diff = std::max((got->hidden_states - want->hidden_states).abs().max().item<double>(),
                                   (got->pooled - want->pooled).abs().max().item<double>());
      EXPECT_LE(diff, ReferenceTolerance(*want));
      std::printf("[%s %s %s] one row vs naive reference: max diff %.3g\n", MethodKindName(kind), name.c_str(),
                  activation, diff);
      auto plain = RunRows(*model, rows, nullptr);
      EXPECT_GT((got->pooled - plain->pooled).abs().max().item<double>(), 1e-4);
    }
  }
}

TEST_P(AdapterTest, BFloat16Runs) {
  const bool parallel = GetParam();
  const MethodKind kind = parallel ? MethodKind::kParallelAdapter : MethodKind::kAdapter;
  auto model = TinyBert("bfloat16");
  ASSERT_NE(model, nullptr);
  auto adapters = MixedAdapters(*model, parallel, 3);
  for (const auto& a : adapters) ASSERT_NE(a, nullptr);
  const auto rows = RandomRows(*model, 6, 1, 12, 5);
  auto diff = MaxBatchVsSoloDiff(*model, kind, rows,
                                 {adapters[0].get(), adapters[1].get(), nullptr, adapters[2].get(),
                                  adapters[3].get(), adapters[4].get()});
  ASSERT_TRUE(diff.ok()) << diff.status();
  EXPECT_TRUE(std::isfinite(*diff));
  EXPECT_LE(*diff, 0.1);
  EXPECT_EQ(adapters[0]->bytes() * 2, CreateOrFail(adapters[0]->spec(), *TinyBert())->bytes());
}

INSTANTIATE_TEST_SUITE_P(Kinds, AdapterTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return info.param ? "Parallel" : "Sequential";
                         });

TEST(AdapterSpecTest, CanonicalSpecHasResolvedTargetsAndDefaults) {
  for (const auto& [name, model] : TestModels()) {
    SCOPED_TRACE(name);
    AdapterOptions o;
    o.targets = BlockNames(*model, false);
    auto houlsby = CreateOrFail(AdapterSpec(*model, o), *model);
    ASSERT_NE(houlsby, nullptr);
    const nlohmann::json& c = houlsby->spec().config;
    EXPECT_EQ(c["placement"], "houlsby");
    EXPECT_EQ(c["activation"], "relu");
    EXPECT_EQ(c["scaling"], 1.0);
    EXPECT_EQ(c["bottleneck"], 8);
    std::vector<std::string> sorted = o.targets;
    std::sort(sorted.begin(), sorted.end());
    EXPECT_EQ(c["targets"].get<std::vector<std::string>>(), sorted);
    EXPECT_EQ(houlsby->spec().tensors.size(), 4 * sorted.size());
    int64_t bytes = 0;
    for (const auto& [n, t] : houlsby->spec().tensors) bytes += t.nbytes();
    EXPECT_EQ(houlsby->bytes(), bytes);
    // The canonical spec is accepted again, and is a fixed point.
    auto again = CreateOrFail(houlsby->spec(), *model);
    ASSERT_NE(again, nullptr);
    EXPECT_EQ(again->spec().config, c);

    // Pfeiffer: only the feed-forward block outputs, never "attention.output".
    o.targets = BlockNames(*model, true);
    o.placement = "pfeiffer";
    auto pfeiffer = CreateOrFail(AdapterSpec(*model, o), *model);
    ASSERT_NE(pfeiffer, nullptr);
    for (const auto& t : pfeiffer->spec().config["targets"]) {
      EXPECT_EQ(t.get<std::string>().find("attention"), std::string::npos) << t;
    }
    EXPECT_EQ(pfeiffer->spec().config["targets"].size(), static_cast<size_t>(model->info().num_layers));

    // Custom with a dotted suffix and a regex.
    o.placement = "custom";
    o.set_targets = true;
    o.targets = {"encoder.layer.1.attention.output"};
    AdapterOptions o2 = o;
    MethodSpec spec = AdapterSpec(*model, o2);
    spec.config["targets"] = {"layer.1.attention.output"};
    auto custom = CreateOrFail(spec, *model);
    ASSERT_NE(custom, nullptr);
    EXPECT_EQ(custom->spec().config["targets"], nlohmann::json({"encoder.layer.1.attention.output"}));

    // Parallel default: the feed-forward blocks.
    AdapterOptions p;
    p.parallel = true;
    p.targets = BlockNames(*model, true);
    auto parallel = CreateOrFail(AdapterSpec(*model, p), *model);
    ASSERT_NE(parallel, nullptr);
    sorted = p.targets;
    std::sort(sorted.begin(), sorted.end());
    EXPECT_EQ(parallel->spec().config["targets"].get<std::vector<std::string>>(), sorted);
    EXPECT_FALSE(parallel->spec().config.contains("placement"));
  }
}

TEST(AdapterSpecTest, BadInputIsInvalidArgument) {
  for (const auto& [name, model] : TestModels()) {
    for (bool parallel : {false, true}) {
      SCOPED_TRACE(absl::StrCat(name, parallel ? " parallel" : " sequential"));
      AdapterOptions o;
      o.parallel = parallel;
      o.targets = parallel ? BlockNames(*model, true) : BlockNames(*model, false);
      const MethodSpec good = AdapterSpec(*model, o);
      ASSERT_NE(CreateOrFail(good, *model), nullptr);
      const std::string block = o.targets[0];

      MethodSpec s = good;
      s.tensors.erase(block + ".up.weight");
      ExpectInvalid(s, *model, block + ".up.weight\" is missing");

      s = good;
      s.tensors["encoder.layer.0.extra"] = at::zeros({2});
      ExpectInvalid(s, *model, "unexpected tensor \"encoder.layer.0.extra\"");

      s = good;
      s.tensors[block + ".down.weight"] = at::zeros({8, 3});
      ExpectInvalid(s, *model, block + ".down.weight\" has shape [8,3]");

      s = good;
      s.tensors[block + ".up.bias"] = s.tensors[block + ".up.bias"].clone();
      s.tensors[block + ".up.bias"][0] = std::nan("");
      ExpectInvalid(s, *model, "NaN");

      s = good;
      s.tensors[block + ".down.bias"] = s.tensors[block + ".down.bias"].to(at::kDouble);
      ExpectInvalid(s, *model, "float32");

      s = good;
      s.config.erase("bottleneck");
      ExpectInvalid(s, *model, "\"bottleneck\" is required");

      MethodLimits small;
      small.max_bottleneck = 4;
      ExpectInvalid(good, *model, "\"bottleneck\" must be an integer in [1, 4]", small);

      s = good;
      s.config["bottleneck"] = 0;
      ExpectInvalid(s, *model, "\"bottleneck\"");

      s = good;
      s.config["activation"] = "softplus";
      ExpectInvalid(s, *model, "\"activation\" \"softplus\" is not supported");

      s = good;
      s.config["scaling"] = "big";
      ExpectInvalid(s, *model, "\"scaling\" must be a finite number");

      s = good;
      s.config["targets"] = {"encoder.layer.0.attention.self.query"};
      ExpectInvalid(s, *model, "encoder.layer.0.attention.self.query");

      s = good;
      s.config["bottlenek"] = 8;
      ExpectInvalid(s, *model, "unknown config key \"bottlenek\"");

      s = good;
      s.config = nlohmann::json::array();
      ExpectInvalid(s, *model, "config must be a JSON object");

      s = good;
      s.config["targets"] = nlohmann::json::array();
      ExpectInvalid(s, *model, "\"targets\" must be a non-empty list");

      if (!parallel) {
        s = good;
        s.config["placement"] = "middle";
        ExpectInvalid(s, *model, "\"placement\" \"middle\" is not supported");

        s = good;
        s.config["placement"] = "custom";
        ExpectInvalid(s, *model, "placement \"custom\" needs \"targets\"");

        // Houlsby tensors under Pfeiffer placement: the attention blocks' tensors are unexpected.
        s = good;
        s.config["placement"] = "pfeiffer";
        ExpectInvalid(s, *model, "unexpected tensor");

        // A target list that contradicts the placement.
        s = good;
        s.config["targets"] = {"encoder.layer.0.output"};
        ExpectInvalid(s, *model, "differ from placement \"houlsby\"");
      } else {
        s = good;
        s.config["placement"] = "houlsby";
        ExpectInvalid(s, *model, "unknown config key \"placement\"");
      }
    }
  }
}

TEST(AdapterSpecTest, MakeBatchRefusesOtherKinds) {
  auto model = TinyBert();
  AdapterOptions o;
  o.targets = BlockNames(*model, false);
  auto seq = CreateOrFail(AdapterSpec(*model, o), *model);
  ASSERT_NE(seq, nullptr);
  auto b = MakeMethodBatch(MethodKind::kParallelAdapter, {seq.get()}, *model);
  EXPECT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument);
  // A method made for the float32 model is refused on the bfloat16 one.
  auto bf16 = TinyBert("bfloat16");
  b = MakeMethodBatch(MethodKind::kAdapter, {seq.get()}, *bf16);
  EXPECT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument);
  // No rows carrying anything: a batch that changes nothing.
  b = MakeMethodBatch(MethodKind::kAdapter, {nullptr, nullptr}, *model);
  ASSERT_TRUE(b.ok());
}

}  // namespace
}  // namespace delta
}  // namespace deltaserve
