// serving_bench: multi-tenant serving figures of docs/BENCHMARKS.md ("Multi-tenant serving (P4, P5)").
//
//   --bench=p4   Starts a DeltaServer in this process (use-lite, filesystem store in a temp directory), pushes
//                --tasks LoRA packs (--methods) with the load generator's setup, sets the delta cache's device tier
//                to hold --cache_fraction of them (host tier: --host_cache_fraction), and alternates rounds of the
//                same closed-loop load (--concurrency clients, --batch texts per Embed) through loopback gRPC:
//                  multi:  each request's task drawn Zipf(--zipf_s) over the K tasks;
//                  single: every request on task 0 (the most popular one).
//                Prints inputs/s, p50/p99 and, from the server's /metrics, cache hit ratio, loads, rows and
//                distinct deltas per batch; the P4 ratio is multi / single (goal >= 0.80). Also setup time and RSS.
//   --bench=p5   In-process DeltaManager + filesystem store + model: per round, a new LoRA pack (fresh digest) is
//                pushed, then Resolve() turns it from stored bytes into a servable pack (cold: both cache tiers are
//                0 bytes), and one batch-1 forward pass of an SST-2 sentence runs; the P5 ratio is median cold load
//                / median forward (goal <= 1). The load is broken down into store read and parse + bind.
//   --bench=e2e  P1 / P3 end to end: the same closed-loop Embed load through the server on the base model, on
//                --e2e_tasks LoRA tasks drawn uniformly (P1: every row of a batch a different LoRA), and on as many
//                mixed-method tasks (P3), all packs resident; ratios to the base model.
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <cstdio>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "ATen/ATen.h"
#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "c10/core/InferenceMode.h"
#include "client/client.h"
#include "client/loadgen/load_report.h"
#include "client/loadgen/load_runner.h"
#include "client/loadgen/metrics_scrape.h"
#include "client/loadgen/pack_gen.h"
#include "client/loadgen/task_setup.h"
#include "client/loadgen/workload.h"
#include "client/loadgen/zipf.h"
#include "delta_store/fs_store.h"
#include "server/common/sha256.h"
#include "server/delta/delta_pack.h"
#include "server/deltas/delta_manager.h"
#include "server/model/model_loader.h"
#include "server/service/platform.h"
#include "server/service/server.h"

ABSL_FLAG(std::string, bench, "p4,p5", "Which benchmarks: p4, p5, e2e (comma separated).");
ABSL_FLAG(std::string, model_dir, "models/use-lite", "The model directory.");
ABSL_FLAG(std::string, texts, "", "Texts file (default ../shared/data/glue-sst2/train.tsv when present).");
ABSL_FLAG(std::string, dir, "", "Scratch directory for the stores (default: a new one under /tmp).");
// P4
ABSL_FLAG(int64_t, tasks, 1000, "P4: registered tasks (deltas).");
ABSL_FLAG(double, zipf_s, 1.0, "P4: Zipf exponent of task popularity.");
ABSL_FLAG(std::string, methods, "lora", "P4: pack recipes (as deltaserve-loadgen --methods).");
ABSL_FLAG(double, cache_fraction, 0.10, "P4: device cache tier as a share of all packs' device bytes.");
ABSL_FLAG(double, host_cache_fraction, 0.0, "P4: host cache tier as a share of all packs' serialized bytes.");
ABSL_FLAG(int, concurrency, 16, "P4 / e2e: closed-loop clients.");
ABSL_FLAG(bool, pack_tokens, true, "The server's --pack_tokens.");
ABSL_FLAG(int, batch, 1, "P4 / e2e: texts per request.");
ABSL_FLAG(double, round_s, 5, "P4 / e2e: measuring seconds per round and mode.");
ABSL_FLAG(double, warmup_s, 2, "P4 / e2e: warm-up seconds before each round.");
ABSL_FLAG(int, rounds, 3, "P4 / e2e: rounds (modes alternate within each round).");
ABSL_FLAG(int, setup_threads, 2, "P4 / e2e: pushes in flight during setup.");
// P5
ABSL_FLAG(int, p5_rounds, 30, "P5: cold loads (and forwards) measured.");
ABSL_FLAG(std::string, p5_ranks, "8,64", "P5: LoRA ranks to measure.");
// e2e
ABSL_FLAG(int64_t, e2e_tasks, 64, "e2e: tasks per mode (uniform draws, all resident).");

namespace ds = deltaserve;
namespace lg = deltaserve::loadgen;

