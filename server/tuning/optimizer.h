// AdamW (Loshchilov & Hutter, decoupled weight decay) over named tensors, a linear warm-up / linear decay
// learning-rate schedule, and global gradient-norm clipping. Written here rather than taken from torch::optim so
// that its whole state is a map of named tensors plus a step count: a checkpoint saves and restores it exactly,
// and a resumed run continues bit-for-bit.
//
// Not thread-safe: one training thread uses an optimizer.
#ifndef DELTASERVE_SERVER_TUNING_OPTIMIZER_H_
#define DELTASERVE_SERVER_TUNING_OPTIMIZER_H_

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "ATen/core/Tensor.h"
#include "absl/status/status.h"

namespace deltaserve {
namespace tuning {

struct AdamWOptions {
  // Exponential decay rates of the first and second moment estimates.
  double beta1 = 0.9;
  double beta2 = 0.999;
  // Added to the denominator for numerical stability.
  double eps = 1e-8;
  // Decoupled weight decay, applied to tensors of two or more dimensions only (matrices: not biases, layer-norm
  // deltas, (IA)^3 scales or other vectors).
  double weight_decay = 0.01;
  // Learning-rate multipliers by parameter-name prefix (the longest matching prefix wins; 1 where none matches):
  // {"head/": 10} updates the head at 10x the scheduled rate, as a torch.optim parameter group with its own
  // learning rate under the same scheduler would. Weight decay scales with it (lr x weight_decay), as there.
  std::map<std::string, double> lr_scales;
};

class AdamW {
 public:
  // `params`: (name, leaf tensor with requires_grad); the tensors are shared with the caller (updated in place).
  AdamW(std::vector<std::pair<std::string, at::Tensor>> params, AdamWOptions options);

  // One update with learning rate `lr` (times the parameter's lr_scales entry) from the tensors' current .grad()
  // (a tensor without a gradient is skipped). Increments step().
  void Step(double lr);
  // Resets every parameter's gradient.
  void ZeroGrad();

  int64_t step() const { return step_; }
  // The moment estimates by name: "exp_avg/<param>", "exp_avg_sq/<param>" (CPU copies for a checkpoint).
  std::map<std::string, at::Tensor> StateTensors() const;
  // Restores what StateTensors() returned and the step count. INVALID_ARGUMENT for a missing or misshapen tensor.
  absl::Status LoadState(const std::map<std::string, at::Tensor>& state, int64_t step);
  // Bytes of optimizer state (both moments over all parameters).
  int64_t state_bytes() const;

 private:
  std::vector<std::pair<std::string, at::Tensor>> params_;
  std::vector<at::Tensor> exp_avg_, exp_avg_sq_;
  std::vector<double> lr_scale_;  // per parameter, from options_.lr_scales
  AdamWOptions options_;
  int64_t step_ = 0;
};

// Linear warm-up from 0 to `peak` over `warmup_steps`, then linear decay to 0 at `total_steps`.
// `step` counts from 0 (the learning rate of the first update is peak / warmup_steps, or peak without warm-up).
double LearningRateAt(int64_t step, int64_t total_steps, int64_t warmup_steps, double peak);

// Scales every gradient so that their global L2 norm is at most `max_norm` (no-op for max_norm <= 0). Returns
// the norm before clipping (NaN or Inf when a gradient is not finite: the caller fails the job).
double ClipGradNorm(const std::vector<std::pair<std::string, at::Tensor>>& params, double max_norm);

}  // namespace tuning
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_TUNING_OPTIMIZER_H_
