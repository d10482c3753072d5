#include "server/tuning/trainer.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <omp.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <numeric>
#include <optional>
#include <random>
#include <thread>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "server/common/logging.h"
#include "server/common/serving_activity.h"
#include "server/common/status_macros.h"
#include "server/common/torch_status.h"
#include "server/model/model_loader.h"
#include "server/model/tokenizer.h"
#include "server/tuning/optimizer.h"

namespace deltaserve {
namespace tuning {
namespace {

constexpr const char* kCheckpointFormat = "deltaserve-trainer-checkpoint-1";
constexpr const char* kParamPrefix = "param/";
constexpr const char* kBestPrefix = "best/";
constexpr const char* kOptPrefix = "opt/";
// Full fine-tuning: the private copy's weights, named "backbone/<parameter>" among the trainable tensors.
constexpr const char* kBackbonePrefix = "backbone/";
// Weight of the previous value in the smoothed training loss.
constexpr double kLossSmoothing = 0.9;

bool StartsWith(const std::string& s, const std::string& prefix) { return s.compare(0, prefix.size(), prefix) == 0; }

// ---------------------------------------------------------------------------------------------------------------
// Metrics.

// Average ranks (1-based; ties share the mean of their ranks), as Spearman's correlation needs.
std::vector<double> Ranks(const std::vector<double>& v) {
  std::vector<size_t> order(v.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return v[a] < v[b]; });
  std::vector<double> ranks(v.size());
  size_t i = 0;
  while (i < order.size()) {
    size_t j = i;
    while (j + 1 < order.size() && v[order[j + 1]] == v[order[i]]) ++j;
    const double rank = (static_cast<double>(i) + static_cast<double>(j)) / 2.0 + 1.0;
    for (size_t k = i; k <= j; ++k) ranks[order[k]] = rank;
    i = j + 1;
  }
  return ranks;
}

// Pearson's correlation; 0 when either side is constant (undefined).
double Pearson(const std::vector<double>& a, const std::vector<double>& b) {
  const size_t n = a.size();
  if (n < 2) return 0;
  double ma = 0, mb = 0;
  for (size_t i = 0; i < n; ++i) {
    ma += a[i];
    mb += b[i];
  }
  ma /= static_cast<double>(n);
  mb /= static_cast<double>(n);
  double cov = 0, va = 0, vb = 0;
  for (size_t i = 0; i < n; ++i) {
    cov += (a[i] - ma) * (b[i] - mb);
    va += (a[i] - ma) * (a[i] - ma);
    vb += (b[i] - mb) * (b[i] - mb);
  }
  if (va <= 0 || vb <= 0) return 0;
  const double r = cov / std::sqrt(va * vb);
  return std::isfinite(r) ? std::max(-1.0, std::min(1.0, r)) : 0;
}

EvalMetrics ClassificationMetrics(const std::vector<int64_t>& truth, const std::vector<int64_t>& predicted,
                                  int64_t num_classes, double loss) {
  EvalMetrics m;
  m.loss = loss;
  m.primary = "accuracy";
  const size_t n = truth.size();
  std::vector<int64_t> tp(num_classes, 0), fp(num_classes, 0), fn(num_classes, 0);
  std::vector<bool> seen(num_classes, false);
  int64_t correct = 0;
  for (size_t i = 0; i < n; ++i) {
    seen[truth[i]] = true;
    seen[predicted[i]] = true;
    if (truth[i] == predicted[i]) {
      ++correct;
      ++tp[truth[i]];
    } else {
      ++fp[predicted[i]];
      ++fn[truth[i]];
    }
  }
  auto f1 = [&](int64_t c) {
    const double denom = 2.0 * tp[c] + fp[c] + fn[c];
    return denom > 0 ? 2.0 * tp[c] / denom : 0.0;
  };
  m.metrics["accuracy"] = n > 0 ? static_cast<double>(correct) / static_cast<double>(n) : 0;
  // Macro F1 over the classes that occur in the truth or the predictions (scikit-learn's default).
  double sum = 0;
  int64_t classes = 0;
  for (int64_t c = 0; c < num_classes; ++c) {
    if (!seen[c]) continue;
    sum += f1(c);
    ++classes;
  }
  m.metrics["macro_f1"] = classes > 0 ? sum / static_cast<double>(classes) : 0;
  if (num_classes == 2) {
    m.metrics["f1"] = f1(1);
    const double t_p = static_cast<double>(tp[1]), t_n = static_cast<double>(tp[0]);
    const double f_p = static_cast<double>(fp[1]), f_n = static_cast<double>(fn[1]);
    const double denom = std::sqrt((t_p + f_p) * (t_p + f_n) * (t_n + f_p) * (t_n + f_n));
    m.metrics["mcc"] = denom > 0 ? (t_p * t_n - f_p * f_n) / denom : 0;
  }
  return m;
}

EvalMetrics RegressionMetrics(const std::vector<double>& truth, const std::vector<double>& predicted) {
  EvalMetrics m;
  m.primary = "pearson";
  double se = 0;
  for (size_t i = 0; i < truth.size(); ++i) se += (predicted[i] - truth[i]) * (predicted[i] - truth[i]);
  const double mse = truth.empty() ? 0 : se / static_cast<double>(truth.size());
  m.loss = mse;
  m.metrics["mse"] = mse;
  m.metrics["pearson"] = Pearson(truth, predicted);
  m.metrics["spearman"] = Pearson(Ranks(truth), Ranks(predicted));
  return m;
}

// JSON for doubles that may not be finite (JSON has no NaN): null stands for NaN.
nlohmann::json Number(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); }
double NumberOf(const nlohmann::json& j) {
  return j.is_number() ? j.get<double>() : std::numeric_limits<double>::quiet_NaN();
}

nlohmann::json MetricsJson(const EvalMetrics& m) {
  nlohmann::json metrics = nlohmann::json::object();
  for (const auto& [k, v] : m.metrics) metrics[k] = Number(v);
  return metrics;
}

nlohmann::json EvalJson(const EvalMetrics& m) {
  return nlohmann::json{{"loss", Number(m.loss)}, {"metrics", MetricsJson(m)}, {"primary", m.primary}};
}

absl::StatusOr<EvalMetrics> EvalFromJson(const nlohmann::json& j) {
  if (!j.is_object() || !j.contains("metrics") || !j["metrics"].is_object() || !j.contains("primary") ||
      !j["primary"].is_string()) {
    return absl::InvalidArgumentError(absl::StrCat("checkpoint: malformed eval entry ", j.dump()));
  }
  EvalMetrics m;
  m.loss = NumberOf(j.value("loss", nlohmann::json(nullptr)));
  m.primary = j["primary"].get<std::string>();
  for (auto it = j["metrics"].begin(); it != j["metrics"].end(); ++it) m.metrics[it.key()] = NumberOf(it.value());
  return m;
}

nlohmann::json HyperParametersJson(const HyperParameters& hp) {
  return nlohmann::json{{"learning_rate", hp.learning_rate},
                        {"head_learning_rate", hp.head_learning_rate > 0 ? hp.head_learning_rate : hp.learning_rate},
                        {"epochs", hp.epochs},
                        {"max_steps", hp.max_steps},
                        {"batch_size", hp.batch_size},
                        {"warmup_fraction", hp.warmup_fraction},
                        {"warmup_steps", hp.warmup_steps},
                        {"weight_decay", hp.weight_decay},
                        {"max_sequence_length", hp.max_sequence_length},
                        {"max_grad_norm", hp.max_grad_norm},
                        {"seed", hp.seed}};
}

// ---------------------------------------------------------------------------------------------------------------
// The training thread's settings.

pid_t ThreadId() { return static_cast<pid_t>(::syscall(SYS_gettid)); }

// The training thread's op hook: before each op it waits while a serving forward pass is in flight, at most
// kMaxYieldPerOp per op so that a saturated server slows a job down but never starves it. Thread-local: serving
// threads run no callback. (P8 in docs/BENCHMARKS.md: niceness alone does not keep serving's latency.)
constexpr absl::Duration kMaxYieldPerOp = absl::Milliseconds(20);

std::unique_ptr<at::ObserverContext> YieldToServing(const at::RecordFunction&) {
  ServingActivity::WaitUntilIdle(kMaxYieldPerOp);
  return nullptr;
}

// Applies TrainerOptions::threads and ::nice to the calling thread (a thread Run() starts for the job, so nothing
// has to be restored: the settings end with it, and the OpenMP workers it starts inherit its niceness).
void ConfigureTrainingThread(int threads, int nice) {
  at::internal::lazy_init_num_threads();  // ATen's own per-thread set-up first, so it does not override ours
  if (threads > 0) omp_set_num_threads(threads);
  if (nice > 0) {
    errno = 0;
    const pid_t tid = ThreadId();
    const int current = ::getpriority(PRIO_PROCESS, static_cast<id_t>(tid));
    if (errno == 0) {
      const int target = std::min(19, current + nice);
      if (::setpriority(PRIO_PROCESS, static_cast<id_t>(tid), target) != 0) {
        DS_LOG(WARNING) << "trainer: could not renice the training thread to " << target << " (errno " << errno
                        << ")";
      }
    }
  }
}

// Holds a mutex shared, or nothing (the private copy of `full` needs no lock).
class MaybeReaderLock {
 public:
  explicit MaybeReaderLock(absl::Mutex* mu) ABSL_NO_THREAD_SAFETY_ANALYSIS : mu_(mu) {
    if (mu_ != nullptr) mu_->ReaderLock();
  }
  ~MaybeReaderLock() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    if (mu_ != nullptr) mu_->ReaderUnlock();
  }
  MaybeReaderLock(const MaybeReaderLock&) = delete;
  MaybeReaderLock& operator=(const MaybeReaderLock&) = delete;

