// tuning_bench: what a delta training step costs next to a full fine-tuning step on the same batch, and how much
// optimizer state each keeps (docs/BENCHMARKS.md, P7).
//
//   tuning_bench [--model_dir=models/use-lite] [--bert_base_dir=/tmp/deltaserve-bert-base]
//                [--models=use-lite,bert-base] [--shapes=32x64,8x128] [--methods=lora,adapter,bitfit,prompt,full]
//                [--rounds=5] [--threads=0] [--clock=wall|cpu] [--breakdown] [--blas=openblas]
//
// The step measured is the real one: for every method a Trainer::Run (server/tuning/trainer.h) trains on a
// dataset of 1 + --rounds batches of B examples that all tokenize to T tokens (texts longer than T, truncated by
// max_sequence_length = T), so each step is one fixed-shape batch: ForwardTrainable with the delta's hooks, the
// head, the loss, backward, gradient clipping and the AdamW update, under the model's weights lock as the server
// runs it. The runs go on at the same time, one thread each, but take turns step by step (a baton passed in the
// on_progress callback): each round runs one step of every method in turn, so that a burst of load on the shared
// machine hits every method alike. A step's time is from the moment its run gets the baton to its progress
// report; the first step of each run (warm-up) is not counted. Ratios to full fine-tuning are taken within a
// round; the table gives medians over rounds and the range.
//
// Methods: LoRA r=8 (alpha 16) on every attention and FFN linear, a Pfeiffer adapter (bottleneck 64), BitFit (every
// bias), prompt tuning (20 virtual tokens), and `full`: every weight of a private float32 copy of the backbone (as
// the trainer does it). Every run trains a 2-class head too.
//
// --sentences=FILE (e.g. ../shared/data/glue-sst2/train.tsv) trains on those texts in file order instead (their
// own lengths, cut at T): a real dataset's mix of short and long rows. --compare_packing runs every method twice,
// with packed batches (model::ForwardInput::pack_tokens, the server's default) and without, in the same rounds, and
// adds a table of the step times and their ratio.
//
// --breakdown also times the step's parts (forward + head + loss, backward, clipping, optimizer), replicating the
// trainer's step with the same public pieces (TrainableDelta, AdamW, ClipGradNorm) on random token ids of the same
// shape, next to a plain inference-mode forward of the batch.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <sys/stat.h>
#include <time.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "tests/bench/bench_models.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "server/model/model_loader.h"
#include "server/model/safetensors.h"
#include "server/service/platform.h"
#include "server/tuning/optimizer.h"
#include "server/tuning/trainable_delta.h"
#include "server/tuning/trainer.h"

ABSL_FLAG(std::string, model_dir, "models/use-lite", "The use-lite model directory.");
ABSL_FLAG(std::string, bert_base_dir, "/tmp/deltaserve-bert-base", "Where the random BERT-base model is kept.");
ABSL_FLAG(std::string, models, "use-lite,bert-base", "Models to measure.");
ABSL_FLAG(std::string, shapes, "32x64,8x128", "Batches to measure, as ROWSxTOKENS.");
ABSL_FLAG(std::string, methods, "lora,adapter,bitfit,prompt,full",
          "Methods to measure (lora, adapter, bitfit, prompt, ia3, ln_tuning, prefix, parallel_adapter, head, "
          "full); ratios are to `full` when it is measured.");
ABSL_FLAG(int, rounds, 5, "Rounds (measured steps per method); medians are reported.");
ABSL_FLAG(std::string, blas, "openblas", "openblas, blis, reference or system.");
ABSL_FLAG(int, threads, 0, "Intra-op threads of the training (0 = every core).");
ABSL_FLAG(std::string, clock, "wall",
          "wall, or cpu: the process's CPU time, steadier on a shared machine but only meaningful with --threads=1 "
          "(idle OpenMP threads spin).");
ABSL_FLAG(int64_t, micro_batch_tokens, 0,
          "Micro-batch size of a step in padded tokens (the server's default is 256; 0 = whole batches, as the P7 "
          "figures in docs/BENCHMARKS.md were measured).");
ABSL_FLAG(bool, breakdown, false, "Also time the parts of a step (forward, backward, clip, optimizer).");
ABSL_FLAG(double, delta_lr, 1e-3, "Learning rate of the delta methods.");
ABSL_FLAG(double, full_lr, 2e-5, "Learning rate of full fine-tuning.");
ABSL_FLAG(std::string, sentences, "",
          "Train on these texts (one per line; TSV: the first column; a header line is skipped) instead of texts "
          "of exactly T tokens.");
