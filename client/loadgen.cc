// deltaserve-loadgen: load-tests a deltaserve server the way many tenants would use it, to size a deployment.
//
//   deltaserve-loadgen [--server=HOST:PORT] [--metrics=HOST:PORT] [--tasks=K] [--zipf_s=S] [--methods=mixed]
//                      [--mode=closed --concurrency=1,8,32 | --mode=open --qps=50,100,200] [--batch=N]
//                      [--rpc=embed|classify] [--priority=low|normal|high] [--tenants=T] [--prefetch=N]
//                      [--duration_s=D] [--warmup_s=W] [--slo_p99_ms=MS] [--json]
//
// Setup: registers K tasks, one delta pack each, with mixed methods (LoRA, BitFit, (IA)^3, prompt, adapter,
// combinations; --methods), generated against the served model (loaded locally from --model_dir) and pushed
// as each task's latest version — idempotent, so a second run pushes nothing new (--setup=existing skips it).
// Run: for each load step (--concurrency for a closed loop, --qps for an open one), requests whose task is drawn
// Zipf(--zipf_s) over the K tasks, --batch texts each (from --texts, default GLUE SST-2 when present).
// Report: per step req/s, inputs/s, latency p50/p95/p99/max, errors by gRPC code, tasks hit, a verdict; with
// --metrics, what the server saw (batch sizes, queue time, delta cache). --json prints it all as one JSON object.
//
// Exit code: 0 when no step failed (errors over --max_error_rate), 3 when one did, 1 for setup / connection
// problems, 2 for bad flags.
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "client/client.h"
#include "client/loadgen/load_report.h"
#include "client/loadgen/load_runner.h"
#include "client/loadgen/metrics_scrape.h"
#include "client/loadgen/pack_gen.h"
#include "client/loadgen/task_setup.h"
#include "client/loadgen/workload.h"
#include "client/loadgen/zipf.h"
#include "nlohmann/json.hpp"
#include "server/model/model_loader.h"

ABSL_FLAG(std::string, server, "127.0.0.1:50051", "deltaserve gRPC address (host:port).");
ABSL_FLAG(std::string, metrics, "",
          "The server's metrics address (host:port, e.g. 127.0.0.1:9464): adds what the server saw per step.");
ABSL_FLAG(double, timeout_s, 30, "Deadline of each request, in seconds.");
ABSL_FLAG(int64_t, tasks, 100, "K: tasks (delta packs) the requests are spread over (0 = the base model only).");
ABSL_FLAG(double, zipf_s, 1.0, "Zipf exponent of the task popularity (0 = uniform, 1 = classic Zipf).");
ABSL_FLAG(std::string, methods, "mixed",
          "Pack recipes dealt to the tasks in turn: \"mixed\" (lora, bitfit, ia3, prompt, adapter, lora+bitfit, "
          "ln_tuning, prefix, parallel_adapter, prompt+adapter) or a list like \"lora,bitfit+lora,prompt\".");
ABSL_FLAG(std::string, setup, "push",
          "push: generate and push the K packs (idempotent; needs --model_dir, the served model); existing: the "
          "tasks were pushed before (by an earlier run with the same --tasks/--methods/--task_prefix/--tenants).");
ABSL_FLAG(std::string, model_dir, "models/use-lite", "The served model's directory (to generate packs for it).");
ABSL_FLAG(std::string, task_prefix, "lg-", "Prefix of the task and tenant names the load generator uses.");
ABSL_FLAG(int, tenants, 0, "Tenants the tasks are dealt to round-robin (0 = the server's default tenant).");
ABSL_FLAG(int, setup_threads, 4, "Pushes in flight during setup.");
ABSL_FLAG(int64_t, lora_rank, 8, "LoRA rank of the generated packs.");
ABSL_FLAG(std::string, mode, "closed",
          "closed: N clients each send their next request when the previous returns (finds capacity); open: "
          "requests arrive at --qps whatever the server's speed (finds latency at a given rate).");
ABSL_FLAG(std::string, concurrency, "8",
          "Closed loop: clients per step, comma separated for a sweep (\"1,8,32\"). Open loop: the most requests in "
          "flight (one value).");