 private:
  absl::Mutex* mu_;
};

// ---------------------------------------------------------------------------------------------------------------
// The run.

struct EncodedExample {
  std::vector<int64_t> ids;
  int64_t label = 0;   // classification
  float value = 0;     // regression
};

// The mutable state of a run: what a checkpoint holds.
struct RunState {
  int64_t step = 0;        // optimizer updates done
  int64_t epoch = 0;       // 0-based epoch under way (= epochs completed)
  int64_t position = 0;    // steps done within `epoch`
  int64_t best_epoch = 0;  // 1-based; 0 = none yet
  double best_metric = -std::numeric_limits<double>::infinity();
  std::vector<EvalMetrics> eval_history;
  double smoothed_loss = 0;
  bool has_smoothed_loss = false;
  double elapsed_seconds = 0;  // before this Run() call
  std::map<std::string, at::Tensor> best;  // best epoch's values, on the device
};

class Run {
 public:
  Run(const model::Model& served, const TrainerOptions& options, const TrainingProblem& problem,
      const TrainCallbacks& callbacks)
      : served_(served), options_(options), problem_(problem), hp_(problem.hp), callbacks_(callbacks) {}

  absl::StatusOr<TrainResult> Go(const Checkpoint* resume);

 private:
  absl::Status Validate();
  absl::Status Encode();
  absl::Status Restore(const Checkpoint& checkpoint);
  absl::StatusOr<double> TrainStep(const std::vector<int64_t>& rows, double lr);
  // Forward and backward of one micro-batch (train_ indices), its loss scaled to a share of a step of
  // `total_rows` rows; gradients add up in the parameters' .grad. Returns that loss share.
  absl::StatusOr<double> AccumulateGradients(const std::vector<int64_t>& rows, double total_rows);
  absl::StatusOr<EvalMetrics> Evaluate();
  absl::Status SaveCheckpoint();
  absl::StatusOr<model::ForwardInput> MakeInput(const std::vector<const EncodedExample*>& rows) const;
  // A head alone (no method, not `full`) sees a backbone that never changes: the sentence embeddings of every
  // example are computed once, and training and evaluation run the head on them (a linear probe costs one
  // forward per example, not one per epoch). Fills train_pooled_ / validation_pooled_.
  absl::Status EmbedOnce();
  // The sentence embeddings of `rows` from the frozen backbone, batched, outside autograd.
  absl::StatusOr<at::Tensor> Embed(const std::vector<EncodedExample>& rows);
  std::map<std::string, at::Tensor> Snapshot() const;
  absl::Status LoadInto(const std::map<std::string, at::Tensor>& values);
  bool Cancelled() const { return callbacks_.is_cancelled && callbacks_.is_cancelled(); }
  double RunSeconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }
  void ReportProgress(const std::optional<EvalMetrics>& eval);

  const model::Model& served_;
  const TrainerOptions& options_;
  const TrainingProblem& problem_;
  const HyperParameters& hp_;
  const TrainCallbacks& callbacks_;

  TrainableSpec spec_;                     // problem.spec with the head's labels filled in
  std::unique_ptr<model::Model> private_;  // `full`: the private copy
  const model::Model* model_ = nullptr;    // what is trained on: &served_ or private_
  absl::Mutex* lock_ = nullptr;            // served_.weights_mutex(), or null for the private copy
  std::unique_ptr<TrainableDelta> delta_;
  std::vector<std::pair<std::string, at::Tensor>> params_;  // every trainable tensor (delta, + backbone)
  std::unique_ptr<AdamW> optimizer_;
  std::vector<EncodedExample> train_, validation_;
  bool head_only_ = false;
  at::Tensor train_pooled_, validation_pooled_;  // head_only_: [N, D] embeddings, in example order
  bool classification_ = true;
  int64_t num_classes_ = 0;
  int64_t steps_per_epoch_ = 0, total_steps_ = 0, warmup_steps_ = 0, epochs_to_run_ = 0;
  RunState state_;
  std::chrono::steady_clock::time_point start_;
  int64_t steps_this_run_ = 0, examples_this_run_ = 0;
  double last_lr_ = 0;
};

