// Integration: several replicas on one machine, as the `replicated` deployment runs them (docs/OPERATIONS.md).
// A real OCI registry (Debian's docker-registry), three real deltaserve processes sharing it (each with its own
// local cache directory and --store_resolve_ttl_s=1, the documented bound on label propagation), and a real
// Prometheus (Debian's prometheus) scraping the three metrics ports every second.
//   - a pack pushed through one replica serves, with the same output, on every other;
//   - a label moved through one replica is seen by all within the resolve TTL (the time is measured and printed);
//   - SIGKILLing a replica right after it acknowledged a push and a label move loses nothing: the others serve
//     them, and the replica restarted on the same cache directory serves them too;
//   - Prometheus sees every replica's request counters through its HTTP API.
// The registry, the servers and Prometheus start once for the suite (SetUpTestSuite) and are stopped by
// TearDownTestSuite; Prometheus and the registry also die with the test process (PR_SET_PDEATHSIG). Every test
// uses its own task names, so the tests hold in any order and alone (ctest runs each in its own process).
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <future>
#include <map>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "curl/curl.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/common/file_util.h"
#include "server/common/sha256.h"
#include "server/model/model_loader.h"
#include "tests/server/server_process.h"
#include "tests/server/test_packs.h"
#include "tests/store/local_registry.h"

namespace deltaserve {
namespace {

using ::deltaserve::testing::LoraHeadPack;
using ::deltaserve::testing::ServerProcess;
using ::testing::ElementsAre;
namespace pb = ::deltaserve::v1;

constexpr int kReplicas = 3;
// --store_resolve_ttl_s of every replica: how long a replica may keep answering with a label's previous version.
constexpr double kResolveTtlSeconds = 1;
// What label propagation may take beyond the TTL (a request's own time, a loaded machine).
constexpr absl::Duration kPropagationSlack = absl::Seconds(2);
constexpr char kText[] = "a movie I will remember";

std::vector<float> Values(const pb::Vector& v) { return {v.values().begin(), v.values().end()}; }

float MaxDiff(const std::vector<float>& a, const std::vector<float>& b) {
  float m = a.size() == b.size() ? 0.f : 1e9f;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}

std::string FindOnPath(const std::string& name) {
  const char* path = getenv("PATH");
  for (absl::string_view dir : absl::StrSplit(path != nullptr ? path : "", ':', absl::SkipEmpty())) {
    const std::string candidate = absl::StrCat(dir, "/", name);
    if (access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

// A GET with libcurl (never through a proxy): the HTTP status and the body.
absl::StatusOr<std::pair<long, std::string>> HttpGetUrl(const std::string& url) {
  CURL* curl = curl_easy_init();
  if (curl == nullptr) return absl::InternalError("curl_easy_init failed");
  std::string body;
  curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
  curl_easy_setopt(curl, CURLOPT_NOPROXY, "*");
  curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, 1000L);
  curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, 5000L);
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, +[](char* p, size_t size, size_t n, void* out) -> size_t {
    static_cast<std::string*>(out)->append(p, size * n);
    return size * n;
  });
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, &body);
  const CURLcode rc = curl_easy_perform(curl);
  long code = 0;
  curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &code);
  curl_easy_cleanup(curl);
  if (rc != CURLE_OK) return absl::UnavailableError(absl::StrCat("GET ", url, ": ", curl_easy_strerror(rc)));
  return std::make_pair(code, std::move(body));
}

std::string UrlEscape(const std::string& s) {
  CURL* curl = curl_easy_init();
  char* escaped = curl_easy_escape(curl, s.c_str(), static_cast<int>(s.size()));
  std::string out = escaped != nullptr ? escaped : "";
  curl_free(escaped);
  curl_easy_cleanup(curl);
  return out;
}

// A real Prometheus on 127.0.0.1 (a free port), scraping `targets` every second, with its TSDB and config in a
// fresh temporary directory. Killed (SIGKILL) by the destructor and with the test process. Not thread-safe.
class Prometheus {
 public:
  static constexpr char kSkipMessage[] =
      "prometheus is not installed; install it (apt-get install prometheus) to run the replicas test";

