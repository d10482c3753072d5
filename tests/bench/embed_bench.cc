// deltaserve_bench: Embed throughput of the served model, measured side by side in one run.
//
//   deltaserve_bench --model_dir=models/use-lite [--sentences=FILE] [--batches=1,8,32] [--seconds=3]
//                    [--blas=openblas] [--dtype=float32] [--threads=0]
//
// For each batch size it alternates rounds of (a) in-process InferenceEngine::Embed and (b) the same request over
// gRPC to a DeltaServer on 127.0.0.1 in this process, and reports sentences/s of both and their ratio. It also
// reports the backbone's GFLOP/s on a plain batched forward (FLOPs counted from the model's linear modules and
// attention shapes). Output: a Markdown table on stdout, one JSON line per row on stderr (for scripts).
#include <ATen/Parallel.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/randint.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "client/client.h"
#include "server/inference/inference_engine.h"
#include "server/model/model_loader.h"
#include "server/service/platform.h"
#include "server/service/server.h"
#include "tests/bench/bench_models.h"

ABSL_FLAG(std::string, model_dir, "models/use-lite", "Model directory.");
ABSL_FLAG(std::string, sentences, "",
          "Text file, one sentence per line (TSV: first column); default: built-in sentences.");
ABSL_FLAG(std::string, batches, "1,8,32", "Batch sizes (sentences per request).");
ABSL_FLAG(double, seconds, 3, "Measuring time per batch size and path.");
ABSL_FLAG(std::string, blas, "openblas", "openblas, blis, reference or system.");
ABSL_FLAG(std::string, dtype, "float32", "float32 or bfloat16.");
ABSL_FLAG(int, threads, 0, "Intra-op threads (0 = every core).");
ABSL_FLAG(bool, pack_tokens, true, "The engine's --pack_tokens (the default path).");
ABSL_FLAG(double, packed_max_padding_ratio, 4.0, "The engine's length-split threshold packed (0 = never split).");
ABSL_FLAG(double, max_padding_ratio, 1.5, "The engine's length-split threshold unpacked (0 = one forward per batch).");