absl::Status Run::Validate() {
  DS_RETURN_IF_ERROR(ValidateHyperParameters(hp_, served_));
  if (problem_.train.examples.empty()) return absl::InvalidArgumentError("the training split is empty");
  if (problem_.validation.examples.empty()) return absl::InvalidArgumentError("the validation split is empty");
  classification_ = problem_.labels.type == TaskType::kClassification;
  spec_ = problem_.spec;
  HeadConfig& head = spec_.head;
  if (head.type != TaskTypeName(problem_.labels.type)) {
    return absl::InvalidArgumentError(absl::StrCat("the head's type \"", head.type, "\" does not match the task type \"",
                                                   TaskTypeName(problem_.labels.type), "\""));
  }
  if (classification_) {
    if (problem_.labels.labels.size() < 2) {
      return absl::InvalidArgumentError(
          absl::StrCat("classification needs at least 2 labels, got ", problem_.labels.labels.size()));
    }
    if (head.labels.empty()) {
      head.labels = problem_.labels.labels;
    } else if (head.labels != problem_.labels.labels) {
      return absl::InvalidArgumentError(absl::StrCat("the head's labels [", absl::StrJoin(head.labels, ", "),
                                                     "] differ from the dataset's label space [",
                                                     absl::StrJoin(problem_.labels.labels, ", "), "]"));
    }
    num_classes_ = static_cast<int64_t>(problem_.labels.labels.size());
  } else if (!head.labels.empty()) {
    return absl::InvalidArgumentError("a regression head has no labels");
  }
  auto check_labels = [&](const Dataset& data, const EncodedLabels& labels, const char* split) -> absl::Status {
    const size_t n = data.examples.size();
    if (classification_) {
      if (labels.classes.size() != n) {
        return absl::InvalidArgumentError(absl::StrCat("the ", split, " split has ", n, " examples but ",
                                                       labels.classes.size(), " encoded labels"));
      }
      for (size_t i = 0; i < n; ++i) {
        if (labels.classes[i] < 0 || labels.classes[i] >= num_classes_) {
          return absl::InvalidArgumentError(absl::StrCat(split, " example at line ", data.examples[i].line,
                                                         ": class index ", labels.classes[i], " is outside [0, ",
                                                         num_classes_, ")"));
        }
      }
    } else {
      if (labels.values.size() != n) {
        return absl::InvalidArgumentError(absl::StrCat("the ", split, " split has ", n, " examples but ",
                                                       labels.values.size(), " encoded labels"));
      }
      for (size_t i = 0; i < n; ++i) {
        if (!std::isfinite(labels.values[i])) {
          return absl::InvalidArgumentError(
              absl::StrCat(split, " example at line ", data.examples[i].line, ": the label is not a finite number"));
        }
      }
    }
    return absl::OkStatus();
  };
  DS_RETURN_IF_ERROR(check_labels(problem_.train, problem_.train_labels, "train"));
  DS_RETURN_IF_ERROR(check_labels(problem_.validation, problem_.validation_labels, "validation"));
  if (problem_.full) {
    if (!options_.allow_full) {
      return absl::FailedPreconditionError(
          "full fine-tuning is disabled on this server (it trains a private copy of every weight)");
    }
    if (options_.model_dir.empty()) {
      return absl::FailedPreconditionError("full fine-tuning needs the backbone's directory, which is not configured");
    }
    if (!spec_.methods.empty()) {
      return absl::InvalidArgumentError("full fine-tuning trains every weight: it takes no delta methods");
    }
  }
  return absl::OkStatus();
}

absl::Status Run::Encode() {
  const model::Tokenizer& tokenizer = model_->tokenizer();
  const int64_t limit = model_->info().max_sequence_length;
  int64_t max_tokens = hp_.max_sequence_length > 0 ? std::min(hp_.max_sequence_length, limit) : limit;
  // Soft prompt tokens take positions too.
  const int64_t virtual_tokens = delta_->leading_virtual_tokens();
  if (virtual_tokens > 0 && max_tokens > limit - virtual_tokens) max_tokens = limit - virtual_tokens;
  auto encode = [&](const Dataset& data, const EncodedLabels& labels, const char* split,
                    std::vector<EncodedExample>* out) -> absl::Status {
    out->resize(data.examples.size());
    for (size_t i = 0; i < data.examples.size(); ++i) {
      const Example& e = data.examples[i];
      auto ids = EncodeExample(tokenizer, e.text, e.text_pair, max_tokens);
      if (!ids.ok()) {
        return absl::Status(ids.status().code(),
                            absl::StrCat(split, " example at line ", e.line, ": ", ids.status().message()));
      }
      (*out)[i].ids = *std::move(ids);
      if (classification_) {
        (*out)[i].label = labels.classes[i];
      } else {
        (*out)[i].value = labels.values[i];
      }
    }
    return absl::OkStatus();
  };
  DS_RETURN_IF_ERROR(encode(problem_.train, problem_.train_labels, "train", &train_));
  DS_RETURN_IF_ERROR(encode(problem_.validation, problem_.validation_labels, "validation", &validation_));
  return absl::OkStatus();
}