  static absl::StatusOr<std::unique_ptr<Prometheus>> Start(const std::vector<std::string>& targets) {
    const std::string binary = FindOnPath("prometheus");
    if (binary.empty()) return absl::FailedPreconditionError(kSkipMessage);
    absl::Status last;
    for (int attempt = 0; attempt < 3; ++attempt) {  // the probed port may be taken before Prometheus binds it
      std::unique_ptr<Prometheus> p(new Prometheus(testing::MakeTempDir()));
      last = p->WriteConfig(targets);
      if (last.ok()) last = p->Launch(binary);
      if (last.ok()) return p;
    }
    return last;
  }

  ~Prometheus() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }
  Prometheus(const Prometheus&) = delete;
  Prometheus& operator=(const Prometheus&) = delete;

  // Rewrites the scrape targets and has Prometheus reload its configuration (SIGHUP).
  absl::Status SetTargets(const std::vector<std::string>& targets) {
    if (absl::Status st = WriteConfig(targets); !st.ok()) return st;
    if (::kill(pid_, SIGHUP) != 0) return absl::InternalError("cannot signal prometheus");
    return absl::OkStatus();
  }

  // An instant query through the HTTP API: data.result of a successful answer.
  absl::StatusOr<nlohmann::json> Query(const std::string& expr) const {
    auto got = HttpGetUrl(absl::StrCat(url_, "/api/v1/query?query=", UrlEscape(expr)));
    if (!got.ok()) return got.status();
    nlohmann::json answer = nlohmann::json::parse(got->second, nullptr, /*allow_exceptions=*/false);
    if (got->first != 200 || answer.is_discarded() || answer.value("status", "") != "success") {
      return absl::InternalError(absl::StrCat("query ", expr, ": HTTP ", got->first, ": ", got->second));
    }
    return answer["data"]["result"];
  }

  // The targets page of the API (for failure messages).
  std::string Targets() const {
    auto got = HttpGetUrl(url_ + "/api/v1/targets");
    return got.ok() ? got->second : std::string(got.status().message());
  }

  std::string Log() const {
    std::ifstream in(dir_ + "/prometheus.log");
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }

 private:
  explicit Prometheus(std::string dir) : dir_(std::move(dir)) {}

  absl::Status WriteConfig(const std::vector<std::string>& targets) {
    std::vector<std::string> quoted;
    for (const std::string& t : targets) quoted.push_back(absl::StrCat("'", t, "'"));
    return WriteFileAtomically(dir_ + "/prometheus.yml", absl::StrCat(R"(global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: deltaserve
    metrics_path: /metrics
    static_configs:
      - targets: [)",
                                                                     absl::StrJoin(quoted, ", "), "]\n"));
  }

  absl::Status Launch(const std::string& binary) {
    const int port = testing::FreePort();
    if (port <= 0) return absl::UnavailableError("no free port for prometheus");
    url_ = absl::StrCat("http://127.0.0.1:", port);
    std::vector<std::string> argv = {binary,
                                     "--config.file=" + dir_ + "/prometheus.yml",
                                     "--storage.tsdb.path=" + dir_ + "/data",
                                     absl::StrCat("--web.listen-address=127.0.0.1:", port),
                                     "--log.level=info"};
    std::vector<char*> args;
    for (std::string& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    const std::string log = dir_ + "/prometheus.log";
    const pid_t parent = ::getpid();
    const pid_t pid = ::fork();
    if (pid < 0) return absl::UnavailableError("fork failed");
    if (pid == 0) {  // only async-signal-safe calls until exec
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(127);
      const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (fd >= 0) {
        ::dup2(fd, 1);
        ::dup2(fd, 2);
      }
      ::execv(args[0], args.data());
      ::_exit(127);
    }
    pid_ = pid;
    const absl::Time end = absl::Now() + absl::Seconds(30);
    while (absl::Now() < end) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return absl::UnavailableError("prometheus exited before it was ready:\n" + Log());
      }
      auto ready = HttpGetUrl(url_ + "/-/ready");
      if (ready.ok() && ready->first == 200) return absl::OkStatus();
      absl::SleepFor(absl::Milliseconds(50));
    }
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
    pid_ = -1;
    return absl::UnavailableError("prometheus was not ready within 30 s:\n" + Log());
  }

  const std::string dir_;  // prometheus.yml, data/, prometheus.log
  std::string url_;
  pid_t pid_ = -1;
};

// The value of one sample of an instant vector: {"metric": {...}, "value": [<time>, "<value>"]}.
double SampleValue(const nlohmann::json& sample) { return std::stod(sample["value"][1].get<std::string>()); }

