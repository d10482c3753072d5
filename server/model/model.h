// Model: one frozen pre-trained encoder held in memory, with a batched forward pass and named hook points where the
// delta methods of later issues attach (LoRA, adapters, prefix / prompt tuning, BitFit, LN-tuning, (IA)^3).
//
// A Model owns its weights (on options.device, in options.dtype) and its Tokenizer. Forward() is const and keeps
// no state between calls, so one Model serves any number of threads at once: thread-safe, with one exception:
// merge mode (delta::MergedPack, server/delta/merge.h) rewrites the weights in place for the length of one batch.
// weights_mutex() orders the two: whoever reads the weights (runs Forward(), reads parameters()) while a merge
// may happen on another thread holds it shared; a MergedPack holds it exclusively from its merge until its
// restore. Forward() takes no lock itself, so the merging thread can run forwards on the merged weights.
//
// Module names. Every model exposes a flat list of modules with stable dotted names modelled on Hugging Face's
// BERT (`embeddings.word_embeddings`, `encoder.layer.0.attention.self.query`, `encoder.layer.0.output.dense`, ...);
// delta targets are patterns over these names. Parameters are named `<module>.weight` / `<module>.bias`.
//
// Hook points. Forward() calls `hooks` (when non-null) at fixed points; with hooks == nullptr it runs the plain
// forward and pays nothing for them. Each hook sees the whole batch; a hook that applies per-row deltas knows which
// row carries which delta. Shapes: B rows, T tokens, H hidden, NH heads, DH head dim; in a packed forward
// (ForwardInput::pack_tokens, TokenLayout) the per-token hook tensors are [N, ...] over the N real tokens instead.
#ifndef DELTASERVE_SERVER_MODEL_MODEL_H_
#define DELTASERVE_SERVER_MODEL_MODEL_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "ATen/core/Tensor.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/model/tokenizer.h"

namespace deltaserve {
namespace model {

enum class ModuleKind {
  kEmbedding,   // a lookup table; input ids -> [B,T,H]
  kLinear,      // y = x W^T + b (W is [out, in])
  kLayerNorm,   // y = (x - mean) / sqrt(var + eps) * gain + bias
  kAttention,   // a self-attention block (the key/value hook point of prefix tuning)
  kBlockOutput, // the output of a sub-layer (attention or FFN) before its residual add (sequential adapters)
};

const char* ModuleKindName(ModuleKind kind);

struct ForwardInput;

// Checks the REQUIRES of Model::Forward for a model with ids in [0, vocab_size) and at most max_sequence_length
// tokens: INVALID_ARGUMENT naming what is wrong. Every family calls it first.
absl::Status ValidateForwardInput(const ForwardInput& input, int64_t vocab_size, int64_t max_sequence_length);

struct ModuleInfo {
  std::string name;        // stable dotted name, e.g. "encoder.layer.0.attention.self.query"
  ModuleKind kind = ModuleKind::kLinear;
  int64_t layer = -1;      // transformer layer index, -1 outside the stack
  int64_t in_features = 0;   // kLinear: input width; kLayerNorm / kBlockOutput / kEmbedding: hidden width
  int64_t out_features = 0;  // kLinear: output width; kEmbedding: its width (= in_features); kAttention: NH * DH
  bool has_bias = false;     // kLinear / kLayerNorm: whether the base module has a bias
  int64_t num_heads = 0;     // kAttention only
  int64_t head_dim = 0;      // kAttention only
  double eps = 0;            // kLayerNorm only: the epsilon of its variance
  // kBlockOutput only: the linear module whose input is this sub-layer's input (e.g. the FFN block
  // "encoder.layer.N.output" reads the input of "encoder.layer.N.intermediate.dense"). Parallel adapters take
  // their input there.
  std::string sublayer_input;
};

// Where a batch's rows sit in the per-token tensors that the OnLinearInput, OnLinear, OnLayerNorm and
// OnBlockOutput hooks see. Padded (what hooks see unless told otherwise): [B, T, ...], row r is t[r], its padding
// included. Packed: [N, ...], the real tokens of every row back to back and no padding, row r's at
// [offset(r), offset(r + 1)). A model that packs announces the layout through ForwardHooks::OnTokenLayout; tensors
// with one value per row (a pooler's [B, D] input and output) are padded with T = 1.
//
// A value type, cheap to copy (its index tensors are shared); immutable, so thread-safe.
class TokenLayout {
 public:
  // The padded layout of a batch of `rows` rows.
  static TokenLayout Padded(int64_t rows);
  // The packed layout of the real tokens of `mask` ([B,T] bool, any device; true = real token, holes allowed).
  static TokenLayout Packed(const at::Tensor& mask);