absl::StatusOr<model::ForwardInput> Run::MakeInput(const std::vector<const EncodedExample*>& rows) const {
  int64_t longest = 1;
  for (const EncodedExample* r : rows) longest = std::max<int64_t>(longest, static_cast<int64_t>(r->ids.size()));
  const int64_t b = static_cast<int64_t>(rows.size());
  std::vector<int64_t> ids(static_cast<size_t>(b * longest), 0);
  std::vector<uint8_t> mask(static_cast<size_t>(b * longest), 0);
  for (int64_t i = 0; i < b; ++i) {
    const std::vector<int64_t>& row = rows[i]->ids;
    std::copy(row.begin(), row.end(), ids.begin() + i * longest);
    std::fill(mask.begin() + i * longest, mask.begin() + i * longest + static_cast<int64_t>(row.size()), 1);
  }
  return TorchCall(
      [&] {
        model::ForwardInput input;
        input.pack_tokens = options_.pack_tokens;
        input.input_ids = at::from_blob(ids.data(), {b, longest}, at::kLong).clone();
        input.attention_mask = at::from_blob(mask.data(), {b, longest}, at::kByte).to(at::kBool);
        return input;
      },
      "trainer: building a batch");
}

absl::StatusOr<double> Run::AccumulateGradients(const std::vector<int64_t>& indices, double total_rows) {
  std::vector<const EncodedExample*> rows;
  rows.reserve(indices.size());
  for (int64_t i : indices) rows.push_back(&train_[i]);
  model::ForwardInput input;
  if (!head_only_) {
    DS_ASSIGN_OR_RETURN(input, MakeInput(rows));
  }
  const c10::Device device(model_->info().device);
  MaybeReaderLock lock(lock_);
  at::Tensor pooled;
  if (head_only_) {
    DS_ASSIGN_OR_RETURN(pooled, TorchCall(
                                    [&] {
                                      at::Tensor index = at::tensor(indices, at::TensorOptions().dtype(at::kLong));
                                      return train_pooled_.index_select(0, index.to(train_pooled_.device()));
                                    },
                                    "trainer: cached embeddings"));
  } else {
    DS_ASSIGN_OR_RETURN(model::ForwardOutput out, model_->ForwardTrainable(input, delta_.get()));
    pooled = out.pooled;
  }
  DS_ASSIGN_OR_RETURN(at::Tensor logits, delta_->HeadForward(pooled));
  // The step's loss is the mean over all its rows: each micro-batch contributes its sum / total_rows.
  DS_ASSIGN_OR_RETURN(
      at::Tensor loss,
      TorchCall(
          [&] {
            c10::AutoGradMode grad(true);
            at::Tensor sum;
            if (classification_) {
              std::vector<int64_t> labels;
              for (const EncodedExample* r : rows) labels.push_back(r->label);
              at::Tensor target = at::tensor(labels, at::TensorOptions().dtype(at::kLong)).to(device);
              sum = at::cross_entropy_loss(logits.to(at::kFloat), target, {}, at::Reduction::Sum);
            } else {
              std::vector<float> values;
              for (const EncodedExample* r : rows) values.push_back(r->value);
              at::Tensor target = at::tensor(values, at::TensorOptions().dtype(at::kFloat)).to(device);
              sum = at::mse_loss(logits.to(at::kFloat).reshape({-1}), target, at::Reduction::Sum);
            }
            return sum / total_rows;
          },
          "trainer: loss"));
  DS_ASSIGN_OR_RETURN(double loss_value, TorchCall([&] { return loss.item<double>(); }, "trainer: loss value"));
  // A non-finite loss is reported by the caller (naming the step); its backward would only spread NaN.
  if (!std::isfinite(loss_value)) return loss_value;
  DS_RETURN_IF_ERROR(TorchCallVoid([&] { loss.backward(); }, "trainer: backward"));
  return loss_value;
}

absl::StatusOr<double> Run::TrainStep(const std::vector<int64_t>& indices, double lr) {
  const int64_t step_number = state_.step + 1;
  // Micro-batches: consecutive runs of rows whose padded size stays within micro_batch_tokens.
  std::vector<std::vector<int64_t>> chunks;
  if (head_only_ || options_.micro_batch_tokens <= 0) {
    chunks.push_back(indices);
  } else {
    int64_t longest = 0;
    for (int64_t i : indices) {
      const int64_t len = static_cast<int64_t>(train_[i].ids.size());
      const int64_t grown = std::max(longest, len);
      if (!chunks.empty() && !chunks.back().empty() &&
          grown * static_cast<int64_t>(chunks.back().size() + 1) > options_.micro_batch_tokens) {
        chunks.emplace_back();
        longest = len;
      } else {
        longest = grown;
      }
      if (chunks.empty()) chunks.emplace_back();
      chunks.back().push_back(i);
    }
  }
  const double total_rows = static_cast<double>(indices.size());
  double loss_value = 0;
  for (const std::vector<int64_t>& chunk : chunks) {
    DS_ASSIGN_OR_RETURN(double chunk_loss, AccumulateGradients(chunk, total_rows));
    loss_value += chunk_loss;
    if (!std::isfinite(loss_value)) break;
  }
  if (!std::isfinite(loss_value)) {
    return absl::AbortedError(absl::StrCat("loss became ", std::isnan(loss_value) ? "NaN" : "infinite",
                                           " at step ", step_number, "; lower the learning rate (now ",
                                           hp_.learning_rate, ")"));
  }
  absl::StatusOr<double> norm = TorchCall([&] { return ClipGradNorm(params_, hp_.max_grad_norm); }, "clip");
  DS_RETURN_IF_ERROR(norm.status());
  if (!std::isfinite(*norm)) {
    return absl::AbortedError(absl::StrCat("loss became NaN at step ", step_number,
                                           " (the gradient is not finite); lower the learning rate (now ",
                                           hp_.learning_rate, ")"));
  }
  DS_RETURN_IF_ERROR(TorchCallVoid(
      [&] {
        optimizer_->Step(lr);
        optimizer_->ZeroGrad();
      },
      "trainer: optimizer step"));
  return loss_value;
}