// Everything ListDeltas lists for the default tenant, every page: (task, version) -> digest.
absl::StatusOr<std::map<std::pair<std::string, int64_t>, std::string>> ListAll(client::DeltaserveClient& c) {
  std::map<std::pair<std::string, int64_t>, std::string> all;
  pb::ListDeltasRequest request;
  request.set_page_size(1000);
  while (true) {
    auto page = c.ListDeltas(request);
    if (!page.ok()) return page.status();
    for (const pb::DeltaVersion& v : page->versions()) all[{v.task(), v.version()}] = v.digest();
    if (page->next_page_token().empty()) return all;
    request.set_page_token(page->next_page_token());
  }
}

class ReplicasTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    model_dir_ = testing::UseLiteModelDir();
    if (model_dir_.empty()) {
      skip_ = "no converted use-lite model: run `bash scripts/setup.sh build`";
      return;
    }
    if (store::LocalRegistry::FindBinary().empty()) {
      skip_ = store::LocalRegistry::kSkipMessage;
      return;
    }
    if (FindOnPath("prometheus").empty()) {
      skip_ = Prometheus::kSkipMessage;
      return;
    }
    curl_global_init(CURL_GLOBAL_DEFAULT);
    const absl::Time start = absl::Now();
    // The test process needs the model too, to make packs for it.
    auto model = std::async(std::launch::async, [] { return model::LoadModel(model_dir_, {}); });
    auto registry = store::LocalRegistry::Start();
    if (!registry.ok()) {
      setup_error_ = absl::StrCat("registry: ", registry.status().ToString());
      return;
    }
    registry_ = std::move(*registry);
    root_ = testing::MakeTempDir();
    // One after the other, from this thread: a child started with PR_SET_PDEATHSIG dies with the thread that
    // forked it, so no helper threads start processes here.
    for (int i = 0; i < kReplicas; ++i) {
      auto server = ServerProcess::Start(ReplicaArgs(i));
      if (!server.ok()) {
        setup_error_ += absl::StrCat("replica ", i + 1, ": ", server.status().ToString(), "\n");
        continue;
      }
      servers_[i] = std::move(*server);
      ConnectClient(i);
    }
    auto loaded = model.get();
    if (!loaded.ok()) setup_error_ += absl::StrCat("model: ", loaded.status().ToString());
    if (!setup_error_.empty()) return;
    model_ = std::move(*loaded);
    auto prometheus = Prometheus::Start(MetricsTargets());
    if (!prometheus.ok()) {
      setup_error_ = absl::StrCat("prometheus: ", prometheus.status().ToString());
      return;
    }
    prometheus_ = std::move(*prometheus);
    std::printf("[ replicas ] registry, %d replicas and prometheus up in %.2f s\n", kReplicas,
                absl::ToDoubleSeconds(absl::Now() - start));
  }

  static void TearDownTestSuite() {
    // What the replicas logged at WARNING and above, for whoever reads the test's output.
    for (int i = 0; i < kReplicas; ++i) {
      if (servers_[i] == nullptr) continue;
      for (absl::string_view line : absl::StrSplit(servers_[i]->Log(), '\n')) {
        if (!line.empty() && (line[0] == 'W' || line[0] == 'E' || line[0] == 'F')) {
          std::printf("[ replica %d log ] %.*s\n", i + 1, static_cast<int>(line.size()), line.data());
        }
      }
    }
    for (auto& c : clients_) c.reset();
    for (auto& s : servers_) s.reset();
    prometheus_.reset();
    registry_.reset();
    model_.reset();
    if (!root_.empty()) {
      std::error_code ignored;
      std::filesystem::remove_all(root_, ignored);
    }
  }

  void SetUp() override {
    if (!skip_.empty()) GTEST_SKIP() << skip_;
    ASSERT_TRUE(setup_error_.empty()) << setup_error_;
  }

  // Replica i's flags: its own cache directory (kept across restarts), the shared registry, the TTL bound.
  static std::vector<std::string> ReplicaArgs(int i) {
    return {"--model_dir=" + model_dir_,
            absl::StrCat("--store_dir=", root_, "/replica", i + 1),
            "--store_url=" + registry_->url(),
            absl::StrCat("--store_resolve_ttl_s=", kResolveTtlSeconds),
            "--max_pack_bytes=400000",
            "--max_queue_delay_ms=5"};
  }

  static void ConnectClient(int i) {
    client::DeltaserveClient::Options options;
    options.target = servers_[i]->address();
    options.timeout = absl::Seconds(20);
    clients_[i] = std::make_unique<client::DeltaserveClient>(options);
  }

  static std::vector<std::string> MetricsTargets() {
    std::vector<std::string> targets;
    for (const auto& s : servers_) targets.push_back(Instance(*s));
    return targets;
  }
  static std::string Instance(const ServerProcess& s) { return absl::StrCat("127.0.0.1:", s.metrics_port()); }

  static client::DeltaserveClient& Client(int i) { return *clients_[i]; }

  static absl::StatusOr<pb::PushDeltaResponse> Push(int replica, const std::string& task, const std::string& bytes,
                                                    std::vector<std::string> labels = {}) {
    pb::PushDeltaHeader header;
    header.set_task(task);
    for (const std::string& l : labels) header.add_labels(l);
    return Client(replica).PushDelta(header, bytes);
  }

  // The embedding of kText on `replica` with the pack `ref` names ("task", "task:label", "task@N"), and the
  // digest of the pack that served it.
  struct Served {
    std::vector<float> embedding;
    std::string digest;
  };
  static absl::StatusOr<Served> EmbedWith(int replica, const std::string& ref) {
    pb::EmbedRequest request;
    request.mutable_task()->set_task(ref);
    request.add_texts(kText);
    auto r = Client(replica).Embed(request);
    if (!r.ok()) return r.status();
    return Served{Values(r->results(0).embedding()), r->delta().digest()};
  }

  static absl::Status SetLabel(int replica, const std::string& task, const std::string& label, int64_t version) {
    pb::SetLabelRequest move;
    move.set_task(task);
    move.set_label(label);
    move.set_version(version);
    return Client(replica).SetLabel(move).status();
  }

  inline static std::string skip_;
  inline static std::string setup_error_;
  inline static std::string model_dir_;
  inline static std::string root_;
  inline static std::unique_ptr<model::Model> model_;
  inline static std::unique_ptr<store::LocalRegistry> registry_;
  inline static std::array<std::unique_ptr<ServerProcess>, kReplicas> servers_;
  inline static std::array<std::unique_ptr<client::DeltaserveClient>, kReplicas> clients_;
  inline static std::unique_ptr<Prometheus> prometheus_;
};

