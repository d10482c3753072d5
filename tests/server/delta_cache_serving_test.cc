// Integration: the delta cache of a real deltaserve, over gRPC and through deltactl. Prefetch warms tasks and says
// where each pack came from (store, host tier, already loaded); bad references get clear statuses; the cache's
// metrics show on /metrics; and a label moved again and again under concurrent requests never fails a request,
// each getting the old or the new pack's result.
#include <atomic>
#include <cmath>
#include <iostream>
#include <map>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "client/client.h"
#include "deltaserve/v1/deltas.grpc.pb.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/delta/delta_pack.h"
#include "server/model/model_loader.h"
#include "tests/delta/delta_test_util.h"
#include "tests/server/server_process.h"
#include "tests/server/test_packs.h"

namespace deltaserve {
namespace {

using ::deltaserve::testing::ServerProcess;
using ::testing::HasSubstr;
namespace pb = ::deltaserve::v1;

using ::deltaserve::testing::LoraHeadPack;

// The value of the series `name{labels}` (labels as Prometheus writes them, sorted), or -1 when absent.
double MetricValue(const std::string& text, const std::string& series) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::StartsWith(line, series + " ")) continue;
    double v = -1;
    if (absl::SimpleAtod(line.substr(series.size() + 1), &v)) return v;
  }
  return -1;
}

class DeltaCacheServingTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    model_dir_ = new std::string(testing::UseLiteModelDir());
    if (model_dir_->empty()) return;
    auto loaded = model::LoadModel(*model_dir_, {});
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    model_ = loaded->release();
    auto pack = delta::DeltaPack::Load(LoraHeadPack(*model_, "probe", 1), *model_, {});
    ASSERT_TRUE(pack.ok()) << pack.status();
    pack_bytes_ = (*pack)->bytes();
  }

  void SetUp() override {
    if (model_ == nullptr) GTEST_SKIP() << "no converted use-lite model: run `bash scripts/setup.sh build`";
  }

  // A server whose device tier holds `packs` of this test's packs.
  void StartServer(double packs, std::vector<std::string> extra = {}) {
    const int64_t cache_bytes = static_cast<int64_t>(packs * static_cast<double>(pack_bytes_));
    std::vector<std::string> args = {"--model_dir=" + *model_dir_, "--max_pack_bytes=400000",
                                     "--max_queue_delay_ms=2", "--delta_cache_bytes=" + std::to_string(cache_bytes)};
    args.insert(args.end(), extra.begin(), extra.end());
    auto server = ServerProcess::Start(args);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    client::DeltaserveClient::Options options;
    options.target = server_->address();
    client_ = std::make_unique<client::DeltaserveClient>(options);
  }

  pb::PushDeltaResponse Push(const std::string& task, const std::string& bytes, std::vector<std::string> labels = {}) {
    pb::PushDeltaHeader header;
    header.set_task(task);
    for (const std::string& l : labels) header.add_labels(l);
    auto r = client_->PushDelta(header, bytes);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *r : pb::PushDeltaResponse();
  }

  absl::StatusOr<pb::PrefetchResponse> Prefetch(const std::vector<std::string>& refs) {
    pb::PrefetchRequest request;
    for (const std::string& ref : refs) request.add_tasks()->set_task(ref);
    return client_->Prefetch(request);
  }

  testing::CommandResult Deltactl(std::vector<std::string> args) {
    args.insert(args.begin(), {testing::DeltactlBinary(), "--server=" + server_->address()});
    return testing::RunCommand(args);
  }

  static std::string* model_dir_;
  static const model::Model* model_;
  static int64_t pack_bytes_;
  std::unique_ptr<ServerProcess> server_;
  std::unique_ptr<client::DeltaserveClient> client_;
};

std::string* DeltaCacheServingTest::model_dir_ = nullptr;
const model::Model* DeltaCacheServingTest::model_ = nullptr;
int64_t DeltaCacheServingTest::pack_bytes_ = 0;

