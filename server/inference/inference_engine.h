// InferenceEngine: turns embed requests into batched forward passes of the one served Model.
//
// For each request it validates and tokenizes the inputs (on the caller's thread, so tokenization runs in
// parallel across RPCs), applies the truncation policy, queues the rows on the Batcher, and returns one result
// per input. It owns the Batcher; it shares the Model (which outlives nothing: the engine keeps it alive).
// Thread-safe: Embed() may be called from any number of threads.
//
// Errors (all with a message a user can act on): INVALID_ARGUMENT for empty input, too many inputs, an over-long
// text or id list (unless truncating), invalid UTF-8, an out-of-range token id, texts and ids mixed, text_pairs
// not one per text (or given with token ids);
// NOT_FOUND / FAILED_PRECONDITION for a task reference the DeltaResolver cannot serve (or any task reference when
// the engine has no resolver); FAILED_PRECONDITION for Classify on a pack without a head; the Batcher's
// RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED / CANCELLED / UNAVAILABLE.
//
// A request that names a task runs every one of its rows with that task's pack; rows of different tasks (and of
// the base model) share forward passes: each row carries its pack (a shared_ptr that pins it until the row is
// done) and the batch runner applies all of them in one pass (delta::DeltaBatch).
#ifndef DELTASERVE_SERVER_INFERENCE_INFERENCE_ENGINE_H_
#define DELTASERVE_SERVER_INFERENCE_INFERENCE_ENGINE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/batching/batcher.h"
#include "server/inference/delta_resolver.h"
#include "server/model/model.h"

namespace deltaserve {
namespace inference {

enum class Truncation { kDefault, kTruncate, kError };

// The delta pack that served a request.
struct DeltaInfo {
  std::string digest;
  std::string name;
  std::vector<std::string> methods;
};

struct EmbedRequest {
  std::string tenant;
  TaskSelector task;
  std::vector<std::string> texts;               // either texts ...
  std::vector<std::vector<int64_t>> token_ids;  // ... or full model inputs, not both
  // Optional second text of each input (pair tasks): empty, or one per text ("" = no pair for that input).
  // A pair row's input is model::EncodeTextPair(text, pair), the rule fine-tuning jobs train with.
  std::vector<std::string> text_pairs;
  bool return_token_embeddings = false;
  bool return_token_ids = false;
  Truncation truncation = Truncation::kDefault;
  // Scheduling priority of the request's rows (batching::Batcher: high first within the tenant; low fills spare
  // room only).
  batching::Priority priority = batching::Priority::kNormal;
};

struct EmbedResult {
  std::vector<float> embedding;
  std::vector<float> token_embeddings;  // num_tokens x hidden_size, when asked for
  std::vector<int64_t> token_ids;       // when asked for
  int64_t num_tokens = 0;
  bool truncated = false;
};

struct EmbedResponse {
  std::vector<EmbedResult> results;
  int64_t embedding_dim = 0;
  int64_t hidden_size = 0;
  int64_t total_tokens = 0;
  std::optional<DeltaInfo> delta;  // set when a task's pack ran
};

struct ClassifyRequest {
  std::string tenant;
  TaskSelector task;  // required
  std::vector<std::string> texts;
  std::vector<std::vector<int64_t>> token_ids;
  std::vector<std::string> text_pairs;  // as in EmbedRequest
  Truncation truncation = Truncation::kDefault;
  int top_k = 0;  // 0 = all labels
  batching::Priority priority = batching::Priority::kNormal;  // as in EmbedRequest
};

struct LabelScore {
  std::string label;
  float score = 0;  // softmax probability
  float logit = 0;
};

struct ClassifyResult {
  std::vector<LabelScore> labels;  // classification heads, best first
  float value = 0;                 // regression heads
  int64_t num_tokens = 0;
  bool truncated = false;
};

struct ClassifyResponse {
  std::vector<ClassifyResult> results;
  bool regression = false;
  DeltaInfo delta;
  int64_t total_tokens = 0;
};

// How a call ends early: its deadline, and a callback that says whether the client went away.
struct CallContext {
  absl::Time deadline = absl::InfiniteFuture();
  std::function<bool()> is_cancelled;
};

class InferenceEngine {
 public:
  struct Options {
    // Most inputs (texts or id lists) in one request.
    int max_inputs_per_request = 256;
    // Longest text accepted, in bytes (checked before tokenizing).
    int64_t max_text_bytes = 1 << 20;
    // Longest model input in tokens; 0 = the model's own maximum. Never above the model's maximum.
    int64_t max_sequence_length = 0;
    // What Truncation::kDefault means: true = cut over-long inputs, false = INVALID_ARGUMENT.
    bool truncate_by_default = true;
    // Packed batches (model::ForwardInput::pack_tokens): the per-token layers (every linear, layer norm and
    // their deltas: nearly all the FLOPs) run on the real tokens only, so rows of different lengths, and rows
    // whose packs add soft tokens (prompt tuning), share one forward pass at little cost; only attention still
    // spans the longest row. false: every pass is padded to its longest row.
    bool pack_tokens = true;
    // Unpacked (pack_tokens false): a batch whose padded tokens exceed this multiple of its real tokens runs as
    // length-sorted sub-batches (fewer wasted FLOPs on padding, a few more forward calls), and rows whose packs
    // add soft tokens run apart from rows without; 0 = always one forward per batch.
    double max_padding_ratio = 1.5;
    // Packed: the same split, for batches whose padding would make attention dear (rows x longest row above
    // this multiple of the real tokens); 0 = always one forward per batch.
    double packed_max_padding_ratio = 4.0;
    // Merge mode (delta::MergedPack): a forward pass whose rows all carry the same pack, made only of methods that
    // fold into the weights (lora, bitfit, ln_tuning, ia3), runs as merge -> plain forward -> restore when its
    // tokens (the real ones packed, rows x longest row unpacked: what the hooks run on) reach
    // merge_break_even x delta::MergeBreakEvenTokens(pack): the size
    // from which merging's fixed cost (about four passes over the weights it rewrites) is below the hooks' cost
    // per token, estimated from the pack's and the weights' sizes (from ~20 tokens for BitFit alone to ~2,300 for
    // LoRA on every linear of BERT-base; docs/BENCHMARKS.md). 0 or negative: never merge.
    double merge_break_even = 1.0;
    // The dynamic batcher.
    batching::Batcher::Options batching;
  };

