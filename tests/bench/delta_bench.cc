// delta_bench: what per-row deltas cost, measured side by side in one run (docs/BENCHMARKS.md, P1-P3 and merge
// mode).
//
//   delta_bench [--model_dir=models/use-lite] [--bert_base_dir=/tmp/deltaserve-bert-base] [--models=use-lite,bert-base]
//               [--batches=8,32] [--seq_len=32] [--seconds=2] [--blas=openblas] [--p2_tasks=32] [--merge]
//               [--per_method] [--breakdown] [--only=base|p1|p3] [--clock=wall|cpu]
//
// Per model, merge mode's costs: for batches whose rows all carry one pack, merge + restore time and the hooks'
// time per token, their ratio (the break-even batch size) next to the engine's estimate of it
// (delta::MergeBreakEvenTokens), and merged / unmerged at 256 and 1024 tokens. Then, for each batch size B (rows
// of --seq_len random tokens):
//   P1  every row a different LoRA r=8 pack on all attention and FFN linears, in one forward (DeltaBatch),
//       vs the same batch on the base model;
//   P2  --p2_tasks distinct tasks (LoRA r=8 packs), one row each, served mixed (in batches of B rows) vs the
//       naive way a single-adapter library serves them (per task: merge its LoRA into the weights, run its row,
//       unmerge); "bound" is base rows/s over naive rows/s, what P2 would be with free deltas;
//   P3  one batch mixing every method (lora, bitfit, ln_tuning, ia3, adapter, parallel_adapter, prefix, prompt,
//       and combinations), planned into passes as the engine plans them, vs the base model;
//   peak activation memory (LibTorch's CPU allocator) of the base, P1 and P3 batches.
// Timings alternate between the paths so that machine noise hits both alike. "bert-base" is a BERT-base-sized
// model (768 hidden, 12 layers, 12 heads, FFN 3072) with random weights, written once to --bert_base_dir.
#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/InferenceMode.h>
#include <sys/stat.h>
#include <time.h>

#include <algorithm>
#include <cstdio>
#include <mutex>
#include <unordered_map>
#include <fstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "tests/bench/bench_models.h"
#include "absl/flags/parse.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "server/batching/batch_plan.h"
#include "server/delta/delta_batch.h"
#include "server/delta/delta_pack.h"
#include "server/delta/merge.h"
#include "server/model/model_loader.h"
#include "server/model/safetensors.h"
#include "server/service/platform.h"

ABSL_FLAG(std::string, model_dir, "models/use-lite", "The use-lite model directory.");
ABSL_FLAG(std::string, bert_base_dir, "/tmp/deltaserve-bert-base", "Where the random BERT-base model is kept.");
ABSL_FLAG(std::string, models, "use-lite,bert-base", "Models to measure.");
ABSL_FLAG(std::string, batches, "8,32", "Batch sizes (rows).");
ABSL_FLAG(int, seq_len, 32, "Tokens per row.");
ABSL_FLAG(double, seconds, 2, "Measuring time per path and point.");
ABSL_FLAG(std::string, blas, "openblas", "openblas, blis, reference or system.");
ABSL_FLAG(int, threads, 0, "Intra-op threads (0 = every core).");
ABSL_FLAG(std::string, clock, "wall",
          "wall, or cpu: the process's CPU time, steadier on a shared machine but only meaningful with --threads=1 "
          "(idle OpenMP threads spin).");
ABSL_FLAG(bool, pack_tokens, true, "Run batches packed, as the server does by default (--pack_tokens).");
ABSL_FLAG(double, max_padding_ratio, 1.5, "The server's length-split threshold unpacked (--max_padding_ratio).");
ABSL_FLAG(double, packed_max_padding_ratio, 4.0,
          "The server's length-split threshold packed (--packed_max_padding_ratio).");
ABSL_FLAG(bool, per_method, true, "Also measure each method alone (every row a different pack of that kind).");
ABSL_FLAG(int, rounds, 6, "Rounds per measurement: each path runs --seconds / rounds per round; medians are reported.");
ABSL_FLAG(int, p2_tasks, 32, "P2: distinct tasks (one row each) served mixed in batches of B vs merged per task.");
ABSL_FLAG(bool, merge, true, "Measure merge mode's costs (the data for the engine's merge rule).");
ABSL_FLAG(std::string, only, "",
          "Run one path only (base, p1, p3) for --seconds and print its rate: a steady load for `perf record`.");
ABSL_FLAG(bool, breakdown, false, "Also print where the time of P1 and P3 goes (hook points, batch set-up).");