namespace {

std::vector<std::string> LoadSentences(const std::string& path) {
  std::vector<std::string> out;
  if (!path.empty()) out = deltaserve::bench::ReadSentences(path, 4096);
  if (out.empty()) {
    out = {"hello world",
           "The quick brown fox jumps over the lazy dog.",
           "it 's a charming and often affecting journey .",
           "I love this movie.",
           "This film is wonderful.",
           "The stock market fell sharply today.",
           "a gorgeous , witty , seductive movie .",
           "the story is predictable and the characters are thin .",
           "Delta tuning adapts one frozen model to many tasks by training a small delta.",
           "Requests for different tasks are batched together into one forward pass."};
  }
  return out;
}

// Runs `fn` (which embeds `batch` sentences) repeatedly for `seconds`; returns sentences per second.
template <typename F>
double Throughput(int batch, double seconds, F&& fn) {
  fn();  // warm-up
  int64_t sentences = 0;
  const absl::Time start = absl::Now();
  const absl::Time end = start + absl::Seconds(seconds);
  while (absl::Now() < end) {
    fn();
    sentences += batch;
  }
  return sentences / absl::ToDoubleSeconds(absl::Now() - start);
}

// FLOPs of one forward over `tokens` tokens in rows of length `len`: 2*in*out per linear per token, plus
// attention scores and weighted sums (2 * 2 * len * width per token per attention module).
double ForwardFlops(const deltaserve::model::Model& model, int64_t tokens, int64_t len) {
  double per_token = 0;
  for (const auto& m : model.modules()) {
    if (m.kind == deltaserve::model::ModuleKind::kLinear) per_token += 2.0 * m.in_features * m.out_features;
    if (m.kind == deltaserve::model::ModuleKind::kAttention) per_token += 4.0 * len * m.out_features;
  }
  return per_token * tokens;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  if (auto st = deltaserve::SelectBlas(absl::GetFlag(FLAGS_blas), argv); !st.ok()) {
    std::fprintf(stderr, "%s\n", std::string(st.message()).c_str());
    return 2;
  }
  deltaserve::ConfigureAllocator();
  const int threads = deltaserve::SetIntraOpThreads(absl::GetFlag(FLAGS_threads));
  const std::vector<std::string> sentences = LoadSentences(absl::GetFlag(FLAGS_sentences));
  std::vector<int> batches;
  for (absl::string_view b : absl::StrSplit(absl::GetFlag(FLAGS_batches), ',')) {
    int v;
    if (absl::SimpleAtoi(b, &v) && v > 0) batches.push_back(v);
  }
  const double seconds = absl::GetFlag(FLAGS_seconds);

  deltaserve::service::DeltaServer::Options options;
  options.listen_address = "127.0.0.1:0";
  options.metrics_address = "";
  options.model_dir = absl::GetFlag(FLAGS_model_dir);
  options.model.dtype = absl::GetFlag(FLAGS_dtype);
  options.engine.max_inputs_per_request = 1024;
  options.engine.batching.max_queue_delay = absl::ZeroDuration();
  options.engine.batching.max_batch_rows = 64;
  options.engine.pack_tokens = absl::GetFlag(FLAGS_pack_tokens);
  options.engine.packed_max_padding_ratio = absl::GetFlag(FLAGS_packed_max_padding_ratio);
  options.engine.max_padding_ratio = absl::GetFlag(FLAGS_max_padding_ratio);
  options.blas = deltaserve::LoadedBlas();
  options.intra_op_threads = threads;
  auto server = deltaserve::service::DeltaServer::Start(options);
  if (!server.ok()) {
    std::fprintf(stderr, "cannot start: %s\n", server.status().ToString().c_str());
    return 1;
  }
  // The in-process path: an engine over the same model object the server serves.
  std::shared_ptr<const deltaserve::model::Model> model(&(*server)->model(), [](const auto*) {});
  auto engine = deltaserve::inference::InferenceEngine::Create(model, options.engine, nullptr);
  // Unpacked engines: padded passes split by length (the default before packing), and one padded pass per batch
  // (what padding costs).
  deltaserve::inference::InferenceEngine::Options split_options = options.engine;
  split_options.pack_tokens = false;
  auto split = deltaserve::inference::InferenceEngine::Create(model, split_options, nullptr);
  deltaserve::inference::InferenceEngine::Options unsplit_options = split_options;
  unsplit_options.max_padding_ratio = 0;
  auto unsplit = deltaserve::inference::InferenceEngine::Create(model, unsplit_options, nullptr);
  deltaserve::client::DeltaserveClient::Options copts;
  copts.target = "127.0.0.1:" + std::to_string((*server)->port());
  deltaserve::client::DeltaserveClient client(copts);

  const auto& info = model->info();
  std::printf("model %s (%s, %lld parameters), dtype %s, BLAS %s, %d threads, %zu distinct sentences\n\n",
              info.name.c_str(), info.family.c_str(), static_cast<long long>(info.num_parameters),
              info.dtype.c_str(), options.blas.c_str(), threads, sentences.size());
  std::printf(
      "| batch | in-process sent/s | gRPC sent/s | gRPC / in-process | unpacked, length split | default / that | "
      "unpacked, no split | default / that |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  for (int batch : batches) {
    size_t cursor = 0;
    auto next = [&] {
      std::vector<std::string> texts;
      for (int i = 0; i < batch; ++i) texts.push_back(sentences[(cursor++) % sentences.size()]);
      return texts;
    };
    double in_process = 0, grpc = 0, split_sps = 0, no_split = 0;
    // Alternate halves so that machine noise hits both paths alike.
    for (int round = 0; round < 2; ++round) {
      in_process += Throughput(batch, seconds / 2, [&] {
        deltaserve::inference::EmbedRequest request;
        request.texts = next();
        auto r = (*engine)->Embed(request, {});
        if (!r.ok()) std::fprintf(stderr, "embed: %s\n", r.status().ToString().c_str());
      });
      grpc += Throughput(batch, seconds / 2, [&] {
        auto r = client.EmbedTexts(next());
        if (!r.ok()) std::fprintf(stderr, "grpc embed: %s\n", r.status().ToString().c_str());
      });
      split_sps += Throughput(batch, seconds / 2, [&] {
        deltaserve::inference::EmbedRequest request;
        request.texts = next();
        auto r = (*split)->Embed(request, {});
        if (!r.ok()) std::fprintf(stderr, "embed: %s\n", r.status().ToString().c_str());
      });
      no_split += Throughput(batch, seconds / 2, [&] {
        deltaserve::inference::EmbedRequest request;
        request.texts = next();
        auto r = (*unsplit)->Embed(request, {});
        if (!r.ok()) std::fprintf(stderr, "embed: %s\n", r.status().ToString().c_str());
      });
    }
    in_process /= 2;
    grpc /= 2;
    split_sps /= 2;
    no_split /= 2;
    std::printf("| %d | %.1f | %.1f | %.3f | %.1f | %.3f | %.1f | %.3f |\n", batch, in_process, grpc,
                grpc / in_process, split_sps, in_process / split_sps, no_split, in_process / no_split);
    std::fprintf(stderr,
                 "{\"batch\": %d, \"in_process_sps\": %.2f, \"grpc_sps\": %.2f, \"split_sps\": %.2f, "
                 "\"no_split_sps\": %.2f}\n",
                 batch, in_process, grpc, split_sps, no_split);
  }

  // Backbone GFLOP/s: a plain forward of 32 rows x 32 tokens of random ids.
  const int64_t rows = 32, len = 32;
  deltaserve::model::ForwardInput input;
  input.input_ids = at::randint(1, std::min<int64_t>(info.vocab_size, 1000), {rows, len}, at::kLong);
  input.attention_mask = at::ones({rows, len}, at::kBool);
  (void)model->Forward(input, nullptr);
  int iters = 0;
  const absl::Time start = absl::Now();
  while (absl::Now() - start < absl::Seconds(seconds)) {
    (void)model->Forward(input, nullptr);
    ++iters;
  }
  const double secs = absl::ToDoubleSeconds(absl::Now() - start);
  const double gflops = ForwardFlops(*model, rows * len, len) * iters / secs / 1e9;
  std::printf("\nbackbone forward, %lld x %lld tokens: %.2f ms per pass, %.1f GFLOP/s\n",
              static_cast<long long>(rows), static_cast<long long>(len), secs / iters * 1e3, gflops);
  std::fprintf(stderr, "{\"forward_ms\": %.3f, \"gflops\": %.2f}\n", secs / iters * 1e3, gflops);
  (*server)->Shutdown(absl::Seconds(1));
  return 0;
}