namespace {

void Die(const std::string& what, const absl::Status& st) {
  std::fprintf(stderr, "serving_bench: %s: %s\n", what.c_str(), st.ToString().c_str());
  std::exit(1);
}

double RssMb(const char* field = "VmRSS:") {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field, 0) == 0) return std::stod(line.substr(std::strlen(field))) / 1024.0;
  }
  return 0;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return lg::Percentile(v, 50);
}
double P90(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return lg::Percentile(v, 90);
}

std::vector<std::string> Texts() {
  std::string path = absl::GetFlag(FLAGS_texts);
  if (path.empty() && access("../shared/data/glue-sst2/train.tsv", R_OK) == 0) {
    path = "../shared/data/glue-sst2/train.tsv";
  }
  if (path.empty()) return lg::BuiltinTexts();
  absl::StatusOr<std::vector<std::string>> texts = lg::LoadTexts(path, 4096);
  if (!texts.ok()) Die("texts", texts.status());
  return *texts;
}

// The scratch directory, and whether this run made it (then it is removed at the end).
std::pair<std::string, bool> ScratchDir() {
  std::string dir = absl::GetFlag(FLAGS_dir);
  if (!dir.empty()) return {dir, false};
  char tmpl[] = "/tmp/deltaserve-serving-bench.XXXXXX";
  return {::mkdtemp(tmpl), true};
}

// Mean device bytes (DeltaPack::bytes) and serialized bytes of the packs tasks 0..n-1 get (recipes cycle).
std::pair<double, double> MeanPackBytes(const ds::model::Model& model, const std::vector<lg::Recipe>& recipes,
                                        int64_t n) {
  double device = 0, serialized = 0;
  const int64_t kinds = std::min<int64_t>(n, static_cast<int64_t>(recipes.size()));
  for (int64_t i = 0; i < kinds; ++i) {
    absl::StatusOr<std::string> bytes = lg::MakeLoadPack(model, recipes[static_cast<size_t>(i)], 1, "size");
    if (!bytes.ok()) Die("making a pack", bytes.status());
    auto pack = ds::delta::DeltaPack::Load(*bytes, model, {});
    if (!pack.ok()) Die("loading a pack", pack.status());
    device += static_cast<double>((*pack)->bytes());
    serialized += static_cast<double>(bytes->size());
  }
  return {device / kinds, serialized / kinds};
}

// One in-process server with a client and a closed-loop Embed driver.
struct Harness {
  std::unique_ptr<ds::service::DeltaServer> server;
  std::unique_ptr<ds::client::DeltaserveClient> client;
  std::vector<std::string> texts;
  std::string metrics_addr;

  // A closed-loop round; `pick` draws the task (-1 = base model) and `names` names task i.
  lg::LoadReport Round(const lg::TaskPicker& pick, const std::string& prefix, absl::Duration warmup,
                       nlohmann::json* server_side) {
    std::atomic<uint64_t> cursor{0};
    const int batch = absl::GetFlag(FLAGS_batch);
    auto send = [&](const lg::RequestSlot& slot) -> absl::StatusOr<int64_t> {
      ds::v1::EmbedRequest request;
      if (slot.task >= 0) request.mutable_task()->set_task(lg::NameTask(prefix, slot.task, 0).task);
      const uint64_t first = cursor.fetch_add(static_cast<uint64_t>(batch));
      for (int i = 0; i < batch; ++i) request.add_texts(texts[(first + i) % texts.size()]);
      absl::StatusOr<ds::v1::EmbedResponse> r = client->Embed(request);
      if (!r.ok()) return r.status();
      return static_cast<int64_t>(batch);
    };
    lg::RunOptions o;
    o.concurrency = absl::GetFlag(FLAGS_concurrency);
    o.duration = absl::Seconds(absl::GetFlag(FLAGS_round_s));
    o.warmup = warmup;
    absl::StatusOr<std::map<std::string, double>> before = lg::ScrapeMetrics(metrics_addr);
    absl::StatusOr<lg::RunResult> run = lg::RunLoad(o, pick, send);
    if (!run.ok()) Die("load", run.status());
    absl::StatusOr<std::map<std::string, double>> after = lg::ScrapeMetrics(metrics_addr);
    if (before.ok() && after.ok() && server_side != nullptr) {
      auto d = [&](const std::string& name) { return lg::SumMetric(*after, name) - lg::SumMetric(*before, name); };
      auto dl = [&](const std::string& name, const std::string& label) {
        return lg::SumMetricWithLabel(*after, name, label) - lg::SumMetricWithLabel(*before, name, label);
      };
      const double batches = d("deltaserve_batches_total");
      const double lookups = d("deltaserve_delta_cache_lookups_total");
      (*server_side)["rows_per_batch"] = batches > 0 ? d("deltaserve_batch_rows_sum") / batches : 0;
      if (lookups > 0) {
        (*server_side)["hit_ratio"] = dl("deltaserve_delta_cache_lookups_total", "tier=\"device\"") / lookups;
        (*server_side)["loads"] = d("deltaserve_delta_loads_total");
        (*server_side)["evictions"] = d("deltaserve_delta_cache_evictions_total");
      }
      const double ddc = d("deltaserve_batch_distinct_deltas_count");
      if (ddc > 0 && lookups > 0) (*server_side)["deltas_per_batch"] = d("deltaserve_batch_distinct_deltas_sum") / ddc;
      const double lc = d("deltaserve_delta_load_seconds_count");
      if (lc > 0) (*server_side)["load_ms"] = 1000 * d("deltaserve_delta_load_seconds_sum") / lc;
    }
    lg::RunShape shape;
    shape.concurrency = o.concurrency;
    shape.seconds = run->seconds;
    return lg::Summarize(run->recorder, shape, lg::VerdictRules());
  }
};