absl::StatusOr<EvalMetrics> Run::Evaluate() {
  const int64_t n = static_cast<int64_t>(validation_.size());
  const int64_t batch = std::max<int64_t>(hp_.batch_size, 32);
  std::vector<int64_t> predicted_classes;
  std::vector<double> predicted_values;
  double loss_sum = 0;
  const c10::Device device(model_->info().device);
  for (int64_t begin = 0; begin < n; begin += batch) {
    if (Cancelled()) return absl::CancelledError("the job was cancelled");
    std::vector<const EncodedExample*> rows;
    for (int64_t i = begin; i < std::min(n, begin + batch); ++i) rows.push_back(&validation_[i]);
    model::ForwardInput input;
    if (!head_only_) {
      DS_ASSIGN_OR_RETURN(input, MakeInput(rows));
    }
    MaybeReaderLock lock(lock_);
    absl::Status inner;
    DS_RETURN_IF_ERROR(TorchCallVoid(
        [&] {
          // The serving forward (inference mode, no autograd record) with the delta's hooks.
          c10::InferenceMode guard;
          at::Tensor pooled;
          if (head_only_) {
            pooled = validation_pooled_.narrow(0, begin, static_cast<int64_t>(rows.size()));
          } else {
            absl::StatusOr<model::ForwardOutput> out = model_->Forward(input, delta_.get());
            if (!out.ok()) {
              inner = out.status();
              return;
            }
            pooled = out->pooled;
          }
          absl::StatusOr<at::Tensor> head = delta_->HeadForward(pooled);
          if (!head.ok()) {
            inner = head.status();
            return;
          }
          at::Tensor logits = head->to(at::kFloat);
          if (classification_) {
            std::vector<int64_t> labels;
            for (const EncodedExample* r : rows) labels.push_back(r->label);
            at::Tensor target = at::tensor(labels, at::TensorOptions().dtype(at::kLong)).to(device);
            loss_sum += at::cross_entropy_loss(logits, target, {}, at::Reduction::Sum).item<double>();
            at::Tensor argmax = logits.argmax(1).to(at::kCPU).contiguous();
            const int64_t* p = argmax.data_ptr<int64_t>();
            predicted_classes.insert(predicted_classes.end(), p, p + argmax.numel());
          } else {
            at::Tensor values = logits.reshape({-1}).to(at::kCPU, at::kDouble).contiguous();
            const double* p = values.data_ptr<double>();
            predicted_values.insert(predicted_values.end(), p, p + values.numel());
          }
        },
        "trainer: evaluation"));
    DS_RETURN_IF_ERROR(inner);
  }
  if (classification_) {
    std::vector<int64_t> truth;
    for (const EncodedExample& e : validation_) truth.push_back(e.label);
    return ClassificationMetrics(truth, predicted_classes, num_classes_, loss_sum / static_cast<double>(n));
  }
  std::vector<double> truth;
  for (const EncodedExample& e : validation_) truth.push_back(e.value);
  return RegressionMetrics(truth, predicted_values);
}

absl::StatusOr<at::Tensor> Run::Embed(const std::vector<EncodedExample>& rows) {
  const int64_t n = static_cast<int64_t>(rows.size());
  const int64_t batch = std::max<int64_t>(hp_.batch_size, 32);
  std::vector<at::Tensor> parts;
  for (int64_t begin = 0; begin < n; begin += batch) {
    if (Cancelled()) return absl::CancelledError("the job was cancelled");
    std::vector<const EncodedExample*> chunk;
    for (int64_t i = begin; i < std::min(n, begin + batch); ++i) chunk.push_back(&rows[i]);
    DS_ASSIGN_OR_RETURN(model::ForwardInput input, MakeInput(chunk));
    MaybeReaderLock lock(lock_);
    DS_ASSIGN_OR_RETURN(model::ForwardOutput out, model_->Forward(input, nullptr));
    parts.push_back(out.pooled);
  }
  // Forward() returns inference tensors, which autograd cannot save for the head's backward: copy them out.
  return TorchCall([&] { return at::cat(parts, 0).to(at::kFloat).clone(); }, "trainer: caching embeddings");
}

absl::Status Run::EmbedOnce() {
  DS_ASSIGN_OR_RETURN(train_pooled_, Embed(train_));
  DS_ASSIGN_OR_RETURN(validation_pooled_, Embed(validation_));
  return absl::OkStatus();
}

std::map<std::string, at::Tensor> Run::Snapshot() const {
  c10::NoGradGuard no_grad;
  std::map<std::string, at::Tensor> out;
  for (const auto& [name, t] : params_) out[name] = t.detach().clone();
  return out;
}

absl::Status Run::LoadInto(const std::map<std::string, at::Tensor>& values) {
  std::map<std::string, at::Tensor> delta_values;
  for (const auto& [name, t] : params_) {
    auto it = values.find(name);
    if (it == values.end()) {
      return absl::InvalidArgumentError(absl::StrCat("checkpoint: tensor \"", name, "\" is missing"));
    }
    if (StartsWith(name, kBackbonePrefix)) {
      if (it->second.sizes() != t.sizes()) {
        return absl::InvalidArgumentError(absl::StrCat("checkpoint: tensor \"", name, "\" has shape ",
                                                       ShapeString(it->second.sizes()), ", expected ",
                                                       ShapeString(t.sizes())));
      }
      DS_RETURN_IF_ERROR(TorchCallVoid(
          [&] {
            c10::NoGradGuard no_grad;
            t.copy_(it->second);
          },
          "checkpoint: restoring a weight"));
    } else {
      delta_values[name] = it->second;
    }
  }
  return delta_->LoadValues(delta_values);
}

