// Integration: deltaserve-loadgen against a real server over real gRPC (use-lite, in-memory store, a delta cache
// too small to keep every pack, so packs are loaded and evicted), and the Grafana dashboard in deploy/grafana
// against the metrics that server exports after that traffic.
#include <regex>
#include <set>
#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/server/server_process.h"

namespace deltaserve {
namespace {

using ::deltaserve::testing::ServerProcess;
using ::testing::HasSubstr;

class LoadgenTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (testing::UseLiteModelDir().empty()) return;
    // 64 KiB of cache: a few packs at most stay loaded, so the run loads and evicts.
    auto server = ServerProcess::Start({"--model_dir=" + testing::UseLiteModelDir(), "--delta_cache_bytes=65536",
                                        "--threads=1"});
    if (server.ok()) {
      server_ = server->release();
    } else {
      start_error_ = new std::string(server.status().ToString());
    }
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  void SetUp() override {
    if (testing::UseLiteModelDir().empty()) {
      GTEST_SKIP() << "no converted use-lite model: run `bash scripts/setup.sh build` (or set DS_USE_LITE_DIR)";
    }
    ASSERT_NE(server_, nullptr) << (start_error_ ? *start_error_ : "");
  }

  // Runs deltaserve-loadgen against the server with `args` (plus --server, --model_dir, --json).
  static testing::CommandResult Loadgen(std::vector<std::string> args) {
    std::vector<std::string> argv = {testing::BinaryDir() + "/client/deltaserve-loadgen",
                                     "--server=" + server_->address(),
                                     "--model_dir=" + testing::UseLiteModelDir(), "--json"};
    argv.insert(argv.end(), args.begin(), args.end());
    return testing::RunCommand(argv, "", absl::Seconds(300));
  }

  static ServerProcess* server_;
  static std::string* start_error_;
};
ServerProcess* LoadgenTest::server_ = nullptr;
std::string* LoadgenTest::start_error_ = nullptr;

TEST_F(LoadgenTest, ClosedLoopOverMixedTasksReportsThroughputLatencyAndNoErrors) {
  const testing::CommandResult r =
      Loadgen({"--tasks=20", "--zipf_s=0.5", "--concurrency=1,3", "--duration_s=1.5", "--warmup_s=0.3",
               "--batch=2", absl::StrCat("--metrics=127.0.0.1:", server_->metrics_port())});
  ASSERT_EQ(r.exit_code, 0) << r.err << r.out;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["setup"]["tasks"], 20);
  EXPECT_EQ(j["setup"]["created"].get<int>() + j["setup"]["existing"].get<int>(), 20);
  ASSERT_EQ(j["steps"].size(), 2u);
  for (const nlohmann::json& step : j["steps"]) {
    EXPECT_GT(step["ok"].get<int64_t>(), 0) << step.dump();
    EXPECT_EQ(step["errors"], 0) << step.dump();
    EXPECT_EQ(step["inputs"].get<int64_t>(), 2 * step["ok"].get<int64_t>());
    EXPECT_GT(step["requests_per_second"].get<double>(), 0);
    EXPECT_LE(step["latency_ms"]["p50"].get<double>(), step["latency_ms"]["p99"].get<double>());
    EXPECT_LE(step["latency_ms"]["p99"].get<double>(), step["latency_ms"]["max"].get<double>());
    EXPECT_GT(step["distinct_tasks"].get<int64_t>(), 1);
    EXPECT_EQ(step["verdict"], "OK");
    EXPECT_GT(step["server_side"]["batches"].get<double>(), 0) << step.dump();
  }
  EXPECT_EQ(j["steps"][1]["concurrency"], 3);
  EXPECT_THAT(j["verdict"].get<std::string>(), HasSubstr("capacity"));
  // The people's report goes to stderr with --json.
  EXPECT_THAT(r.err, HasSubstr("VERDICT:"));
  EXPECT_THAT(r.err, HasSubstr("p99 ms"));
}

TEST_F(LoadgenTest, SetupIsIdempotentAndOpenLoopClassifyWorks) {
  const std::vector<std::string> common = {"--tasks=6", "--methods=lora,bitfit+lora,prompt", "--task_prefix=idem-",
                                           "--tenants=2"};
  std::vector<std::string> first = common;
  first.insert(first.end(), {"--max_requests=5", "--warmup_s=0", "--concurrency=1"});
  const testing::CommandResult a = Loadgen(first);
  ASSERT_EQ(a.exit_code, 0) << a.err;
  EXPECT_EQ(nlohmann::json::parse(a.out)["setup"]["created"], 6);

  std::vector<std::string> second = common;
  second.insert(second.end(), {"--mode=open", "--qps=40", "--concurrency=4", "--duration_s=1", "--warmup_s=0",
                               "--rpc=classify", "--max_error_rate=0"});
  const testing::CommandResult b = Loadgen(second);
  ASSERT_EQ(b.exit_code, 0) << b.err;
  const nlohmann::json j = nlohmann::json::parse(b.out);
  EXPECT_EQ(j["setup"]["created"], 0);
  EXPECT_EQ(j["setup"]["existing"], 6);
  EXPECT_EQ(j["steps"][0]["mode"], "open");
  EXPECT_GT(j["steps"][0]["ok"].get<int64_t>(), 10);
  EXPECT_EQ(j["steps"][0]["errors"], 0);
}