Harness StartServer(const std::string& dir, int64_t cache_bytes, int64_t host_cache_bytes) {
  ds::service::DeltaServer::Options options;
  options.listen_address = "127.0.0.1:0";
  options.metrics_address = "127.0.0.1:0";
  options.model_dir = absl::GetFlag(FLAGS_model_dir);
  options.store_dir = dir + "/store";
  options.deltas.cache_bytes = cache_bytes;
  options.deltas.host_cache_bytes = host_cache_bytes;
  options.engine.pack_tokens = absl::GetFlag(FLAGS_pack_tokens);
  options.intra_op_threads = ds::SetIntraOpThreads(0);
  options.blas = ds::LoadedBlas();
  absl::StatusOr<std::unique_ptr<ds::service::DeltaServer>> server = ds::service::DeltaServer::Start(options);
  if (!server.ok()) Die("starting the server", server.status());
  Harness h;
  h.server = *std::move(server);
  ds::client::DeltaserveClient::Options copts;
  copts.target = absl::StrCat("127.0.0.1:", h.server->port());
  copts.timeout = absl::Seconds(120);
  h.client = std::make_unique<ds::client::DeltaserveClient>(copts);
  h.metrics_addr = absl::StrCat("127.0.0.1:", h.server->metrics_port());
  h.texts = Texts();
  return h;
}

void Setup(Harness& h, const ds::model::Model& model, int64_t n, const std::vector<lg::Recipe>& recipes,
           const std::string& prefix) {
  lg::SetupOptions s;
  s.num_tasks = n;
  s.recipes = recipes;
  s.prefix = prefix;
  s.threads = absl::GetFlag(FLAGS_setup_threads);
  s.progress = [](int64_t done, int64_t total) {
    if (done % std::max<int64_t>(1, total / 10) == 0) std::fprintf(stderr, "  pushed %lld/%lld\n", (long long)done, (long long)total);
  };
  const double rss0 = RssMb();
  absl::StatusOr<lg::SetupReport> r = lg::PushLoadPacks(*h.client, model, s);
  if (!r.ok()) Die("setup", r.status());
  std::printf("setup: %lld tasks pushed (%lld new) in %.1f s (%.1f packs/s), %.1f KiB per pack; RSS %.0f -> %.0f MB\n",
              (long long)n, (long long)r->created, r->seconds, n / std::max(r->seconds, 1e-9),
              r->pack_bytes / 1024.0 / std::max<int64_t>(n, 1), rss0, RssMb());
}

std::string Side(const nlohmann::json& j) {
  std::vector<std::string> parts;
  for (const auto& [k, v] : j.items()) parts.push_back(absl::StrFormat("%s %.3g", k, v.get<double>()));
  return absl::StrJoin(parts, ", ");
}

