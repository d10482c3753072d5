// Tests for server/tuning/trainer.h: a delta learns a separable task on the shared frozen backbone, runs repeat
// bit-for-bit with a seed and across a checkpoint / resume, a non-finite loss fails with its reason, cancellation,
// hyper-parameter validation, `full` fine-tuning on a private copy, the exported pack serving what training
// measured, and EncodeExample's pair / truncation rule. Models: the tiny random BERT always, use-lite when present.
#include "server/tuning/trainer.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <omp.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/delta/delta_batch.h"
#include "server/delta/delta_pack.h"
#include "server/model/model_loader.h"
#include "server/model/safetensors.h"
#include "tests/delta/delta_test_util.h"

namespace deltaserve {
namespace tuning {
namespace {

using delta::testing::TestModels;
using delta::testing::TinyBert;
using delta::testing::UseLite;
using ::testing::HasSubstr;

// Words every test model knows (TinyBert's vocabulary; use-lite knows them too).
const std::vector<std::string>& Fillers() {
  static const auto* words = new std::vector<std::string>{"the", "a",   "cat",   "dog",  "sat",  "on",  "mat",
                                                          "is",  "was", "big",   "small", "red", "blue", "house",
                                                          "tree", "this", "it", "very", "movie", "film"};
  return *words;
}
const std::vector<std::string> kPositive = {"good", "great", "love"};
const std::vector<std::string> kNegative = {"bad", "awful", "hate"};

// Sentences of 3-7 filler words with one keyword: the label is the keyword's polarity ("neg" / "pos").
// Regression: 1 for positive, 0 for negative.
void MakeSplit(int n, uint64_t seed, bool regression, bool pairs, Dataset* data, EncodedLabels* labels) {
  std::mt19937_64 rng(seed);
  for (int i = 0; i < n; ++i) {
    const bool positive = i % 2 == 0;
    std::vector<std::string> words;
    const int len = 3 + static_cast<int>(rng() % 5);
    for (int k = 0; k < len; ++k) words.push_back(Fillers()[rng() % Fillers().size()]);
    const auto& keys = positive ? kPositive : kNegative;
    words.insert(words.begin() + static_cast<int64_t>(rng() % (words.size() + 1)), keys[rng() % keys.size()]);
    Example e;
    for (const auto& w : words) e.text += (e.text.empty() ? "" : " ") + w;
    if (pairs) e.text_pair = absl::StrCat(Fillers()[rng() % Fillers().size()], " ", Fillers()[rng() % 5]);
    e.label = regression ? (positive ? "1" : "0") : (positive ? "pos" : "neg");
    e.line = i + 2;
    data->examples.push_back(e);
    if (regression) {
      labels->values.push_back(positive ? 1.f : 0.f);
    } else {
      labels->classes.push_back(positive ? 1 : 0);
    }
  }
  data->has_text_pair = pairs;
}

delta::MethodSpec Method(delta::MethodKind kind, nlohmann::json config = nlohmann::json::object()) {
  delta::MethodSpec spec;
  spec.kind = kind;
  spec.config = std::move(config);
  return spec;
}

delta::MethodSpec Lora(int64_t rank = 8) { return Method(delta::MethodKind::kLora, {{"rank", rank}}); }

TrainingProblem KeywordProblem(int n_train, int n_val, std::vector<delta::MethodSpec> methods,
                               bool regression = false, bool pairs = false) {
  TrainingProblem p;
  p.name = "keywords";
  p.provenance = {{"job", "test-job"}};
  p.spec.methods = std::move(methods);
  if (regression) {
    p.labels.type = TaskType::kRegression;
    p.spec.head.type = "regression";
  } else {
    p.labels.type = TaskType::kClassification;
    p.labels.labels = {"neg", "pos"};
    p.spec.head.type = "classification";
    p.spec.head.labels = {"neg", "pos"};
  }
  MakeSplit(n_train, 11, regression, pairs, &p.train, &p.train_labels);
  MakeSplit(n_val, 12, regression, pairs, &p.validation, &p.validation_labels);
  p.hp.learning_rate = 1e-2;
  p.hp.epochs = 2;
  p.hp.batch_size = 8;
  p.hp.max_sequence_length = 32;
  p.hp.warmup_fraction = 0.1;
  return p;
}

TrainerOptions QuietOptions() {
  TrainerOptions o;
  o.nice = 0;  // tests share the machine with builds: a niced trainer would crawl
  o.checkpoint_every_steps = 0;
  return o;
}

absl::StatusOr<TrainResult> Train(const model::Model& model, const TrainingProblem& problem,
                                  TrainerOptions options = QuietOptions(), const TrainCallbacks& callbacks = {},
                                  const Checkpoint* resume = nullptr) {
  Trainer trainer(model, options);
  return trainer.Run(problem, resume, callbacks);
}

std::string PackBytes(const TrainResult& result) {
  EXPECT_TRUE(result.pack.has_value());
  if (!result.pack) return "";
  auto bytes = delta::SerializePack(*result.pack);
  EXPECT_TRUE(bytes.ok()) << bytes.status();
  return bytes.value_or("");
}

// A copy of a checkpoint as the job manager would persist it: state through its JSON text, tensors cloned.
Checkpoint Persisted(const Checkpoint& c) {
  Checkpoint out;
  out.state = nlohmann::json::parse(c.state.dump());
  for (const auto& [name, t] : c.tensors) out.tensors[name] = t.clone();
  return out;
}

// ------------------------------------------------------------------------------------------------------------
// Learning.

TEST(TrainerTest, LoraLearnsASeparableTask) {
  for (const auto& [name, model] : TestModels()) {
    SCOPED_TRACE(name);
    TrainingProblem p = KeywordProblem(96, 48, {Lora()});
    p.hp.epochs = 4;
    std::vector<Progress> progress;
    TrainCallbacks cb;
    cb.on_progress = [&](const Progress& pr) { progress.push_back(pr); };
    auto result = Train(*model, p, QuietOptions(), cb);
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_EQ(result->steps, 4 * 12);
    ASSERT_EQ(result->eval_history.size(), 4u);
    EXPECT_EQ(result->best_eval.primary, "accuracy");
    EXPECT_GE(result->best_eval.metrics.at("accuracy"), 0.9);
    for (const char* m : {"macro_f1", "f1", "mcc"}) EXPECT_TRUE(result->best_eval.metrics.count(m)) << m;
    EXPECT_GE(result->best_epoch, 1);
    EXPECT_LE(result->best_epoch, 4);
    // The training loss went down: the smoothed loss at the end is below the first step's.
    std::vector<double> step_losses;
    int evals = 0;
    for (const Progress& pr : progress) {
      if (pr.eval) {
        ++evals;
      } else {
        step_losses.push_back(pr.loss);
      }
    }
    EXPECT_EQ(evals, 4);
    ASSERT_EQ(step_losses.size(), 48u);
    EXPECT_LT(step_losses.back(), 0.7 * step_losses.front());
    EXPECT_LT(result->eval_history.back().loss, result->eval_history.front().loss + 1e-6);
    EXPECT_EQ(progress.back().step, 48);
    EXPECT_EQ(progress.back().total_steps, 48);
    EXPECT_GT(progress.back().examples_per_second, 0);
    // Only delta tensors were trained; the pack records where it came from.
    EXPECT_GT(result->trainable_parameters, 0);
    EXPECT_LT(result->trainable_parameters, result->model_parameters);
    EXPECT_EQ(result->model_parameters, model->info().num_parameters);
    EXPECT_GT(result->optimizer_state_bytes, 0);
    ASSERT_TRUE(result->pack.has_value());
    const nlohmann::json& prov = result->pack->manifest.provenance;
    EXPECT_EQ(prov.value("job", ""), "test-job");
    EXPECT_EQ(prov.value("trainer", ""), "deltaserve");
    EXPECT_EQ(prov["methods"], nlohmann::json::array({"lora"}));
    EXPECT_EQ(prov["best_epoch"], result->best_epoch);
    EXPECT_EQ(prov["train_examples"], 96);
    EXPECT_EQ(prov["validation_examples"], 48);
    EXPECT_DOUBLE_EQ(prov["validation"]["accuracy"].get<double>(), result->best_eval.metrics.at("accuracy"));
    EXPECT_EQ(prov["hyper_parameters"]["seed"], 42);
    EXPECT_EQ(result->pack->manifest.name, "keywords");
    EXPECT_EQ(result->pack->manifest.backbone_fingerprint, model->info().fingerprint);
  }
}

TEST(TrainerTest, RegressionReportsErrorAndCorrelations) {
  auto model = TinyBert();
  ASSERT_NE(model, nullptr);
  TrainingProblem p = KeywordProblem(64, 32, {Lora()}, /*regression=*/true);
  p.hp.epochs = 3;
  auto result = Train(*model, p);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->best_eval.primary, "pearson");
  for (const char* m : {"mse", "pearson", "spearman"}) EXPECT_TRUE(result->best_eval.metrics.count(m)) << m;
  EXPECT_GT(result->best_eval.metrics.at("pearson"), 0.5);
  EXPECT_LT(result->best_eval.metrics.at("mse"), 0.25);
  ASSERT_TRUE(result->pack.has_value());
  ASSERT_TRUE(result->pack->head.has_value());
  EXPECT_EQ(result->pack->head->config["type"], "regression");
}

TEST(TrainerTest, TextPairsTrain) {
  auto model = TinyBert();
  ASSERT_NE(model, nullptr);
  TrainingProblem p = KeywordProblem(32, 16, {Lora()}, /*regression=*/false, /*pairs=*/true);
  p.hp.max_steps = 3;
  auto result = Train(*model, p);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->steps, 3);
  EXPECT_EQ(result->eval_history.size(), 1u);  // max_steps stopped the first epoch: evaluated at the end
}

// ------------------------------------------------------------------------------------------------------------
// Repeatability and resume.

TEST(TrainerTest, SameSeedGivesIdenticalPack) {
  for (const auto& [name, model] : TestModels()) {
    SCOPED_TRACE(name);
    TrainingProblem p = KeywordProblem(32, 16, {Lora(4), Method(delta::MethodKind::kBitFit)});
    p.hp.max_steps = 6;
    auto a = Train(*model, p);
    auto b = Train(*model, p);
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_EQ(PackBytes(*a), PackBytes(*b));
  }
}

TEST(TrainerTest, MicroBatchesGiveTheWholeBatchUpdate) {
  for (const auto& [name, model] : TestModels()) {
    SCOPED_TRACE(name);
    TrainingProblem p = KeywordProblem(32, 16, {Lora(4), Method(delta::MethodKind::kBitFit)});
    p.hp.max_steps = 4;
    TrainerOptions whole = QuietOptions();
    whole.micro_batch_tokens = 0;
    TrainerOptions micro = QuietOptions();
    micro.micro_batch_tokens = 16;  // batches of 8 rows run as several micro-batches
    auto a = Train(*model, p, whole);
    auto b = Train(*model, p, micro);
    auto c = Train(*model, p, micro);
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_EQ(PackBytes(*b), PackBytes(*c));  // the split depends on the data only
    ASSERT_TRUE(a->pack && b->pack);
    ASSERT_EQ(a->pack->methods.size(), b->pack->methods.size());
    for (size_t m = 0; m < a->pack->methods.size(); ++m) {
      for (const auto& [tensor_name, t] : a->pack->methods[m].tensors) {
        SCOPED_TRACE(tensor_name);
        // A key bias shifts every score of a query by the same amount, which softmax ignores: its gradient is
        // zero up to rounding, and AdamW scales that rounding noise up to full-size steps. Nothing to compare.
        if (absl::StrContains(tensor_name, "key.bias")) continue;
        const at::Tensor& u = b->pack->methods[m].tensors.at(tensor_name);
        EXPECT_LE((t - u).abs().max().item<float>(), 1e-4);
      }
    }
    for (const auto& [tensor_name, t] : a->pack->head->tensors) {
      EXPECT_LE((t - b->pack->head->tensors.at(tensor_name)).abs().max().item<float>(), 1e-4) << tensor_name;
    }
  }
}

TEST(TrainerTest, PackedBatchesGiveThePaddedUpdateForEveryMethodKind) {
  using K = delta::MethodKind;
  for (const auto& [name, model] : TestModels()) {
    SCOPED_TRACE(name);
    // Rows of different lengths (the keyword texts), every kind in one delta, and full fine-tuning's head alone.
    TrainingProblem p = KeywordProblem(
        32, 16,
        {Lora(4), Method(K::kBitFit), Method(K::kLnTuning), Method(K::kParallelAdapter, {{"bottleneck", 4}}),
         Method(K::kIa3), Method(K::kPrefix, {{"num_virtual_tokens", 2}}), Method(K::kPrompt, {{"num_virtual_tokens", 2}}),
         Method(K::kAdapter, {{"bottleneck", 4}})});
    p.hp.max_steps = 3;
    p.hp.learning_rate = 1e-3;  // small steps: AdamW turns rounding noise in tiny gradients into full-size steps
    TrainerOptions padded = QuietOptions();
    padded.pack_tokens = false;
    TrainerOptions packed = QuietOptions();
    ASSERT_TRUE(packed.pack_tokens);  // the default
    auto a = Train(*model, p, padded);
    auto b = Train(*model, p, packed);
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    ASSERT_TRUE(a->pack && b->pack);
    EXPECT_NEAR(a->best_eval.loss, b->best_eval.loss, 1e-4);
    ASSERT_EQ(a->pack->methods.size(), b->pack->methods.size());
    for (size_t m = 0; m < a->pack->methods.size(); ++m) {
      for (const auto& [tensor_name, t] : a->pack->methods[m].tensors) {
        SCOPED_TRACE(tensor_name);
        if (absl::StrContains(tensor_name, "key.bias")) continue;  // zero gradient up to rounding (see above)
        EXPECT_LE((t - b->pack->methods[m].tensors.at(tensor_name)).abs().max().item<float>(), 1e-4);
      }
    }
  }
}

TEST(TrainerTest, HeadLearningRateTrainsTheHeadAtItsOwnRate) {
  auto model = TinyBert();
  ASSERT_NE(model, nullptr);
  // One step without warm-up: AdamW's first update is linear in the learning rate (p - lr * (wd * p + g / |g|)),
  // and the delta's gradients at step 1 do not depend on the head's rate.
  TrainingProblem p = KeywordProblem(32, 16, {Lora(4)});
  p.hp.max_steps = 1;
  p.hp.warmup_fraction = 0;
  p.hp.learning_rate = 1e-3;
  auto unset = Train(*model, p);
  p.hp.head_learning_rate = 1e-3;
  auto same = Train(*model, p);
  p.hp.head_learning_rate = 2e-3;
  auto twice = Train(*model, p);
  p.hp.head_learning_rate = 1e-2;
  auto ten = Train(*model, p);
  for (const auto* r : {&unset, &same, &twice, &ten}) ASSERT_TRUE(r->ok()) << r->status();
  // Unset means the delta's rate: the very same pack.
  EXPECT_EQ(PackBytes(*unset), PackBytes(*same));
  ASSERT_TRUE(unset->pack && twice->pack && ten->pack);
  for (const auto& [tensor_name, t] : unset->pack->methods[0].tensors) {
    EXPECT_TRUE(t.equal(ten->pack->methods[0].tensors.at(tensor_name))) << tensor_name;
  }
  for (const auto& [tensor_name, t] : unset->pack->head->tensors) {
    SCOPED_TRACE(tensor_name);
    const at::Tensor step_1e3 = twice->pack->head->tensors.at(tensor_name) - t;  // the update at 2e-3 minus 1e-3
    const at::Tensor step_9e3 = ten->pack->head->tensors.at(tensor_name) - t;   // at 1e-2 minus 1e-3
    EXPECT_GT(step_1e3.abs().max().item<float>(), 5e-4);
    EXPECT_LE((step_9e3 - step_1e3 * 9).abs().max().item<float>(), 1e-5);
  }
}

TEST(TrainerTest, DifferentSeedDiffers) {
  auto model = TinyBert();
  ASSERT_NE(model, nullptr);
  TrainingProblem p = KeywordProblem(32, 16, {Lora(4)});
  p.hp.max_steps = 4;
  auto a = Train(*model, p);
  p.hp.seed = 43;
  auto b = Train(*model, p);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_NE(PackBytes(*a), PackBytes(*b));
}

TEST(TrainerTest, ResumeFromCheckpointGivesTheSamePack) {
  for (const auto& [name, model] : TestModels()) {
    SCOPED_TRACE(name);
    // 40 examples / batch 8 = 5 steps per epoch, 3 epochs; checkpoints every 3 steps and at each epoch's end.
    TrainingProblem p = KeywordProblem(40, 16, {Lora(4), Method(delta::MethodKind::kLnTuning)});
    p.hp.epochs = 3;
    TrainerOptions options = QuietOptions();
    options.checkpoint_every_steps = 3;

    std::vector<int64_t> checkpoint_steps;
    TrainCallbacks plain;
    plain.on_checkpoint = [&](const Checkpoint& c) {
      checkpoint_steps.push_back(c.state["step"].get<int64_t>());
      return absl::OkStatus();
    };
    auto whole = Train(*model, p, options, plain);
    ASSERT_TRUE(whole.ok()) << whole.status();
    EXPECT_EQ(checkpoint_steps, (std::vector<int64_t>{3, 5, 6, 9, 10, 12, 15}));
    const std::string expected = PackBytes(*whole);

    // Interrupted after 7 steps (last checkpoint: step 6, mid-epoch 2), resumed, interrupted again after step 12
    // (checkpoint at 12), resumed to the end.
    std::optional<Checkpoint> last;
    int64_t steps_seen = 0;
    int64_t stop_after = 7;
    TrainCallbacks cb;
    cb.on_progress = [&](const Progress& pr) {
      if (!pr.eval) steps_seen = pr.step;
    };
    cb.on_checkpoint = [&](const Checkpoint& c) {
      for (const auto& [tname, t] : c.tensors) {
        EXPECT_EQ(t.scalar_type(), at::kFloat) << tname;
        EXPECT_TRUE(t.device().is_cpu()) << tname;
      }
      last = Persisted(c);
      return absl::OkStatus();
    };
    cb.is_cancelled = [&] { return steps_seen >= stop_after; };
    auto first = Train(*model, p, options, cb);
    EXPECT_EQ(first.status().code(), absl::StatusCode::kCancelled) << first.status();
    ASSERT_TRUE(last.has_value());
    EXPECT_EQ(last->state["step"], 6);
    EXPECT_EQ(last->state["epoch"], 1);
    EXPECT_EQ(last->state["position"], 1);
    EXPECT_EQ(last->state["best_epoch"], 1);
    bool has_param = false, has_best = false, has_opt = false;
    for (const auto& [tname, t] : last->tensors) {
      has_param = has_param || tname.rfind("param/", 0) == 0;
      has_best = has_best || tname.rfind("best/", 0) == 0;
      has_opt = has_opt || tname.rfind("opt/", 0) == 0;
    }
    EXPECT_TRUE(has_param && has_best && has_opt);

    stop_after = 12;
    Checkpoint resume1 = *last;
    auto second = Train(*model, p, options, cb, &resume1);
    EXPECT_EQ(second.status().code(), absl::StatusCode::kCancelled) << second.status();
    ASSERT_EQ(last->state["step"], 12);

    stop_after = 1000;
    Checkpoint resume2 = *last;
    auto third = Train(*model, p, options, cb, &resume2);
    ASSERT_TRUE(third.ok()) << third.status();
    EXPECT_EQ(third->steps, 15);
    EXPECT_EQ(third->eval_history.size(), 3u);
    EXPECT_EQ(third->best_epoch, whole->best_epoch);
    EXPECT_EQ(PackBytes(*third), expected);

    // Resuming from the final checkpoint returns the same pack without training.
    Checkpoint final_checkpoint = *last;
    EXPECT_EQ(final_checkpoint.state["step"], 15);
    auto again = Train(*model, p, options, {}, &final_checkpoint);
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_EQ(PackBytes(*again), expected);
  }
}

TEST(TrainerTest, ResumeRejectsACheckpointOfAnotherJob) {
  auto model = TinyBert();
  ASSERT_NE(model, nullptr);
  TrainingProblem p = KeywordProblem(40, 16, {Lora(4)});
  p.hp.max_steps = 5;
  std::optional<Checkpoint> last;
  TrainCallbacks cb;
  cb.on_checkpoint = [&](const Checkpoint& c) {
    last = Persisted(c);
    return absl::OkStatus();
  };
  ASSERT_TRUE(Train(*model, p, QuietOptions(), cb).ok());
  ASSERT_TRUE(last.has_value());
  TrainingProblem other = p;
  other.hp.batch_size = 4;  // a different schedule
  auto result = Train(*model, other, QuietOptions(), {}, &*last);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << result.status();
  EXPECT_THAT(std::string(result.status().message()), HasSubstr("checkpoint"));
  Checkpoint garbage;
  garbage.state = {{"hello", 1}};
  result = Train(*model, p, QuietOptions(), {}, &garbage);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << result.status();
}

TEST(TrainerTest, ACheckpointErrorFailsTheJob) {
  auto model = TinyBert();
  ASSERT_NE(model, nullptr);
  TrainingProblem p = KeywordProblem(16, 8, {Lora(4)});
  TrainCallbacks cb;
  cb.on_checkpoint = [](const Checkpoint&) { return absl::UnavailableError("disk full"); };
  auto result = Train(*model, p, QuietOptions(), cb);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kUnavailable) << result.status();
}

