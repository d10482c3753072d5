// The per-kind entry points behind CreateMethod / MakeMethodBatch (method.cc dispatches on the kind), and helpers
// the method implementations share. Internal to the delta library.
#ifndef DELTASERVE_SERVER_DELTA_METHODS_INTERNAL_H_
#define DELTASERVE_SERVER_DELTA_METHODS_INTERNAL_H_

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/delta/method.h"

namespace deltaserve {
namespace delta {

#define DS_DECLARE_DELTA_METHOD(Name)                                                                          \
  absl::StatusOr<std::unique_ptr<Method>> Create##Name(MethodSpec spec, const model::Model& model,            \
                                                       const MethodLimits& limits);                             \
  absl::StatusOr<std::unique_ptr<MethodBatch>> Make##Name##Batch(const std::vector<const Method*>& rows,        \
                                                                  const model::Model& model);

DS_DECLARE_DELTA_METHOD(Lora)             // lora.cc
DS_DECLARE_DELTA_METHOD(BitFit)           // bitfit.cc
DS_DECLARE_DELTA_METHOD(LnTuning)         // ln_tuning.cc
DS_DECLARE_DELTA_METHOD(ParallelAdapter)  // adapter.cc
DS_DECLARE_DELTA_METHOD(Ia3)              // ia3.cc
DS_DECLARE_DELTA_METHOD(Prefix)           // prefix.cc
DS_DECLARE_DELTA_METHOD(Prompt)           // prompt.cc
DS_DECLARE_DELTA_METHOD(Adapter)          // adapter.cc

#undef DS_DECLARE_DELTA_METHOD

// Reads spec.tensors[name]: NOT present / not float32 / not contiguous-able / shape != `shape` / NaN or Inf are
// INVALID_ARGUMENT naming the method kind and the tensor. Marks `name` as used in `used`.
absl::StatusOr<at::Tensor> RequireTensor(const MethodSpec& spec, const std::string& name,
                                         const std::vector<int64_t>& shape, std::set<std::string>* used);

// INVALID_ARGUMENT naming the first tensor of `spec` that is not in `used` ("unexpected tensor ...").
absl::Status CheckNoUnexpectedTensors(const MethodSpec& spec, const std::set<std::string>& used);

// The tensor as the model computes with it: on the model's device, in its compute dtype.
absl::StatusOr<at::Tensor> ToModelDevice(const at::Tensor& t, const model::Model& model);

// config["targets"] as a list of strings, or `defaults` when absent. INVALID_ARGUMENT when present but not a
// non-empty list of strings.
absl::StatusOr<std::vector<std::string>> TargetPatterns(const MethodSpec& spec,
                                                        const std::vector<std::string>& defaults);

// config[key] as a positive integer <= max; `fallback` when absent (fallback < 0: required).
absl::StatusOr<int64_t> ConfigPositiveInt(const MethodSpec& spec, const char* key, int64_t max, int64_t fallback);
// config[key] as a finite number; `fallback` when absent.
absl::StatusOr<double> ConfigNumber(const MethodSpec& spec, const char* key, double fallback);
// config[key] as a string; `fallback` when absent.
absl::StatusOr<std::string> ConfigString(const MethodSpec& spec, const char* key, const std::string& fallback);

// INVALID_ARGUMENT when spec.config is neither null (no settings) nor an object, or holds a key not in `known`
// (the message lists the known keys).
absl::Status CheckConfigKeys(const MethodSpec& spec, const std::vector<std::string>& known);

// ResolveTargets with the method's kind in the message, a clearer one when a pattern only names modules of
// another kind (e.g. LoRA on a layer norm), and INVALID_ARGUMENT when the targets match nothing. `what` describes
// `kinds` ("linear modules").
absl::StatusOr<std::vector<const model::ModuleInfo*>> ResolveMethodTargets(
    const MethodSpec& spec, const std::vector<std::string>& patterns, const model::Model& model,
    const std::vector<model::ModuleKind>& kinds, const char* what);

// The sorted, de-duplicated names of `modules` (a canonical spec's "targets").
std::vector<std::string> SortedNames(const std::vector<const model::ModuleInfo*>& modules);

// What ties a method to a model: the weights' fingerprint, the compute dtype and the device. A method works with
// any Model whose key equals the one it was created for (e.g. the same weights loaded twice).
std::string ModelKey(const model::Model& model);