TEST_F(ReplicasTest, PackPushedThroughOneReplicaServesOnEveryOther) {
  const std::string bytes = LoraHeadPack(*model_, "pushed-v1", 7);
  auto pushed = Push(0, "pushed", bytes, {"prod"});
  ASSERT_TRUE(pushed.ok()) << pushed.status();
  const std::string digest = pushed->version().digest();

  std::array<pb::ClassifyResponse, kReplicas> classified;
  std::array<Served, kReplicas> embedded;
  for (int i = 0; i < kReplicas; ++i) {
    SCOPED_TRACE(absl::StrCat("replica ", i + 1));
    pb::ClassifyRequest request;
    request.mutable_task()->set_task("pushed");
    request.add_texts(kText);
    request.add_texts("the dullest two hours of the year");
    auto c = Client(i).Classify(request);
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_EQ(c->delta().digest(), digest);
    ASSERT_EQ(c->results_size(), 2);
    classified[i] = *c;
    auto e = EmbedWith(i, "pushed:prod");
    ASSERT_TRUE(e.ok()) << e.status();
    EXPECT_EQ(e->digest, digest);
    embedded[i] = *e;

    auto got = Client(i).GetDelta("", "pushed@1");
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->version().digest(), digest);
    EXPECT_THAT(got->version().labels(), ElementsAre("latest", "prod"));
    std::string pulled;
    ASSERT_TRUE(Client(i).PullDelta("", "pushed", &pulled).ok());
    EXPECT_EQ(Sha256Digest(pulled), digest);
  }
  // The same outputs everywhere: labels in the same order with the same scores, the same embeddings.
  for (int i = 1; i < kReplicas; ++i) {
    SCOPED_TRACE(absl::StrCat("replica ", i + 1, " against replica 1"));
    for (int r = 0; r < 2; ++r) {
      const pb::ClassifyResult& want = classified[0].results(r);
      const pb::ClassifyResult& got = classified[i].results(r);
      ASSERT_EQ(got.labels_size(), want.labels_size());
      for (int l = 0; l < want.labels_size(); ++l) {
        EXPECT_EQ(got.labels(l).label(), want.labels(l).label());
        EXPECT_NEAR(got.labels(l).score(), want.labels(l).score(), 1e-5);
        EXPECT_NEAR(got.labels(l).logit(), want.labels(l).logit(), 1e-4);
      }
    }
    EXPECT_LE(MaxDiff(embedded[i].embedding, embedded[0].embedding), 1e-5);
  }
}