// ------------------------------------------------------------------------------------------------------------
// Failures.

TEST(TrainerTest, NanLossAbortsWithReason) {
  auto model = TinyBert();
  ASSERT_NE(model, nullptr);
  // Regression targets of 1e30: their squares overflow float32, so the first loss is infinite.
  TrainingProblem p = KeywordProblem(16, 8, {Lora(4)}, /*regression=*/true);
  for (float& v : p.train_labels.values) v = 1e30f;
  p.hp.learning_rate = 0.5;
  std::optional<Checkpoint> last;
  TrainCallbacks cb;
  cb.on_checkpoint = [&](const Checkpoint& c) {
    last = c;
    return absl::OkStatus();
  };
  auto result = Train(*model, p, QuietOptions(), cb);
  ASSERT_EQ(result.status().code(), absl::StatusCode::kAborted) << result.status();
  EXPECT_THAT(std::string(result.status().message()), HasSubstr("at step 1"));
  EXPECT_THAT(std::string(result.status().message()), HasSubstr("lower the learning rate (now 0.5)"));
  EXPECT_FALSE(last.has_value());
}

TEST(TrainerTest, CancelStopsPromptly) {
  auto model = TinyBert();
  ASSERT_NE(model, nullptr);
  TrainingProblem p = KeywordProblem(64, 16, {Lora(4)});
  p.hp.epochs = 100;
  int64_t steps = 0;
  int64_t steps_after_cancel = 0;
  std::atomic<bool> cancel{false};
  TrainCallbacks cb;
  cb.on_progress = [&](const Progress& pr) {
    if (pr.eval) return;
    steps = pr.step;
    if (cancel) ++steps_after_cancel;
    if (pr.step == 3) cancel = true;
  };
  cb.is_cancelled = [&] { return cancel.load(); };
  const auto start = std::chrono::steady_clock::now();
  auto result = Train(*model, p, QuietOptions(), cb);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(result.status().code(), absl::StatusCode::kCancelled) << result.status();
  EXPECT_EQ(steps, 3);
  EXPECT_EQ(steps_after_cancel, 0);
  EXPECT_LT(seconds, 10);
}

