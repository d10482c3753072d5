// delta_bench: what per-row deltas cost, measured side by side in one run (docs/BENCHMARKS.md, P1-P3).
//
//   delta_bench [--model_dir=models/use-lite] [--bert_base_dir=/tmp/deltaserve-bert-base] [--models=use-lite,bert-base]
//               [--batches=8,32] [--seq_len=32] [--seconds=2] [--blas=openblas]
//
// For each model and batch size B (rows of --seq_len random tokens):
//   P1  every row a different LoRA r=8 pack on all attention and FFN linears, in one forward (DeltaBatch),
//       vs the same batch on the base model;
//   P2  the same mixed batch vs the naive way: group rows by task, and per task merge its LoRA into the weights,
//       run its rows, unmerge (B distinct tasks);
//   P3  one batch mixing every method (lora, bitfit, ln_tuning, ia3, adapter, parallel_adapter, prefix, prompt,
//       and combinations) vs the base model;
//   peak resident memory (VmHWM, reset before each) of the mixed batch vs the base batch.
// Timings alternate between the paths so that machine noise hits both alike. "bert-base" is a BERT-base-sized
// model (768 hidden, 12 layers, 12 heads, FFN 3072) with random weights, written once to --bert_base_dir.
#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/InferenceMode.h>
#include <sys/stat.h>

#include <cstdio>
#include <mutex>
#include <unordered_map>
#include <fstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
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
ABSL_FLAG(double, max_padding_ratio, 1.5, "The server's length-split threshold (--max_padding_ratio).");
ABSL_FLAG(bool, per_method, true, "Also measure each method alone (every row a different pack of that kind).");

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

bool Exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

void Check(const absl::Status& st, const char* what) {
  if (!st.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, st.ToString().c_str());
    std::exit(1);
  }
}

std::string WriteBertBase(const std::string& dir) {
  if (Exists(dir + "/model.safetensors")) return dir;
  ::mkdir(dir.c_str(), 0755);
  const int64_t H = 768, L = 12, F = 3072, V = 30522, P = 512;
  {
    std::ofstream vocab(dir + "/vocab.txt");
    vocab << "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n";
    for (int64_t i = 5; i < V; ++i) vocab << "w" << i << "\n";
  }
  std::ofstream(dir + "/config.json") << absl::StrCat(
      R"({"model_type": "bert", "vocab_size": )", V, R"(, "hidden_size": )", H, R"(, "num_hidden_layers": )", L,
      R"(, "num_attention_heads": 12, "intermediate_size": )", F, R"(, "max_position_embeddings": )", P, "}");
  at::manual_seed(0);
  std::map<std::string, at::Tensor> t;
  auto rnd = [](std::vector<int64_t> shape) { return at::randn(shape) * 0.02; };
  t["embeddings.word_embeddings.weight"] = rnd({V, H});
  t["embeddings.position_embeddings.weight"] = rnd({P, H});
  t["embeddings.token_type_embeddings.weight"] = rnd({2, H});
  t["embeddings.LayerNorm.weight"] = at::ones({H});
  t["embeddings.LayerNorm.bias"] = at::zeros({H});
  for (int64_t l = 0; l < L; ++l) {
    const std::string p = absl::StrCat("encoder.layer.", l, ".");
    for (const char* n : {"attention.self.query", "attention.self.key", "attention.self.value",
                          "attention.output.dense"}) {
      t[p + n + ".weight"] = rnd({H, H});
      t[p + n + ".bias"] = at::zeros({H});
    }
    t[p + "intermediate.dense.weight"] = rnd({F, H});
    t[p + "intermediate.dense.bias"] = at::zeros({F});
    t[p + "output.dense.weight"] = rnd({H, F});
    t[p + "output.dense.bias"] = at::zeros({H});
    for (const char* n : {"attention.output.LayerNorm", "output.LayerNorm"}) {
      t[p + n + ".weight"] = at::ones({H});
      t[p + n + ".bias"] = at::zeros({H});
    }
  }
  Check(ds::model::WriteSafetensors(dir + "/model.safetensors", t), "writing bert-base");
  return dir;
}

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