  bool packed() const { return packed_; }
  int64_t rows() const { return rows_; }
  // Packed: N, the real tokens of all rows.
  int64_t tokens() const { return packed_ ? offsets_.back() : 0; }
  // Packed: where row `row`'s tokens start (row == rows(): N).
  int64_t offset(int64_t row) const { return offsets_[row]; }
  // The size of a hook tensor's first dimension in this layout: B (padded) or N (packed).
  int64_t leading() const { return packed_ ? tokens() : rows_; }

  // Rows [first, first + count) of hook tensor `t` as a 2-D [tokens, t.size(-1)] view (padded: with their
  // padding). Writes through the view reach `t`.
  at::Tensor Rows(const at::Tensor& t, int64_t first, int64_t count) const;
  // `v` ([B, n]: one vector per row, or [1, n]: one for all) arranged to broadcast against hook tensor `t`
  // ([B, ..., n] padded, [N, n] packed).
  at::Tensor PerRow(const at::Tensor& v, const at::Tensor& t) const;

  // For models. REQUIRES: packed(); `padded` is [B, T, ...] with the mask's B and T, `packed` [N, ...].
  at::Tensor Pack(const at::Tensor& padded) const;     // -> [N, ...]
  at::Tensor Unpack(const at::Tensor& packed) const;   // -> [B, T, ...], zeros at padding
  // Unpack() of each of `slices`, the equal-width slices of a fused projection's packed output `fused` ([N, k x w],
  // e.g. query / key / value): one copy of `fused` when every slice is still the view of its place in it, else
  // one per slice (a hook replaced it).
  void UnpackSlices(const at::Tensor& fused, const std::vector<at::Tensor*>& slices) const;

 private:
  bool packed_ = false;
  int64_t rows_ = 0;
  int64_t length_ = 0;            // packed: T of the mask
  std::vector<int64_t> offsets_;  // packed: B + 1 token offsets
  at::Tensor token_index_;        // packed: [N] int64, b * T + t of each real token, in row order
  at::Tensor row_of_token_;       // packed: [N] int64, the row of each real token
};

// The forward-pass hook points. Every method has a no-op default; implementations override what they need.
// All tensors are on the model's device in its compute dtype, except masks (bool).
class ForwardHooks {
 public:
  virtual ~ForwardHooks() = default;

  // Whether these hooks handle packed per-token tensors (TokenLayout). A model packs a batch only for hooks that
  // do (and for no hooks at all); others always see the padded layout.
  virtual bool SupportsPackedTokens() const { return false; }

  // The layout of the per-token tensors passed to every later hook call (until the next OnTokenLayout). Called
  // only for hooks that support packed tokens: after OnTokenEmbeddings with the pass's layout (packed or
  // padded), and with the padded layout again before per-row modules (a pooler) of a packed pass.
  virtual void OnTokenLayout(const TokenLayout& layout) {}

  // After the token embedding lookup, before positions (and anything else) are added. `hidden` is [B,T,H],
  // `mask` [B,T] (true = real token). Prompt tuning splices soft tokens here and may change T and the mask; the
  // model derives position ids from the mask (cumsum over real tokens), so a row keeps the positions it would have
  // alone wherever padding sits.
  virtual void OnTokenEmbeddings(at::Tensor* hidden, at::Tensor* mask) {}

  // Before a linear layer reads `*input` ([..., in]); (IA)^3 scales the input of feed-forward down-projections
  // here. Not called for the fused q/k/v projections, whose shared input belongs to the layer norm (or block)
  // before them: change it through OnLayerNorm.
  virtual void OnLinearInput(const ModuleInfo& module, at::Tensor* input) {}

  // After a linear layer computed `*output` from `input`. LoRA, BitFit (bias deltas), (IA)^3 and parallel
  // adapters add to or scale `*output` here. For fused projections (use-lite's and BERT's qkv) the model calls
  // this once per logical module with the same input and that module's slice of the output (a view: not
  // contiguous). The hook may replace `*output` or update it in place: nothing but the module's own consumers
  // reads it (for a fused projection, nothing reads the fused result except through the three slices).
  virtual void OnLinear(const ModuleInfo& module, const at::Tensor& input, at::Tensor* output) {}

  // After a layer norm computed `*output` from `input` (LN-tuning).
  virtual void OnLayerNorm(const ModuleInfo& module, const at::Tensor& input, at::Tensor* output) {}

  // Inside self-attention, after keys and values are computed and split into heads ([B,NH,T,DH]) and before the
  // scores. `key_mask` is [B,Tk] (true = attend). Prefix tuning prepends per-row key/value prefixes and extends
  // the mask; queries are not changed, so the output keeps T rows.
  virtual void OnAttentionKeyValue(const ModuleInfo& attention, at::Tensor* keys, at::Tensor* values,
                                   at::Tensor* key_mask) {}

