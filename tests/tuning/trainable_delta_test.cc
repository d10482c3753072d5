// TrainableDelta: the training form of every delta method computes what serving computes for the exported pack,
// starts as the identity where the method's paper says so, sends gradients only into delta tensors, is seeded,
// validates specs with the packs' messages, and round-trips its values.
#include "server/tuning/trainable_delta.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/delta/delta_batch.h"
#include "server/delta/delta_pack.h"
#include "server/delta/head.h"
#include "server/delta/method.h"
#include "tests/delta/delta_test_util.h"

namespace deltaserve {
namespace tuning {
namespace {

using delta::MethodKind;
using delta::MethodSpec;
using ::testing::HasSubstr;
namespace dt = delta::testing;

MethodSpec Method(MethodKind kind, nlohmann::json config) {
  MethodSpec spec;
  spec.kind = kind;
  spec.config = std::move(config);
  return spec;
}

// One spec per method kind (non-default hyper-parameters where a method has some).
std::vector<MethodSpec> EveryKind() {
  return {
      Method(MethodKind::kLora, {{"rank", 4}, {"alpha", 8}}),
      Method(MethodKind::kBitFit, nlohmann::json::object()),
      Method(MethodKind::kLnTuning, nlohmann::json::object()),
      Method(MethodKind::kParallelAdapter, {{"bottleneck", 8}, {"activation", "tanh"}, {"scaling", 2.0}}),
      Method(MethodKind::kIa3, nlohmann::json::object()),
      Method(MethodKind::kPrefix, {{"num_virtual_tokens", 3}}),
      Method(MethodKind::kPrompt, {{"num_virtual_tokens", 3}}),
      Method(MethodKind::kAdapter, {{"bottleneck", 8}, {"activation", "gelu"}, {"scaling", 0.5}}),
  };
}

TrainableSpec Spec(std::vector<MethodSpec> methods, int64_t hidden = 0) {
  TrainableSpec spec;
  spec.methods = std::move(methods);
  spec.head.type = "classification";
  spec.head.labels = {"neg", "pos", "neutral"};
  spec.head.hidden = hidden;
  spec.head.activation = "relu";
  return spec;
}

std::unique_ptr<TrainableDelta> CreateOrFail(const TrainableSpec& spec, const model::Model& model,
                                             uint64_t seed = 1) {
  auto d = TrainableDelta::Create(spec, model, seed);
  EXPECT_TRUE(d.ok()) << d.status();
  return d.ok() ? std::move(d).value() : nullptr;
}

model::ForwardInput MakeInput(const std::vector<std::vector<int64_t>>& rows) {
  int64_t t = 0;
  for (const auto& r : rows) t = std::max<int64_t>(t, r.size());
  const int64_t b = static_cast<int64_t>(rows.size());
  model::ForwardInput input;
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

// Moves every parameter away from its initial value (so that no method is the identity).
void Perturb(TrainableDelta* d, uint64_t seed, double scale = 0.1) {
  at::NoGradGuard no_grad;
  for (const auto& [name, p] : d->parameters()) {
    const_cast<at::Tensor&>(p).add_(dt::RandomTensor(p.sizes().vec(), scale, seed++).to(p.device()));
  }
}

double MaxAbs(const at::Tensor& a, const at::Tensor& b) {
  return (a.detach().to(at::kDouble) - b.detach().to(at::kDouble)).abs().max().item<double>();
}

// The training forward of `rows` with `d`, and the serving forward of `d`'s exported pack; EXPECTs pooled outputs
// and the head's logits to agree.
void ExpectTrainingEqualsServing(const model::Model& model, TrainableDelta* d,
                                 const std::vector<std::vector<int64_t>>& rows, double tolerance = 1e-5) {
  auto trained = model.ForwardTrainable(MakeInput(rows), d);
  ASSERT_TRUE(trained.ok()) << trained.status();
  auto logits = d->HeadForward(trained->pooled);
  ASSERT_TRUE(logits.ok()) << logits.status();

  delta::PackManifest manifest;
  manifest.name = "trainable-delta-test";
  auto contents = d->Export(manifest);
  ASSERT_TRUE(contents.ok()) << contents.status();
  auto pack = delta::DeltaPack::FromContents(*contents, model, delta::PackLimits());
  ASSERT_TRUE(pack.ok()) << pack.status();
  std::vector<const delta::DeltaPack*> packs(rows.size(), pack->get());
  auto batch = delta::DeltaBatch::Create(packs, model);
  ASSERT_TRUE(batch.ok()) << batch.status();
  auto served = dt::RunRows(model, rows, batch->get());
  ASSERT_TRUE(served.ok()) << served.status();
  ASSERT_EQ(served->pooled.sizes(), trained->pooled.sizes());
  EXPECT_LE(MaxAbs(trained->pooled, served->pooled), tolerance);
  ASSERT_NE((*pack)->head(), nullptr);
  auto served_logits = (*pack)->head()->Apply(served->pooled);
  ASSERT_TRUE(served_logits.ok()) << served_logits.status();
  EXPECT_LE(MaxAbs(*logits, *served_logits), tolerance);
  std::printf("  %s: max |training - serving| pooled %.3g, logits %.3g\n", model.info().name.c_str(),
              MaxAbs(trained->pooled, served->pooled), MaxAbs(*logits, *served_logits));
  // The delta is not the identity: the pooled output moved.
  auto base = dt::RunRows(model, rows, nullptr);
  ASSERT_TRUE(base.ok());
  EXPECT_GT(MaxAbs(base->pooled, served->pooled), 1e-4);
  // Under inference mode (evaluation) the hooks give the same outputs.
  auto evaluated = model.Forward(MakeInput(rows), d);
  ASSERT_TRUE(evaluated.ok()) << evaluated.status();
  EXPECT_LE(MaxAbs(evaluated->pooled, trained->pooled), 1e-6);
  // Prompt tuning's soft tokens: the leading positions the serving batch reports.
  EXPECT_EQ(d->leading_virtual_tokens(), (*batch)->LeadingVirtualTokens(0));
}

TEST(TrainableDeltaTest, EveryMethodComputesWhatServingComputesForTheExportedPack) {
  for (const auto& [name, model] : dt::TestModels()) {
    const auto rows = dt::RandomRows(*model, 3, 2, 7, 11);
    for (const MethodSpec& m : EveryKind()) {
      SCOPED_TRACE(absl::StrCat(name, " ", delta::MethodKindName(m.kind)));
      auto d = CreateOrFail(Spec({m}), *model);
      ASSERT_NE(d, nullptr);
      Perturb(d.get(), 100);
      ExpectTrainingEqualsServing(*model, d.get(), rows);
    }
  }
}

TEST(TrainableDeltaTest, CombinationsComputeWhatServingComputes) {
  for (const auto& [name, model] : dt::TestModels()) {
    const auto rows = dt::RandomRows(*model, 4, 1, 6, 12);
    const std::vector<std::vector<MethodSpec>> combos = {
        {Method(MethodKind::kLora, {{"rank", 2}}), Method(MethodKind::kBitFit, nlohmann::json::object())},
        {Method(MethodKind::kPrompt, {{"num_virtual_tokens", 2}}), Method(MethodKind::kAdapter, {{"bottleneck", 4}})},
        EveryKind(),
    };
    for (size_t i = 0; i < combos.size(); ++i) {
      SCOPED_TRACE(absl::StrCat(name, " combination ", i));
      auto d = CreateOrFail(Spec(combos[i], /*hidden=*/i == 0 ? 16 : 0), *model);
      ASSERT_NE(d, nullptr);
      Perturb(d.get(), 200 + 10 * i);
      ExpectTrainingEqualsServing(*model, d.get(), rows);
    }
  }
}

TEST(TrainableDeltaTest, RegressionHeadMatchesServing) {
  for (const auto& [name, model] : dt::TestModels()) {
    SCOPED_TRACE(name);
    TrainableSpec spec = Spec({Method(MethodKind::kLora, nlohmann::json::object())}, 8);
    spec.head.type = "regression";
    spec.head.labels.clear();
    spec.head.activation = "gelu";
    auto d = CreateOrFail(spec, *model);
    ASSERT_NE(d, nullptr);
    Perturb(d.get(), 300);
    ExpectTrainingEqualsServing(*model, d.get(), dt::RandomRows(*model, 2, 3, 5, 13));
    auto logits = d->HeadForward(at::zeros({5, model->info().embedding_dim}));
    ASSERT_TRUE(logits.ok()) << logits.status();
    EXPECT_EQ(logits->sizes().vec(), (std::vector<int64_t>{5, 1}));
  }
}

TEST(TrainableDeltaTest, ForwardTrainableWithoutHooksEqualsForward) {
  for (const auto& [name, model] : dt::TestModels()) {
    SCOPED_TRACE(name);
    const auto rows = dt::RandomRows(*model, 4, 1, 9, 18);
    auto base = dt::RunRows(*model, rows, nullptr);
    auto trained = model->ForwardTrainable(MakeInput(rows), nullptr);
    ASSERT_TRUE(base.ok() && trained.ok());
    EXPECT_LE(MaxAbs(trained->pooled, base->pooled), 1e-6);
    EXPECT_TRUE(at::equal(trained->attention_mask, base->attention_mask));
    // Over real tokens, relative to the states' magnitude (use-lite's reach ~30).
    const at::Tensor mask = base->attention_mask.unsqueeze(-1);
    const double scale = std::max(1.0, base->hidden_states.abs().max().item<double>());
    EXPECT_LE(MaxAbs(trained->hidden_states * mask, base->hidden_states * mask) / scale, 1e-6);
  }
}

TEST(TrainableDeltaTest, IdentityMethodsLeaveTheBackboneUnchangedAtInit) {
  for (const auto& [name, model] : dt::TestModels()) {
    const auto rows = dt::RandomRows(*model, 3, 2, 7, 14);
    auto base = dt::RunRows(*model, rows, nullptr);
    ASSERT_TRUE(base.ok());
    for (const MethodSpec& m : EveryKind()) {
      if (m.kind == MethodKind::kPrefix || m.kind == MethodKind::kPrompt) continue;  // they add tokens
      SCOPED_TRACE(absl::StrCat(name, " ", delta::MethodKindName(m.kind)));
      auto d = CreateOrFail(Spec({m}), *model);
      ASSERT_NE(d, nullptr);
      auto out = model->ForwardTrainable(MakeInput(rows), d.get());
      ASSERT_TRUE(out.ok()) << out.status();
      EXPECT_LE(MaxAbs(out->pooled, base->pooled), 1e-6);
    }
  }
}

// Cross-entropy of the head's logits against fixed labels, through the training forward.
at::Tensor Loss(const model::Model& model, TrainableDelta* d, const std::vector<std::vector<int64_t>>& rows) {
  auto out = model.ForwardTrainable(MakeInput(rows), d);
  EXPECT_TRUE(out.ok()) << out.status();
  if (!out.ok()) return at::Tensor();
  auto logits = d->HeadForward(out->pooled);
  EXPECT_TRUE(logits.ok()) << logits.status();
  if (!logits.ok()) return at::Tensor();
  const at::Tensor labels = at::arange(static_cast<int64_t>(rows.size()), at::kLong).remainder(3);
  return at::cross_entropy_loss(*logits, labels.to(logits->device()));
}

TEST(TrainableDeltaTest, GradientsReachOnlyDeltaTensors) {
  for (const auto& [name, model] : dt::TestModels()) {
    SCOPED_TRACE(name);
    const auto rows = dt::RandomRows(*model, 4, 2, 6, 15);
    auto d = CreateOrFail(Spec(EveryKind(), 8), *model);
    ASSERT_NE(d, nullptr);
    EXPECT_GT(d->num_parameters(), 0);
    for (const auto& [pname, p] : d->parameters()) {
      EXPECT_TRUE(p.requires_grad() && p.is_leaf()) << pname;
      EXPECT_EQ(p.scalar_type(), at::kFloat) << pname;
    }
    at::Tensor loss = Loss(*model, d.get(), rows);
    ASSERT_TRUE(loss.defined());
    loss.backward();
    for (const auto& [pname, p] : d->parameters()) {
      ASSERT_TRUE(p.grad().defined()) << pname;
      EXPECT_TRUE(at::isfinite(p.grad()).all().item<bool>()) << pname;
      // At init, LoRA's A and an adapter's down-projection see a zero B / up-projection: their gradient is 0.
      const bool zero_at_init = absl::EndsWith(pname, ".lora_A") || absl::EndsWith(pname, ".down.weight") ||
                                absl::EndsWith(pname, ".down.bias");
      if (!zero_at_init) {
        EXPECT_GT(p.grad().abs().max().item<double>(), 0) << pname;
      }
    }
    for (const auto& [pname, w] : model->parameters()) {
      EXPECT_FALSE(w.requires_grad()) << pname;
      EXPECT_FALSE(w.grad().defined()) << pname;
    }
    // Once B and the up-projections move, A and the down-projections get gradients too.
    Perturb(d.get(), 400);
    for (const auto& [pname, p] : d->parameters()) const_cast<at::Tensor&>(p).mutable_grad() = at::Tensor();
    loss = Loss(*model, d.get(), rows);
    ASSERT_TRUE(loss.defined());
    loss.backward();
    for (const auto& [pname, p] : d->parameters()) {
      ASSERT_TRUE(p.grad().defined()) << pname;
      EXPECT_GT(p.grad().abs().max().item<double>(), 0) << pname;
    }
  }
}

// Input tensors made under inference mode (as the serving code makes them) are inference tensors, which autograd
// cannot save; the training forward copies them.
TEST(TrainableDeltaTest, InputsMadeUnderInferenceModeStillTrain) {
  for (const auto& [name, model] : dt::TestModels()) {
    SCOPED_TRACE(name);
    auto d = CreateOrFail(Spec({Method(MethodKind::kPrompt, {{"num_virtual_tokens", 2}})}), *model);
    ASSERT_NE(d, nullptr);
    model::ForwardInput input;
    {
      c10::InferenceMode guard;
      input = MakeInput(dt::RandomRows(*model, 2, 2, 4, 19));
    }
    ASSERT_TRUE(input.input_ids.is_inference());
    auto out = model->ForwardTrainable(input, d.get());
    ASSERT_TRUE(out.ok()) << out.status();
    auto logits = d->HeadForward(out->pooled);
    ASSERT_TRUE(logits.ok()) << logits.status();
    logits->sum().backward();
    for (const auto& [pname, p] : d->parameters()) EXPECT_TRUE(p.grad().defined()) << pname;
  }
}

// The autograd gradient of one LoRA entry agrees with a central difference of the loss.
TEST(TrainableDeltaTest, LoraGradientMatchesFiniteDifference) {
  auto model = dt::TinyBert();
  ASSERT_NE(model, nullptr);
  const auto rows = dt::RandomRows(*model, 3, 3, 6, 16);
  auto d = CreateOrFail(Spec({Method(MethodKind::kLora, {{"rank", 2}})}), *model);
  ASSERT_NE(d, nullptr);
  Perturb(d.get(), 500);
  at::Tensor a;
  for (const auto& [pname, p] : d->parameters()) {
    if (absl::EndsWith(pname, "layer.0.attention.self.query.lora_A")) a = p;
  }
  ASSERT_TRUE(a.defined());
  at::Tensor loss = Loss(*model, d.get(), rows);
  loss.backward();
  const double g = a.grad()[1][3].item<double>();
  const double h = 1e-2;
  double at_h[2];
  for (int side = 0; side < 2; ++side) {
    {
      at::NoGradGuard no_grad;
      a[1][3].add_(side == 0 ? h : -2 * h);
    }
    at::NoGradGuard no_grad;
    at_h[side] = Loss(*model, d.get(), rows).item<double>();
  }
  EXPECT_NEAR(g, (at_h[0] - at_h[1]) / (2 * h), 1e-3 + 2e-2 * std::abs(g));
}

TEST(TrainableDeltaTest, SameSeedSameParametersOtherSeedOthers) {
  for (const auto& [name, model] : dt::TestModels()) {
    SCOPED_TRACE(name);
    const TrainableSpec spec = Spec(EveryKind(), 8);
    auto a = CreateOrFail(spec, *model, 7);
    auto b = CreateOrFail(spec, *model, 7);
    auto c = CreateOrFail(spec, *model, 8);
    ASSERT_TRUE(a && b && c);
    ASSERT_EQ(a->parameters().size(), b->parameters().size());
    ASSERT_EQ(a->parameters().size(), c->parameters().size());
    bool any_differs = false;
    for (size_t i = 0; i < a->parameters().size(); ++i) {
      const auto& [an, at_] = a->parameters()[i];
      EXPECT_EQ(an, b->parameters()[i].first);
      EXPECT_TRUE(at::equal(at_, b->parameters()[i].second)) << an;
      any_differs = any_differs || !at::equal(at_, c->parameters()[i].second);
    }
    EXPECT_TRUE(any_differs);
  }
}

TEST(TrainableDeltaTest, ParametersAreNamedSortedAndCounted) {
  auto model = dt::TinyBert();
  ASSERT_NE(model, nullptr);
  auto d = CreateOrFail(Spec({Method(MethodKind::kLora, {{"rank", 4}})}), *model);
  ASSERT_NE(d, nullptr);
  std::vector<std::string> names;
  int64_t count = 0;
  for (const auto& [name, p] : d->parameters()) {
    names.push_back(name);
    count += p.numel();
  }
  EXPECT_TRUE(std::is_sorted(names.begin(), names.end()));
  EXPECT_THAT(names, ::testing::Contains("lora/encoder.layer.0.attention.self.query.lora_A"));
  EXPECT_THAT(names, ::testing::Contains("lora/encoder.layer.1.attention.self.value.lora_B"));
  EXPECT_THAT(names, ::testing::Contains("head/out.weight"));
  EXPECT_THAT(names, ::testing::Contains("head/out.bias"));
  EXPECT_EQ(d->num_parameters(), count);
  // TinyBert: 2 layers x {query, value} x (4 x 32 + 32 x 4), and a 3 x 32 head with its bias.
  EXPECT_EQ(count, 2 * 2 * (4 * 32 + 32 * 4) + 3 * 32 + 3);
}

// The message a pack with this method config gets from the serving code.
std::string ServingError(const MethodSpec& spec, const model::Model& model) {
  auto m = delta::CreateMethod(spec, model, delta::MethodLimits());
  EXPECT_FALSE(m.ok());
  return m.ok() ? "" : std::string(m.status().message());
}

TEST(TrainableDeltaTest, BadSpecsAreInvalidArgumentWithThePacksMessages) {
  auto model = dt::TinyBert();
  ASSERT_NE(model, nullptr);
  const std::vector<MethodSpec> bad = {
      Method(MethodKind::kLora, {{"rnk", 4}}),
      Method(MethodKind::kLora, {{"targets", nlohmann::json::array({"querry"})}}),
      Method(MethodKind::kLora, {{"rank", 0}}),
      Method(MethodKind::kLora, {{"targets", nlohmann::json::array({"LayerNorm"})}}),
      Method(MethodKind::kAdapter, nlohmann::json::object()),  // bottleneck is required
      Method(MethodKind::kPrefix,
             {{"num_virtual_tokens", 2}, {"targets", nlohmann::json::array({"re:nothing.*"})}}),
      Method(MethodKind::kIa3, {{"feedforward", nlohmann::json::array({"query"})}}),
      Method(MethodKind::kPrompt, {{"num_virtual_tokens", 100000}}),
  };
  for (const MethodSpec& m : bad) {
    SCOPED_TRACE(m.config.dump());
    auto d = TrainableDelta::Create(Spec({m}), *model, 1);
    ASSERT_FALSE(d.ok());
    EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument) << d.status();
    EXPECT_EQ(d.status().message(), ServingError(m, *model));
  }
  auto unknown = TrainableDelta::Create(Spec({Method(MethodKind::kLora, {{"rnk", 4}})}), *model, 1);
  ASSERT_FALSE(unknown.ok());
  EXPECT_THAT(unknown.status().message(), HasSubstr("unknown config key \"rnk\""));
  auto nothing = TrainableDelta::Create(
      Spec({Method(MethodKind::kLora, {{"targets", nlohmann::json::array({"querry"})}})}), *model, 1);
  ASSERT_FALSE(nothing.ok());
  EXPECT_THAT(nothing.status().message(), HasSubstr("querry"));

  // Two of one kind.
  auto twice = TrainableDelta::Create(
      Spec({Method(MethodKind::kLora, nlohmann::json::object()), Method(MethodKind::kLora, {{"rank", 2}})}), *model,
      1);
  ASSERT_FALSE(twice.ok());
  EXPECT_EQ(twice.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(twice.status().message(), HasSubstr("appears twice"));

  // Heads.
  TrainableSpec one_label = Spec({});
  one_label.head.labels = {"only"};
  TrainableSpec bad_type = Spec({});
  bad_type.head.type = "ranking";
  TrainableSpec duplicate = Spec({});
  duplicate.head.labels = {"a", "a"};
  TrainableSpec bad_activation = Spec({}, 4);
  bad_activation.head.activation = "softplus";
  TrainableSpec huge = Spec({}, int64_t{1} << 20);
  TrainableSpec regression_labels = Spec({});
  regression_labels.head.type = "regression";
  for (const auto& [spec, needle] : std::vector<std::pair<TrainableSpec, std::string>>{
           {one_label, "at least 2 labels"},
           {bad_type, "unknown type \"ranking\""},
           {duplicate, "appears twice"},
           {bad_activation, "unknown activation"},
           {huge, "\"hidden\""},
           {regression_labels, "no \"labels\""}}) {
    auto d = TrainableDelta::Create(spec, *model, 1);
    ASSERT_FALSE(d.ok()) << needle;
    EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument) << d.status();
    EXPECT_THAT(d.status().message(), HasSubstr(needle));
  }
  // A head alone is fine.
  EXPECT_NE(CreateOrFail(Spec({}), *model), nullptr);
}

TEST(TrainableDeltaTest, LoadValuesRoundTripsAndRejectsMissingOrMisshapenValues) {
  for (const auto& [name, model] : dt::TestModels()) {
    SCOPED_TRACE(name);
    const TrainableSpec spec = Spec(EveryKind(), 8);
    auto a = CreateOrFail(spec, *model, 1);
    auto b = CreateOrFail(spec, *model, 2);
    ASSERT_TRUE(a && b);
    Perturb(a.get(), 600);
    std::map<std::string, at::Tensor> values;
    for (const auto& [pname, p] : a->parameters()) values[pname] = p.detach().to(at::kCPU).clone();
    values["opt/unrelated"] = at::zeros({1});  // other names are ignored
    ASSERT_TRUE(b->LoadValues(values).ok());
    for (size_t i = 0; i < a->parameters().size(); ++i) {
      EXPECT_TRUE(at::equal(a->parameters()[i].second, b->parameters()[i].second)) << a->parameters()[i].first;
      EXPECT_TRUE(b->parameters()[i].second.requires_grad());
    }
    const auto rows = dt::RandomRows(*model, 2, 2, 5, 17);
    auto out_a = model->ForwardTrainable(MakeInput(rows), a.get());
    auto out_b = model->ForwardTrainable(MakeInput(rows), b.get());
    ASSERT_TRUE(out_a.ok() && out_b.ok());
    EXPECT_TRUE(at::equal(out_a->pooled, out_b->pooled));

    auto c = CreateOrFail(spec, *model, 3);
    ASSERT_NE(c, nullptr);
    const at::Tensor before = c->parameters()[0].second.detach().clone();
    std::map<std::string, at::Tensor> missing = values;
    missing.erase(a->parameters().back().first);
    absl::Status st = c->LoadValues(missing);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
    EXPECT_THAT(st.message(), HasSubstr(a->parameters().back().first));
    EXPECT_TRUE(at::equal(c->parameters()[0].second, before)) << "nothing is copied on an error";
    std::map<std::string, at::Tensor> misshapen = values;
    misshapen["head/out.bias"] = at::zeros({7});
    st = c->LoadValues(misshapen);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
    EXPECT_THAT(st.message(), HasSubstr("head/out.bias"));
    EXPECT_TRUE(at::equal(c->parameters()[0].second, before));
  }
}

TEST(TrainableDeltaTest, ExportHoldsCanonicalSpecsAndTheBackbone) {
  auto model = dt::TinyBert();
  ASSERT_NE(model, nullptr);
  auto d = CreateOrFail(Spec({Method(MethodKind::kLora, nlohmann::json::object()),
                              Method(MethodKind::kAdapter, {{"bottleneck", 4}})}),
                        *model);
  ASSERT_NE(d, nullptr);
  delta::PackManifest manifest;
  manifest.name = "exported";
  auto contents = d->Export(manifest);
  ASSERT_TRUE(contents.ok()) << contents.status();
  EXPECT_EQ(contents->manifest.name, "exported");
  EXPECT_EQ(contents->manifest.backbone_fingerprint, model->info().fingerprint);
  EXPECT_EQ(contents->manifest.backbone_family, model->info().family);
  ASSERT_EQ(contents->methods.size(), 2u);
  EXPECT_EQ(contents->methods[0].kind, MethodKind::kLora);
  EXPECT_EQ(contents->methods[0].config["rank"], 8);
  EXPECT_EQ(contents->methods[0].config["targets"].size(), 4u);  // 2 layers x {query, value}
  EXPECT_EQ(contents->methods[1].config["placement"], "houlsby");
  for (const auto& m : contents->methods) {
    for (const auto& [name, t] : m.tensors) {
      EXPECT_TRUE(t.device().is_cpu() && t.scalar_type() == at::kFloat && !t.requires_grad()) << name;
    }
  }
  ASSERT_TRUE(contents->head.has_value());
  EXPECT_EQ(contents->head->config["labels"].size(), 3u);
  std::string bytes;
  auto pack = delta::DeltaPack::FromContents(*contents, *model, delta::PackLimits(), &bytes);
  ASSERT_TRUE(pack.ok()) << pack.status();
  auto reparsed = delta::ParsePack(bytes, delta::PackLimits());
  ASSERT_TRUE(reparsed.ok()) << reparsed.status();
}

}  // namespace
}  // namespace tuning
}  // namespace deltaserve