// Runs `fn` repeatedly for `seconds`; returns calls per second.
template <typename F>
double Rate(double seconds, F&& fn) {
  fn();
  int64_t n = 0;
  const absl::Time start = absl::Now();
  while (absl::Now() - start < absl::Seconds(seconds)) {
    fn();
    ++n;
  }
  return n / absl::ToDoubleSeconds(absl::Now() - start);
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
  std::printf("| model | batch | base rows/s | P1 mixed LoRA rows/s | P1 ratio | P2 naive rows/s | P2 mixed / naive | "
              "P3 all-methods rows/s | P3 ratio | peak activation MB base / P1 / P3 |\n"
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  for (absl::string_view name : absl::StrSplit(absl::GetFlag(FLAGS_models), ',')) {
    const std::string dir =
        name == "bert-base" ? WriteBertBase(absl::GetFlag(FLAGS_bert_base_dir)) : absl::GetFlag(FLAGS_model_dir);
    auto loaded = ds::model::LoadModel(dir, {});
    Check(loaded.status(), "loading the model");
    const ds::model::Model& model = **loaded;
    c10::InferenceMode guard;
    at::manual_seed(1);
    for (int batch : batches) {
      ds::model::ForwardInput input;
      input.input_ids = at::randint(5, std::min<int64_t>(model.info().vocab_size, 7000), {batch, len}, at::kLong);
      input.attention_mask = at::ones({batch, len}, at::kBool);
      // P1 / P2: B distinct LoRA r=8 packs, one per row.
      std::vector<std::shared_ptr<const ds::delta::DeltaPack>> lora_packs;
      std::vector<const ds::delta::DeltaPack*> lora_rows;
      for (int i = 0; i < batch; ++i) {
        lora_packs.push_back(MakePack(model, {Lora(model, 8)}, absl::StrCat("lora-", i)));
        lora_rows.push_back(lora_packs.back().get());
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
      auto run_rows = [&](const std::vector<const ds::delta::DeltaPack*>& rows) {
        std::vector<int64_t> lengths;
        for (const auto* pack : rows) lengths.push_back(len + (pack ? pack->added_tokens() : 0));
        for (const auto& pass : ds::batching::PlanForwardPasses(lengths, absl::GetFlag(FLAGS_max_padding_ratio))) {
          std::vector<const ds::delta::DeltaPack*> pass_rows;
          std::vector<int64_t> index;
          for (size_t i : pass) {
            pass_rows.push_back(rows[i]);
            index.push_back(static_cast<int64_t>(i));
          }
          const bool all = pass.size() == rows.size();
          const at::Tensor idx = at::tensor(index, at::kLong);
          ds::model::ForwardInput sub{all ? input.input_ids : input.input_ids.index_select(0, idx),
                                      all ? input.attention_mask : input.attention_mask.index_select(0, idx)};
          auto hooks = ds::delta::DeltaBatch::Create(pass_rows, model);
          Check(hooks.status(), "DeltaBatch");
          Check(model.Forward(sub, hooks->get()).status(), "mixed");
        }
      };
      auto run_naive = [&] {
        for (int i = 0; i < batch; ++i) {  // one task per row: merge, run its row, unmerge
          const ds::delta::Method* lora = lora_rows[i]->method(MethodKind::kLora);
          MergeLora(model, *lora, +1);
          ds::model::ForwardInput one{input.input_ids.narrow(0, i, 1), input.attention_mask.narrow(0, i, 1)};
          Check(model.Forward(one, nullptr).status(), "naive");
          MergeLora(model, *lora, -1);
        }
      };
      double base = 0, p1 = 0, p2 = 0, base3 = 0, p3 = 0;
      for (int round = 0; round < 2; ++round) {
        base += Rate(secs / 2, run_base) * batch;
        p1 += Rate(secs / 2, [&] { run_rows(lora_rows); }) * batch;
        p2 += Rate(secs / 2, run_naive) * batch;
        base3 += Rate(secs / 2, run_base) * batch;
        p3 += Rate(secs / 2, [&] { run_rows(mixed_rows); }) * batch;
      }
      const double base_mb = PeakActivationMb(run_base);
      const double p1_mb = PeakActivationMb([&] { run_rows(lora_rows); });
      const double p3_mb = PeakActivationMb([&] { run_rows(mixed_rows); });
      base /= 2, p1 /= 2, p2 /= 2, base3 /= 2, p3 /= 2;
      const double base_all = (base + base3) / 2;
      std::printf("| %s | %d | %.1f | %.1f | %.3f | %.1f | %.2f | %.1f | %.3f | %.1f / %.1f / %.1f |\n",
                  std::string(name).c_str(), batch, base_all, p1, p1 / base, p2, p1 / p2, p3, p3 / base3, base_mb,
                  p1_mb, p3_mb);
      std::fflush(stdout);
      {
        // Merge mode: one LoRA pack on every row, unmerged hooks vs merge + plain forward + restore.
        std::vector<const ds::delta::DeltaPack*> same(batch, lora_rows[0]);
        double unmerged = 0, merged = 0;
        for (int round = 0; round < 2; ++round) {
          unmerged += Rate(secs / 4, [&] { run_rows(same); });
          merged += Rate(secs / 4, [&] {
            auto m = ds::delta::MergedPack::Merge(*lora_rows[0], model);
            Check(m.status(), "merge");
            Check(model.Forward(input, nullptr).status(), "merged forward");
          });
        }
        std::printf("|  | one LoRA on all %d rows: merged / unmerged %.2f |\n", batch, merged / unmerged);
      }
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
          double b = 0, m = 0;
          for (int round = 0; round < 2; ++round) {
            b += Rate(secs / 4, run_base);
            m += Rate(secs / 4, [&] { run_rows(rows); });
          }
          absl::StrAppend(&line, ds::delta::MethodKindName(kind), " ", absl::StrFormat("%.2f", m / b), "; ");
        }
        std::printf("%s|\n", line.c_str());
        std::fflush(stdout);
      }
    }
  }
  return 0;
}