// `v` as a 1-D int64 tensor on `device` (row or entry indices for index_select / index_add / index_copy).
at::Tensor IndexTensor(const std::vector<int64_t>& v, const c10::Device& device);

// Checks that a hook's per-token tensor fits `layout` (B rows padded, N tokens packed; a mismatch is a caller
// bug: it throws, and the model's forward turns the throw into an INTERNAL status). `kind` names the method.
void CheckRows(const at::Tensor& t, const model::TokenLayout& layout, const model::ModuleInfo& module,
               const char* kind);

// True when nothing but `t` can observe its values (tensor and storage referenced once, e.g. a fresh linear
// output) and it is contiguous: then updating it in place equals assigning a new tensor, without allocating one.
// A slice of a fused projection shares its storage, so it is never exclusive (but OnLinear's output may be
// updated in place all the same: model.h).
bool Exclusive(const at::Tensor& t);

// Per-row vectors of one module (BitFit's bias deltas, (IA)^3's scales), to add to or multiply a [B, ..., n]
// tensor with: one [B, n] (or [1, n] when every row has the same) tensor broadcast over the batch, or, when at most
// half the rows carry a vector, segments of consecutive rows with the same one, so that rows without are not
// touched (a pass over the whole output for a few rows would cost more than the few ops).
struct RowVectors {
  struct Segment {
    int64_t first = 0;
    int64_t count = 0;
    at::Tensor vector;  // [n]
  };
  at::Tensor dense;               // [B, n] or [1, n]; undefined when `segments` are used
  std::vector<Segment> segments;  // in row order
};

// The plan for per_row[i]: row i's vector [n], or undefined for rows that keep their values (`identity`: 0 to
// add, 1 to multiply; it fills those rows of a dense plan).
RowVectors PlanRowVectors(const std::vector<at::Tensor>& per_row, double identity);

// *t + plan (multiply = false) or *t * plan (multiply = true), in place when `writable`, else into a new tensor.
// `*t` is a per-token hook tensor in `layout`.
void ApplyRowVectors(const RowVectors& plan, const model::TokenLayout& layout, bool multiply, bool writable,
                     at::Tensor* t);

// Runs fn(piece) for every segment of `segments` on the intra-op threads. A segment is anything with int64_t
// `first` and `count`: consecutive batch rows that carry the same delta at a module. Segments longer than an equal
// share of `num_rows` are cut into pieces (copies with a narrower first / count), so that the threads get similar
// work; BLAS runs single-threaded inside each call. Per-row deltas are narrow GEMMs (a LoRA's r columns, an
// adapter's bottleneck), which scale poorly over BLAS's own threads. Calls on different pieces touch disjoint
// rows. Exceptions reach the caller.
//
// Only float32 CPU tensors (`like`: the hook's activations) run in parallel: their GEMMs go to the BLAS library.
// Other dtypes run the segments one after another on the calling thread, each op using the intra-op threads
// itself: bfloat16 matmuls go to oneDNN, whose kernel generation crashes when kernels are created on several
// threads and its primitive cache evicts (Debian's oneDNN 2.6.3: SIGSEGV in brgemm_kernel_create under
// mixed-delta bfloat16 traffic; docs/MODELS.md), and a GPU gains nothing from CPU threads queueing kernels.
template <typename Segment, typename F>
void ForEachSegmentPiece(const std::vector<Segment>& segments, int64_t num_rows, const at::Tensor& like, F&& fn) {
  if (!like.device().is_cpu() || like.scalar_type() != at::kFloat) {
    for (const Segment& s : segments) fn(s);
    return;
  }
  const int64_t threads = at::get_num_threads();
  const int64_t chunk = std::max<int64_t>(1, (num_rows + threads - 1) / threads);
  std::vector<Segment> pieces;
  pieces.reserve(segments.size() + static_cast<size_t>(threads));
  for (const Segment& s : segments) {
    for (int64_t first = s.first; first < s.first + s.count; first += chunk) {
      Segment piece = s;
      piece.first = first;
      piece.count = std::min(chunk, s.first + s.count - first);
      pieces.push_back(piece);
    }
  }
  const bool inference_mode = c10::InferenceMode::is_enabled();
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t begin, int64_t end) {
    c10::InferenceMode guard(inference_mode);  // thread-local: the pool's threads do not inherit the caller's
    for (int64_t i = begin; i < end; ++i) fn(pieces[i]);
  });
}

}  // namespace delta
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_DELTA_METHODS_INTERNAL_H_
