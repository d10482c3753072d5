#include "server/tuning/optimizer.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "server/common/torch_status.h"

namespace deltaserve {
namespace tuning {
namespace {

constexpr char kExpAvg[] = "exp_avg/";
constexpr char kExpAvgSq[] = "exp_avg_sq/";

}  // namespace

AdamW::AdamW(std::vector<std::pair<std::string, at::Tensor>> params, AdamWOptions options)
    : params_(std::move(params)), options_(options) {
  at::NoGradGuard no_grad;
  for (const auto& [name, p] : params_) {
    exp_avg_.push_back(at::zeros_like(p, at::MemoryFormat::Contiguous).detach());
    exp_avg_sq_.push_back(at::zeros_like(p, at::MemoryFormat::Contiguous).detach());
    double scale = 1;
    size_t matched = 0;
    for (const auto& [prefix, s] : options_.lr_scales) {
      if (prefix.size() >= matched && absl::StartsWith(name, prefix)) {
        scale = s;
        matched = prefix.size();
      }
    }
    lr_scale_.push_back(scale);
  }
}

void AdamW::Step(double lr) {
  ++step_;
  at::NoGradGuard no_grad;
  const double b1 = options_.beta1, b2 = options_.beta2;
  const double bias1 = 1 - std::pow(b1, static_cast<double>(step_));
  const double bias2 = 1 - std::pow(b2, static_cast<double>(step_));
  const double bias2_sqrt = std::sqrt(bias2);
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor& p = params_[i].second;
    const at::Tensor& g = p.grad();
    if (!g.defined()) continue;
    const double p_lr = lr * lr_scale_[i];
    const double step_size = p_lr / bias1;
    // Decoupled weight decay (matrices only), before the Adam update, as torch.optim.AdamW.
    if (options_.weight_decay != 0 && p.dim() >= 2) p.mul_(1 - p_lr * options_.weight_decay);
    at::Tensor& m = exp_avg_[i];
    at::Tensor& v = exp_avg_sq_[i];
    m.mul_(b1).add_(g, 1 - b1);
    v.mul_(b2).addcmul_(g, g, 1 - b2);
    const at::Tensor denom = v.sqrt().div_(bias2_sqrt).add_(options_.eps);
    p.addcdiv_(m, denom, -step_size);
  }
}

void AdamW::ZeroGrad() {
  for (auto& [name, p] : params_) {
    if (p.grad().defined()) p.mutable_grad() = at::Tensor();
  }
}

std::map<std::string, at::Tensor> AdamW::StateTensors() const {
  std::map<std::string, at::Tensor> out;
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string& name = params_[i].first;
    out[kExpAvg + name] = exp_avg_[i].detach().to(at::kCPU).clone();
    out[kExpAvgSq + name] = exp_avg_sq_[i].detach().to(at::kCPU).clone();
  }
  return out;
}

absl::Status AdamW::LoadState(const std::map<std::string, at::Tensor>& state, int64_t step) {
  if (step < 0) return absl::InvalidArgumentError(absl::StrCat("optimizer state: step ", step, " is negative"));
  for (size_t i = 0; i < params_.size(); ++i) {
    for (const char* prefix : {kExpAvg, kExpAvgSq}) {
      const std::string key = prefix + params_[i].first;
      auto it = state.find(key);
      if (it == state.end() || !it->second.defined()) {
        return absl::InvalidArgumentError(absl::StrCat("optimizer state: tensor \"", key, "\" is missing"));
      }
      if (it->second.sizes() != params_[i].second.sizes()) {
        return absl::InvalidArgumentError(absl::StrCat("optimizer state: tensor \"", key, "\" has shape ",
                                                       ShapeString(it->second.sizes()), ", expected ",
                                                       ShapeString(params_[i].second.sizes())));
      }
    }
  }
  absl::Status copied = TorchCallVoid(
      [&] {
        at::NoGradGuard no_grad;
        for (size_t i = 0; i < params_.size(); ++i) {
          exp_avg_[i].copy_(state.at(kExpAvg + params_[i].first));
          exp_avg_sq_[i].copy_(state.at(kExpAvgSq + params_[i].first));
        }
      },
      "loading optimizer state");
  if (!copied.ok()) return absl::InvalidArgumentError(copied.message());
  step_ = step;
  return absl::OkStatus();
}

int64_t AdamW::state_bytes() const {
  int64_t n = 0;
  for (size_t i = 0; i < exp_avg_.size(); ++i) n += exp_avg_[i].nbytes() + exp_avg_sq_[i].nbytes();
  return n;
}

double LearningRateAt(int64_t step, int64_t total_steps, int64_t warmup_steps, double peak) {
  if (step < 0) step = 0;
  if (warmup_steps > 0 && step < warmup_steps) {
    return peak * static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
  }
  if (total_steps <= warmup_steps) return total_steps > 0 && step >= total_steps ? 0 : peak;
  if (step >= total_steps) return 0;
  return peak * static_cast<double>(total_steps - step) / static_cast<double>(total_steps - warmup_steps);
}

double ClipGradNorm(const std::vector<std::pair<std::string, at::Tensor>>& params, double max_norm) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> norms;
  for (const auto& [name, p] : params) {
    const at::Tensor& g = p.grad();
    if (!g.defined()) continue;
    norms.push_back(at::linalg_vector_norm(g, 2, c10::nullopt, false, at::kDouble).to(at::kCPU));
  }
  if (norms.empty()) return 0;
  const double total = at::stack(norms).norm(2).item<double>();
  if (!std::isfinite(total)) return total;
  if (max_norm > 0 && total > max_norm) {
    const double scale = max_norm / (total + 1e-6);
    for (const auto& [name, p] : params) {
      if (p.grad().defined()) const_cast<at::Tensor&>(p).mutable_grad().mul_(scale);
    }
  }
  return total;
}

}  // namespace tuning
}  // namespace deltaserve