namespace ds = ::deltaserve;
using ds::delta::MethodKind;
using ds::delta::MethodSpec;
using ds::delta::PackContents;

namespace {

// Counts the bytes LibTorch's CPU allocator hands out, to report the peak activation memory of one forward.
// Wraps the default CPU allocator keeping its contract (context == data pointer, a raw deleter), which parts of
// LibTorch assert.
class TrackingAllocator final : public c10::Allocator {
 public:
  explicit TrackingAllocator(c10::Allocator* base) {
    base_ = base;
    base_deleter_ = base->raw_deleter();
  }
  c10::DataPtr allocate(size_t n) const override {
    c10::DataPtr inner = base_->allocate(n);
    void* data = inner.get();
    const c10::Device device = inner.device();
    (void)inner.release_context();  // the base's context is the data pointer; we free it with its raw deleter
    {
      std::lock_guard<std::mutex> lock(mu_);
      sizes_[data] = n;
      current_ += static_cast<int64_t>(n);
      peak_ = std::max(peak_, current_);
    }
    return c10::DataPtr(data, data, &Delete, device);
  }
  c10::DeleterFnPtr raw_deleter() const override { return &Delete; }
  // Starts a new peak measurement; returns the bytes in use now.
  int64_t ResetPeak() {
    std::lock_guard<std::mutex> lock(mu_);
    peak_ = current_;
    return peak_;
  }
  int64_t peak() const {
    std::lock_guard<std::mutex> lock(mu_);
    return peak_;
  }

 private:
  static void Delete(void* p) {
    if (p == nullptr) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = sizes_.find(p);
      if (it != sizes_.end()) {
        current_ -= static_cast<int64_t>(it->second);
        sizes_.erase(it);
      }
    }
    base_deleter_(p);
  }
  static inline c10::Allocator* base_ = nullptr;
  static inline c10::DeleterFnPtr base_deleter_ = nullptr;
  static inline std::mutex mu_;
  static inline std::unordered_map<void*, size_t> sizes_;
  static inline int64_t current_ = 0;
  static inline int64_t peak_ = 0;
};

TrackingAllocator* g_tracker = nullptr;

// Forwards every hook to `inner` and adds up the wall time spent in each hook point (LibTorch runs CPU ops
// synchronously, so this is the time the deltas cost there).
class TimedHooks : public ds::model::ForwardHooks {
 public:
  enum Point { kEmbeddings, kLinearInput, kLinear, kLayerNorm, kKeyValue, kBlockOutput, kNumPoints };
  static constexpr const char* kNames[kNumPoints] = {"embeddings", "linear_input", "linear", "layer_norm",
                                                      "key_value", "block_output"};
  TimedHooks(ds::model::ForwardHooks* inner, double* seconds) : inner_(inner), seconds_(seconds) {}

  bool SupportsPackedTokens() const override { return inner_->SupportsPackedTokens(); }
  void OnTokenLayout(const ds::model::TokenLayout& layout) override { inner_->OnTokenLayout(layout); }
  void OnTokenEmbeddings(at::Tensor* hidden, at::Tensor* mask) override {
    Timed(kEmbeddings, [&] { inner_->OnTokenEmbeddings(hidden, mask); });
  }
  void OnLinearInput(const ds::model::ModuleInfo& m, at::Tensor* input) override {
    Timed(kLinearInput, [&] { inner_->OnLinearInput(m, input); });
  }
  void OnLinear(const ds::model::ModuleInfo& m, const at::Tensor& input, at::Tensor* output) override {
    Timed(kLinear, [&] { inner_->OnLinear(m, input, output); });
  }
  void OnLayerNorm(const ds::model::ModuleInfo& m, const at::Tensor& input, at::Tensor* output) override {
    Timed(kLayerNorm, [&] { inner_->OnLayerNorm(m, input, output); });
  }
  void OnAttentionKeyValue(const ds::model::ModuleInfo& m, at::Tensor* k, at::Tensor* v, at::Tensor* mask) override {
    Timed(kKeyValue, [&] { inner_->OnAttentionKeyValue(m, k, v, mask); });
  }
  void OnBlockOutput(const ds::model::ModuleInfo& m, at::Tensor* hidden) override {
    Timed(kBlockOutput, [&] { inner_->OnBlockOutput(m, hidden); });
  }

 private:
  template <typename F>
  void Timed(Point p, F&& f) {
    const absl::Time start = absl::Now();
    f();
    seconds_[p] += absl::ToDoubleSeconds(absl::Now() - start);
  }
  ds::model::ForwardHooks* inner_;
  double* seconds_;
};