TEST_F(LoadgenTest, UnregisteredTasksFailWithAClearMessage) {
  const testing::CommandResult r = Loadgen({"--tasks=3", "--setup=existing", "--task_prefix=never-pushed-"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("NOT_FOUND"));
  EXPECT_THAT(r.err, HasSubstr("never-pushed-task-00000"));
}

TEST_F(LoadgenTest, BadFlagsAreUsageErrors) {
  EXPECT_EQ(Loadgen({"--mode=open"}).exit_code, 2);  // no --qps
  EXPECT_EQ(Loadgen({"--methods=lora+nothing"}).exit_code, 2);
  EXPECT_EQ(Loadgen({"--tasks=0", "--rpc=classify"}).exit_code, 2);
}

TEST(LoadgenNoServerTest, UnreachableServerIsReported) {
  const testing::CommandResult r = testing::RunCommand(
      {testing::BinaryDir() + "/client/deltaserve-loadgen", "--server=127.0.0.1:1", "--timeout_s=2", "--tasks=0"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("cannot reach deltaserve at 127.0.0.1:1"));
}

// The metric names a PromQL expression reads: every deltaserve_* identifier.
std::set<std::string> MetricNames(const std::string& expr) {
  std::set<std::string> out;
  static const std::regex kName("deltaserve_[a-zA-Z0-9_]+");
  for (auto it = std::sregex_iterator(expr.begin(), expr.end(), kName); it != std::sregex_iterator(); ++it) {
    out.insert(it->str());
  }
  return out;
}

TEST_F(LoadgenTest, DashboardParsesAndQueriesOnlyMetricsTheServerExports) {
  // Traffic first, so that labelled series exist (requests by code, cache results, rows by method, ...).
  const testing::CommandResult load = Loadgen({"--tasks=30", "--task_prefix=dash-", "--max_requests=60",
                                               "--warmup_s=0", "--concurrency=2", "--tenants=2"});
  ASSERT_EQ(load.exit_code, 0) << load.err;
  const testing::CommandResult missing =
      Loadgen({"--tasks=1", "--setup=existing", "--task_prefix=dash-missing-"});  // a NOT_FOUND request code
  (void)missing;
  const std::string metrics = testing::HttpGet(server_->metrics_port(), "/metrics");
  ASSERT_THAT(metrics, HasSubstr("deltaserve_requests_total"));

  std::ifstream in(testing::SourceDir() + "/deploy/grafana/deltaserve-dashboard.json");
  ASSERT_TRUE(in.good());
  std::stringstream text;
  text << in.rdbuf();
  nlohmann::json dash = nlohmann::json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  ASSERT_FALSE(dash.is_discarded()) << "deltaserve-dashboard.json is not valid JSON";
  ASSERT_TRUE(dash.contains("panels"));
  EXPECT_EQ(dash["uid"], "deltaserve");
  std::set<std::string> queried;
  int panels_with_queries = 0;
  for (const nlohmann::json& panel : dash["panels"]) {
    if (!panel.contains("targets")) continue;
    ++panels_with_queries;
    for (const nlohmann::json& target : panel["targets"]) {
      const std::set<std::string> names = MetricNames(target["expr"].get<std::string>());
      EXPECT_FALSE(names.empty()) << panel["title"];
      queried.insert(names.begin(), names.end());
    }
  }
  EXPECT_GE(panels_with_queries, 10);
  // Metrics whose series appear only after their first event, which this traffic need not cause.
  const std::set<std::string> lazy = {
      "deltaserve_queue_dropped_rows_total",  // {reason}: a queued row whose request ended (deadline, cancel)
  };
  for (const std::string& name : queried) {
    if (lazy.count(name) > 0) continue;
    // A series line starts with the name followed by '{' or ' ' (histograms: name_bucket / _sum / _count).
    EXPECT_TRUE(absl::StrContains(metrics, "\n" + name + "{") || absl::StrContains(metrics, "\n" + name + " "))
        << "the dashboard queries " << name << ", which the server does not export";
  }
  // And every deltaserve_ metric the server exports is on the dashboard.
  std::set<std::string> exported;
  std::istringstream lines(metrics);
  for (std::string line; std::getline(lines, line);) {
    if (!absl::StartsWith(line, "# TYPE deltaserve_")) continue;
    exported.insert(line.substr(7, line.find(' ', 7) - 7));
  }
  for (const std::string& family : exported) {
    bool shown = false;
    for (const std::string& name : queried) shown |= absl::StartsWith(name, family);
    EXPECT_TRUE(shown) << family << " is exported but not on the dashboard";
  }
}

}  // namespace
}  // namespace deltaserve