void RunP4(const std::string& dir) {
  const int64_t k = absl::GetFlag(FLAGS_tasks);
  absl::StatusOr<std::vector<lg::Recipe>> recipes = lg::ParseRecipes(absl::GetFlag(FLAGS_methods));
  if (!recipes.ok()) Die("--methods", recipes.status());
  absl::StatusOr<std::unique_ptr<ds::model::Model>> model = ds::model::LoadModel(absl::GetFlag(FLAGS_model_dir), {});
  if (!model.ok()) Die("model", model.status());
  const auto [device_bytes, serialized_bytes] = MeanPackBytes(**model, *recipes, k);
  const int64_t cache = static_cast<int64_t>(absl::GetFlag(FLAGS_cache_fraction) * k * device_bytes);
  const int64_t host = static_cast<int64_t>(absl::GetFlag(FLAGS_host_cache_fraction) * k * serialized_bytes);
  std::printf("\n## P4: %lld tasks (%s), Zipf s=%.2f, device cache %.1f MiB (%.0f%% of %lld packs x %.1f KiB), "
              "host cache %.1f MiB; %d clients x %d text(s), %.0f s rounds\n",
              (long long)k, absl::GetFlag(FLAGS_methods).c_str(), absl::GetFlag(FLAGS_zipf_s), cache / 1048576.0,
              100 * absl::GetFlag(FLAGS_cache_fraction), (long long)k, device_bytes / 1024, host / 1048576.0,
              absl::GetFlag(FLAGS_concurrency), absl::GetFlag(FLAGS_batch), absl::GetFlag(FLAGS_round_s));
  Harness h = StartServer(dir + "/p4", cache, host);
  Setup(h, **model, k, *recipes, "p4-");
  absl::StatusOr<lg::ZipfSampler> zipf = lg::ZipfSampler::Create(k, absl::GetFlag(FLAGS_zipf_s));
  if (!zipf.ok()) Die("zipf", zipf.status());
  std::printf("  the top %lld tasks (the cache's 10%%) draw %.1f%% of requests\n",
              (long long)std::max<int64_t>(1, static_cast<int64_t>(k * absl::GetFlag(FLAGS_cache_fraction))),
              100 * [&] {
                double p = 0;
                for (int64_t i = 0; i < std::max<int64_t>(1, static_cast<int64_t>(k * absl::GetFlag(FLAGS_cache_fraction))); ++i) p += zipf->Probability(i);
                return p;
              }());
  const lg::TaskPicker multi = [&](std::mt19937_64& rng) { return zipf->Sample(rng); };
  const lg::TaskPicker single = [](std::mt19937_64&) { return int64_t{0}; };
  double multi_sum = 0, single_sum = 0;
  std::printf("| round | mode | inputs/s | p50 ms | p99 ms | errors | tasks hit | RSS MB | server side |\n|---|---|---:|---:|---:|---:|---:|---:|---|\n");
  const absl::Duration warmup = absl::Seconds(absl::GetFlag(FLAGS_warmup_s));
  for (int r = 0; r < absl::GetFlag(FLAGS_rounds); ++r) {
    for (int m = 0; m < 2; ++m) {
      nlohmann::json side;
      const lg::LoadReport rep = h.Round(m == 0 ? multi : single, "p4-", warmup, &side);
      (m == 0 ? multi_sum : single_sum) += rep.inputs_per_second;
      std::printf("| %d | %s | %.1f | %.1f | %.1f | %lld | %lld | %.0f | %s |\n", r + 1,
                  m == 0 ? "multi (Zipf)" : "single task", rep.inputs_per_second, rep.p50_ms, rep.p99_ms,
                  (long long)rep.errors, (long long)rep.distinct_tasks, RssMb(), Side(side).c_str());
      std::fflush(stdout);
    }
  }
  std::printf("P4 ratio (multi / single, inputs/s over %d rounds): %.3f  (goal >= 0.80); RSS %.0f MB (peak %.0f MB)\n",
              absl::GetFlag(FLAGS_rounds), multi_sum / std::max(single_sum, 1e-9), RssMb(), RssMb("VmHWM:"));
  h.server->Shutdown(absl::Seconds(5));
}

