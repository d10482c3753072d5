// AdamW against a hand computation, its checkpointable state, the learning-rate schedule and gradient clipping.
#include "server/tuning/optimizer.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace deltaserve {
namespace tuning {
namespace {

using ::testing::HasSubstr;
using Params = std::vector<std::pair<std::string, at::Tensor>>;

at::Tensor Leaf(std::vector<float> values, std::vector<int64_t> shape) {
  return at::tensor(values, at::kFloat).reshape(shape).clone().requires_grad_(true);
}

void SetGrad(const at::Tensor& p, std::vector<float> values) {
  p.mutable_grad() = at::tensor(values, at::kFloat).reshape(p.sizes()).clone();
}

std::vector<double> Values(const at::Tensor& t) {
  const at::Tensor c = t.detach().to(at::kDouble).contiguous().view(-1);
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

// One element's AdamW update, written out (torch.optim.AdamW's algorithm).
struct Reference {
  double p, m = 0, v = 0;
  void Step(double g, int64_t t, double lr, double wd, bool decay, const AdamWOptions& o) {
    if (decay) p *= 1 - lr * wd;
    m = o.beta1 * m + (1 - o.beta1) * g;
    v = o.beta2 * v + (1 - o.beta2) * g * g;
    const double m_hat = m / (1 - std::pow(o.beta1, t));
    const double v_hat = v / (1 - std::pow(o.beta2, t));
    p -= lr * m_hat / (std::sqrt(v_hat) + o.eps);
  }
};

TEST(AdamWTest, MatchesAHandComputedUpdateForTwoSteps) {
  AdamWOptions options;
  options.weight_decay = 0.1;
  const std::vector<float> w0 = {0.5f, -1.0f, 2.0f, 0.25f}, b0 = {1.0f, -0.5f};
  at::Tensor w = Leaf(w0, {2, 2});  // a matrix: decayed
  at::Tensor b = Leaf(b0, {2});     // a vector: not decayed
  at::Tensor frozen = Leaf({3.0f}, {1});  // never gets a gradient: skipped
  AdamW opt({{"w", w}, {"b", b}, {"frozen", frozen}}, options);
  const std::vector<std::vector<float>> gw = {{0.1f, -0.2f, 0.3f, 0.0f}, {-0.05f, 0.4f, 0.01f, 1.0f}};
  const std::vector<std::vector<float>> gb = {{1.0f, 0.5f}, {-2.0f, 0.0f}};
  const double lrs[] = {0.1, 0.05};
  std::vector<Reference> rw, rb;
  for (float x : w0) rw.push_back({x});
  for (float x : b0) rb.push_back({x});
  for (int step = 0; step < 2; ++step) {
    SetGrad(w, gw[step]);
    SetGrad(b, gb[step]);
    opt.Step(lrs[step]);
    EXPECT_EQ(opt.step(), step + 1);
    for (size_t i = 0; i < rw.size(); ++i) rw[i].Step(gw[step][i], step + 1, lrs[step], 0.1, true, options);
    for (size_t i = 0; i < rb.size(); ++i) rb[i].Step(gb[step][i], step + 1, lrs[step], 0.1, false, options);
    const std::vector<double> got_w = Values(w), got_b = Values(b);
    for (size_t i = 0; i < rw.size(); ++i) EXPECT_NEAR(got_w[i], rw[i].p, 1e-6) << "step " << step << " w" << i;
    for (size_t i = 0; i < rb.size(); ++i) EXPECT_NEAR(got_b[i], rb[i].p, 1e-6) << "step " << step << " b" << i;
  }
  // A parameter without a gradient does not move.
  EXPECT_NEAR(Values(frozen)[0], 3.0, 0);
  const auto state = opt.StateTensors();
  EXPECT_EQ(state.size(), 6u);
  EXPECT_NEAR(Values(state.at("exp_avg/w"))[1], rw[1].m, 1e-7);
  EXPECT_NEAR(Values(state.at("exp_avg_sq/b"))[0], rb[0].v, 1e-7);
  EXPECT_EQ(Values(state.at("exp_avg/frozen"))[0], 0);
}

TEST(AdamWTest, LearningRateScalesApplyByLongestNamePrefix) {
  AdamWOptions options;
  options.weight_decay = 0.1;
  options.lr_scales = {{"head/", 10.0}, {"head/out.", 4.0}, {"lora/", 0.5}};
  at::Tensor hw = Leaf({0.5f, -1.0f, 2.0f, 0.25f}, {2, 2});  // "head/dense.weight": x10, decayed at 10x too
  at::Tensor hb = Leaf({1.0f, -0.5f}, {2});                   // "head/out.bias": the longer prefix wins, x4
  at::Tensor la = Leaf({0.3f, 0.6f}, {1, 2});                 // "lora/...": x0.5
  at::Tensor other = Leaf({2.0f}, {1});                       // no prefix: x1
  AdamW opt({{"head/dense.weight", hw}, {"head/out.bias", hb}, {"lora/a", la}, {"other", other}}, options);
  const std::vector<std::vector<float>> grads = {{0.1f, -0.2f, 0.3f, 0.0f}, {1.0f, 0.5f}, {-0.4f, 0.2f}, {0.7f}};
  const std::vector<at::Tensor> params = {hw, hb, la, other};
  const std::vector<double> scales = {10.0, 4.0, 0.5, 1.0};
  std::vector<std::vector<Reference>> refs(params.size());
  for (size_t k = 0; k < params.size(); ++k) {
    for (double x : Values(params[k])) refs[k].push_back({x});
  }
  for (int step = 1; step <= 2; ++step) {
    for (size_t k = 0; k < params.size(); ++k) SetGrad(params[k], grads[k]);
    opt.Step(0.01);
    for (size_t k = 0; k < params.size(); ++k) {
      const std::vector<double> got = Values(params[k]);
      for (size_t i = 0; i < refs[k].size(); ++i) {
        refs[k][i].Step(grads[k][i], step, 0.01 * scales[k], 0.1, params[k].dim() >= 2, options);
        EXPECT_NEAR(got[i], refs[k][i].p, 1e-6) << "param " << k << " element " << i << " step " << step;
      }
    }
  }
}

TEST(AdamWTest, ZeroGradClearsGradients) {
  at::Tensor w = Leaf({1, 2}, {2});
  AdamW opt({{"w", w}}, AdamWOptions());
  SetGrad(w, {1, 1});
  opt.ZeroGrad();
  EXPECT_FALSE(w.grad().defined());
  opt.Step(0.1);  // no gradient: nothing moves
  EXPECT_EQ(Values(w), (std::vector<double>{1, 2}));
}

TEST(AdamWTest, StateRoundTripContinuesBitForBit) {
  auto make = [] {
    return Params{{"a", Leaf({0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 0.6f}, {2, 3})}, {"c", Leaf({-1.0f, 1.0f}, {2})}};
  };
  auto grads = [](int step) {
    return std::vector<std::vector<float>>{
        {0.1f * step, -0.3f, 0.7f, 0.2f / step, 1.0f, -0.9f},
        {0.5f, -0.25f * step},
    };
  };
  Params pa = make();
  AdamW a(pa, AdamWOptions());
  for (int step = 1; step <= 3; ++step) {
    for (size_t i = 0; i < pa.size(); ++i) SetGrad(pa[i].second, grads(step)[i]);
    a.Step(1e-2 * step);
  }
  // Resume a second optimizer from a's checkpoint (parameters and state), then run both on.
  Params pb = make();
  {
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < pb.size(); ++i) pb[i].second.copy_(pa[i].second);
  }
  AdamW b(pb, AdamWOptions());
  ASSERT_TRUE(b.LoadState(a.StateTensors(), a.step()).ok());
  EXPECT_EQ(b.step(), 3);
  for (int step = 4; step <= 6; ++step) {
    for (size_t i = 0; i < pa.size(); ++i) {
      SetGrad(pa[i].second, grads(step)[i]);
      SetGrad(pb[i].second, grads(step)[i]);
    }
    a.Step(1e-2 * step);
    b.Step(1e-2 * step);
  }
  for (size_t i = 0; i < pa.size(); ++i) EXPECT_TRUE(at::equal(pa[i].second, pb[i].second)) << pa[i].first;
  const auto sa = a.StateTensors(), sb = b.StateTensors();
  for (const auto& [name, t] : sa) EXPECT_TRUE(at::equal(t, sb.at(name))) << name;

  // Missing or misshapen state.
  auto missing = sa;
  missing.erase("exp_avg_sq/c");
  absl::Status st = b.LoadState(missing, 1);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("exp_avg_sq/c"));
  auto misshapen = sa;
  misshapen["exp_avg/a"] = at::zeros({3, 2});
  st = b.LoadState(misshapen, 1);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("exp_avg/a"));
  EXPECT_EQ(b.step(), 6) << "a refused state changes nothing";
  EXPECT_EQ(b.LoadState(sa, -1).code(), absl::StatusCode::kInvalidArgument);
}