ABSL_FLAG(bool, pack_tokens, true, "Packed batches (the server's --pack_tokens).");
ABSL_FLAG(bool, compare_packing, false, "Run every method packed and unpacked, side by side.");

namespace ds = ::deltaserve;
namespace tuning = ::deltaserve::tuning;

namespace {

void Check(const absl::Status& st, const char* what) {
  if (!st.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, st.ToString().c_str());
    std::exit(1);
  }
}

using ::deltaserve::bench::WriteBertBase;  // tests/bench/bench_models.h

// Seconds on the clock --clock names.
double Clock() {
  if (absl::GetFlag(FLAGS_clock) == "cpu") {
    timespec ts;
    ::clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
  }
  return absl::ToUnixNanos(absl::Now()) * 1e-9;
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

// "0.93 (0.91-0.95)": the median and the range.
std::string MedianAndRange(const std::vector<double>& v, int digits) {
  if (v.empty()) return "-";
  return absl::StrFormat("%.*f (%.*f-%.*f)", digits, Median(v), digits, *std::min_element(v.begin(), v.end()), digits,
                         *std::max_element(v.begin(), v.end()));
}

std::vector<double> Scaled(std::vector<double> v, double factor) {
  for (double& x : v) x *= factor;
  return v;
}

std::string WithCommas(int64_t n) {
  std::string s = absl::StrCat(n);
  for (int i = static_cast<int>(s.size()) - 3; i > 0; i -= 3) s.insert(static_cast<size_t>(i), ",");
  return s;
}

// A method under test: its name, the spec it trains (empty for the head alone and for full) and whether it is
// full fine-tuning.
struct Method {
  std::string name;
  std::vector<ds::delta::MethodSpec> specs;
  bool full = false;
  bool pack = true;  // model::ForwardInput::pack_tokens
};

ds::delta::MethodSpec Spec(ds::delta::MethodKind kind, nlohmann::json config) {
  ds::delta::MethodSpec s;
  s.kind = kind;
  s.config = std::move(config);
  return s;
}

Method MakeMethod(const std::string& name, const ds::model::Model& model) {
  using ds::delta::MethodKind;
  Method m;
  m.name = name;
  if (name == "lora") {
    std::vector<std::string> targets;  // every attention and FFN linear, as delta_bench's P1
    for (const auto& mod : model.modules()) {
      if (mod.kind == ds::model::ModuleKind::kLinear && mod.layer >= 0) targets.push_back(mod.name);
    }
    m.name = "lora r=8";
    m.specs.push_back(Spec(MethodKind::kLora, {{"rank", 8}, {"alpha", 16}, {"targets", targets}}));
  } else if (name == "adapter") {
    m.name = "adapter b=64";
    m.specs.push_back(Spec(MethodKind::kAdapter, {{"bottleneck", 64}, {"placement", "pfeiffer"}}));
  } else if (name == "bitfit") {
    m.specs.push_back(Spec(MethodKind::kBitFit, nlohmann::json::object()));
  } else if (name == "prompt") {
    m.name = "prompt P=20";
    m.specs.push_back(Spec(MethodKind::kPrompt, {{"num_virtual_tokens", 20}}));
  } else if (name == "prefix") {
    m.name = "prefix P=20";
    m.specs.push_back(Spec(MethodKind::kPrefix, {{"num_virtual_tokens", 20}}));
  } else if (name == "ia3") {
    m.specs.push_back(Spec(MethodKind::kIa3, nlohmann::json::object()));
  } else if (name == "ln_tuning") {
    m.specs.push_back(Spec(MethodKind::kLnTuning, nlohmann::json::object()));
  } else if (name == "parallel_adapter") {
    m.specs.push_back(Spec(MethodKind::kParallelAdapter, nlohmann::json::object()));
  } else if (name == "head") {
    m.name = "head only";
  } else if (name == "full") {
    m.full = true;
  } else {
    std::fprintf(stderr, "unknown method \"%s\"\n", name.c_str());
    std::exit(2);
  }
  return m;
}

// A text that tokenizes to more than `tokens` tokens on `model`: random vocabulary words (BERT-base's random
// vocabulary is w5..w30521; use-lite knows ordinary words).
std::string LongText(const ds::model::Model& model, int64_t tokens, std::mt19937_64& rng) {
  static const std::vector<std::string> kWords = {"the",   "movie", "was",  "a",     "very",  "good", "bad",
                                                  "film",  "story", "and",  "actors", "plot", "it",   "is",
                                                  "great", "dull",  "long", "funny", "of",    "with", "house"};
  std::string text;
  for (int64_t i = 0; i < 2 * tokens + 8; ++i) {
    if (!text.empty()) text += ' ';
    if (model.info().family == "bert") {
      text += absl::StrCat("w", 5 + rng() % 30000);
    } else {
      text += kWords[rng() % kWords.size()];
    }
  }
  return text;
}

// `steps` batches of `rows` examples of exactly `tokens` tokens each (the texts are longer; max_sequence_length
// truncates them), two classes; a two-example validation split.
// --sentences: the texts of the file, in order (at most `n`).
std::vector<std::string> FileSentences(const std::string& path, size_t n) {
  std::vector<std::string> out = ds::bench::ReadSentences(path, n);
  if (out.empty()) {
    std::fprintf(stderr, "--sentences: no texts in %s\n", path.c_str());
    std::exit(2);
  }
  return out;
}

tuning::TrainingProblem MakeProblem(const ds::model::Model& model, const Method& method, int64_t rows, int64_t tokens,
                                    int64_t steps) {
  tuning::TrainingProblem p;
  p.name = "bench";
  p.spec.methods = method.specs;
  p.spec.head.type = "classification";
  p.spec.head.labels = {"neg", "pos"};
  p.full = method.full;
  p.labels.type = tuning::TaskType::kClassification;
  p.labels.labels = {"neg", "pos"};
  std::mt19937_64 rng(7);
  std::vector<std::string> sentences;
  if (!absl::GetFlag(FLAGS_sentences).empty()) {
    sentences = FileSentences(absl::GetFlag(FLAGS_sentences), static_cast<size_t>(rows * steps));
  }
  auto fill = [&](int64_t n, tuning::Dataset* data, tuning::EncodedLabels* labels) {
    for (int64_t i = 0; i < n; ++i) {
      tuning::Example e;
      e.text = sentences.empty() ? LongText(model, tokens, rng) : sentences[static_cast<size_t>(i) % sentences.size()];
      e.label = i % 2 == 0 ? "pos" : "neg";
      e.line = i + 2;
      data->examples.push_back(std::move(e));
      labels->classes.push_back(i % 2 == 0 ? 1 : 0);
    }
  };
  fill(rows * steps, &p.train, &p.train_labels);
  fill(2, &p.validation, &p.validation_labels);
  p.hp.learning_rate = method.full ? absl::GetFlag(FLAGS_full_lr) : absl::GetFlag(FLAGS_delta_lr);
  p.hp.epochs = 1;
  p.hp.batch_size = rows;
  p.hp.max_sequence_length = tokens;
  p.hp.warmup_steps = 1;
  return p;
}

// Lets one of N runs step at a time, in turn.
class Baton {
 public:
  explicit Baton(int n) : active_(static_cast<size_t>(n), true) {}
  // Waits for run i's turn.
  void Acquire(int i) {
    absl::MutexLock lock(&mu_);
    struct Arg {
      const Baton* baton;
      int i;
    } arg{this, i};
    mu_.Await(absl::Condition(
        +[](Arg* a) ABSL_NO_THREAD_SAFETY_ANALYSIS { return a->baton->turn_ == a->i; }, &arg));
  }
  // Gives the turn to the next active run after i.
  void Pass(int i) {
    absl::MutexLock lock(&mu_);
    Next(i);
  }
  // Run i is done: it takes no more turns.
  void Retire(int i) {
    absl::MutexLock lock(&mu_);
    active_[static_cast<size_t>(i)] = false;
    Next(i);
  }

 private:
  void Next(int i) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const int n = static_cast<int>(active_.size());
    for (int k = 1; k <= n; ++k) {
      const int j = (i + k) % n;
      if (active_[static_cast<size_t>(j)]) {
        turn_ = j;
        return;
      }
    }
    turn_ = -1;
  }
  absl::Mutex mu_;
  int turn_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<bool> active_ ABSL_GUARDED_BY(mu_);
};