ABSL_FLAG(std::string, qps, "", "Open loop: target requests per second per step, comma separated (\"50,100\").");
ABSL_FLAG(std::string, arrivals, "poisson", "Open loop: poisson (exponential gaps) or uniform (even gaps).");
ABSL_FLAG(std::string, rpc, "embed", "embed or classify (every generated pack has a 2-label head).");
ABSL_FLAG(int, batch, 1, "Texts per request.");
ABSL_FLAG(std::string, priority, "", "Request priority: low, normal or high (empty = unset, the server's normal).");
ABSL_FLAG(int64_t, prefetch, 0,
          "Before the run, warm the delta cache with the N most popular tasks (Prefetch RPC); 0 = start cold.");
ABSL_FLAG(std::string, texts, "",
          "Text file (one per line, or a TSV whose first column is the text). Default: "
          "../shared/data/glue-sst2/train.tsv when present, else built-in sentences.");
ABSL_FLAG(double, duration_s, 10, "Measuring seconds per step.");
ABSL_FLAG(double, warmup_s, 2, "Warm-up seconds before each step's measurement (requests sent, not counted).");
ABSL_FLAG(int64_t, max_requests, 0, "Stop a step after this many measured requests (0 = run for --duration_s).");
ABSL_FLAG(double, slo_p99_ms, 0, "A p99 latency objective to judge each step against (0 = none).");
ABSL_FLAG(double, max_error_rate, 0.001, "Share of failed requests above which a step FAILs.");
ABSL_FLAG(uint64_t, seed, 1, "Seed of task draws, arrivals and pack weights.");
ABSL_FLAG(bool, json, false, "Print the report as one JSON object on stdout (progress still goes to stderr).");

namespace ds = deltaserve;
namespace lg = deltaserve::loadgen;

namespace {

constexpr char kUsage[] =
    "load-tests a deltaserve server with many tenants' tasks.\n"
    "  deltaserve-loadgen --tasks=1000 --zipf_s=1 --concurrency=1,8,32            (closed loop sweep)\n"
    "  deltaserve-loadgen --tasks=1000 --mode=open --qps=100,200,400 --concurrency=256 --slo_p99_ms=100\n"
    "  deltaserve-loadgen --tasks=0 --batch=8                                      (the base model only)\n"
    "Start the server first (build/server/deltaserve); add --metrics=127.0.0.1:9464 to see its side.\n";

int Usage(const std::string& message) {
  std::cerr << "deltaserve-loadgen: " << message << "\n";
  return 2;
}

int Fail(const std::string& what, const absl::Status& status) {
  std::cerr << "deltaserve-loadgen: " << what << ": " << absl::StatusCodeToString(status.code()) << ": "
            << status.message() << "\n";
  return 1;
}

template <typename T>
bool ParseList(const std::string& text, std::vector<T>* out) {
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    T v{};
    if constexpr (std::is_same_v<T, int>) {
      if (!absl::SimpleAtoi(part, &v)) return false;
    } else {
      if (!absl::SimpleAtod(part, &v)) return false;
    }
    out->push_back(v);
  }
  return !out->empty();
}

// What the server saw during a step, from two scrapes of its /metrics: only metrics it exports appear.
nlohmann::json ServerSide(const std::map<std::string, double>& before, const std::map<std::string, double>& after) {
  auto delta = [&](const std::string& name) { return lg::SumMetric(after, name) - lg::SumMetric(before, name); };
  auto has = [&](const std::string& name) { return lg::SumMetric(after, name) != 0 || after.count(name) > 0; };
  auto delta_label = [&](const std::string& name, const std::string& label) {
    return lg::SumMetricWithLabel(after, name, label) - lg::SumMetricWithLabel(before, name, label);
  };
  nlohmann::json j = nlohmann::json::object();
  const double batches = delta("deltaserve_batches_total");
  j["batches"] = batches;
  if (batches > 0) {
    j["mean_batch_rows"] = delta("deltaserve_batch_rows_sum") / batches;
    j["mean_batch_padded_tokens"] = delta("deltaserve_batch_padded_tokens_sum") / batches;
    j["mean_forward_ms"] = 1000 * delta("deltaserve_batch_duration_seconds_sum") / batches;
    if (has("deltaserve_batch_distinct_deltas_count")) {
      j["mean_distinct_deltas_per_batch"] = delta("deltaserve_batch_distinct_deltas_sum") / batches;
    }
  }
  const double queued = delta("deltaserve_queue_duration_seconds_count");
  if (queued > 0) j["mean_queue_ms"] = 1000 * delta("deltaserve_queue_duration_seconds_sum") / queued;
  // The delta cache (server/deltas): lookups by the tier that answered (device = a hit), loads, evictions.
  const double lookups = delta("deltaserve_delta_cache_lookups_total");
  if (lookups > 0) {
    j["delta_cache_lookups"] = lookups;
    j["delta_cache_hit_ratio"] = delta_label("deltaserve_delta_cache_lookups_total", "tier=\"device\"") / lookups;
  }
  if (has("deltaserve_delta_loads_total")) j["delta_loads"] = delta("deltaserve_delta_loads_total");
  if (has("deltaserve_delta_cache_evictions_total")) {
    j["delta_cache_evictions"] = delta("deltaserve_delta_cache_evictions_total");
  }
  const double loads = delta("deltaserve_delta_load_seconds_count");
  if (loads > 0) j["mean_delta_load_ms"] = 1000 * delta("deltaserve_delta_load_seconds_sum") / loads;
  return j;
}