void RunE2e(const std::string& dir) {
  const int64_t k = absl::GetFlag(FLAGS_e2e_tasks);
  absl::StatusOr<std::unique_ptr<ds::model::Model>> model = ds::model::LoadModel(absl::GetFlag(FLAGS_model_dir), {});
  if (!model.ok()) Die("model", model.status());
  std::printf("\n## P1 / P3 end to end: %d clients x %d text(s); %lld LoRA tasks (P1) and %lld mixed tasks (P3), "
              "uniform draws, all resident; %.0f s rounds\n",
              absl::GetFlag(FLAGS_concurrency), absl::GetFlag(FLAGS_batch), (long long)k, (long long)k,
              absl::GetFlag(FLAGS_round_s));
  Harness h = StartServer(dir + "/e2e", int64_t{1} << 32, 0);
  Setup(h, **model, k, *lg::ParseRecipes("lora"), "e2e-lora-");
  Setup(h, **model, k, lg::MixedRecipes(), "e2e-mixed-");
  const lg::TaskPicker uniform = [k](std::mt19937_64& rng) { return static_cast<int64_t>(rng() % k); };
  const std::vector<std::pair<std::string, lg::TaskPicker>> modes = {
      {"base", nullptr}, {"P1 LoRA", uniform}, {"P3 mixed", uniform}};
  const std::vector<std::string> prefixes = {"", "e2e-lora-", "e2e-mixed-"};
  std::vector<double> sums(3);
  std::printf("| round | mode | inputs/s | p50 ms | p99 ms | errors | server side |\n|---|---|---:|---:|---:|---:|---|\n");
  for (int r = 0; r < absl::GetFlag(FLAGS_rounds); ++r) {
    for (size_t m = 0; m < modes.size(); ++m) {
      nlohmann::json side;
      const lg::LoadReport rep =
          h.Round(modes[m].second, prefixes[m], absl::Seconds(absl::GetFlag(FLAGS_warmup_s)), &side);
      sums[m] += rep.inputs_per_second;
      std::printf("| %d | %s | %.1f | %.1f | %.1f | %lld | %s |\n", r + 1, modes[m].first.c_str(),
                  rep.inputs_per_second, rep.p50_ms, rep.p99_ms, (long long)rep.errors, Side(side).c_str());
      std::fflush(stdout);
    }
  }
  std::printf("P1 end to end (LoRA tasks / base): %.3f; P3 end to end (mixed / base): %.3f\n",
              sums[1] / std::max(sums[0], 1e-9), sums[2] / std::max(sums[0], 1e-9));
  h.server->Shutdown(absl::Seconds(5));
}