struct MethodResult {
  std::vector<double> step_seconds;  // one per round
  int64_t trainable_parameters = 0, model_parameters = 0, optimizer_state_bytes = 0;
  absl::Status status;
};

// Every method's real training steps, round-robin (see the top of the file).
std::vector<MethodResult> MeasureSteps(const ds::model::Model& model, const std::string& dir,
                                       const std::vector<Method>& methods, int64_t rows, int64_t tokens, int rounds) {
  const int n = static_cast<int>(methods.size());
  std::vector<tuning::TrainingProblem> problems;
  for (const Method& m : methods) problems.push_back(MakeProblem(model, m, rows, tokens, 1 + rounds));
  tuning::TrainerOptions options;
  options.model_dir = dir;
  options.allow_full = true;
  options.checkpoint_every_steps = 0;
  options.threads = absl::GetFlag(FLAGS_threads);
  options.nice = 0;
  options.micro_batch_tokens = absl::GetFlag(FLAGS_micro_batch_tokens);
  options.pack_tokens = true;
  const tuning::Trainer packed_trainer(model, options);
  options.pack_tokens = false;
  const tuning::Trainer unpacked_trainer(model, options);
  std::vector<MethodResult> results(static_cast<size_t>(n));
  Baton baton(n);
  std::vector<std::thread> threads;
  for (int i = 0; i < n; ++i) {
    threads.emplace_back([&, i] {
      MethodResult& r = results[static_cast<size_t>(i)];
      double resumed = 0;
      tuning::TrainCallbacks cb;
      cb.on_progress = [&](const tuning::Progress& p) {
        if (p.eval) return;
        const double now = Clock();
        if (p.step >= 2) r.step_seconds.push_back(now - resumed);
        if (p.step >= p.total_steps) return;  // keep the baton through the evaluation and the export
        baton.Pass(i);
        baton.Acquire(i);
        resumed = Clock();
      };
      baton.Acquire(i);
      const tuning::Trainer& trainer = methods[static_cast<size_t>(i)].pack ? packed_trainer : unpacked_trainer;
      auto result = trainer.Run(problems[static_cast<size_t>(i)], nullptr, cb);
      if (result.ok()) {
        r.trainable_parameters = result->trainable_parameters;
        r.model_parameters = result->model_parameters;
        r.optimizer_state_bytes = result->optimizer_state_bytes;
      } else {
        r.status = result.status();
      }
      baton.Retire(i);
    });
  }
  for (std::thread& t : threads) t.join();
  return results;
}