TEST(TrainerTest, RejectsAbsurdHyperParameters) {
  auto model = TinyBert();
  ASSERT_NE(model, nullptr);
  struct Case {
    const char* field;
    std::function<void(HyperParameters*)> set;
  };
  const double nan = std::nan("");
  const std::vector<Case> cases = {
      {"learning_rate", [](HyperParameters* h) { h->learning_rate = 5; }},
      {"learning_rate", [](HyperParameters* h) { h->learning_rate = 0; }},
      {"learning_rate", [&](HyperParameters* h) { h->learning_rate = nan; }},
      {"head_learning_rate", [](HyperParameters* h) { h->head_learning_rate = -1e-3; }},
      {"head_learning_rate", [](HyperParameters* h) { h->head_learning_rate = 2; }},
      {"head_learning_rate", [&](HyperParameters* h) { h->head_learning_rate = nan; }},
      {"epochs", [](HyperParameters* h) { h->epochs = 0; }},
      {"epochs", [](HyperParameters* h) { h->epochs = 1001; }},
      {"max_steps", [](HyperParameters* h) { h->max_steps = -1; }},
      {"max_steps", [](HyperParameters* h) { h->max_steps = 10000001; }},
      {"batch_size", [](HyperParameters* h) { h->batch_size = 0; }},
      {"batch_size", [](HyperParameters* h) { h->batch_size = 4097; }},
      {"warmup_fraction", [](HyperParameters* h) { h->warmup_fraction = 1; }},
      {"warmup_fraction", [](HyperParameters* h) { h->warmup_fraction = -0.1; }},
      {"warmup_fraction", [&](HyperParameters* h) { h->warmup_fraction = nan; }},
      {"warmup_steps", [](HyperParameters* h) { h->warmup_steps = -3; }},
      {"weight_decay", [](HyperParameters* h) { h->weight_decay = 1; }},
      {"weight_decay", [](HyperParameters* h) { h->weight_decay = -1e-3; }},
      {"weight_decay", [&](HyperParameters* h) { h->weight_decay = nan; }},
      {"max_sequence_length", [](HyperParameters* h) { h->max_sequence_length = -1; }},
      {"max_sequence_length", [&](HyperParameters* h) { h->max_sequence_length = 1 << 20; }},
      {"max_sequence_length", [](HyperParameters* h) { h->max_sequence_length = 2; }},  // only BERT's specials
      {"max_grad_norm", [](HyperParameters* h) { h->max_grad_norm = -1; }},
      {"max_grad_norm", [&](HyperParameters* h) { h->max_grad_norm = nan; }},
  };
  HyperParameters valid;
  valid.max_sequence_length = 0;  // the default of 128 is over the tiny model's 64
  EXPECT_TRUE(ValidateHyperParameters(valid, *model).ok());
  for (const Case& c : cases) {
    HyperParameters hp = valid;
    c.set(&hp);
    absl::Status st = ValidateHyperParameters(hp, *model);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << c.field << ": " << st;
    EXPECT_THAT(std::string(st.message()), HasSubstr(c.field));
  }
  HyperParameters hp = valid;
  hp.learning_rate = 5;
  EXPECT_EQ(ValidateHyperParameters(hp, *model).message(), "learning_rate must be in (0, 1], got 5");

  // Run() validates first.
  TrainingProblem p = KeywordProblem(16, 8, {Lora(4)});
  p.hp.batch_size = 0;
  auto result = Train(*model, p);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << result.status();
  EXPECT_THAT(std::string(result.status().message()), HasSubstr("batch_size"));
}