absl::Status Run::Restore(const Checkpoint& checkpoint) {
  const nlohmann::json& s = checkpoint.state;
  auto bad = [](const std::string& what) { return absl::InvalidArgumentError(absl::StrCat("checkpoint: ", what)); };
  if (!s.is_object() || s.value("format", "") != kCheckpointFormat) {
    return bad("not a trainer checkpoint (unknown format)");
  }
  auto integer = [&](const char* key, int64_t* out) -> absl::Status {
    auto it = s.find(key);
    if (it == s.end() || !it->is_number_integer()) return bad(absl::StrCat("\"", key, "\" is missing"));
    *out = it->get<int64_t>();
    return absl::OkStatus();
  };
  int64_t total = 0, per_epoch = 0, train_examples = 0;
  DS_RETURN_IF_ERROR(integer("total_steps", &total));
  DS_RETURN_IF_ERROR(integer("steps_per_epoch", &per_epoch));
  DS_RETURN_IF_ERROR(integer("train_examples", &train_examples));
  if (total != total_steps_ || per_epoch != steps_per_epoch_ ||
      train_examples != static_cast<int64_t>(train_.size())) {
    return bad(absl::StrCat("it was made for ", total, " steps of ", per_epoch, " per epoch over ", train_examples,
                            " examples; this job has ", total_steps_, " of ", steps_per_epoch_, " over ",
                            train_.size()));
  }
  DS_RETURN_IF_ERROR(integer("step", &state_.step));
  DS_RETURN_IF_ERROR(integer("epoch", &state_.epoch));
  DS_RETURN_IF_ERROR(integer("position", &state_.position));
  DS_RETURN_IF_ERROR(integer("best_epoch", &state_.best_epoch));
  if (state_.step < 0 || state_.step > total_steps_ || state_.epoch < 0 || state_.epoch > epochs_to_run_ ||
      state_.position < 0 || state_.position > steps_per_epoch_ || state_.best_epoch < 0 ||
      state_.best_epoch > state_.epoch + 1) {
    return bad("the position (step, epoch, position, best_epoch) is out of range");
  }
  state_.best_metric = state_.best_epoch > 0 && s.contains("best_metric")
                           ? NumberOf(s["best_metric"])
                           : -std::numeric_limits<double>::infinity();
  state_.eval_history.clear();
  if (s.contains("eval_history")) {
    if (!s["eval_history"].is_array()) return bad("\"eval_history\" is not a list");
    for (const nlohmann::json& e : s["eval_history"]) {
      DS_ASSIGN_OR_RETURN(EvalMetrics m, EvalFromJson(e));
      state_.eval_history.push_back(std::move(m));
    }
  }
  if (s.contains("smoothed_loss") && s["smoothed_loss"].is_number()) {
    state_.smoothed_loss = s["smoothed_loss"].get<double>();
    state_.has_smoothed_loss = true;
  }
  state_.elapsed_seconds = s.contains("elapsed_seconds") ? NumberOf(s["elapsed_seconds"]) : 0;
  if (!std::isfinite(state_.elapsed_seconds)) state_.elapsed_seconds = 0;

  std::map<std::string, at::Tensor> params, best, opt;
  for (const auto& [name, t] : checkpoint.tensors) {
    if (StartsWith(name, kParamPrefix)) {
      params[name.substr(strlen(kParamPrefix))] = t;
    } else if (StartsWith(name, kBestPrefix)) {
      best[name.substr(strlen(kBestPrefix))] = t;
    } else if (StartsWith(name, kOptPrefix)) {
      opt[name.substr(strlen(kOptPrefix))] = t;
    } else {
      return bad(absl::StrCat("unexpected tensor \"", name, "\""));
    }
  }
  DS_RETURN_IF_ERROR(LoadInto(params));
  DS_RETURN_IF_ERROR(optimizer_->LoadState(opt, state_.step));
  state_.best.clear();
  if (state_.best_epoch > 0) {
    const c10::Device device(model_->info().device);
    for (const auto& [name, t] : params_) {
      auto it = best.find(name);
      if (it == best.end()) return bad(absl::StrCat("tensor \"best/", name, "\" is missing"));
      if (it->second.sizes() != t.sizes()) return bad(absl::StrCat("tensor \"best/", name, "\" is misshapen"));
      DS_ASSIGN_OR_RETURN(state_.best[name],
                          TorchCall([&] { return it->second.to(device, t.scalar_type()).clone(); }, "checkpoint"));
    }
  }
  return absl::OkStatus();
}

absl::Status Run::SaveCheckpoint() {
  if (!callbacks_.on_checkpoint) return absl::OkStatus();
  Checkpoint checkpoint;
  DS_RETURN_IF_ERROR(TorchCallVoid(
      [&] {
        c10::NoGradGuard no_grad;
        auto cpu = [](const at::Tensor& t) { return t.detach().to(at::kCPU, at::kFloat).contiguous().clone(); };
        for (const auto& [name, t] : params_) checkpoint.tensors[kParamPrefix + name] = cpu(t);
        for (const auto& [name, t] : state_.best) checkpoint.tensors[kBestPrefix + name] = cpu(t);
        for (const auto& [name, t] : optimizer_->StateTensors()) checkpoint.tensors[kOptPrefix + name] = cpu(t);
      },
      "trainer: checkpoint"));
  nlohmann::json history = nlohmann::json::array();
  for (const EvalMetrics& m : state_.eval_history) history.push_back(EvalJson(m));
  checkpoint.state = nlohmann::json{
      {"format", kCheckpointFormat},
      {"step", state_.step},
      {"epoch", state_.epoch},
      {"position", state_.position},
      {"best_epoch", state_.best_epoch},
      {"best_metric", Number(state_.best_metric)},
      {"eval_history", history},
      {"smoothed_loss", state_.has_smoothed_loss ? Number(state_.smoothed_loss) : nlohmann::json(nullptr)},
      {"elapsed_seconds", state_.elapsed_seconds + RunSeconds()},
      {"total_steps", total_steps_},
      {"steps_per_epoch", steps_per_epoch_},
      {"train_examples", static_cast<int64_t>(train_.size())},
      {"seed", hp_.seed},
  };
  return callbacks_.on_checkpoint(checkpoint);
}

void Run::ReportProgress(const std::optional<EvalMetrics>& eval) {
  if (!callbacks_.on_progress) return;
  Progress p;
  p.step = state_.step;
  p.total_steps = total_steps_;
  p.epoch = std::min(state_.epoch + 1, epochs_to_run_);
  p.epochs = epochs_to_run_;
  p.loss = state_.smoothed_loss;
  p.learning_rate = last_lr_;
  const double seconds = RunSeconds();
  p.examples_per_second = seconds > 0 ? static_cast<double>(examples_this_run_) / seconds : 0;
  p.eta_seconds = steps_this_run_ > 0
                      ? seconds / static_cast<double>(steps_this_run_) * static_cast<double>(total_steps_ - state_.step)
                      : 0;
  p.eval = eval;
  callbacks_.on_progress(p);
}