std::string FormatServerSide(const nlohmann::json& j) {
  std::vector<std::string> parts;
  auto num = [&](const char* key, const char* label, const char* format, double scale = 1) {
    if (!j.contains(key)) return;
    parts.push_back(absl::StrCat(label, " ", absl::StrFormat(*absl::ParsedFormat<'f'>::New(format),
                                                              j[key].get<double>() * scale)));
  };
  num("mean_batch_rows", "rows/batch", "%.1f");
  num("mean_distinct_deltas_per_batch", "deltas/batch", "%.1f");
  num("mean_forward_ms", "forward ms", "%.1f");
  num("mean_queue_ms", "queue ms", "%.1f");
  num("delta_cache_hit_ratio", "cache hits %", "%.1f", 100);
  num("delta_loads", "pack loads", "%.0f");
  num("delta_cache_evictions", "evictions", "%.0f");
  num("mean_delta_load_ms", "load ms", "%.1f");
  return parts.empty() ? std::string("no batches") : absl::StrJoin(parts, ", ");
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(kUsage);
  // --help lists this file's flags (absl matches flag files by the program's name, which differs from it).
  absl::FlagsUsageConfig usage_config;
  usage_config.contains_help_flags = [](absl::string_view file) { return absl::EndsWith(file, "client/loadgen.cc"); };
  usage_config.contains_helpshort_flags = usage_config.contains_help_flags;
  absl::SetFlagsUsageConfig(usage_config);
  const std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  if (args.size() > 1) return Usage(absl::StrCat("unexpected argument \"", args[1], "\" (see --help)"));
  const bool json_out = absl::GetFlag(FLAGS_json);
  std::FILE* text_out = json_out ? stderr : stdout;  // people read text; --json keeps stdout for the JSON

  // --- Flags ---
  absl::StatusOr<lg::LoopMode> mode = lg::ParseLoopMode(absl::GetFlag(FLAGS_mode));
  if (!mode.ok()) return Usage(std::string(mode.status().message()));
  absl::StatusOr<lg::Arrivals> arrivals = lg::ParseArrivals(absl::GetFlag(FLAGS_arrivals));
  if (!arrivals.ok()) return Usage(std::string(arrivals.status().message()));
  std::vector<int> concurrency;
  if (!ParseList(absl::GetFlag(FLAGS_concurrency), &concurrency)) {
    return Usage("--concurrency must be a comma-separated list of integers");
  }
  std::vector<double> qps;
  if (*mode == lg::LoopMode::kOpen) {
    if (!ParseList(absl::GetFlag(FLAGS_qps), &qps)) return Usage("an open loop needs --qps (e.g. --qps=50,100)");
    if (concurrency.size() != 1) return Usage("an open loop takes one --concurrency (the most in flight)");
  }
  const std::string rpc = absl::GetFlag(FLAGS_rpc);
  if (rpc != "embed" && rpc != "classify") return Usage("--rpc must be embed or classify");
  const int64_t num_tasks = absl::GetFlag(FLAGS_tasks);
  if (num_tasks < 0) return Usage("--tasks must be >= 0");
  if (rpc == "classify" && num_tasks == 0) return Usage("--rpc=classify needs --tasks > 0 (the packs carry heads)");
  const int batch = absl::GetFlag(FLAGS_batch);
  if (batch < 1) return Usage("--batch must be >= 1");
  ds::v1::Priority priority = ds::v1::PRIORITY_UNSPECIFIED;
  if (const std::string p = absl::GetFlag(FLAGS_priority); p == "low") {
    priority = ds::v1::PRIORITY_LOW;
  } else if (p == "normal") {
    priority = ds::v1::PRIORITY_NORMAL;
  } else if (p == "high") {
    priority = ds::v1::PRIORITY_HIGH;
  } else if (!p.empty()) {
    return Usage("--priority must be low, normal or high");
  }
  absl::StatusOr<std::vector<lg::Recipe>> recipes = lg::ParseRecipes(absl::GetFlag(FLAGS_methods));
  if (!recipes.ok()) return Usage(std::string(recipes.status().message()));
  const std::string setup = absl::GetFlag(FLAGS_setup);
  if (setup != "push" && setup != "existing") return Usage("--setup must be push or existing");
  const std::string prefix = absl::GetFlag(FLAGS_task_prefix);
  const int tenants = absl::GetFlag(FLAGS_tenants);
  std::optional<lg::ZipfSampler> zipf;
  if (num_tasks > 0) {
    absl::StatusOr<lg::ZipfSampler> z = lg::ZipfSampler::Create(num_tasks, absl::GetFlag(FLAGS_zipf_s));
    if (!z.ok()) return Usage(std::string(z.status().message()));
    zipf = *std::move(z);
  }

  // --- Texts ---
  std::string texts_path = absl::GetFlag(FLAGS_texts);
  if (texts_path.empty() && access("../shared/data/glue-sst2/train.tsv", R_OK) == 0) {
    texts_path = "../shared/data/glue-sst2/train.tsv";
  }
  std::vector<std::string> texts = lg::BuiltinTexts();
  if (!texts_path.empty()) {
    absl::StatusOr<std::vector<std::string>> loaded = lg::LoadTexts(texts_path);
    if (!loaded.ok()) return Fail("--texts", loaded.status());
    texts = *std::move(loaded);
  }

  // --- The server ---
  ds::client::DeltaserveClient::Options copts;
  copts.target = absl::GetFlag(FLAGS_server);
  copts.timeout = absl::Seconds(absl::GetFlag(FLAGS_timeout_s));
  ds::client::DeltaserveClient client(copts);
  absl::StatusOr<ds::v1::GetModelInfoResponse> info = client.GetModelInfo();
  if (!info.ok()) return Fail(absl::StrCat("cannot reach deltaserve at ", copts.target), info.status());
  nlohmann::json report;
  report["server"] = {{"target", copts.target},
                      {"version", info->server_version()},
                      {"model", info->model().family()},
                      {"fingerprint", info->model().fingerprint()},
                      {"device", info->model().device()},
                      {"dtype", info->model().dtype()},
                      {"intra_op_threads", info->intra_op_threads()},
                      {"max_batch_rows", info->limits().max_batch_rows()},
                      {"max_inputs_per_request", info->limits().max_inputs_per_request()}};
  std::fprintf(text_out, "deltaserve-loadgen -> %s: deltaserve %s, %s (%s, %s), %d threads, batches of <= %d rows\n",
               copts.target.c_str(), info->server_version().c_str(), info->model().family().c_str(),
               info->model().dtype().c_str(), info->model().device().c_str(), info->intra_op_threads(),
               info->limits().max_batch_rows());
  if (info->limits().max_inputs_per_request() > 0 && batch > info->limits().max_inputs_per_request()) {
    return Usage(absl::StrCat("--batch=", batch, " exceeds the server's max_inputs_per_request (",
                              info->limits().max_inputs_per_request(), ")"));
  }

  // --- Setup ---
  nlohmann::json setup_json = {{"tasks", num_tasks}, {"mode", setup}, {"methods", absl::GetFlag(FLAGS_methods)}};
  if (num_tasks > 0 && setup == "push") {
    ds::model::ModelOptions mopts;  // the packs only need module names and shapes: float32 on the CPU
    absl::StatusOr<std::unique_ptr<ds::model::Model>> model =
        ds::model::LoadModel(absl::GetFlag(FLAGS_model_dir), mopts);
    if (!model.ok()) return Fail(absl::StrCat("loading --model_dir=", absl::GetFlag(FLAGS_model_dir)), model.status());
    if ((*model)->info().fingerprint != info->model().fingerprint()) {
      return Fail("setup", absl::FailedPreconditionError(absl::StrCat(
                               "--model_dir holds ", (*model)->info().fingerprint, " but the server serves ",
                               info->model().fingerprint(), ": point --model_dir at the served model")));
    }
    lg::SetupOptions sopts;
    sopts.num_tasks = num_tasks;
    sopts.recipes = *recipes;
    sopts.prefix = prefix;
    sopts.num_tenants = tenants;
    sopts.threads = absl::GetFlag(FLAGS_setup_threads);
    sopts.seed = absl::GetFlag(FLAGS_seed);
    sopts.packs.lora_rank = absl::GetFlag(FLAGS_lora_rank);
    int64_t last_shown = -1;
    const bool tty = isatty(STDERR_FILENO) != 0;
    sopts.progress = [&](int64_t done, int64_t total) {  // a line per 10 % (redrawn in place on a terminal)
      const int64_t tenth = done * 10 / total;
      if (tenth == last_shown) return;
      last_shown = tenth;
      std::fprintf(stderr, "%ssetup: %lld/%lld packs pushed%s", tty ? "\r" : "", static_cast<long long>(done),
                   static_cast<long long>(total), !tty || done == total ? "\n" : "");
    };
    absl::StatusOr<lg::SetupReport> pushed = lg::PushLoadPacks(client, **model, sopts);
    if (!pushed.ok()) return Fail("setup", pushed.status());
    std::vector<std::string> mix;
    for (const auto& [name, n] : pushed->tasks_by_recipe) mix.push_back(absl::StrCat(name, " ", n));
    std::fprintf(text_out, "setup: %lld tasks (%lld new, %lld already stored), %.1f KiB per pack, %.1f s; %s\n",
                 static_cast<long long>(num_tasks), static_cast<long long>(pushed->created),
                 static_cast<long long>(pushed->existing), pushed->pack_bytes / 1024.0 / num_tasks,
                 pushed->seconds, absl::StrJoin(mix, ", ").c_str());
    setup_json["created"] = pushed->created;
    setup_json["existing"] = pushed->existing;
    setup_json["seconds"] = pushed->seconds;
    setup_json["mean_pack_bytes"] = pushed->pack_bytes / num_tasks;
    setup_json["tasks_by_recipe"] = pushed->tasks_by_recipe;
  } else if (num_tasks > 0) {
    for (int64_t i : {int64_t{0}, num_tasks - 1}) {
      const lg::TaskName name = lg::NameTask(prefix, i, tenants);
      if (absl::StatusOr<ds::v1::GetDeltaResponse> got = client.GetDelta(name.tenant, name.task); !got.ok()) {
        return Fail(absl::StrCat("--setup=existing: task ", name.task), got.status());
      }
    }
    std::fprintf(text_out, "setup: using %lld tasks pushed before (%s*)\n", static_cast<long long>(num_tasks),
                 prefix.c_str());
  }
  report["setup"] = setup_json;

  // --- Workload ---
  std::string spread = "the base model only";
  if (zipf) {
    spread = absl::StrFormat("tasks Zipf(s=%.2f) over %lld: the top 1%% (%lld) draw %.0f%% of requests, %lld tasks "
                             "draw 90%%",
                             zipf->s(), static_cast<long long>(num_tasks),
                             static_cast<long long>(std::max<int64_t>(1, num_tasks / 100)),
                             100 * [&] {
                               double p = 0;
                               for (int64_t k = 0; k < std::max<int64_t>(1, num_tasks / 100); ++k) {
                                 p += zipf->Probability(k);
                               }
                               return p;
                             }(),
                             static_cast<long long>(zipf->HeadCovering(0.9)));
  }
  std::fprintf(text_out, "workload: %s, %d text%s per request, %s; texts: %s (%zu)\n",
               rpc == "embed" ? "Embed" : "Classify", batch, batch == 1 ? "" : "s", spread.c_str(),
               texts_path.empty() ? "built-in" : texts_path.c_str(), texts.size());
  report["workload"] = {{"rpc", rpc},          {"batch", batch},
                        {"zipf_s", absl::GetFlag(FLAGS_zipf_s)}, {"texts", texts_path.empty() ? "built-in" : texts_path},
                        {"num_texts", texts.size()}};

  // --- Prefetch: the most popular tasks first (index order is popularity order), per tenant, <= 1000 a call ---
  if (const int64_t n = std::min(absl::GetFlag(FLAGS_prefetch), num_tasks); n > 0) {
    const absl::Time start = absl::Now();
    std::map<std::string, std::vector<std::string>> by_tenant;
    for (int64_t i = 0; i < n; ++i) {
      const lg::TaskName name = lg::NameTask(prefix, i, tenants);
      by_tenant[name.tenant].push_back(name.task);
    }
    int64_t loaded = 0;
    for (const auto& [tenant, tasks] : by_tenant) {
      for (size_t first = 0; first < tasks.size(); first += 1000) {
        ds::v1::PrefetchRequest request;
        request.set_tenant(tenant);
        for (size_t i = first; i < std::min(tasks.size(), first + 1000); ++i) request.add_tasks()->set_task(tasks[i]);
        absl::StatusOr<ds::v1::PrefetchResponse> warmed = client.Prefetch(request);
        if (!warmed.ok()) return Fail("--prefetch", warmed.status());
        loaded += warmed->deltas_size();
      }
    }
    std::fprintf(text_out, "prefetch: %lld most popular tasks warmed in %.2f s\n", static_cast<long long>(loaded),
                 absl::ToDoubleSeconds(absl::Now() - start));
    report["prefetch"] = {{"tasks", loaded}, {"seconds", absl::ToDoubleSeconds(absl::Now() - start)}};
  }

  // --- Run ---
  std::atomic<uint64_t> text_cursor{0};
  const std::string tenant_default;
  auto send = [&](const lg::RequestSlot& slot) -> absl::StatusOr<int64_t> {
    const uint64_t first = text_cursor.fetch_add(static_cast<uint64_t>(batch));
    lg::TaskName name;
    if (slot.task >= 0) name = lg::NameTask(prefix, slot.task, tenants);
    if (rpc == "embed") {
      ds::v1::EmbedRequest request;
      request.set_tenant(name.tenant);
      request.set_priority(priority);
      if (slot.task >= 0) request.mutable_task()->set_task(name.task);
      for (int i = 0; i < batch; ++i) request.add_texts(texts[(first + i) % texts.size()]);
      absl::StatusOr<ds::v1::EmbedResponse> response = client.Embed(request);
      if (!response.ok()) return response.status();
      if (response->results_size() != batch) return absl::InternalError("short Embed response");
    } else {
      ds::v1::ClassifyRequest request;
      request.set_tenant(name.tenant);
      request.set_priority(priority);
      request.mutable_task()->set_task(name.task);
      for (int i = 0; i < batch; ++i) request.add_texts(texts[(first + i) % texts.size()]);
      absl::StatusOr<ds::v1::ClassifyResponse> response = client.Classify(request);
      if (!response.ok()) return response.status();
      if (response->results_size() != batch) return absl::InternalError("short Classify response");
    }
    return static_cast<int64_t>(batch);
  };
  lg::TaskPicker pick = nullptr;
  if (zipf) pick = [&](std::mt19937_64& rng) { return zipf->Sample(rng); };

  lg::VerdictRules rules;
  rules.slo_p99_ms = absl::GetFlag(FLAGS_slo_p99_ms);
  rules.max_error_rate = absl::GetFlag(FLAGS_max_error_rate);
  const std::string metrics_addr = absl::GetFlag(FLAGS_metrics);
  const size_t num_steps = *mode == lg::LoopMode::kOpen ? qps.size() : concurrency.size();
  std::fprintf(text_out, "run: %s loop, %zu step%s of %.0f s (+%.0f s warm-up)%s\n\n",
               *mode == lg::LoopMode::kOpen ? "open" : "closed", num_steps, num_steps == 1 ? "" : "s",
               absl::GetFlag(FLAGS_duration_s), absl::GetFlag(FLAGS_warmup_s),
               *mode == lg::LoopMode::kOpen
                   ? absl::StrFormat(", %s arrivals, <= %d in flight", absl::GetFlag(FLAGS_arrivals), concurrency[0])
                         .c_str()
                   : "");
  std::vector<lg::LoadReport> steps;
  std::vector<nlohmann::json> server_sides;
  bool any_failed = false;
  for (size_t s = 0; s < num_steps; ++s) {
    lg::RunOptions ropts;
    ropts.mode = *mode;
    ropts.concurrency = *mode == lg::LoopMode::kOpen ? concurrency[0] : concurrency[s];
    ropts.qps = *mode == lg::LoopMode::kOpen ? qps[s] : 0;
    ropts.arrivals = *arrivals;
    ropts.duration = absl::Seconds(absl::GetFlag(FLAGS_duration_s));
    ropts.warmup = absl::Seconds(absl::GetFlag(FLAGS_warmup_s));
    ropts.max_requests = absl::GetFlag(FLAGS_max_requests);
    ropts.seed = absl::GetFlag(FLAGS_seed) + s;
    std::map<std::string, double> before;
    if (!metrics_addr.empty()) {
      absl::StatusOr<std::map<std::string, double>> scraped = lg::ScrapeMetrics(metrics_addr);
      if (!scraped.ok()) return Fail("--metrics", scraped.status());
      before = *std::move(scraped);
    }
    std::fprintf(stderr, "step %zu/%zu: %s ...\n", s + 1, num_steps,
                 *mode == lg::LoopMode::kOpen ? absl::StrFormat("%.1f req/s", ropts.qps).c_str()
                                              : absl::StrFormat("%d clients", ropts.concurrency).c_str());
    absl::StatusOr<lg::RunResult> run = lg::RunLoad(ropts, pick, send);
    if (!run.ok()) return Usage(std::string(run.status().message()));
    lg::RunShape shape;
    shape.mode = *mode == lg::LoopMode::kOpen ? "open" : "closed";
    shape.concurrency = ropts.concurrency;
    shape.target_qps = ropts.qps;
    shape.seconds = run->seconds;
    shape.num_tasks = num_tasks;
    steps.push_back(lg::Summarize(run->recorder, shape, rules));
    any_failed |= steps.back().verdict == "FAIL";
    nlohmann::json side = nlohmann::json::object();
    if (!metrics_addr.empty()) {
      absl::StatusOr<std::map<std::string, double>> after = lg::ScrapeMetrics(metrics_addr);
      if (after.ok()) side = ServerSide(before, *after);
    }
    server_sides.push_back(side);
  }

  // --- Report ---
  std::fprintf(text_out, "%s", lg::FormatTable(steps).c_str());
  nlohmann::json steps_json = nlohmann::json::array();
  for (size_t s = 0; s < steps.size(); ++s) {
    nlohmann::json j = lg::ToJson(steps[s]);
    if (!server_sides[s].empty()) j["server_side"] = server_sides[s];
    steps_json.push_back(j);
  }
  report["steps"] = steps_json;
  if (!metrics_addr.empty()) {
    std::fprintf(text_out, "\nserver side (from %s; each step with its warm-up):\n", metrics_addr.c_str());
    for (size_t s = 0; s < steps.size(); ++s) {
      std::fprintf(text_out, "  step %zu: %s\n", s + 1, FormatServerSide(server_sides[s]).c_str());
    }
  }
  std::fprintf(text_out, "\nerrors:\n");
  for (size_t s = 0; s < steps.size(); ++s) {
    const std::string errors = lg::FormatErrors(steps[s]);
    std::fprintf(text_out, "%s%s", steps.size() > 1 ? absl::StrCat("  step ", s + 1, ": ").c_str() : "  ",
                 errors.c_str());
  }
  // The verdict: one step's, or for a sweep the highest load every step up to which was OK.
  std::string verdict;
  if (steps.size() == 1) {
    verdict = steps[0].verdict_line;
  } else {
    int best = -1;
    for (size_t s = 0; s < steps.size(); ++s) {
      if (steps[s].verdict != "OK") break;
      best = static_cast<int>(s);
    }
    if (best < 0) {
      verdict = absl::StrCat("no step passed; the first: ", steps[0].verdict_line);
    } else {
      const lg::LoadReport& b = steps[static_cast<size_t>(best)];
      verdict = absl::StrFormat(
          "capacity %.1f req/s (%.1f inputs/s) at p99 %.1f ms with %s%s%s", b.requests_per_second,
          b.inputs_per_second, b.p99_ms,
          b.shape.mode == "open" ? absl::StrFormat("a %.1f req/s target", b.shape.target_qps)
                                 : absl::StrFormat("%d clients", b.shape.concurrency),
          rules.slo_p99_ms > 0 ? absl::StrFormat(" within the %.1f ms p99 SLO", rules.slo_p99_ms) : "",
          best + 1 < static_cast<int>(steps.size())
              ? absl::StrCat("; the next step: ", steps[static_cast<size_t>(best) + 1].verdict_line)
              : " (the highest step tried: try more load)");
    }
  }
  report["verdict"] = verdict;
  std::fprintf(text_out, "\nVERDICT: %s\n", verdict.c_str());
  if (json_out) std::cout << report.dump(2) << "\n";
  return any_failed ? 3 : 0;
}