TEST(TrainerTest, RejectsInconsistentProblems) {
  auto model = TinyBert();
  ASSERT_NE(model, nullptr);
  auto expect_invalid = [&](const TrainingProblem& p, const std::string& needle) {
    auto result = Train(*model, p);
    EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << result.status();
    EXPECT_THAT(std::string(result.status().message()), HasSubstr(needle));
  };
  TrainingProblem p = KeywordProblem(16, 8, {Lora(4)});
  TrainingProblem empty_train = p;
  empty_train.train.examples.clear();
  empty_train.train_labels.classes.clear();
  expect_invalid(empty_train, "training split is empty");
  TrainingProblem empty_val = p;
  empty_val.validation.examples.clear();
  empty_val.validation_labels.classes.clear();
  expect_invalid(empty_val, "validation split is empty");
  TrainingProblem other_labels = p;
  other_labels.spec.head.labels = {"a", "b"};
  expect_invalid(other_labels, "label space");
  TrainingProblem wrong_type = p;
  wrong_type.spec.head.type = "regression";
  expect_invalid(wrong_type, "task type");
  TrainingProblem out_of_range = p;
  out_of_range.train_labels.classes[3] = 7;
  expect_invalid(out_of_range, "line 5");
  TrainingProblem bad_method = p;
  bad_method.spec.methods = {Method(delta::MethodKind::kLora, {{"rank", 8}, {"targets", {"no.such.module"}}})};
  EXPECT_EQ(Train(*model, bad_method).status().code(), absl::StatusCode::kInvalidArgument);
  TrainingProblem no_tokens = p;
  no_tokens.train.examples[2].text = "   ";
  expect_invalid(no_tokens, "line 4");
  // Labels filled from the label space when the head names none.
  TrainingProblem unnamed = p;
  unnamed.spec.head.labels.clear();
  unnamed.hp.max_steps = 1;
  auto result = Train(*model, unnamed);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->pack->head->config["labels"], nlohmann::json::array({"neg", "pos"}));
}