TEST_F(DeltaCacheServingTest, PrefetchWarmsTasksAndSaysWhereEachPackCameFrom) {
  StartServer(1.5);  // one pack on the device
  const pb::PushDeltaResponse a = Push("alpha", LoraHeadPack(*model_, "alpha", 1));  // kept: it fits
  const pb::PushDeltaResponse b = Push("beta", LoraHeadPack(*model_, "beta", 100));  // not kept: a push never evicts

  auto r = Prefetch({"beta"});
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->deltas_size(), 1);
  const pb::PrefetchedDelta& beta = r->deltas(0);
  EXPECT_EQ(beta.tenant(), "default");
  EXPECT_EQ(beta.task(), "beta");
  EXPECT_EQ(beta.version(), 1);
  EXPECT_EQ(beta.digest(), b.version().digest());
  EXPECT_EQ(beta.source(), pb::CACHE_TIER_STORE);
  EXPECT_EQ(beta.device_bytes(), pack_bytes_);
  EXPECT_GT(beta.serialized_bytes(), 0);
  EXPECT_GT(beta.load_seconds(), 0);
  EXPECT_TRUE(beta.resident());

  // alpha was evicted to the host tier for beta; warming it again takes it from there, and beta goes.
  r = Prefetch({"default/alpha@1"});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->deltas(0).digest(), a.version().digest());
  EXPECT_EQ(r->deltas(0).source(), pb::CACHE_TIER_HOST);
  r = Prefetch({"alpha"});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->deltas(0).source(), pb::CACHE_TIER_DEVICE);
  EXPECT_EQ(r->deltas(0).load_seconds(), 0);

  // Both in one call: the device holds one, so the first is no longer resident when the call returns.
  r = Prefetch({"alpha", b.version().digest()});
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->deltas_size(), 2);
  EXPECT_FALSE(r->deltas(0).resident());
  EXPECT_EQ(r->deltas(1).digest(), b.version().digest());
  EXPECT_TRUE(r->deltas(1).resident());

  // A request for the warmed task is a hit.
  pb::ClassifyRequest classify;
  classify.mutable_task()->set_task("beta");
  classify.add_texts("a movie I will remember");
  auto classified = client_->Classify(classify);
  ASSERT_TRUE(classified.ok()) << classified.status();
  EXPECT_EQ(classified->delta().digest(), b.version().digest());

  const std::string metrics = testing::HttpGet(server_->metrics_port(), "/metrics");
  EXPECT_GE(MetricValue(metrics, "deltaserve_delta_cache_lookups_total{tier=\"device\"}"), 2);
  EXPECT_GE(MetricValue(metrics, "deltaserve_delta_cache_lookups_total{tier=\"host\"}"), 1);
  EXPECT_GE(MetricValue(metrics, "deltaserve_delta_cache_lookups_total{tier=\"store\"}"), 1);
  EXPECT_GE(MetricValue(metrics, "deltaserve_delta_loads_total{outcome=\"ok\",source=\"store\"}"), 1);
  EXPECT_GE(MetricValue(metrics, "deltaserve_delta_load_seconds_count{source=\"host\"}"), 1);
  EXPECT_GE(MetricValue(metrics, "deltaserve_delta_cache_evictions_total{tier=\"device\"}"), 2);
  EXPECT_EQ(MetricValue(metrics, "deltaserve_delta_cache_resident_bytes{tier=\"device\"}"), pack_bytes_);
  EXPECT_EQ(MetricValue(metrics, "deltaserve_delta_cache_resident_packs{tier=\"device\"}"), 1);
  EXPECT_EQ(MetricValue(metrics, "deltaserve_delta_cache_resident_packs{tier=\"host\"}"), 1);
  EXPECT_GT(MetricValue(metrics, "deltaserve_delta_cache_resident_bytes{tier=\"host\"}"), 0);
  EXPECT_EQ(MetricValue(metrics, "deltaserve_requests_total{code=\"OK\",rpc=\"Prefetch\"}"), 4);
}

TEST_F(DeltaCacheServingTest, PrefetchOfBadReferencesIsAClearErrorAndLoadsNothing) {
  StartServer(4);
  Push("alpha", LoraHeadPack(*model_, "alpha", 1));
  struct Case {
    std::vector<std::string> refs;
    absl::StatusCode code;
    std::string message;
  };
  const std::vector<Case> cases = {
      {{"nope"}, absl::StatusCode::kNotFound, "nope"},
      {{"alpha@7"}, absl::StatusCode::kNotFound, "7"},
      {{"alpha:canary"}, absl::StatusCode::kNotFound, "canary"},
      {{"sha256:" + std::string(64, 'a')}, absl::StatusCode::kNotFound, ""},
      {{"alpha@x"}, absl::StatusCode::kInvalidArgument, ""},
      {{"alpha", "Bad Name"}, absl::StatusCode::kInvalidArgument, "task reference 2 of 2"},
      {{"acme/alpha"}, absl::StatusCode::kNotFound, ""},
      {{}, absl::StatusCode::kInvalidArgument, "at least one"},
  };
  for (const Case& c : cases) {
    auto r = Prefetch(c.refs);
    EXPECT_EQ(r.status().code(), c.code) << absl::StrJoin(c.refs, ",") << ": " << r.status();
    EXPECT_THAT(r.status().message(), HasSubstr(c.message));
  }
  pb::PrefetchRequest empty_ref;
  empty_ref.add_tasks();
  EXPECT_EQ(client_->Prefetch(empty_ref).status().code(), absl::StatusCode::kInvalidArgument);
  const std::string metrics = testing::HttpGet(server_->metrics_port(), "/metrics");
  EXPECT_EQ(MetricValue(metrics, "deltaserve_requests_total{code=\"NOT_FOUND\",rpc=\"Prefetch\"}"), 5);
  EXPECT_EQ(MetricValue(metrics, "deltaserve_delta_loads_total{outcome=\"ok\",source=\"store\"}"), 0);
}