TEST(AdamWTest, StateBytesCountBothMoments) {
  AdamW opt({{"a", Leaf({1, 2, 3, 4, 5, 6}, {2, 3})}, {"b", Leaf({1, 2}, {2})}}, AdamWOptions());
  EXPECT_EQ(opt.state_bytes(), 2 * (6 + 2) * 4);
}

TEST(LearningRateTest, WarmsUpLinearlyThenDecaysToZero) {
  const double peak = 1e-3;
  EXPECT_DOUBLE_EQ(LearningRateAt(0, 100, 10, peak), peak / 10);  // the first update
  EXPECT_DOUBLE_EQ(LearningRateAt(4, 100, 10, peak), peak / 2);
  EXPECT_DOUBLE_EQ(LearningRateAt(9, 100, 10, peak), peak);  // the warm-up's end
  EXPECT_DOUBLE_EQ(LearningRateAt(10, 100, 10, peak), peak);
  EXPECT_DOUBLE_EQ(LearningRateAt(55, 100, 10, peak), peak / 2);  // half way down
  EXPECT_DOUBLE_EQ(LearningRateAt(99, 100, 10, peak), peak / 90);  // the last update
  EXPECT_DOUBLE_EQ(LearningRateAt(100, 100, 10, peak), 0);
  EXPECT_DOUBLE_EQ(LearningRateAt(500, 100, 10, peak), 0);
  // Without warm-up the first update uses the peak.
  EXPECT_DOUBLE_EQ(LearningRateAt(0, 100, 0, peak), peak);
  EXPECT_DOUBLE_EQ(LearningRateAt(50, 100, 0, peak), peak / 2);
  // Monotone: up during the warm-up, down after.
  for (int64_t s = 1; s < 100; ++s) {
    if (s < 10) {
      EXPECT_GT(LearningRateAt(s, 100, 10, peak), LearningRateAt(s - 1, 100, 10, peak));
    } else {
      EXPECT_LE(LearningRateAt(s, 100, 10, peak), LearningRateAt(s - 1, 100, 10, peak));
    }
  }
}