// ------------------------------------------------------------------------------------------------------------
// Full fine-tuning.

// A tiny random BERT written to a fresh directory (a `full` job needs the backbone's directory).
std::string WriteTinyBertDir() {
  const std::string dir = delta::testing::MakeTempDir("trainer_bert");
  const int64_t H = 16, L = 1, F = 32, P = 48;
  std::vector<std::string> words = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"};
  for (const auto& w : Fillers()) words.push_back(w);
  for (const auto& w : kPositive) words.push_back(w);
  for (const auto& w : kNegative) words.push_back(w);
  const int64_t V = static_cast<int64_t>(words.size());
  {
    std::ofstream vocab(dir + "/vocab.txt");
    for (const auto& w : words) vocab << w << "\n";
  }
  std::ofstream(dir + "/config.json") << absl::StrCat(
      R"({"model_type": "bert", "vocab_size": )", V, R"(, "hidden_size": )", H, R"(, "num_hidden_layers": )", L,
      R"(, "num_attention_heads": 2, "intermediate_size": )", F, R"(, "max_position_embeddings": )", P,
      R"(, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu"})");
  std::map<std::string, at::Tensor> t;
  uint64_t seed = 100;
  auto rnd = [&](std::vector<int64_t> shape, double scale) {
    return delta::testing::RandomTensor(shape, scale, seed++);
  };
  t["embeddings.word_embeddings.weight"] = rnd({V, H}, 0.5);
  t["embeddings.position_embeddings.weight"] = rnd({P, H}, 0.1);
  t["embeddings.token_type_embeddings.weight"] = rnd({2, H}, 0.1);
  t["embeddings.LayerNorm.weight"] = at::ones({H}) + rnd({H}, 0.1);
  t["embeddings.LayerNorm.bias"] = rnd({H}, 0.1);
  for (int64_t l = 0; l < L; ++l) {
    const std::string p = absl::StrCat("encoder.layer.", l, ".");
    for (const char* n :
         {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"}) {
      t[p + n + ".weight"] = rnd({H, H}, 0.2);
      t[p + n + ".bias"] = rnd({H}, 0.05);
    }
    t[p + "intermediate.dense.weight"] = rnd({F, H}, 0.2);
    t[p + "intermediate.dense.bias"] = rnd({F}, 0.05);
    t[p + "output.dense.weight"] = rnd({H, F}, 0.2);
    t[p + "output.dense.bias"] = rnd({H}, 0.05);
    for (const char* n : {"attention.output.LayerNorm", "output.LayerNorm"}) {
      t[p + n + ".weight"] = at::ones({H}) + rnd({H}, 0.1);
      t[p + n + ".bias"] = rnd({H}, 0.1);
    }
  }
  EXPECT_TRUE(model::WriteSafetensors(dir + "/model.safetensors", t).ok());
  return dir;
}