// Where the time of a path goes, per call: [0] the whole call, [1] building the hooks, [2..] each hook point.
struct Breakdown {
  double seconds[2 + TimedHooks::kNumPoints] = {};
  int64_t calls = 0;
  std::string Format() const {
    std::string out = absl::StrFormat("total %.2f ms, hooks set-up %.2f", seconds[0] * 1e3 / calls,
                                      seconds[1] * 1e3 / calls);
    for (int p = 0; p < TimedHooks::kNumPoints; ++p) {
      if (seconds[2 + p] > 0) {
        absl::StrAppendFormat(&out, ", %s %.2f", TimedHooks::kNames[p], seconds[2 + p] * 1e3 / calls);
      }
    }
    return out;
  }
};

void Check(const absl::Status& st, const char* what) {
  if (!st.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, st.ToString().c_str());
    std::exit(1);
  }
}

using ::deltaserve::bench::WriteBertBase;  // tests/bench/bench_models.h

at::Tensor Rand(std::vector<int64_t> shape, double scale) { return at::randn(shape) * scale; }

bool IsAttentionOrFfnLinear(const ds::model::ModuleInfo& m) {
  return m.kind == ds::model::ModuleKind::kLinear && m.layer >= 0;
}

PackContents Base(const ds::model::Model& model, const std::string& name) {
  PackContents c;
  c.manifest.name = name;
  c.manifest.backbone_family = model.info().family;
  c.manifest.backbone_fingerprint = model.info().fingerprint;
  return c;
}

MethodSpec Lora(const ds::model::Model& model, int64_t rank) {
  MethodSpec s;
  s.kind = MethodKind::kLora;
  std::vector<std::string> targets;
  for (const auto& m : model.modules()) {
    if (!IsAttentionOrFfnLinear(m)) continue;
    targets.push_back(m.name);
    s.tensors[m.name + ".lora_A"] = Rand({rank, m.in_features}, 0.02);
    s.tensors[m.name + ".lora_B"] = Rand({m.out_features, rank}, 0.02);
  }
  s.config = {{"rank", rank}, {"alpha", 2 * rank}, {"targets", targets}};
  return s;
}

// One single-method spec of `kind` with typical sizes.
MethodSpec OneMethod(const ds::model::Model& model, MethodKind kind) {
  MethodSpec s;
  s.kind = kind;
  const auto& mods = model.modules();
  switch (kind) {
    case MethodKind::kLora:
      return Lora(model, 8);
    case MethodKind::kBitFit:
      for (const auto& m : mods) {
        if (m.kind == ds::model::ModuleKind::kLinear) s.tensors[m.name + ".bias"] = Rand({m.out_features}, 0.02);
        if (m.kind == ds::model::ModuleKind::kLayerNorm) s.tensors[m.name + ".bias"] = Rand({m.in_features}, 0.02);
      }
      return s;
    case MethodKind::kLnTuning:
      for (const auto& m : mods) {
        if (m.kind != ds::model::ModuleKind::kLayerNorm) continue;
        s.tensors[m.name + ".weight"] = Rand({m.in_features}, 0.02);
        s.tensors[m.name + ".bias"] = Rand({m.in_features}, 0.02);
      }
      return s;
    case MethodKind::kIa3:
      for (const auto& m : mods) {
        if (m.kind != ds::model::ModuleKind::kLinear || m.layer < 0) continue;
        if (absl::EndsWith(m.name, ".key") || absl::EndsWith(m.name, ".value")) {
          s.tensors[m.name + ".ia3_l"] = at::ones({m.out_features}) + Rand({m.out_features}, 0.02);
        } else if (absl::EndsWith(m.name, "layer." + std::to_string(m.layer) + ".output.dense")) {
          s.tensors[m.name + ".ia3_l"] = at::ones({m.in_features}) + Rand({m.in_features}, 0.02);
        }
      }
      return s;
    case MethodKind::kAdapter:
    case MethodKind::kParallelAdapter: {
      const int64_t b = 16;
      std::vector<std::string> targets;
      for (const auto& m : mods) {
        if (m.kind != ds::model::ModuleKind::kBlockOutput) continue;
        if (kind == MethodKind::kParallelAdapter && absl::EndsWith(m.name, "attention.output")) continue;
        targets.push_back(m.name);
        const int64_t h = m.in_features;
        s.tensors[m.name + ".down.weight"] = Rand({b, h}, 0.02);
        s.tensors[m.name + ".down.bias"] = Rand({b}, 0.02);
        s.tensors[m.name + ".up.weight"] = Rand({h, b}, 0.02);
        s.tensors[m.name + ".up.bias"] = Rand({h}, 0.02);
      }
      s.config = {{"bottleneck", b}, {"targets", targets}};
      if (kind == MethodKind::kAdapter) s.config["placement"] = "custom";
      return s;
    }
    case MethodKind::kPrefix:
      s.config = {{"num_virtual_tokens", 10}};
      for (const auto& m : mods) {
        if (m.kind != ds::model::ModuleKind::kAttention) continue;
        s.tensors[m.name + ".prefix_keys"] = Rand({10, m.num_heads * m.head_dim}, 0.02);
        s.tensors[m.name + ".prefix_values"] = Rand({10, m.num_heads * m.head_dim}, 0.02);
      }
      return s;
    case MethodKind::kPrompt:
      s.config = {{"num_virtual_tokens", 10}};
      for (const auto& m : mods) {
        if (m.name == "embeddings.word_embeddings") s.tensors["prompt_embeddings"] = Rand({10, m.out_features}, 0.02);
      }
      return s;
  }
  return s;
}

