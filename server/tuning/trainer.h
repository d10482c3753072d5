// Trainer: runs one fine-tuning job on the served, frozen backbone — tokenizes the examples, trains a
// TrainableDelta (or, for the `full` baseline, a private copy of every weight) with AdamW, a warm-up / decay
// schedule and gradient clipping, evaluates on the validation split after every epoch, keeps the best epoch, and
// returns that epoch's delta pack.
//
// The backbone is shared with serving: every forward / backward holds model.weights_mutex() shared (merge mode
// rewrites the weights under the exclusive lock), and only delta tensors require gradients, so no second copy of
// the weights exists. `full` loads its own copy from TrainerOptions::model_dir.
//
// A run is repeatable: the same job, data and seed give the same pack, and a run resumed from a checkpoint gives
// the pack the uninterrupted run would have (the checkpoint holds the parameters, the optimizer state, the best
// epoch so far and the data order's position).
//
// A Trainer holds no state between runs: Run() may be called from several threads at once (one per job). Each
// Run() trains on a thread of its own (joined before it returns), so that TrainerOptions::threads and ::nice,
// which are per-thread settings, apply to the job and its OpenMP workers and never leak into the caller's
// thread; the callbacks are called from that thread.
#ifndef DELTASERVE_SERVER_TUNING_TRAINER_H_
#define DELTASERVE_SERVER_TUNING_TRAINER_H_

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "ATen/core/Tensor.h"
#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"
#include "server/delta/delta_pack.h"
#include "server/model/model.h"
#include "server/tuning/dataset.h"
#include "server/tuning/trainable_delta.h"