TEST_F(ReplicasTest, LabelMovedOnOneReplicaIsSeenByAllWithinTheResolveTtl) {
  auto v1 = Push(0, "propagated", LoraHeadPack(*model_, "prop-v1", 11), {"prod"});
  auto v2 = Push(0, "propagated", LoraHeadPack(*model_, "prop-v2", 12));
  ASSERT_TRUE(v1.ok() && v2.ok()) << v1.status() << v2.status();
  const std::string d1 = v1->version().digest(), d2 = v2->version().digest();
  ASSERT_NE(d1, d2);
  // Every replica resolves prod -> v1 now, so each may reuse that answer for up to the TTL.
  for (int i = 0; i < kReplicas; ++i) {
    auto served = EmbedWith(i, "propagated:prod");
    ASSERT_TRUE(served.ok()) << served.status();
    ASSERT_EQ(served->digest, d1) << "replica " << i + 1;
  }

  ASSERT_TRUE(SetLabel(1, "propagated", "prod", 2).ok());  // on replica 2
  const absl::Time moved = absl::Now();
  std::array<absl::Duration, kReplicas> seen_after;
  seen_after.fill(absl::InfiniteDuration());
  const absl::Time give_up = moved + absl::Seconds(kResolveTtlSeconds) + kPropagationSlack + absl::Seconds(10);
  int pending = kReplicas;
  while (pending > 0 && absl::Now() < give_up) {
    for (int i = 0; i < kReplicas; ++i) {
      if (seen_after[i] != absl::InfiniteDuration()) continue;
      auto served = EmbedWith(i, "propagated:prod");
      ASSERT_TRUE(served.ok()) << "replica " << i + 1 << ": " << served.status();
      ASSERT_THAT(served->digest, ::testing::AnyOf(d1, d2)) << "replica " << i + 1;
      if (served->digest == d2) {
        seen_after[i] = absl::Now() - moved;
        --pending;
      }
    }
    if (pending > 0) absl::SleepFor(absl::Milliseconds(20));
  }
  absl::Duration slowest = absl::ZeroDuration();
  std::vector<std::string> times;
  for (int i = 0; i < kReplicas; ++i) {
    slowest = std::max(slowest, seen_after[i]);
    times.push_back(absl::StrCat("replica ", i + 1, " ", absl::FormatDuration(seen_after[i])));
  }
  std::printf("[ replicas ] label move seen by every replica after %s (%s; TTL %.0f s)\n",
              absl::FormatDuration(slowest).c_str(), absl::StrJoin(times, ", ").c_str(), kResolveTtlSeconds);
  RecordProperty("label_propagation_ms", static_cast<int>(absl::ToInt64Milliseconds(slowest)));
  EXPECT_LE(slowest, absl::Seconds(kResolveTtlSeconds) + kPropagationSlack) << absl::StrJoin(times, ", ");
  // The replica that moved it saw it at once; and once seen, the move sticks everywhere.
  EXPECT_LT(seen_after[1], kPropagationSlack);
  for (int i = 0; i < kReplicas; ++i) {
    auto served = EmbedWith(i, "propagated:prod");
    ASSERT_TRUE(served.ok()) << served.status();
    EXPECT_EQ(served->digest, d2) << "replica " << i + 1;
  }
}

