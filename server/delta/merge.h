// Merge mode: when a whole batch runs one delta pack, its reparameterization- and specification-based methods
// (lora, bitfit, ln_tuning, ia3) can be folded into the backbone's weights, so the batch runs as a plain forward:
//   lora       W += (alpha / rank) * B A
//   bitfit     b += delta                  (only where the module has a bias)
//   ln_tuning  gain += dgain, bias += dbias
//   ia3        output scaling: W = diag(l) W, b = l * b;  input scaling (feed-forward): W = W diag(l)
// applied in MethodKind order, which is the order the unmerged hooks act in. MergedPack saves every weight it
// touches first and puts the saved copies back when it is restored or destroyed, so the base weights are
// bit-for-bit what they were.
//
// MergedPack mutates the model's weights in place: REQUIRES that no other forward pass (or anything else reading
// the weights) runs on `model` while a MergedPack is alive. Not thread-safe.
#ifndef DELTASERVE_SERVER_DELTA_MERGE_H_
#define DELTASERVE_SERVER_DELTA_MERGE_H_

#include <map>
#include <memory>
#include <string>

#include "ATen/core/Tensor.h"
#include "absl/status/statusor.h"
#include "server/delta/delta_pack.h"
#include "server/model/model.h"

namespace deltaserve {
namespace delta {

// True when every method of `pack` can be folded into `model`'s weights (lora, bitfit on modules with a bias,
// ln_tuning, ia3) and the pack has at least one method. Adapters, prefixes and prompts cannot be merged.
bool IsMergeable(const DeltaPack& pack, const model::Model& model);

class MergedPack {
 public:
  // Folds `pack` into `model`'s weights. FAILED_PRECONDITION when !IsMergeable(pack, model); on any error the
  // weights are left as they were.
  static absl::StatusOr<std::unique_ptr<MergedPack>> Merge(const DeltaPack& pack, const model::Model& model);
  // Restores the saved weights (if not restored yet).
  ~MergedPack();
  MergedPack(const MergedPack&) = delete;
  MergedPack& operator=(const MergedPack&) = delete;

  // Puts the saved weights back, bit for bit. Idempotent.
  absl::Status Restore();
  // Bytes of weights saved (and copied back on restore): the price of merging.
  int64_t saved_bytes() const;

 private:
  MergedPack() = default;
  // parameter name -> (the model's tensor, its saved copy)
  std::map<std::string, std::pair<at::Tensor, at::Tensor>> saved_;
  bool restored_ = false;
};

}  // namespace delta
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_DELTA_MERGE_H_