TEST(TrainerTest, FullFineTuningNeedsTheFlag) {
  auto model = TinyBert();
  ASSERT_NE(model, nullptr);
  TrainingProblem p = KeywordProblem(16, 8, {});
  p.full = true;
  auto result = Train(*model, p);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kFailedPrecondition) << result.status();
  TrainerOptions options = QuietOptions();
  options.allow_full = true;  // but no model directory
  result = Train(*model, p, options);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kFailedPrecondition) << result.status();
  // `full` takes no methods.
  options.model_dir = "/nonexistent";
  p.spec.methods = {Lora(4)};
  result = Train(*model, p, options);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << result.status();
}

void ExpectFullTrainsAPrivateCopy(const model::Model& served, const std::string& dir, int64_t steps) {
  std::map<std::string, at::Tensor> before;
  for (const auto& [name, t] : served.parameters()) before[name] = t.clone();
  TrainingProblem p = KeywordProblem(32, 16, {});
  p.full = true;
  p.hp.max_steps = steps;
  p.hp.learning_rate = 1e-3;
  TrainerOptions options = QuietOptions();
  options.allow_full = true;
  options.model_dir = dir;
  auto result = Train(served, p, options);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_FALSE(result->pack.has_value());
  EXPECT_EQ(result->steps, steps);
  EXPECT_TRUE(result->best_eval.metrics.count("accuracy"));
  EXPECT_GT(result->trainable_parameters, served.info().num_parameters);
  EXPECT_GT(result->optimizer_state_bytes, 8 * served.info().num_parameters / 2);
  for (const auto& [name, t] : served.parameters()) {
    EXPECT_TRUE(at::equal(t, before.at(name))) << name << " changed";
    EXPECT_FALSE(t.requires_grad()) << name;
  }
}

TEST(TrainerTest, FullFineTuningTrainsAPrivateCopy) {
  const std::string dir = WriteTinyBertDir();
  auto loaded = model::LoadModel(dir, {});
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ExpectFullTrainsAPrivateCopy(**loaded, dir, 6);
  // The weights really train: a full run differs from a head-only run (same seed).
  TrainingProblem p = KeywordProblem(32, 16, {});
  p.hp.max_steps = 6;
  auto head_only = Train(**loaded, p);
  ASSERT_TRUE(head_only.ok()) << head_only.status();
  p.full = true;
  TrainerOptions options = QuietOptions();
  options.allow_full = true;
  options.model_dir = dir;
  auto full = Train(**loaded, p, options);
  ASSERT_TRUE(full.ok()) << full.status();
  EXPECT_NE(full->eval_history[0].loss, head_only->eval_history[0].loss);

  if (auto lite = UseLite()) {
    const char* env = std::getenv("DS_USE_LITE_DIR");
    const std::string lite_dir = env != nullptr && *env ? env : std::string(DS_SOURCE_DIR) + "/models/use-lite";
    SCOPED_TRACE("use-lite");
    ExpectFullTrainsAPrivateCopy(*lite, lite_dir, 2);
  }
}