absl::StatusOr<TrainResult> Run::Go(const Checkpoint* resume) {
  start_ = std::chrono::steady_clock::now();
  DS_RETURN_IF_ERROR(Validate());

  // What to train on.
  model_ = &served_;
  lock_ = &served_.weights_mutex();
  if (problem_.full) {
    model::ModelOptions mo;
    mo.device = served_.info().device;
    // AdamW's small updates vanish in bfloat16 weights: the private copy always trains in float32.
    mo.dtype = "float32";
    DS_ASSIGN_OR_RETURN(private_, model::LoadModel(options_.model_dir, mo));
    if (private_->info().fingerprint != served_.info().fingerprint) {
      return absl::FailedPreconditionError(absl::StrCat(
          "full fine-tuning: ", options_.model_dir, " holds ", private_->info().fingerprint,
          ", not the served backbone ", served_.info().fingerprint));
    }
    model_ = private_.get();
    lock_ = nullptr;
  }
  {
    // Prefix / prompt initialization reads the embeddings: the weights must not be merged meanwhile.
    MaybeReaderLock lock(lock_);
    DS_ASSIGN_OR_RETURN(delta_, TrainableDelta::Create(spec_, *model_, hp_.seed));
  }
  params_ = delta_->parameters();
  if (problem_.full) {
    DS_RETURN_IF_ERROR(TorchCallVoid(
        [&] {
          for (const auto& [name, t] : private_->parameters()) {
            at::Tensor w = t;
            w.requires_grad_(true);
            params_.emplace_back(kBackbonePrefix + name, w);
          }
        },
        "full fine-tuning: making the weights trainable"));
    std::sort(params_.begin(), params_.end(),
              [](const auto& a, const auto& b) { return a.first < b.first; });
  }
  DS_RETURN_IF_ERROR(Encode());
  head_only_ = !problem_.full && problem_.spec.methods.empty();
  if (head_only_) DS_RETURN_IF_ERROR(EmbedOnce());

  // The schedule.
  const int64_t n_train = static_cast<int64_t>(train_.size());
  steps_per_epoch_ = (n_train + hp_.batch_size - 1) / hp_.batch_size;
  total_steps_ = hp_.epochs * steps_per_epoch_;
  if (hp_.max_steps > 0) total_steps_ = std::min(total_steps_, hp_.max_steps);
  epochs_to_run_ = (total_steps_ + steps_per_epoch_ - 1) / steps_per_epoch_;
  warmup_steps_ = hp_.warmup_steps > 0
                      ? std::min(hp_.warmup_steps, total_steps_)
                      : static_cast<int64_t>(std::ceil(hp_.warmup_fraction * static_cast<double>(total_steps_)));

  AdamWOptions adam;
  adam.weight_decay = hp_.weight_decay;
  if (hp_.head_learning_rate > 0) {
    adam.lr_scales[TrainableDelta::kHeadPrefix] = hp_.head_learning_rate / hp_.learning_rate;
  }
  optimizer_ = std::make_unique<AdamW>(params_, adam);
  if (resume != nullptr) DS_RETURN_IF_ERROR(Restore(*resume));

  // The loop. Epoch e's order is a shuffle seeded with seed + e, so a resumed run finds its place without any RNG
  // state in the checkpoint.
  while (state_.epoch < epochs_to_run_) {
    const int64_t epoch = state_.epoch;
    std::vector<int64_t> order(static_cast<size_t>(n_train));
    std::iota(order.begin(), order.end(), 0);
    std::mt19937_64 rng(hp_.seed + static_cast<uint64_t>(epoch));
    for (int64_t i = n_train - 1; i > 0; --i) {
      const int64_t j = static_cast<int64_t>(rng() % static_cast<uint64_t>(i + 1));
      std::swap(order[i], order[j]);
    }
    while (state_.position < steps_per_epoch_ && state_.step < total_steps_) {
      if (Cancelled()) return absl::CancelledError("the job was cancelled");
      const int64_t begin = state_.position * hp_.batch_size;
      const int64_t end = std::min(n_train, begin + hp_.batch_size);
      std::vector<int64_t> batch(order.begin() + begin, order.begin() + end);
      last_lr_ = LearningRateAt(state_.step, total_steps_, warmup_steps_, hp_.learning_rate);
      DS_ASSIGN_OR_RETURN(double loss, TrainStep(batch, last_lr_));
      ++state_.step;
      ++state_.position;
      ++steps_this_run_;
      examples_this_run_ += end - begin;
      state_.smoothed_loss =
          state_.has_smoothed_loss ? kLossSmoothing * state_.smoothed_loss + (1 - kLossSmoothing) * loss : loss;
      state_.has_smoothed_loss = true;
      ReportProgress(std::nullopt);
      const bool epoch_ends = state_.position == steps_per_epoch_ || state_.step == total_steps_;
      if (!epoch_ends && options_.checkpoint_every_steps > 0 && state_.step % options_.checkpoint_every_steps == 0) {
        DS_RETURN_IF_ERROR(SaveCheckpoint());
      }
    }
    // The epoch is over (or max_steps stopped it): evaluate, keep the best.
    if (Cancelled()) return absl::CancelledError("the job was cancelled");
    DS_ASSIGN_OR_RETURN(EvalMetrics eval, Evaluate());
    state_.eval_history.push_back(eval);
    const double value = eval.primary_value();
    // Ties keep the earlier epoch; a metric that is not finite never beats one that is.
    if (state_.best_epoch == 0 ||
        (std::isfinite(value) && (!std::isfinite(state_.best_metric) || value > state_.best_metric))) {
      state_.best_epoch = epoch + 1;
      state_.best_metric = value;
      DS_ASSIGN_OR_RETURN(state_.best, TorchCall([&] { return Snapshot(); }, "trainer: keeping the best epoch"));
    }
    ReportProgress(eval);
    ++state_.epoch;
    state_.position = 0;
    DS_RETURN_IF_ERROR(SaveCheckpoint());
    if (state_.step >= total_steps_) break;
  }

  TrainResult result;
  result.steps = state_.step;
  result.best_epoch = state_.best_epoch;
  result.eval_history = state_.eval_history;
  if (state_.best_epoch >= 1 && state_.best_epoch <= static_cast<int64_t>(state_.eval_history.size())) {
    result.best_eval = state_.eval_history[state_.best_epoch - 1];
  }
  result.model_parameters = served_.info().num_parameters;
  result.trainable_parameters = delta_->num_parameters();
  if (problem_.full) {
    for (const auto& [name, t] : private_->parameters()) result.trainable_parameters += t.numel();
  }
  result.optimizer_state_bytes = optimizer_->state_bytes();
  result.train_seconds = state_.elapsed_seconds + RunSeconds();
  if (!problem_.full) {
    if (!state_.best.empty()) DS_RETURN_IF_ERROR(LoadInto(state_.best));
    delta::PackManifest manifest;
    manifest.name = problem_.name;
    nlohmann::json provenance = problem_.provenance.is_object() ? problem_.provenance : nlohmann::json::object();
    nlohmann::json methods = nlohmann::json::array();
    for (const delta::MethodSpec& m : spec_.methods) methods.push_back(delta::MethodKindName(m.kind));
    provenance["trainer"] = "deltaserve";
    provenance["methods"] = methods;
    provenance["hyper_parameters"] = HyperParametersJson(hp_);
    provenance["best_epoch"] = result.best_epoch;
    provenance["validation"] = MetricsJson(result.best_eval);
    provenance["train_examples"] = static_cast<int64_t>(train_.size());
    provenance["validation_examples"] = static_cast<int64_t>(validation_.size());
    manifest.provenance = std::move(provenance);
    DS_ASSIGN_OR_RETURN(delta::PackContents pack, delta_->Export(std::move(manifest)));
    result.pack = std::move(pack);
  }
  return result;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------

double EvalMetrics::primary_value() const {
  auto it = metrics.find(primary);
  return it == metrics.end() ? std::numeric_limits<double>::quiet_NaN() : it->second;
}

absl::Status ValidateHyperParameters(const HyperParameters& hp, const model::Model& model) {
  auto bad = [](const std::string& field, const std::string& range, const std::string& got) {
    return absl::InvalidArgumentError(absl::StrCat(field, " must be ", range, ", got ", got));
  };
  if (!std::isfinite(hp.learning_rate) || hp.learning_rate <= 0 || hp.learning_rate > 1) {
    return bad("learning_rate", "in (0, 1]", absl::StrCat(hp.learning_rate));
  }
  if (!std::isfinite(hp.head_learning_rate) || hp.head_learning_rate < 0 || hp.head_learning_rate > 1) {
    return bad("head_learning_rate", "in (0, 1], or 0 for learning_rate", absl::StrCat(hp.head_learning_rate));
  }
  if (hp.epochs < 1 || hp.epochs > 1000) return bad("epochs", "in [1, 1000]", absl::StrCat(hp.epochs));
  if (hp.max_steps < 0 || hp.max_steps > 10000000) {
    return bad("max_steps", "in [0, 10000000] (0 = no limit)", absl::StrCat(hp.max_steps));
  }
  if (hp.batch_size < 1 || hp.batch_size > 4096) return bad("batch_size", "in [1, 4096]", absl::StrCat(hp.batch_size));
  if (!std::isfinite(hp.warmup_fraction) || hp.warmup_fraction < 0 || hp.warmup_fraction >= 1) {
    return bad("warmup_fraction", "in [0, 1)", absl::StrCat(hp.warmup_fraction));
  }
  if (hp.warmup_steps < 0 || hp.warmup_steps > 10000000) {
    return bad("warmup_steps", "in [0, 10000000]", absl::StrCat(hp.warmup_steps));
  }
  if (!std::isfinite(hp.weight_decay) || hp.weight_decay < 0 || hp.weight_decay >= 1) {
    return bad("weight_decay", "in [0, 1)", absl::StrCat(hp.weight_decay));
  }
  const int64_t limit = model.info().max_sequence_length;
  const int64_t specials = model.tokenizer().NumSpecialTokens();
  if (hp.max_sequence_length < 0 || hp.max_sequence_length > limit) {
    return bad("max_sequence_length", absl::StrCat("in [0, ", limit, "] (0 = the model's limit of ", limit, ")"),
               absl::StrCat(hp.max_sequence_length));
  }
  if (hp.max_sequence_length != 0 && hp.max_sequence_length <= specials) {
    return bad("max_sequence_length", absl::StrCat("over the model's ", specials, " special tokens"),
               absl::StrCat(hp.max_sequence_length));
  }
  if (!std::isfinite(hp.max_grad_norm) || hp.max_grad_norm < 0) {
    return bad("max_grad_norm", "a finite number >= 0 (0 = no clipping)", absl::StrCat(hp.max_grad_norm));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int64_t>> EncodeExample(const model::Tokenizer& tokenizer, const std::string& text,
                                                   const std::string& text_pair, int64_t max_tokens) {
  return model::EncodeTextPair(tokenizer, text, text_pair, max_tokens);
}

Trainer::Trainer(const model::Model& model, TrainerOptions options) : model_(model), options_(std::move(options)) {}

absl::StatusOr<TrainResult> Trainer::Run(const TrainingProblem& problem, const Checkpoint* resume,
                                         const TrainCallbacks& callbacks) const {
  // The job runs on a thread of its own, so that its niceness and intra-op thread count (per-thread settings,
  // inherited by the OpenMP workers it starts) never leak into the caller's thread.
  absl::StatusOr<TrainResult> result = absl::InternalError("the training thread did not run");
  std::thread worker([&] {
    ConfigureTrainingThread(options_.threads, options_.nice);
    std::optional<at::CallbackHandle> yield;
    if (options_.yield_to_serving) {
      yield = at::addThreadLocalCallback(at::RecordFunctionCallback(&YieldToServing).needsInputs(false));
    }
    try {
      tuning::Run run(model_, options_, problem, callbacks);
      result = run.Go(resume);
    } catch (const std::exception& e) {
      result = absl::InternalError(absl::StrCat("trainer: ", e.what()));
    }
    if (yield.has_value()) at::removeCallback(*yield);
  });
  worker.join();
  return result;
}

}  // namespace tuning
}  // namespace deltaserve