double GlobalNorm(const Params& params) {
  double sq = 0;
  for (const auto& [name, p] : params) {
    if (!p.grad().defined()) continue;
    for (double v : Values(p.grad())) sq += v * v;
  }
  return std::sqrt(sq);
}

TEST(ClipGradNormTest, ScalesToMaxNormAndReturnsTheNormBefore) {
  Params params = {{"a", Leaf({0, 0}, {2})}, {"b", Leaf({0}, {1})}, {"none", Leaf({0}, {1})}};
  SetGrad(params[0].second, {3, 4});
  SetGrad(params[1].second, {12});
  EXPECT_NEAR(ClipGradNorm(params, 100), 13, 1e-9);  // under the limit: unchanged
  EXPECT_NEAR(GlobalNorm(params), 13, 1e-6);
  EXPECT_NEAR(ClipGradNorm(params, 0), 13, 1e-9);  // no clipping
  EXPECT_NEAR(GlobalNorm(params), 13, 1e-6);
  EXPECT_NEAR(ClipGradNorm(params, 1.0), 13, 1e-9);
  EXPECT_NEAR(GlobalNorm(params), 1.0, 1e-5);
  // Directions are kept.
  EXPECT_NEAR(Values(params[0].second.grad())[0] / Values(params[1].second.grad())[0], 3.0 / 12.0, 1e-6);
  EXPECT_FALSE(params[2].second.grad().defined());
}

TEST(ClipGradNormTest, NonFiniteGradientGivesNaNOrInf) {
  Params params = {{"a", Leaf({0, 0}, {2})}, {"b", Leaf({0}, {1})}};
  SetGrad(params[0].second, {1, std::numeric_limits<float>::quiet_NaN()});
  SetGrad(params[1].second, {1});
  EXPECT_TRUE(std::isnan(ClipGradNorm(params, 1.0)));
  SetGrad(params[0].second, {1, std::numeric_limits<float>::infinity()});
  EXPECT_FALSE(std::isfinite(ClipGradNorm(params, 1.0)));
}

}  // namespace
}  // namespace tuning
}  // namespace deltaserve