// --breakdown: the trainer's step replicated with its public pieces, each part timed.
struct Parts {
  std::vector<double> forward, backward, clip, optimizer, total, inference;
};

void MeasureBreakdown(const ds::model::Model& served, const std::string& dir, const std::vector<Method>& methods,
                      int64_t rows, int64_t tokens, int rounds, const std::vector<MethodResult>& steps) {
  struct Setup {
    std::unique_ptr<ds::model::Model> private_copy;
    const ds::model::Model* model = nullptr;
    std::unique_ptr<tuning::TrainableDelta> delta;
    std::vector<std::pair<std::string, at::Tensor>> params;
    std::unique_ptr<tuning::AdamW> adam;
    ds::model::ForwardInput input;
  };
  std::vector<Setup> setups(methods.size());
  const int64_t limit = served.info().max_sequence_length;
  for (size_t i = 0; i < methods.size(); ++i) {
    Setup& s = setups[i];
    s.model = &served;
    if (methods[i].full) {
      ds::model::ModelOptions mo;
      mo.dtype = "float32";
      auto loaded = ds::model::LoadModel(dir, mo);
      Check(loaded.status(), "loading the private copy");
      s.private_copy = *std::move(loaded);
      s.model = s.private_copy.get();
    }
    tuning::TrainableSpec spec;
    spec.methods = methods[i].specs;
    spec.head.labels = {"neg", "pos"};
    auto delta = tuning::TrainableDelta::Create(spec, *s.model, 42);
    Check(delta.status(), "TrainableDelta::Create");
    s.delta = *std::move(delta);
    s.params = s.delta->parameters();
    if (methods[i].full) {
      for (const auto& [name, t] : s.private_copy->parameters()) {
        at::Tensor w = t;
        w.requires_grad_(true);
        s.params.emplace_back("backbone/" + name, w);
      }
    }
    s.adam = std::make_unique<tuning::AdamW>(s.params, tuning::AdamWOptions{});
    const int64_t t = std::min(tokens, limit - s.delta->leading_virtual_tokens());
    s.input.input_ids = at::randint(5, std::min<int64_t>(served.info().vocab_size, 7000), {rows, t}, at::kLong);
    s.input.attention_mask = at::ones({rows, t}, at::kBool);
  }
  const at::Tensor target = at::arange(rows, at::kLong).remainder(2);
  std::vector<Parts> parts(methods.size());
  auto step = [&](size_t i, bool record) {
    Setup& s = setups[i];
    Parts& p = parts[i];
    const double t0 = Clock();
    auto out = s.model->ForwardTrainable(s.input, s.delta.get());
    Check(out.status(), "ForwardTrainable");
    auto logits = s.delta->HeadForward(out->pooled);
    Check(logits.status(), "HeadForward");
    at::Tensor loss;
    {
      c10::AutoGradMode grad(true);
      loss = at::cross_entropy_loss(logits->to(at::kFloat), target);
    }
    (void)loss.item<double>();
    const double t1 = Clock();
    loss.backward();
    const double t2 = Clock();
    tuning::ClipGradNorm(s.params, 1.0);
    const double t3 = Clock();
    s.adam->Step(1e-5);
    s.adam->ZeroGrad();
    const double t4 = Clock();
    if (!record) return;
    p.forward.push_back(t1 - t0);
    p.backward.push_back(t2 - t1);
    p.clip.push_back(t3 - t2);
    p.optimizer.push_back(t4 - t3);
    p.total.push_back(t4 - t0);
  };
  auto inference = [&](size_t i) {
    c10::InferenceMode guard;
    const double t0 = Clock();
    Check(served.Forward(setups[i].input, nullptr).status(), "Forward");
    parts[i].inference.push_back(Clock() - t0);
  };
  for (size_t i = 0; i < methods.size(); ++i) step(i, false);
  for (int round = 0; round < rounds; ++round) {
    for (size_t i = 0; i < methods.size(); ++i) {
      step(i, true);
      inference(i);
    }
  }
  for (size_t i = 0; i < methods.size(); ++i) {
    const Parts& p = parts[i];
    const double ms = 1e3;
    std::printf("| %s | %s | %.0f | %.0f | %.1f | %.1f | %.0f | %.0f | %.0f | %.2f |\n",
                absl::StrFormat("%lldx%lld", static_cast<long long>(rows), static_cast<long long>(tokens)).c_str(),
                methods[i].name.c_str(), Median(p.forward) * ms, Median(p.backward) * ms, Median(p.clip) * ms,
                Median(p.optimizer) * ms, Median(p.total) * ms, Median(steps[i].step_seconds) * ms,
                Median(p.inference) * ms, Median(p.backward) / Median(p.forward));
    std::fflush(stdout);
  }
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  Check(ds::SelectBlas(absl::GetFlag(FLAGS_blas), argv), "--blas");
  ds::ConfigureAllocator();
  const int threads = ds::SetIntraOpThreads(absl::GetFlag(FLAGS_threads));
  const int rounds = std::max(1, absl::GetFlag(FLAGS_rounds));
  std::vector<std::pair<int64_t, int64_t>> shapes;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_shapes), ',', absl::SkipEmpty())) {
    std::vector<std::string> parts = absl::StrSplit(s, 'x');
    int64_t b = 0, t = 0;
    if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &b) || !absl::SimpleAtoi(parts[1], &t) || b < 1 || t < 4) {
      std::fprintf(stderr, "--shapes: \"%s\" is not ROWSxTOKENS\n", std::string(s).c_str());
      return 2;
    }
    shapes.emplace_back(b, t);
  }
  std::printf("# tuning_bench: BLAS %s, %d threads, %s clock, %d rounds\n", ds::LoadedBlas().c_str(), threads,
              absl::GetFlag(FLAGS_clock).c_str(), rounds);
  for (absl::string_view name : absl::StrSplit(absl::GetFlag(FLAGS_models), ',', absl::SkipEmpty())) {
    const std::string dir =
        name == "bert-base" ? WriteBertBase(absl::GetFlag(FLAGS_bert_base_dir)) : absl::GetFlag(FLAGS_model_dir);
    auto loaded = ds::model::LoadModel(dir, {});
    Check(loaded.status(), "loading the model");
    const ds::model::Model& model = **loaded;
    std::vector<Method> methods;
    const bool compare = absl::GetFlag(FLAGS_compare_packing);
    for (absl::string_view m : absl::StrSplit(absl::GetFlag(FLAGS_methods), ',', absl::SkipEmpty())) {
      methods.push_back(MakeMethod(std::string(m), model));
      methods.back().pack = compare || absl::GetFlag(FLAGS_pack_tokens);
    }
    const size_t measured = methods.size();  // the ones the main table reports
    if (compare) {
      for (size_t i = 0; i < measured; ++i) {
        Method unpacked = methods[i];
        unpacked.pack = false;
        methods.push_back(std::move(unpacked));
      }
    }
    int full = -1;
    for (size_t i = 0; i < measured; ++i) {
      if (methods[i].full) full = static_cast<int>(i);
    }
    std::printf("\n## %s (%s parameters)\n\n", std::string(name).c_str(),
                WithCommas(model.info().num_parameters).c_str());
    std::printf("| batch | method | step ms | **step / full** | trainable params | %% of model | optimizer state MB "
                "| **state / full** |\n|---|---|---:|---:|---:|---:|---:|---:|\n");
    std::vector<std::vector<MethodResult>> per_shape;
    for (const auto& [rows, tokens] : shapes) {
      std::vector<MethodResult> results = MeasureSteps(model, dir, methods, rows, tokens, rounds);
      for (size_t i = 0; i < measured; ++i) {
        const MethodResult& r = results[i];
        const std::string shape = absl::StrFormat("%lldx%lld", static_cast<long long>(rows),
                                                  static_cast<long long>(tokens));
        if (!r.status.ok()) {
          std::printf("| %s | %s | failed: %s |\n", shape.c_str(), methods[i].name.c_str(), r.status.ToString().c_str());
          continue;
        }
        std::vector<double> ratios;
        std::string state_ratio = "-";
        if (full >= 0 && results[static_cast<size_t>(full)].status.ok()) {
          const MethodResult& f = results[static_cast<size_t>(full)];
          for (size_t k = 0; k < std::min(r.step_seconds.size(), f.step_seconds.size()); ++k) {
            ratios.push_back(r.step_seconds[k] / f.step_seconds[k]);
          }
          const double s = static_cast<double>(r.optimizer_state_bytes) / static_cast<double>(f.optimizer_state_bytes);
          state_ratio = s < 0.01 ? absl::StrFormat("%.3f %%", 100 * s) : absl::StrFormat("%.2f %%", 100 * s);
        }
        std::printf("| %s | %s | %s | %s | %s | %.3f %% | %.2f | %s |\n", shape.c_str(), methods[i].name.c_str(),
                    MedianAndRange(Scaled(r.step_seconds, 1e3), 0).c_str(),
                    MedianAndRange(ratios, 3).c_str(), WithCommas(r.trainable_parameters).c_str(),
                    100.0 * static_cast<double>(r.trainable_parameters) / static_cast<double>(r.model_parameters),
                    static_cast<double>(r.optimizer_state_bytes) / 1048576.0, state_ratio.c_str());
        std::fflush(stdout);
      }
      if (compare) {
        std::printf("\n| batch | method | packed step ms | unpacked step ms | **packed / unpacked** |\n"
                    "|---|---|---:|---:|---:|\n");
        for (size_t i = 0; i < measured; ++i) {
          const MethodResult& p = results[i];
          const MethodResult& u = results[measured + i];
          if (!p.status.ok() || !u.status.ok()) continue;
          std::vector<double> ratios;
          for (size_t k = 0; k < std::min(p.step_seconds.size(), u.step_seconds.size()); ++k) {
            ratios.push_back(p.step_seconds[k] / u.step_seconds[k]);
          }
          std::printf("| %lldx%lld | %s | %.0f | %.0f | %s |\n", static_cast<long long>(rows),
                      static_cast<long long>(tokens), methods[i].name.c_str(), Median(p.step_seconds) * 1e3,
                      Median(u.step_seconds) * 1e3, MedianAndRange(ratios, 3).c_str());
        }
        std::printf("\n");
        std::fflush(stdout);
        results.resize(measured);
      }
      per_shape.push_back(std::move(results));
    }
    if (absl::GetFlag(FLAGS_breakdown)) {
      std::printf("\n| batch | method | forward + head + loss ms | backward ms | clip ms | optimizer ms | step ms "
                  "(replica) | step ms (trainer) | inference forward ms | backward / forward |\n"
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
      for (size_t k = 0; k < shapes.size(); ++k) {
        const std::vector<Method> reported(methods.begin(), methods.begin() + static_cast<int64_t>(measured));
        MeasureBreakdown(model, dir, reported, shapes[k].first, shapes[k].second, rounds, per_shape[k]);
      }
    }
  }
  return 0;
}