void RunP5(const std::string& dir) {
  absl::StatusOr<std::unique_ptr<ds::model::Model>> model = ds::model::LoadModel(absl::GetFlag(FLAGS_model_dir), {});
  if (!model.ok()) Die("model", model.status());
  absl::StatusOr<std::unique_ptr<ds::store::DeltaStore>> store = ds::store::OpenFileSystemStore(dir + "/p5-store");
  if (!store.ok()) Die("store", store.status());
  ds::deltas::DeltaManager::Options mopts;
  mopts.cache_bytes = 0;       // nothing stays loaded:
  mopts.host_cache_bytes = 0;  // every Resolve of a new digest is a cold load from the store
  ds::deltas::DeltaManager manager(store->get(), model->get(), mopts);

  // One SST-2-like sentence, batch 1.
  const std::string text = "it 's a charming and often affecting journey .";
  absl::StatusOr<std::vector<int64_t>> ids = (*model)->tokenizer().Encode(text);
  if (!ids.ok()) Die("tokenize", ids.status());
  ds::model::ForwardInput input;
  input.input_ids = at::tensor(*ids, at::kLong).unsqueeze(0);
  input.attention_mask = at::ones({1, static_cast<int64_t>(ids->size())}, at::kBool);
  auto forward = [&] {
    c10::InferenceMode guard;
    const absl::Time t = absl::Now();
    absl::StatusOr<ds::model::ForwardOutput> out = (*model)->Forward(input, nullptr);
    if (!out.ok()) Die("forward", out.status());
    return absl::ToDoubleMilliseconds(absl::Now() - t);
  };
  for (int i = 0; i < 5; ++i) forward();  // warm the allocator and BLAS

  std::printf("\n## P5: cold load of a LoRA pack (store -> servable) vs one batch-1 forward (%zu tokens), %d rounds\n",
              ids->size(), absl::GetFlag(FLAGS_p5_rounds));
  std::printf("| LoRA rank | pack KiB | cold load ms (median / p90) | store read ms | parse + bind ms | of which parse | of which re-serialize + sha256 | forward ms (median) | **P5 ratio** (goal <= 1) |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  for (absl::string_view rank_text : absl::StrSplit(absl::GetFlag(FLAGS_p5_ranks), ',')) {
    const int64_t rank = std::stoll(std::string(rank_text));
    lg::PackGenOptions popts;
    popts.lora_rank = rank;
    std::vector<double> loads, forwards, reads, binds, parses, rehashes;
    int64_t pack_bytes = 0;
    for (int r = 0; r < absl::GetFlag(FLAGS_p5_rounds); ++r) {
      absl::StatusOr<std::string> bytes =
          lg::MakeLoadPack(**model, {ds::delta::MethodKind::kLora}, 100000 * rank + r, "p5", popts);
      if (!bytes.ok()) Die("pack", bytes.status());
      pack_bytes = static_cast<int64_t>(bytes->size());
      ds::deltas::PushRequest push;
      push.task = absl::StrCat("p5-r", rank, "-", r);
      absl::StatusOr<ds::deltas::PushResult> pushed = manager.Push(push, *bytes);
      if (!pushed.ok()) Die("push", pushed.status());
      ds::inference::TaskSelector selector;
      selector.task = push.task;
      // The cold load: reference -> digest -> bytes from the store (verified) -> parsed and bound to the model.
      absl::Time t = absl::Now();
      absl::StatusOr<std::shared_ptr<const ds::delta::DeltaPack>> pack = manager.Resolve("", selector);
      loads.push_back(absl::ToDoubleMilliseconds(absl::Now() - t));
      if (!pack.ok()) Die("resolve", pack.status());
      pack->reset();
      forwards.push_back(forward());
      // The parts, on the same pack: reading its blob, and parsing + binding its bytes.
      t = absl::Now();
      auto reader = (*store)->OpenBlob(pushed->version.digest);
      if (!reader.ok()) Die("open blob", reader.status());
      std::string blob((*reader)->size(), '\0');
      size_t done = 0;
      while (done < blob.size()) {
        absl::StatusOr<size_t> n = (*reader)->Read(blob.data() + done, blob.size() - done);
        if (!n.ok() || *n == 0) break;
        done += *n;
      }
      reads.push_back(absl::ToDoubleMilliseconds(absl::Now() - t));
      t = absl::Now();
      auto bound = ds::delta::DeltaPack::Load(blob, **model, {});
      binds.push_back(absl::ToDoubleMilliseconds(absl::Now() - t));
      if (!bound.ok()) Die("load", bound.status());
      // Parse + bind split: parsing alone, and the canonical re-serialization + sha256 that binding ends with.
      t = absl::Now();
      auto parsed = ds::delta::ParsePack(blob, {});
      parses.push_back(absl::ToDoubleMilliseconds(absl::Now() - t));
      if (!parsed.ok()) Die("parse", parsed.status());
      t = absl::Now();
      auto reserialized = ds::delta::SerializePack(*parsed);
      if (!reserialized.ok()) Die("serialize", reserialized.status());
      const std::string digest = ds::Sha256Digest(*reserialized);
      rehashes.push_back(absl::ToDoubleMilliseconds(absl::Now() - t));
    }
    std::printf("| %lld | %.1f | %.3f / %.3f | %.3f | %.3f | %.3f | %.3f | %.3f | **%.2f** |\n", (long long)rank,
                pack_bytes / 1024.0, Median(loads), P90(loads), Median(reads), Median(binds), Median(parses),
                Median(rehashes), Median(forwards), Median(loads) / Median(forwards));
    std::fflush(stdout);
  }
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  if (auto st = ds::SelectBlas("openblas", argv); !st.ok()) Die("blas", st);
  ds::ConfigureAllocator();
  ds::SetIntraOpThreads(0);
  const auto [dir, made_dir] = ScratchDir();
  std::printf("# serving_bench, %s, %ld cores, model %s, scratch %s\n",
              absl::FormatTime("%Y-%m-%d %H:%M UTC", absl::Now(), absl::UTCTimeZone()).c_str(),
              sysconf(_SC_NPROCESSORS_ONLN), absl::GetFlag(FLAGS_model_dir).c_str(), dir.c_str());
  for (absl::string_view b : absl::StrSplit(absl::GetFlag(FLAGS_bench), ',')) {
    if (b == "p5") {
      RunP5(dir);
    } else if (b == "p4") {
      RunP4(dir);
    } else if (b == "e2e") {
      RunE2e(dir);
    } else {
      std::fprintf(stderr, "serving_bench: unknown --bench %s (p4, p5, e2e)\n", std::string(b).c_str());
      return 2;
    }
  }
  if (made_dir) {
    std::error_code ignored;
    std::filesystem::remove_all(dir, ignored);
  }
  return 0;
}