TEST_F(ReplicasTest, KillingAReplicaLosesNothingAndItsRestartServesEverything) {
  auto v1 = Push(0, "survivor", LoraHeadPack(*model_, "surv-v1", 21), {"prod"});
  auto v2 = Push(0, "survivor", LoraHeadPack(*model_, "surv-v2", 22));
  ASSERT_TRUE(v1.ok() && v2.ok()) << v1.status() << v2.status();
  const std::string d1 = v1->version().digest(), d2 = v2->version().digest();
  auto e1 = EmbedWith(0, "survivor@1");
  auto e2 = EmbedWith(0, "survivor@2");
  ASSERT_TRUE(e1.ok() && e2.ok()) << e1.status() << e2.status();
  ASSERT_GT(MaxDiff(e1->embedding, e2->embedding), 1e-4);
  auto before = ListAll(Client(0));
  ASSERT_TRUE(before.ok()) << before.status();
  ASSERT_TRUE(before->count({"survivor", 2}));

  // A label move acknowledged by replica 1, and replica 1 dies at once.
  ASSERT_TRUE(SetLabel(0, "survivor", "prod", 2).ok());
  EXPECT_EQ(servers_[0]->Stop(SIGKILL), 128 + SIGKILL);

  auto check = [&](int i) {
    SCOPED_TRACE(absl::StrCat("replica ", i + 1));
    auto prod = EmbedWith(i, "survivor:prod");
    ASSERT_TRUE(prod.ok()) << prod.status();
    EXPECT_EQ(prod->digest, d2);
    EXPECT_LE(MaxDiff(prod->embedding, e2->embedding), 1e-5);
    auto old = EmbedWith(i, "survivor@1");
    ASSERT_TRUE(old.ok()) << old.status();
    EXPECT_EQ(old->digest, d1);
    EXPECT_LE(MaxDiff(old->embedding, e1->embedding), 1e-5);
    auto listed = ListAll(Client(i));
    ASSERT_TRUE(listed.ok()) << listed.status();
    for (const auto& [key, digest] : *before) {
      auto it = listed->find(key);
      EXPECT_TRUE(it != listed->end() && it->second == digest)
          << key.first << "@" << key.second << " (" << digest << ") is missing";
    }
    auto labelled = Client(i).GetDelta("", "survivor@2");
    ASSERT_TRUE(labelled.ok()) << labelled.status();
    EXPECT_THAT(labelled->version().labels(), ElementsAre("latest", "prod"));
  };
  check(1);
  check(2);

  // Restarted on the same cache directory (new ports: Prometheus is told the new one).
  auto restarted = ServerProcess::Start(ReplicaArgs(0));
  ASSERT_TRUE(restarted.ok()) << restarted.status();
  servers_[0] = std::move(*restarted);
  ConnectClient(0);
  ASSERT_TRUE(prometheus_->SetTargets(MetricsTargets()).ok());
  check(0);
}

TEST_F(ReplicasTest, PrometheusScrapesEveryReplicasRequestCounters) {
  std::map<std::string, int> sent;  // instance -> requests sent to it here
  for (int i = 0; i < kReplicas; ++i) {
    const int n = 3 + 2 * i;
    for (int k = 0; k < n; ++k) {
      pb::EmbedRequest request;
      request.add_texts(absl::StrCat(kText, " ", k));
      ASSERT_TRUE(Client(i).Embed(request).ok());
    }
    sent[Instance(*servers_[i])] = n;
  }

  const absl::Time start = absl::Now();
  const absl::Time give_up = start + absl::Seconds(45);
  std::string last;
  bool done = false;
  while (!done && absl::Now() < give_up) {
    auto requests = prometheus_->Query("sum by (instance) (deltaserve_requests_total)");
    auto up = prometheus_->Query("up{job=\"deltaserve\"}");
    if (!requests.ok() || !up.ok()) {  // e.g. while it reloads its configuration: ask again
      last = absl::StrCat(requests.status().ToString(), "\n", up.status().ToString());
      absl::SleepFor(absl::Milliseconds(250));
      continue;
    }
    last = absl::StrCat("requests: ", requests->dump(), "\nup: ", up->dump());
    std::map<std::string, double> counted, is_up;
    for (const auto& r : *requests) counted[r["metric"].value("instance", "")] = SampleValue(r);
    for (const auto& r : *up) is_up[r["metric"].value("instance", "")] = SampleValue(r);
    done = true;
    for (const auto& [instance, n] : sent) {
      done = done && counted.count(instance) > 0 && counted[instance] >= n && is_up.count(instance) > 0 &&
             is_up[instance] == 1;
    }
    if (!done) absl::SleepFor(absl::Milliseconds(250));
  }
  ASSERT_TRUE(done) << "Prometheus never saw every replica's requests (sent " << ::testing::PrintToString(sent)
                    << "):\n"
                    << last << "\ntargets: " << prometheus_->Targets() << "\nprometheus log:\n"
                    << prometheus_->Log();
  std::printf("[ replicas ] prometheus saw every replica's request counters after %s\n",
              absl::FormatDuration(absl::Now() - start).c_str());
}

}  // namespace
}  // namespace deltaserve