  // The output of a sub-layer (kBlockOutput modules: "encoder.layer.N.attention.output" and
  // "encoder.layer.N.output") before its residual add; [B,T,H]. Sequential adapters transform it here.
  virtual void OnBlockOutput(const ModuleInfo& block, at::Tensor* hidden) {}
};

// A batch of token ids, left-aligned and padded on the right.
struct ForwardInput {
  at::Tensor input_ids;       // [B,T] int64; padding positions hold any valid id
  at::Tensor attention_mask;  // [B,T] bool; true = real token. Every row has at least one real token.
  // Run the per-token layers on the real tokens only (TokenLayout::Packed: no compute spent on padding;
  // attention still sees [B,T]), when the hooks support it and the batch has padding. Outputs (and, from
  // ForwardTrainable, gradients) are the same either way within float rounding.
  bool pack_tokens = false;
};

// The layout a model runs a forward pass in: packed when input.pack_tokens is set, `hooks` (null: none) support
// packed tokens, and `mask` (the [B,T] mask after the token-embedding hook) has more than one row and some
// padding; else padded.
TokenLayout PlanTokenLayout(const ForwardInput& input, const at::Tensor& mask, const ForwardHooks* hooks);

struct ForwardOutput {
  at::Tensor hidden_states;   // [B,T',H'] float32, last layer's per-token states (T' may differ from T if a hook
                              // spliced tokens; rows are aligned with `attention_mask`)
  at::Tensor attention_mask;  // [B,T'] bool, the mask that goes with hidden_states
  at::Tensor pooled;          // [B,D] float32, the sentence embedding
};

struct ModelInfo {
  std::string family;            // "use-lite", "bert"
  std::string name;              // a human name from the model directory (e.g. "use-lite-energetic-0.2.0")
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;       // width of hidden_states
  int64_t embedding_dim = 0;     // width of pooled
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t max_sequence_length = 0;  // longest input (in tokens, specials included) the model accepts
  int64_t num_parameters = 0;
  std::string pooling;           // how `pooled` is made, e.g. "mean+tanh+l2" or "cls"
  std::string dtype;             // compute dtype: "float32" or "bfloat16"
  std::string device;            // e.g. "cpu", "cuda:0"
  // "sha256:<hex>" of the weights file (model.safetensors), computed once at load. Delta packs record the
  // fingerprint of the backbone they were trained on and are refused on any other.
  std::string fingerprint;
};

struct ModelOptions {
  // Where the weights live and the forward runs: "cpu", "cuda", "cuda:N".
  std::string device = "cpu";
  // Compute dtype: "float32" (exact) or "bfloat16" (oneDNN on CPUs with AVX512-BF16 / AMX; outputs stay float32).
  std::string dtype = "float32";
};

class Model {
 public:
  virtual ~Model() = default;

  virtual const ModelInfo& info() const = 0;
  virtual const Tokenizer& tokenizer() const = 0;
  // Every module in forward order.
  virtual const std::vector<ModuleInfo>& modules() const = 0;
  // Every parameter by dotted name ("<module>.weight", "<module>.bias"), on the model's device. Frozen.
  virtual const std::map<std::string, at::Tensor>& parameters() const = 0;

  // The batched forward pass under inference mode.
  // REQUIRES: input.input_ids is [B,T] int64 with ids in [0, vocab_size), 1 <= T <= max_sequence_length,
  //           input.attention_mask is [B,T] bool with a true first column. Violations are INVALID_ARGUMENT.
  // Each row's result equals that row run alone: `pooled` within 1e-5 in float32; `hidden_states` within 1e-5
  // relative to their magnitude (use-lite's states reach ~30 without a final norm, so padding-dependent rounding
  // moves them by up to ~1e-4 absolute).
  virtual absl::StatusOr<ForwardOutput> Forward(const ForwardInput& input, ForwardHooks* hooks) const = 0;

  // The same forward pass (same REQUIRES, same outputs as Forward() within float rounding) recorded by autograd
  // for training: it runs outside inference mode with grad mode on, and uses no in-place ops on tensors autograd
  // may need, so gradients flow into whatever tensors `hooks` add (delta parameters) and into the weights whose
  // requires_grad a caller set (full fine-tuning of a private copy: parameters() are ordinary leaf tensors, views
  // included). The backbone's weights do not require grad otherwise. Slower than Forward(): serving never calls it.
  virtual absl::StatusOr<ForwardOutput> ForwardTrainable(const ForwardInput& input, ForwardHooks* hooks) const = 0;

  // Orders readers of the weights against merge mode, which rewrites them (see the top of this file): hold it
  // shared (absl::ReaderMutexLock) around Forward() and reads of parameters() where a merge may run on another
  // thread. delta::MergedPack holds it exclusively while the weights are merged.
  absl::Mutex& weights_mutex() const { return weights_mutex_; }

 private:
  mutable absl::Mutex weights_mutex_;
};

}  // namespace model
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_MODEL_MODEL_H_