std::shared_ptr<const ds::delta::DeltaPack> MakePack(const ds::model::Model& model, std::vector<MethodSpec> specs,
                                                     const std::string& name) {
  PackContents c = Base(model, name);
  c.methods = std::move(specs);
  auto pack = ds::delta::DeltaPack::FromContents(std::move(c), model, {});
  Check(pack.status(), "building a pack");
  return *pack;
}

// Seconds on the clock --clock names.
double Clock() {
  if (absl::GetFlag(FLAGS_clock) == "cpu") {
    timespec ts;
    ::clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
  }
  return absl::ToUnixNanos(absl::Now()) * 1e-9;
}

// Runs `fn` repeatedly for `seconds`; returns calls per second.
template <typename F>
double Rate(double seconds, F&& fn) {
  fn();
  int64_t n = 0;
  const double start = Clock();
  while (Clock() - start < seconds) {
    fn();
    ++n;
  }
  return n / (Clock() - start);
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

// "0.93 (0.91-0.95)": the median and the range over rounds.
std::string MedianAndRange(const std::vector<double>& v, int digits) {
  return absl::StrFormat("%.*f (%.*f-%.*f)", digits, Median(v), digits, *std::min_element(v.begin(), v.end()), digits,
                         *std::max_element(v.begin(), v.end()));
}

// Peak bytes LibTorch allocated while `fn` ran, above what was in use before.
template <typename F>
double PeakActivationMb(F&& fn) {
  const int64_t before = g_tracker->ResetPeak();
  fn();
  return (g_tracker->peak() - before) / 1048576.0;
}

// Adds (sign=+1) or removes (-1) a LoRA into the model's weights in place: the naive way's merge / unmerge.
void MergeLora(const ds::model::Model& model, const ds::delta::Method& lora, double sign) {
  const MethodSpec& spec = lora.spec();
  const double scale = spec.config["alpha"].get<double>() / spec.config["rank"].get<double>();
  for (const auto& [name, a] : spec.tensors) {
    if (!absl::EndsWith(name, ".lora_A")) continue;
    const std::string module = name.substr(0, name.size() - 7);
    const at::Tensor& b = spec.tensors.at(module + ".lora_B");
    at::Tensor w = model.parameters().at(module + ".weight");
    w.add_(at::matmul(b, a), sign * scale);  // the parameters are the model's own storage
  }
}


// Merge mode's cost rule: for a batch in which every row carries the same pack, what merging costs (merge +
// restore, without the forward: it does not depend on the batch) and what the unmerged hooks add per token. Their
// ratio is the batch size (in tokens) above which merging pays; merged / unmerged at two sizes checks it.
void MeasureMerge(const ds::model::Model& model, absl::string_view model_name, int64_t len, double secs) {
  struct Case {
    const char* name;
    std::vector<MethodSpec> specs;
  };
  std::vector<Case> cases;
  cases.push_back({"lora r=8, all linears", {Lora(model, 8)}});
  {
    MethodSpec qv = Lora(model, 8);
    std::vector<std::string> targets;
    for (auto it = qv.tensors.begin(); it != qv.tensors.end();) {
      const bool keep = absl::StrContains(it->first, ".query.") || absl::StrContains(it->first, ".value.");
      if (keep && absl::EndsWith(it->first, ".lora_A")) targets.push_back(it->first.substr(0, it->first.size() - 7));
      it = keep ? std::next(it) : qv.tensors.erase(it);
    }
    qv.config["targets"] = targets;
    cases.push_back({"lora r=8, query+value", {qv}});
  }
  cases.push_back({"ia3", {OneMethod(model, MethodKind::kIa3)}});
  {
    MethodSpec bitfit;  // the linears' biases (layer norms' biases are ln_tuning's)
    bitfit.kind = MethodKind::kBitFit;
    std::vector<std::string> targets;
    for (const auto& m : model.modules()) {
      if (m.kind != ds::model::ModuleKind::kLinear || !m.has_bias) continue;
      targets.push_back(m.name);
      bitfit.tensors[m.name + ".bias"] = Rand({m.out_features}, 0.02);
    }
    bitfit.config = {{"targets", targets}};
    cases.push_back({"bitfit", {bitfit}});
  }
  cases.push_back({"ln_tuning", {OneMethod(model, MethodKind::kLnTuning)}});
  cases.push_back({"lora all + bitfit + ln_tuning + ia3",
                   {Lora(model, 8), cases[3].specs[0], OneMethod(model, MethodKind::kLnTuning),
                    OneMethod(model, MethodKind::kIa3)}});
  auto inputs = [&](int64_t rows) {
    ds::model::ForwardInput in;
    in.input_ids = at::randint(5, std::min<int64_t>(model.info().vocab_size, 7000), {rows, len}, at::kLong);
    in.attention_mask = at::ones({rows, len}, at::kBool);
    return in;
  };
  const int64_t big = 32, small = 8;
  const ds::model::ForwardInput big_in = inputs(big), small_in = inputs(small);
  for (const Case& c : cases) {
    auto pack = MakePack(model, c.specs, c.name);
    if (!ds::delta::IsMergeable(*pack, model)) {
      std::printf("| %s | %s | not mergeable |\n", std::string(model_name).c_str(), c.name);
      continue;
    }
    // The time the unmerged path spends on the deltas: building the hooks and running them.
    double delta_seconds = 0;
    int64_t delta_calls = 0;
    auto unmerged = [&](const ds::model::ForwardInput& in, bool timed = false) {
      const absl::Time start = absl::Now();
      auto hooks = ds::delta::DeltaBatch::Create(
          std::vector<const ds::delta::DeltaPack*>(in.input_ids.size(0), pack.get()), model);
      Check(hooks.status(), "DeltaBatch");
      if (!timed) {
        Check(model.Forward(in, hooks->get()).status(), "unmerged");
        return;
      }
      double points[TimedHooks::kNumPoints] = {};
      TimedHooks timed_hooks(hooks->get(), points);
      delta_seconds += absl::ToDoubleSeconds(absl::Now() - start);
      Check(model.Forward(in, &timed_hooks).status(), "unmerged");
      for (double p : points) delta_seconds += p;
      ++delta_calls;
    };
    auto merged = [&](const ds::model::ForwardInput& in) {
      auto m = ds::delta::MergedPack::Merge(*pack, model);
      Check(m.status(), "merge");
      Check(model.Forward(in, nullptr).status(), "merged forward");
      Check((*m)->Restore(), "restore");
    };
    std::vector<double> t_merge_v, r_small_v, r_big_v;
    const int rounds = std::max(1, absl::GetFlag(FLAGS_rounds));
    for (int round = 0; round < rounds; ++round) {
      Rate(secs / (4 * rounds), [&] { unmerged(big_in, /*timed=*/true); });
      t_merge_v.push_back(1 / Rate(secs / (4 * rounds), [&] {
        auto m = ds::delta::MergedPack::Merge(*pack, model);
        Check(m.status(), "merge");
        Check((*m)->Restore(), "restore");
      }));
      r_small_v.push_back(Rate(secs / (8 * rounds), [&] { merged(small_in); }) /
                          Rate(secs / (8 * rounds), [&] { unmerged(small_in); }));
      r_big_v.push_back(Rate(secs / (8 * rounds), [&] { merged(big_in); }) /
                        Rate(secs / (8 * rounds), [&] { unmerged(big_in); }));
    }
    const double t_merge = Median(t_merge_v), r_small = Median(r_small_v), r_big = Median(r_big_v);
    const double per_token = delta_seconds / delta_calls / static_cast<double>(big * len);  // seconds per token
    const double merged_mb = ds::delta::MergedWeightBytes(*pack, model) / 1048576.0;
    std::printf("| %s | %s | %.1f | %.2f | %.2f | %.2f | %s | %lld | %.2f | %.2f |\n",
                std::string(model_name).c_str(), c.name, merged_mb, pack->bytes() / 1048576.0, t_merge * 1e3,
                per_token * 1e6, per_token > 0 ? absl::StrFormat("%.0f", t_merge / per_token).c_str() : "never",
                static_cast<long long>(ds::delta::MergeBreakEvenTokens(*pack, model)), r_small, r_big);
    std::fflush(stdout);
  }
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  Check(ds::SelectBlas(absl::GetFlag(FLAGS_blas), argv), "--blas");
  ds::ConfigureAllocator();
  g_tracker = new TrackingAllocator(c10::GetCPUAllocator());
  c10::SetCPUAllocator(g_tracker, /*priority=*/100);
  const int threads = ds::SetIntraOpThreads(absl::GetFlag(FLAGS_threads));
  const double secs = absl::GetFlag(FLAGS_seconds);
  const int64_t len = absl::GetFlag(FLAGS_seq_len);
  std::vector<int> batches;
  for (absl::string_view b : absl::StrSplit(absl::GetFlag(FLAGS_batches), ',')) {
    int v;
    if (absl::SimpleAtoi(b, &v) && v > 0) batches.push_back(v);
  }
  std::printf("# delta_bench: BLAS %s, %d threads, %lld tokens per row, %.1f s per path and point\n\n",
              ds::LoadedBlas().c_str(), threads, static_cast<long long>(len), secs);
  for (absl::string_view name : absl::StrSplit(absl::GetFlag(FLAGS_models), ',')) {
    const std::string dir =
        name == "bert-base" ? WriteBertBase(absl::GetFlag(FLAGS_bert_base_dir)) : absl::GetFlag(FLAGS_model_dir);
    auto loaded = ds::model::LoadModel(dir, {});
    Check(loaded.status(), "loading the model");
    const ds::model::Model& model = **loaded;
    c10::InferenceMode guard;
    at::manual_seed(1);
    if (absl::GetFlag(FLAGS_merge) && absl::GetFlag(FLAGS_only).empty()) {
      std::printf("\n| model | pack (on every row) | merged weights MB | pack MB | merge + restore ms | unmerged hooks "
                  "us/token | break-even tokens | the engine's estimate | merged / unmerged, %d tokens | merged / "
                  "unmerged, %d tokens |\n"
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
                  static_cast<int>(8 * len), static_cast<int>(32 * len));
      MeasureMerge(model, name, len, secs);
      std::printf("\n");
    }
    std::printf("| model | batch | base rows/s | P1 mixed LoRA rows/s | P1 ratio | P2 naive rows/s | P2 mixed / naive, "
                "%d tasks | P2 bound: base / naive | "
                "P3 all-methods rows/s | P3 ratio | P3 ratio %s | peak activation MB base / P1 / P3 |\n"
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
                absl::GetFlag(FLAGS_p2_tasks), absl::GetFlag(FLAGS_pack_tokens) ? "unpacked" : "packed");
    for (int batch : batches) {
      ds::model::ForwardInput input;
      input.input_ids = at::randint(5, std::min<int64_t>(model.info().vocab_size, 7000), {batch, len}, at::kLong);
      input.attention_mask = at::ones({batch, len}, at::kBool);
      // P1: B distinct LoRA r=8 packs, one per row. P2: --p2_tasks of them, one row each.
      const int tasks = absl::GetFlag(FLAGS_p2_tasks);
      ds::model::ForwardInput task_input;
      task_input.input_ids = at::randint(5, std::min<int64_t>(model.info().vocab_size, 7000), {tasks, len}, at::kLong);
      task_input.attention_mask = at::ones({tasks, len}, at::kBool);
      std::vector<std::shared_ptr<const ds::delta::DeltaPack>> lora_packs;
      std::vector<const ds::delta::DeltaPack*> lora_rows, task_rows;
      for (int i = 0; i < std::max(batch, tasks); ++i) {
        lora_packs.push_back(MakePack(model, {Lora(model, 8)}, absl::StrCat("lora-", i)));
        if (i < batch) lora_rows.push_back(lora_packs.back().get());
        if (i < tasks) task_rows.push_back(lora_packs.back().get());
      }
      // P3: every method alone and in combinations, cycled over the rows.
      const std::vector<std::vector<MethodKind>> mixes = {
          {MethodKind::kLora},     {MethodKind::kBitFit},          {MethodKind::kLnTuning},
          {MethodKind::kIa3},      {MethodKind::kAdapter},         {MethodKind::kParallelAdapter},
          {MethodKind::kPrefix},   {MethodKind::kPrompt},          {MethodKind::kLora, MethodKind::kBitFit},
          {MethodKind::kPrompt, MethodKind::kAdapter}};
      std::vector<std::shared_ptr<const ds::delta::DeltaPack>> mixed_packs;
      std::vector<const ds::delta::DeltaPack*> mixed_rows;
      for (int i = 0; i < batch; ++i) {
        std::vector<MethodSpec> specs;
        for (MethodKind k : mixes[i % mixes.size()]) specs.push_back(OneMethod(model, k));
        mixed_packs.push_back(MakePack(model, std::move(specs), absl::StrCat("mix-", i)));
        mixed_rows.push_back(mixed_packs.back().get());
      }
      auto run_base = [&] { Check(model.Forward(input, nullptr).status(), "base"); };
      // As the server runs a batch: planned into length-sorted passes (prompt tokens count), each one forward
      // with every row's pack.
      auto run_rows = [&](const std::vector<const ds::delta::DeltaPack*>& rows, Breakdown* breakdown = nullptr,
                          const ds::model::ForwardInput* rows_input = nullptr,
                          bool pack_tokens = absl::GetFlag(FLAGS_pack_tokens)) {
        const ds::model::ForwardInput& in = rows_input != nullptr ? *rows_input : input;
        const absl::Time call_start = absl::Now();
        std::vector<int64_t> lengths;
        std::vector<int> groups;  // as InferenceEngine::RunBatch: unpacked, rows with soft tokens apart
        const double ratio = pack_tokens ? absl::GetFlag(FLAGS_packed_max_padding_ratio)
                                         : absl::GetFlag(FLAGS_max_padding_ratio);
        for (const auto* pack : rows) {
          const int64_t added = pack ? pack->added_tokens() : 0;
          lengths.push_back(len + added);
          if (!pack_tokens && ratio > 0) groups.push_back(added > 0 ? 1 : 0);
        }
        for (const auto& pass : ds::batching::PlanForwardPasses(lengths, ratio, groups)) {
          std::vector<const ds::delta::DeltaPack*> pass_rows;
          std::vector<int64_t> index;
          for (size_t i : pass) {
            pass_rows.push_back(rows[i]);
            index.push_back(static_cast<int64_t>(i));
          }
          const bool all = pass.size() == rows.size();
          const at::Tensor idx = at::tensor(index, at::kLong);
          ds::model::ForwardInput sub{all ? in.input_ids : in.input_ids.index_select(0, idx),
                                      all ? in.attention_mask : in.attention_mask.index_select(0, idx),
                                      pack_tokens};
          const absl::Time create_start = absl::Now();
          auto hooks = ds::delta::DeltaBatch::Create(pass_rows, model);
          Check(hooks.status(), "DeltaBatch");
          if (breakdown == nullptr) {
            Check(model.Forward(sub, hooks->get()).status(), "mixed");
            continue;
          }
          breakdown->seconds[1] += absl::ToDoubleSeconds(absl::Now() - create_start);
          TimedHooks timed(hooks->get(), breakdown->seconds + 2);
          Check(model.Forward(sub, hooks->get() ? &timed : nullptr).status(), "mixed");
        }
        if (breakdown != nullptr) {
          breakdown->seconds[0] += absl::ToDoubleSeconds(absl::Now() - call_start);
          ++breakdown->calls;
        }
      };
      // P2 served mixed: the tasks' rows in batches of B (as the batcher takes them in arrival order).
      auto run_tasks_mixed = [&] {
        for (int first = 0; first < tasks; first += batch) {
          const int n = std::min(batch, tasks - first);
          const std::vector<const ds::delta::DeltaPack*> rows(task_rows.begin() + first, task_rows.begin() + first + n);
          const ds::model::ForwardInput chunk{task_input.input_ids.narrow(0, first, n),
                                              task_input.attention_mask.narrow(0, first, n)};
          run_rows(rows, nullptr, &chunk);
        }
      };
      // P2 served naively: per task, merge its LoRA, run its row, unmerge.
      auto run_naive = [&] {
        for (int i = 0; i < tasks; ++i) {
          const ds::delta::Method* lora = task_rows[i]->method(MethodKind::kLora);
          MergeLora(model, *lora, +1);
          ds::model::ForwardInput one{task_input.input_ids.narrow(0, i, 1), task_input.attention_mask.narrow(0, i, 1)};
          Check(model.Forward(one, nullptr).status(), "naive");
          MergeLora(model, *lora, -1);
        }
      };
      if (const std::string only = absl::GetFlag(FLAGS_only); !only.empty()) {
        const double rate = only == "p1"   ? Rate(secs, [&] { run_rows(lora_rows); })
                            : only == "p3" ? Rate(secs, [&] { run_rows(mixed_rows); })
                                           : Rate(secs, run_base);
        std::printf("| %s | %d | %s only: %.1f rows/s |\n", std::string(name).c_str(), batch, only.c_str(),
                    rate * batch);
        continue;
      }
      // Each round measures every path once (secs / rounds each); ratios are taken within a round, and the
      // medians over rounds reported: a burst of load on the shared machine spoils a round, not the figure.
      const int rounds = std::max(1, absl::GetFlag(FLAGS_rounds));
      std::vector<double> base_v, p1_v, p2_v, p3_v, r1, r2, r2_bound, r3, r3_other;
      for (int round = 0; round < rounds; ++round) {
        const double b = Rate(secs / rounds, run_base) * batch;
        const double m1 = Rate(secs / rounds, [&] { run_rows(lora_rows); }) * batch;
        const double m2 = Rate(secs / rounds, run_tasks_mixed) * tasks;
        const double n2 = Rate(secs / rounds, run_naive) * tasks;
        const double b3 = Rate(secs / rounds, run_base) * batch;
        const double m3 = Rate(secs / rounds, [&] { run_rows(mixed_rows); }) * batch;
        // The other layout (unpacked when the engine packs), side by side.
        const bool pack = absl::GetFlag(FLAGS_pack_tokens);
        const double m3_other =
            Rate(secs / rounds, [&] { run_rows(mixed_rows, nullptr, nullptr, !pack); }) * batch;
        base_v.push_back((b + b3) / 2);
        p1_v.push_back(m1);
        p2_v.push_back(n2);
        p3_v.push_back(m3);
        r1.push_back(m1 / b);
        r2.push_back(m2 / n2);
        r2_bound.push_back((b + b3) / 2 / n2);
        r3.push_back(m3 / b3);
        r3_other.push_back(m3_other / b3);
      }
      const double base_mb = PeakActivationMb(run_base);
      const double p1_mb = PeakActivationMb([&] { run_rows(lora_rows); });
      const double p3_mb = PeakActivationMb([&] { run_rows(mixed_rows); });
      if (absl::GetFlag(FLAGS_breakdown)) {
        Breakdown b0, b1, b3;
        auto timed_base = [&] {
          const absl::Time start = absl::Now();
          run_base();
          b0.seconds[0] += absl::ToDoubleSeconds(absl::Now() - start);
          ++b0.calls;
        };
        for (int round = 0; round < 2; ++round) {
          Rate(secs / 4, timed_base);
          Rate(secs / 4, [&] { run_rows(lora_rows, &b1); });
          Rate(secs / 4, [&] { run_rows(mixed_rows, &b3); });
        }
        std::printf("|  | breakdown, batch %d: base %s; P1 %s; P3 %s |\n", batch, b0.Format().c_str(),
                    b1.Format().c_str(), b3.Format().c_str());
      }
      std::printf("| %s | %d | %.1f | %.1f | %s | %.1f | %s | %.2f | %.1f | %s | %s | %.1f / %.1f / %.1f |\n",
                  std::string(name).c_str(), batch, Median(base_v), Median(p1_v), MedianAndRange(r1, 3).c_str(),
                  Median(p2_v), MedianAndRange(r2, 2).c_str(), Median(r2_bound), Median(p3_v),
                  MedianAndRange(r3, 3).c_str(), MedianAndRange(r3_other, 3).c_str(), base_mb, p1_mb, p3_mb);
      std::fflush(stdout);
      if (absl::GetFlag(FLAGS_per_method)) {
        std::string line = absl::StrCat("|  | per method, batch ", batch, ": ");
        for (int k = 0; k < ds::delta::kNumMethodKinds; ++k) {
          const MethodKind kind = static_cast<MethodKind>(k);
          std::vector<std::shared_ptr<const ds::delta::DeltaPack>> packs;
          std::vector<const ds::delta::DeltaPack*> rows;
          for (int i = 0; i < batch; ++i) {
            packs.push_back(MakePack(model, {OneMethod(model, kind)}, absl::StrCat("one-", i)));
            rows.push_back(packs.back().get());
          }
          std::vector<double> ratios;
          for (int round = 0; round < rounds; ++round) {
            const double b = Rate(secs / (2 * rounds), run_base);
            ratios.push_back(Rate(secs / (2 * rounds), [&] { run_rows(rows); }) / b);
          }
          absl::StrAppend(&line, ds::delta::MethodKindName(kind), " ", absl::StrFormat("%.2f", Median(ratios)), "; ");
        }
        std::printf("%s|\n", line.c_str());
        std::fflush(stdout);
      }
    }
  }
  return 0;
}