  // REQUIRES: model is non-null; observer and resolver (either may be null: no metrics, no deltas) outlive the
  // engine, and the resolver's packs were loaded for `model`.
  static absl::StatusOr<std::unique_ptr<InferenceEngine>> Create(std::shared_ptr<const model::Model> model,
                                                                 const Options& options,
                                                                 batching::BatcherObserver* observer,
                                                                 const DeltaResolver* resolver = nullptr);
  ~InferenceEngine();

  absl::StatusOr<EmbedResponse> Embed(const EmbedRequest& request, const CallContext& call);
  absl::StatusOr<ClassifyResponse> Classify(const ClassifyRequest& request, const CallContext& call);

  // Stops taking requests and finishes the queued ones (part of a graceful shutdown).
  void Stop();

  const model::Model& model() const { return *model_; }
  const Options& options() const { return options_; }
  // The effective maximum sequence length.
  int64_t max_sequence_length() const { return max_sequence_length_; }
  // Forward passes run in merge mode so far.
  int64_t merged_forwards() const { return merged_forwards_.load(std::memory_order_relaxed); }

 private:
  InferenceEngine(std::shared_ptr<const model::Model> model, const Options& options,
                  batching::BatcherObserver* observer, const DeltaResolver* resolver);

  // Validated, tokenized and truncated rows of one request, all carrying `pack` (may be null).
  struct PreparedRows {
    std::vector<batching::RowInput> rows;
    std::vector<bool> truncated;
    std::vector<int64_t> lengths;
  };
  absl::StatusOr<PreparedRows> PrepareRows(const std::vector<std::string>& texts,
                                           const std::vector<std::vector<int64_t>>& token_ids,
                                           const std::vector<std::string>& text_pairs, Truncation truncation) const;
  absl::StatusOr<std::shared_ptr<const delta::DeltaPack>> ResolveTask(const std::string& tenant,
                                                                      const TaskSelector& task) const;
  // Runs a batch from the batcher, split by length when padding would waste too much.
  absl::Status RunBatch(absl::Span<const batching::BatchRow> rows);
  // One forward pass over `rows`.
  absl::Status RunForward(absl::Span<const batching::BatchRow> rows);
  // The pack to run a pass computing `tokens` tokens in merge mode with: packs[i] (row i's pack) when every row
  // carries that same mergeable pack and the pass is large enough (Options::merge_break_even); else nullptr.
  const delta::DeltaPack* MergeCandidate(const std::vector<const delta::DeltaPack*>& packs, int64_t tokens) const;
  // Merge `pack` into the weights, a plain forward of `input`, restore. An error merging leaves the weights as
  // they were and fails the pass.
  absl::StatusOr<model::ForwardOutput> RunMerged(const delta::DeltaPack& pack, const model::ForwardInput& input);

  const std::shared_ptr<const model::Model> model_;
  const Options options_;
  const DeltaResolver* const resolver_;
  const int64_t max_sequence_length_;
  std::unique_ptr<batching::Batcher> batcher_;
  std::atomic<int64_t> merged_forwards_{0};
};

}  // namespace inference
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_INFERENCE_INFERENCE_ENGINE_H_