TEST(TrainerTest, FullFineTuningRefusesAnotherBackbone) {
  auto model = TinyBert();
  ASSERT_NE(model, nullptr);
  TrainingProblem p = KeywordProblem(16, 8, {});
  p.full = true;
  TrainerOptions options = QuietOptions();
  options.allow_full = true;
  options.model_dir = WriteTinyBertDir();  // a different random BERT
  auto result = Train(*model, p, options);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kFailedPrecondition) << result.status();
}

// ------------------------------------------------------------------------------------------------------------
// The pack serves what training measured.

// Also for a head alone, which trains on embeddings computed once (the linear-probe path).
TEST(TrainerTest, TrainedPackServesTheTrainingPredictions) {
  for (const auto& [name, model] : TestModels()) {
    for (const bool head_only : {false, true}) {
      SCOPED_TRACE(absl::StrCat(name, head_only ? " head alone" : " lora+ia3+prompt"));
      std::vector<delta::MethodSpec> methods;
      if (!head_only) {
        methods = {Lora(4), Method(delta::MethodKind::kIa3),
                   Method(delta::MethodKind::kPrompt, {{"num_virtual_tokens", 3}})};
      }
      TrainingProblem p = KeywordProblem(48, 40, methods);
      p.spec.head.hidden = 8;
      p.hp.epochs = 2;
      auto result = Train(*model, p);
      ASSERT_TRUE(result.ok()) << result.status();
      ASSERT_TRUE(result->pack.has_value());
      auto pack = delta::DeltaPack::FromContents(*result->pack, *model, {});
      ASSERT_TRUE(pack.ok()) << pack.status();
      ASSERT_NE((*pack)->head(), nullptr);

      std::vector<std::vector<int64_t>> rows;
      const int64_t max_tokens =
          std::min<int64_t>(p.hp.max_sequence_length, model->info().max_sequence_length - (head_only ? 0 : 3));
      for (const Example& e : p.validation.examples) {
        auto ids = EncodeExample(model->tokenizer(), e.text, e.text_pair, max_tokens);
        ASSERT_TRUE(ids.ok()) << ids.status();
        rows.push_back(*ids);
      }
      c10::InferenceMode guard;
      std::vector<const delta::DeltaPack*> packs(rows.size(), pack->get());
      auto hooks = delta::DeltaBatch::Create(packs, *model);
      ASSERT_TRUE(hooks.ok()) << hooks.status();
      auto out = delta::testing::RunRows(*model, rows, hooks->get());
      ASSERT_TRUE(out.ok()) << out.status();
      auto logits = (*pack)->head()->Apply(out->pooled);
      ASSERT_TRUE(logits.ok()) << logits.status();
      at::Tensor target = at::tensor(p.validation_labels.classes, at::kLong);
      const double accuracy = (logits->argmax(1) == target).to(at::kDouble).mean().item<double>();
      const double loss = at::cross_entropy_loss(*logits, target).item<double>();
      EXPECT_DOUBLE_EQ(accuracy, result->best_eval.metrics.at("accuracy"));
      EXPECT_NEAR(loss, result->best_eval.loss, 1e-4);
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Every method kind.

TEST(TrainerTest, EveryMethodKindTrainsForTwoSteps) {
  using K = delta::MethodKind;
  const std::vector<std::vector<delta::MethodSpec>> specs = {
      {Lora(4)},
      {Method(K::kBitFit)},
      {Method(K::kLnTuning)},
      {Method(K::kParallelAdapter, {{"bottleneck", 4}})},
      {Method(K::kIa3)},
      {Method(K::kPrefix, {{"num_virtual_tokens", 4}})},
      {Method(K::kPrompt, {{"num_virtual_tokens", 4}})},
      {Method(K::kAdapter, {{"bottleneck", 4}})},
      {},  // the head alone
      {Lora(4), Method(K::kBitFit), Method(K::kLnTuning), Method(K::kParallelAdapter, {{"bottleneck", 4}}),
       Method(K::kIa3), Method(K::kPrefix, {{"num_virtual_tokens", 2}}), Method(K::kPrompt, {{"num_virtual_tokens", 2}}),
       Method(K::kAdapter, {{"bottleneck", 4}})},
  };
  for (const auto& [name, model] : TestModels()) {
    for (const auto& methods : specs) {
      std::string label = name + ":";
      for (const auto& m : methods) label += std::string(" ") + delta::MethodKindName(m.kind);
      SCOPED_TRACE(label);
      TrainingProblem p = KeywordProblem(16, 8, methods);
      p.hp.max_steps = 2;
      p.hp.warmup_steps = 1;
      auto result = Train(*model, p);
      ASSERT_TRUE(result.ok()) << result.status();
      EXPECT_EQ(result->steps, 2);
      ASSERT_TRUE(result->pack.has_value());
      EXPECT_EQ(result->pack->methods.size(), methods.size());
      auto pack = delta::DeltaPack::FromContents(*result->pack, *model, {});
      EXPECT_TRUE(pack.ok()) << pack.status();
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Sharing the backbone with serving.

TEST(TrainerTest, StepsWaitWhileMergeModeHoldsTheWeights) {
  auto model = TinyBert();
  ASSERT_NE(model, nullptr);
  TrainingProblem p = KeywordProblem(16, 8, {Lora(4)});
  p.hp.max_steps = 2;
  std::atomic<int64_t> steps{0};
  TrainCallbacks cb;
  cb.on_progress = [&](const Progress& pr) {
    if (!pr.eval) steps = pr.step;
  };
  absl::StatusOr<TrainResult> result;
  model->weights_mutex().Lock();  // as a MergedPack does
  std::thread job([&] { result = Train(*model, p, QuietOptions(), cb); });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_EQ(steps.load(), 0);
  model->weights_mutex().Unlock();
  job.join();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(steps.load(), 2);
}

pid_t ThreadId() { return static_cast<pid_t>(::syscall(SYS_gettid)); }

TEST(TrainerTest, ThreadSettingsApplyToTheJobOnly) {
  auto model = TinyBert();
  ASSERT_NE(model, nullptr);
  TrainingProblem p = KeywordProblem(16, 8, {Lora(4)});
  p.hp.max_steps = 1;
  TrainerOptions options = QuietOptions();
  options.threads = 1;
  options.nice = 3;
  const int omp_before = omp_get_max_threads();
  const int nice_before = ::getpriority(PRIO_PROCESS, static_cast<id_t>(ThreadId()));
  int job_threads = -1, job_nice = -100;
  TrainCallbacks cb;
  cb.on_progress = [&](const Progress&) {
    job_threads = omp_get_max_threads();
    job_nice = ::getpriority(PRIO_PROCESS, static_cast<id_t>(ThreadId()));
  };
  auto result = Train(*model, p, options, cb);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(job_threads, 1);
  EXPECT_EQ(job_nice, std::min(19, nice_before + 3));
  EXPECT_EQ(omp_get_max_threads(), omp_before);
  EXPECT_EQ(::getpriority(PRIO_PROCESS, static_cast<id_t>(ThreadId())), nice_before);
}

// ------------------------------------------------------------------------------------------------------------
// EncodeExample.

std::vector<std::string> Pieces(const model::Tokenizer& tok, const std::vector<int64_t>& ids) {
  std::vector<std::string> out;
  for (int64_t id : ids) out.push_back(tok.IdToPiece(id));
  return out;
}

TEST(EncodeExampleTest, BertAddsClsAndSeps) {
  auto model = TinyBert();
  ASSERT_NE(model, nullptr);
  const model::Tokenizer& tok = model->tokenizer();
  ASSERT_EQ(tok.NumSpecialTokens(), 2);
  using V = std::vector<std::string>;
  auto single = EncodeExample(tok, "the cat sat", "", 64);
  ASSERT_TRUE(single.ok()) << single.status();
  EXPECT_EQ(Pieces(tok, *single), (V{"[CLS]", "the", "cat", "sat", "[SEP]"}));
  EXPECT_EQ(*single, *tok.Encode("the cat sat"));
  auto pair = EncodeExample(tok, "the cat", "a dog", 64);
  ASSERT_TRUE(pair.ok()) << pair.status();
  EXPECT_EQ(Pieces(tok, *pair), (V{"[CLS]", "the", "cat", "[SEP]", "a", "dog", "[SEP]"}));
  // Truncation keeps the specials; a single text loses its tail.
  auto cut = EncodeExample(tok, "the cat sat on the mat", "", 5);
  ASSERT_TRUE(cut.ok()) << cut.status();
  EXPECT_EQ(Pieces(tok, *cut), (V{"[CLS]", "the", "cat", "sat", "[SEP]"}));
  // A pair trims the longer text first...
  auto longer = EncodeExample(tok, "the cat sat on the mat", "a dog", 9);
  ASSERT_TRUE(longer.ok()) << longer.status();
  EXPECT_EQ(Pieces(tok, *longer), (V{"[CLS]", "the", "cat", "sat", "on", "[SEP]", "a", "dog", "[SEP]"}));
  auto longer_pair = EncodeExample(tok, "a dog", "the cat sat on the mat", 9);
  ASSERT_TRUE(longer_pair.ok()) << longer_pair.status();
  EXPECT_EQ(Pieces(tok, *longer_pair), (V{"[CLS]", "a", "dog", "[SEP]", "the", "cat", "sat", "on", "[SEP]"}));
  // ... then both alternately (ties trim the pair).
  auto both = EncodeExample(tok, "the cat sat on", "a dog is big", 8);
  ASSERT_TRUE(both.ok()) << both.status();
  EXPECT_EQ(Pieces(tok, *both), (V{"[CLS]", "the", "cat", "sat", "[SEP]", "a", "dog", "[SEP]"}));
  // No room for text, or no tokens at all.
  EXPECT_EQ(EncodeExample(tok, "the cat", "", 2).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(EncodeExample(tok, "the cat", "a dog", 4).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(EncodeExample(tok, "  ", "", 64).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(EncodeExample(tok, "the", " \t ", 64).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(EncodeExampleTest, UseLiteConcatenatesPairs) {
  auto model = UseLite();
  if (model == nullptr) GTEST_SKIP() << "models/use-lite is absent";
  const model::Tokenizer& tok = model->tokenizer();
  ASSERT_EQ(tok.NumSpecialTokens(), 0);
  auto a = tok.Encode("the cat sat on the mat");
  auto b = tok.Encode("a dog");
  ASSERT_TRUE(a.ok() && b.ok());
  auto pair = EncodeExample(tok, "the cat sat on the mat", "a dog", 128);
  ASSERT_TRUE(pair.ok()) << pair.status();
  std::vector<int64_t> expected = *a;
  expected.insert(expected.end(), b->begin(), b->end());
  EXPECT_EQ(*pair, expected);
  const int64_t la = static_cast<int64_t>(a->size()), lb = static_cast<int64_t>(b->size());
  ASSERT_GT(la, lb + 1);
  auto cut = EncodeExample(tok, "the cat sat on the mat", "a dog", la + lb - 1);
  ASSERT_TRUE(cut.ok()) << cut.status();
  expected = std::vector<int64_t>(a->begin(), a->end() - 1);
  expected.insert(expected.end(), b->begin(), b->end());
  EXPECT_EQ(*cut, expected);
}

}  // namespace
}  // namespace tuning
}  // namespace deltaserve
