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
// MergedPack rewrites the model's weights in place, so it holds model.weights_mutex() exclusively from Merge()
// until Restore() (or its destruction): a thread that reads the weights while a merge may run on another thread
// holds that mutex shared (model.h), and so waits for the restore. The merging thread itself runs its forward
// passes on the merged weights without taking the mutex. A MergedPack is used by the thread that created it:
// not thread-safe.
#ifndef DELTASERVE_SERVER_DELTA_MERGE_H_
#define DELTASERVE_SERVER_DELTA_MERGE_H_

#include <map>
#include <memory>
#include <string>

#include "ATen/core/Tensor.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/delta/delta_pack.h"
#include "server/model/model.h"

namespace deltaserve {
namespace delta {

// True when every method of `pack` can be folded into `model`'s weights (lora, bitfit on modules with a bias,
// ln_tuning, ia3) and the pack has at least one method. Adapters, prefixes and prompts cannot be merged.
bool IsMergeable(const DeltaPack& pack, const model::Model& model);

// Bytes of `model`'s weights that merging `pack` saves and rewrites (each parameter once): what merging costs,
// about four passes over them (save, rewrite, restore). 0 when !IsMergeable(pack, model).
int64_t MergedWeightBytes(const DeltaPack& pack, const model::Model& model);

// The size of a batch, in padded tokens, from which running it merged (merge + plain forward + restore) is faster
// than running `pack`'s hooks, for a batch whose rows all carry `pack`. Merging costs a fixed amount that grows
// with MergedWeightBytes; the hooks cost an amount per token that grows with the pack's own tensors, by a factor
// per method kind (a LoRA byte costs a narrow GEMM's share, an (IA)^3 byte an elementwise pass over an output):
//   break-even = MergedWeightBytes / sum over the pack's methods of (method bytes / kind factor),
// the factors measured by delta_bench (docs/BENCHMARKS.md). INT64_MAX when !IsMergeable(pack, model).
int64_t MergeBreakEvenTokens(const DeltaPack& pack, const model::Model& model);

class MergedPack {
 public:
  // Takes model.weights_mutex() exclusively (waiting for readers to finish) and folds `pack` into `model`'s
  // weights. FAILED_PRECONDITION when !IsMergeable(pack, model); on any error the weights are left bit for bit as
  // they were and the mutex is released.
  // REQUIRES: the calling thread does not hold model.weights_mutex().
  static absl::StatusOr<std::unique_ptr<MergedPack>> Merge(const DeltaPack& pack, const model::Model& model);
  // Restores the saved weights (if not restored yet).
  ~MergedPack();
  MergedPack(const MergedPack&) = delete;
  MergedPack& operator=(const MergedPack&) = delete;

  // Puts the saved weights back, bit for bit, and releases model.weights_mutex(). Idempotent. An error (a copy
  // that failed: never on valid use) leaves the weights in an unknown state.
  absl::Status Restore();
  // Bytes of weights saved (and copied back on restore): the price of merging.
  int64_t saved_bytes() const;

 private:
  explicit MergedPack(absl::Mutex* weights_mutex) : weights_mutex_(weights_mutex) {}
  absl::Mutex* const weights_mutex_;  // held exclusively until restored_
  // parameter name -> (the model's tensor, its saved copy)
  std::map<std::string, std::pair<at::Tensor, at::Tensor>> saved_;
  bool restored_ = false;
};

}  // namespace delta
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_DELTA_MERGE_H_