TEST_F(DeltaCacheServingTest, DeltactlPrefetchPrintsWhatItLoaded) {
  StartServer(1.5);
  Push("alpha", LoraHeadPack(*model_, "alpha", 1));
  Push("beta", LoraHeadPack(*model_, "beta", 100));
  testing::CommandResult r = Deltactl({"prefetch", "beta"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("default/beta@1: loaded from the store in"));
  r = Deltactl({"prefetch", "beta", "alpha", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j.size(), 2u);
  EXPECT_EQ(j[0]["source"], "device");
  EXPECT_EQ(j[0]["ref"], "beta");
  EXPECT_EQ(j[1]["source"], "host");
  EXPECT_EQ(j[1]["task"], "alpha");
  EXPECT_EQ(j[1]["resident"], true);
  r = Deltactl({"prefetch", "nope"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("deltactl: NOT_FOUND"));
  r = Deltactl({"prefetch"});
  EXPECT_EQ(r.exit_code, 2);
}

// Requests for "swap:prod" run from several threads while the label moves back and forth. With a device tier of
// one pack and no host tier, the moves also evict and reload packs from the store under the running requests.
TEST_F(DeltaCacheServingTest, RequestsInFlightWhileALabelMovesNeverFailAndGetTheOldOrTheNewPack) {
  StartServer(1, {"--host_cache_bytes=0"});
  const pb::PushDeltaResponse v1 = Push("swap", LoraHeadPack(*model_, "v1", 1), {"prod"});
  const pb::PushDeltaResponse v2 = Push("swap", LoraHeadPack(*model_, "v2", 100));
  const std::string text = "a movie I will remember";
  // What each version answers, asked by digest.
  std::map<std::string, float> expected;
  for (const std::string& digest : {v1.version().digest(), v2.version().digest()}) {
    pb::ClassifyRequest request;
    request.mutable_task()->set_task("swap");
    request.mutable_task()->set_digest(digest);
    request.add_texts(text);
    auto r = client_->Classify(request);
    ASSERT_TRUE(r.ok()) << r.status();
    for (const pb::LabelScore& l : r->results(0).labels()) {
      if (l.label() == "pos") expected[digest] = l.score();
    }
  }
  ASSERT_GT(std::fabs(expected[v1.version().digest()] - expected[v2.version().digest()]), 1e-3);

  std::atomic<bool> stop{false};
  std::atomic<int> ok{0}, failed{0}, wrong{0};
  std::map<std::string, std::atomic<int>> by_digest;
  by_digest[v1.version().digest()] = 0;
  by_digest[v2.version().digest()] = 0;
  std::string first_error;
  absl::Mutex error_mu;
  std::vector<std::thread> clients;
  for (int t = 0; t < 6; ++t) {
    clients.emplace_back([&] {
      client::DeltaserveClient::Options options;
      options.target = server_->address();
      client::DeltaserveClient c(options);
      pb::ClassifyRequest request;
      request.mutable_task()->set_task("swap:prod");
      request.add_texts(text);
      while (!stop) {
        auto r = c.Classify(request);
        if (!r.ok()) {
          ++failed;
          absl::MutexLock lock(&error_mu);
          if (first_error.empty()) first_error = r.status().ToString();
          continue;
        }
        auto it = expected.find(r->delta().digest());
        float pos = -1;
        for (const pb::LabelScore& l : r->results(0).labels()) {
          if (l.label() == "pos") pos = l.score();
        }
        if (it == expected.end() || std::fabs(pos - it->second) > 1e-3) {
          ++wrong;
        } else {
          ++ok;
          ++by_digest[it->first];
        }
      }
    });
  }
  for (int move = 0; move < 30; ++move) {
    const int64_t to = move % 2 == 0 ? 2 : 1;
    pb::SetLabelRequest set;
    set.set_task("swap");
    set.set_label("prod");
    set.set_version(to);
    ASSERT_TRUE(client_->SetLabel(set).ok());
    // Takes effect at once for new requests.
    pb::EmbedRequest probe;
    probe.mutable_task()->set_task("swap:prod");
    probe.add_texts(text);
    auto r = client_->Embed(probe);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->delta().digest(), (to == 2 ? v2 : v1).version().digest());
    absl::SleepFor(absl::Milliseconds(30));
  }
  stop = true;
  for (std::thread& t : clients) t.join();
  EXPECT_EQ(failed, 0) << first_error;
  EXPECT_EQ(wrong, 0);
  EXPECT_GT(by_digest[v1.version().digest()], 0);
  EXPECT_GT(by_digest[v2.version().digest()], 0);
  const std::string metrics = testing::HttpGet(server_->metrics_port(), "/metrics");
  std::cout << "requests: " << ok << " (v1 " << by_digest[v1.version().digest()] << ", v2 "
            << by_digest[v2.version().digest()] << "); store loads: "
            << MetricValue(metrics, "deltaserve_delta_loads_total{outcome=\"ok\",source=\"store\"}") << "\n";
  EXPECT_GE(MetricValue(metrics, "deltaserve_delta_loads_total{outcome=\"ok\",source=\"store\"}"), 2);
  EXPECT_EQ(MetricValue(metrics, "deltaserve_delta_loads_total{outcome=\"error\",source=\"store\"}"), 0);
}

}  // namespace
}  // namespace deltaserve