namespace deltaserve {
namespace tuning {

struct HyperParameters {
  double learning_rate = 1e-3;
  // The head's peak learning rate (same warm-up and decay); 0 = learning_rate. A linear probe learns well at
  // rates (1e-2) that would wreck a LoRA or adapter, so the two often want different rates.
  double head_learning_rate = 0;
  // Passes over the training split; max_steps > 0 stops earlier.
  int64_t epochs = 3;
  int64_t max_steps = 0;
  int64_t batch_size = 32;
  // Warm-up steps as a fraction of all steps (warmup_steps > 0 overrides it).
  double warmup_fraction = 0.06;
  int64_t warmup_steps = 0;
  double weight_decay = 0.01;
  // Longest input in tokens (special tokens included); longer examples are truncated. 0 = the model's limit.
  int64_t max_sequence_length = 128;
  double max_grad_norm = 1.0;
  uint64_t seed = 42;
};

// INVALID_ARGUMENT naming the field for absurd values: learning rate not in (0, 1], head learning rate not 0
// (= learning rate) or in (0, 1], epochs not in [1, 1000],
// max_steps < 0 or > 10^7, batch size not in [1, 4096], warm-up fraction not in [0, 1), weight decay not in [0, 1),
// max_sequence_length < 0 or over the model's limit, max_grad_norm < 0, NaN anywhere.
absl::Status ValidateHyperParameters(const HyperParameters& hp, const model::Model& model);

// One job's training problem, fully resolved (labels encoded, split done).
struct TrainingProblem {
  // The pack's name (manifest) and provenance to record (job id, dataset digest, ...).
  std::string name;
  nlohmann::json provenance = nlohmann::json::object();
  // Methods + head. With `full`, methods must be empty: every backbone weight is trained (a private copy).
  TrainableSpec spec;
  bool full = false;
  HyperParameters hp;
  Dataset train, validation;
  LabelSpace labels;
  EncodedLabels train_labels, validation_labels;
};

// The model input for an example: model::EncodeTextPair (Encode(text), then, for pairs, the pair's ids with the
// tokenizer's trailing special tokens (BERT: [CLS] a [SEP] b [SEP]; use-lite: a b), truncated to `max_tokens` by
// trimming the longer text first). The inference engine encodes Classify's / Embed's `text_pairs` with the same
// function, so a task trained on pairs serves with the encoding it was trained on.
absl::StatusOr<std::vector<int64_t>> EncodeExample(const model::Tokenizer& tokenizer, const std::string& text,
                                                   const std::string& text_pair, int64_t max_tokens);

struct EvalMetrics {
  double loss = 0;
  // Classification: accuracy, macro F1 (and for two classes, F1 of the second class and Matthews correlation).
  // Regression: mean squared error, Pearson and Spearman correlation.
  std::map<std::string, double> metrics;
  // The metric that picks the best epoch: "accuracy" (classification) or "pearson" (regression).
  std::string primary;
  double primary_value() const;
};

// What a running job reports (after every step that changed something worth showing, and after each eval).
struct Progress {
  int64_t step = 0;         // optimizer updates done
  int64_t total_steps = 0;
  int64_t epoch = 0;        // 1-based, the epoch under way
  int64_t epochs = 0;
  double loss = 0;          // training loss, smoothed over recent steps
  double learning_rate = 0;
  double examples_per_second = 0;
  double eta_seconds = 0;
  std::optional<EvalMetrics> eval;  // set right after an epoch's evaluation
};

// Everything needed to resume a run: tensors ("param/<name>", "best/<name>", "opt/<state name>") and a small
// JSON state (step, epoch, position in the epoch, best epoch and metric, eval history, smoothed loss, elapsed
// seconds, and the schedule it belongs to). No RNG state: epoch e's data order is a shuffle seeded with seed + e.
struct Checkpoint {
  std::map<std::string, at::Tensor> tensors;  // CPU float32
  nlohmann::json state = nlohmann::json::object();
};

struct TrainCallbacks {
  // Called from the training thread; must be quick.
  std::function<void(const Progress&)> on_progress;
  // Called every TrainerOptions::checkpoint_every_steps steps and at the end of every epoch; the job manager
  // persists it. An error fails the job.
  std::function<absl::Status(const Checkpoint&)> on_checkpoint;
  // Polled between steps; true = stop now (the run returns CANCELLED).
  std::function<bool()> is_cancelled;
};

struct TrainResult {
  // The best epoch's pack (with `full`: none — a full fine-tune changes the backbone and is not servable as a
  // delta; its metrics are the baseline deltas are compared with).
  std::optional<delta::PackContents> pack;
  EvalMetrics best_eval;
  int64_t best_epoch = 0;
  int64_t steps = 0;
  int64_t trainable_parameters = 0;
  int64_t model_parameters = 0;     // the backbone's
  int64_t optimizer_state_bytes = 0;
  double train_seconds = 0;
  std::vector<EvalMetrics> eval_history;  // one per epoch
};

struct TrainerOptions {
  // The backbone's directory; `full` fine-tuning loads its private copy from here (on the served model's device,
  // in float32 whatever the served dtype: AdamW's small updates vanish in bfloat16 weights), and refuses a
  // directory whose weights' fingerprint differs from the served model's. "" = `full` is refused.
  std::string model_dir;
  // Whether `full` fine-tuning is allowed at all (FAILED_PRECONDITION otherwise).
  bool allow_full = false;
  // Checkpoint every this many steps (and at every epoch's end); 0 = at epoch ends only.
  int64_t checkpoint_every_steps = 50;
  // Intra-op threads of the training thread (its OpenMP / BLAS threads); 0 = ATen's process-wide setting.
  int threads = 0;
  // Niceness added to the training thread (and the threads it starts).
  int nice = 10;
  // Before each op, wait (up to 20 ms) while a serving forward pass runs in this process (ServingActivity):
  // serving keeps its latency, jobs train in the gaps. Niceness alone does not achieve that (P8).
  bool yield_to_serving = true;
  // A step's batch runs forward and backward in micro-batches of at most this many padded tokens (at least one
  // row each), accumulating gradients: the same update up to float rounding, and the same bytes run after run (the
  // split depends on the data only). Smaller micro-batches mean shorter ops, so a serving forward waits less for
  // the op in flight when it arrives (P8). 0 = the whole batch at once.
  int64_t micro_batch_tokens = 256;
  // Forward and backward passes run packed (model::ForwardInput::pack_tokens): no compute on padding, which real
  // datasets of short and long texts are mostly made of.
  bool pack_tokens = true;
};

class Trainer {
 public:
  Trainer(const model::Model& model, TrainerOptions options);

  // Runs `problem` to the end, starting from `resume` when given. Errors: INVALID_ARGUMENT (spec or
  // hyper-parameters), FAILED_PRECONDITION (`full` not allowed), CANCELLED (is_cancelled), and for a loss or
  // gradient that is not finite, ABORTED naming the step ("loss became NaN at step 37; lower the learning rate").
  absl::StatusOr<TrainResult> Run(const TrainingProblem& problem, const Checkpoint* resume,
                                  const TrainCallbacks& callbacks) const;

 private:
  const model::Model& model_;
  TrainerOptions options_;
};

}  // namespace tuning
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_TUNING_TRAINER_H_
