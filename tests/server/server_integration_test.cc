// Integration tests: a real deltaserve process serving the real use-lite model on 127.0.0.1, called over real
// gRPC by the C++ client library and by deltactl.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "client/client.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/server/server_process.h"

namespace deltaserve {
namespace {

using ::deltaserve::testing::ServerProcess;
using ::testing::HasSubstr;
namespace pb = ::deltaserve::v1;

double Cosine(const std::vector<float>& a, const std::vector<float>& b) {
  double dot = 0, na = 0, nb = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    dot += double(a[i]) * b[i];
    na += double(a[i]) * a[i];
    nb += double(b[i]) * b[i];
  }
  return dot / std::sqrt(na * nb);
}

float MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  float m = a.size() == b.size() ? 0.f : INFINITY;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}

std::vector<float> Values(const pb::Vector& v) { return {v.values().begin(), v.values().end()}; }

// The reference: sentences, token ids and embeddings computed by the upstream TF.js runtime.
nlohmann::json LoadReference() {
  for (const std::string& path :
       {testing::SourceDir() + "/tests/data/use_lite/reference_embeddings.json",
        testing::SharedDataDir() + "/use-lite-energetic/reference_embeddings.json"}) {
    std::ifstream in(path);
    if (!in) continue;
    std::stringstream ss;
    ss << in.rdbuf();
    return nlohmann::json::parse(ss.str());
  }
  return nlohmann::json();
}

class ServerIntegrationTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    model_dir_ = new std::string(testing::UseLiteModelDir());
    if (model_dir_->empty()) return;
    auto server = ServerProcess::Start({"--model_dir=" + *model_dir_, "--max_inputs_per_request=64",
                                        "--max_message_bytes=1048576", "--max_text_bytes=200000",
                                        "--max_queue_delay_ms=20", "--threads=2"});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
    delete model_dir_;
  }
  void SetUp() override {
    if (model_dir_->empty()) {
      GTEST_SKIP() << "no converted use-lite model: run `bash scripts/setup.sh build` (or set DS_USE_LITE_DIR)";
    }
    ASSERT_NE(server_, nullptr);
    client::DeltaserveClient::Options options;
    options.target = server_->address();
    client_ = std::make_unique<client::DeltaserveClient>(options);
  }

  absl::StatusOr<pb::EmbedResponse> EmbedTexts(const std::vector<std::string>& texts) {
    pb::EmbedRequest request;
    for (const auto& t : texts) request.add_texts(t);
    return client_->Embed(request);
  }

  static std::string* model_dir_;
  static ServerProcess* server_;
  std::unique_ptr<client::DeltaserveClient> client_;
};

std::string* ServerIntegrationTest::model_dir_ = nullptr;
ServerProcess* ServerIntegrationTest::server_ = nullptr;

TEST_F(ServerIntegrationTest, ReportsServingOnTheStandardHealthService) {
  EXPECT_EQ(*client_->Health(), "SERVING");
  EXPECT_EQ(*client_->Health("deltaserve.v1.InferenceService"), "SERVING");
  EXPECT_EQ(client_->Health("no.such.Service").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(ServerIntegrationTest, GetModelInfoDescribesTheServedModel) {
  auto info = client_->GetModelInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->model().family(), "use-lite");
  EXPECT_EQ(info->model().embedding_dim(), 512);
  EXPECT_GT(info->model().vocab_size(), 8000);
  EXPECT_GT(info->model().max_sequence_length(), 0);
  EXPECT_EQ(info->model().dtype(), "float32");
  EXPECT_THAT(info->model().fingerprint(), ::testing::StartsWith("sha256:"));
  EXPECT_EQ(info->model().fingerprint().size(), 7u + 64u);
  EXPECT_EQ(info->api_version(), "deltaserve.v1");
  EXPECT_EQ(info->limits().max_inputs_per_request(), 64);
  EXPECT_EQ(info->intra_op_threads(), 2);
  EXPECT_FALSE(info->blas().empty());
  // --blas defaults to openblas: where it is installed, the server must have re-executed onto it.
  if (::access("/usr/lib/x86_64-linux-gnu/openblas-openmp/libblas.so.3", R_OK) == 0) {
    EXPECT_EQ(info->blas(), "openblas-openmp");
  }
}

TEST_F(ServerIntegrationTest, EmbedsTextsLikeTheUpstreamRuntime) {
  nlohmann::json ref = LoadReference();
  ASSERT_FALSE(ref.is_null()) << "tests/data/use_lite/reference_embeddings.json is missing";
  std::vector<std::string> sentences = ref["sentences"].get<std::vector<std::string>>();
  pb::EmbedRequest request;
  for (const auto& s : sentences) request.add_texts(s);
  request.set_return_token_ids(true);
  auto response = client_->Embed(request);
  ASSERT_TRUE(response.ok()) << response.status();
  ASSERT_EQ(response->results_size(), static_cast<int>(sentences.size()));
  for (size_t i = 0; i < sentences.size(); ++i) {
    const pb::EmbedResult& r = response->results(i);
    std::vector<int64_t> ids(r.token_ids().begin(), r.token_ids().end());
    EXPECT_EQ(ids, ref["token_ids"][i].get<std::vector<int64_t>>()) << sentences[i];
    EXPECT_GE(Cosine(Values(r.embedding()), ref["embeddings"][i].get<std::vector<float>>()), 0.9999)
        << sentences[i];
  }
}

TEST_F(ServerIntegrationTest, TokenIdsGiveTheSameEmbeddingAsTheirText) {
  pb::EmbedRequest by_text;
  by_text.add_texts("The quick brown fox jumps over the lazy dog.");
  by_text.set_return_token_ids(true);
  auto a = client_->Embed(by_text);
  ASSERT_TRUE(a.ok()) << a.status();
  pb::EmbedRequest by_ids;
  *by_ids.add_token_ids()->mutable_ids() = a->results(0).token_ids();
  auto b = client_->Embed(by_ids);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_LE(MaxAbsDiff(Values(a->results(0).embedding()), Values(b->results(0).embedding())), 1e-6);
}

TEST_F(ServerIntegrationTest, ReturnsPerTokenEmbeddingsWhenAsked) {
  pb::EmbedRequest request;
  request.add_texts("hello world");
  request.set_return_token_embeddings(true);
  auto info = client_->GetModelInfo();
  auto response = client_->Embed(request);
  ASSERT_TRUE(response.ok()) << response.status();
  const pb::EmbedResult& r = response->results(0);
  ASSERT_EQ(r.token_embeddings_size(), r.num_tokens());
  for (const auto& v : r.token_embeddings()) EXPECT_EQ(v.values_size(), info->model().hidden_size());
}

TEST_F(ServerIntegrationTest, ConcurrentCallsAreBatchedAndEachGetsItsSoloResult) {
  const std::vector<std::string> texts = {"a short one", "The stock market fell sharply today.",
                                          "it 's a charming and often affecting journey .",
                                          "I love this movie.", "one two three four five six seven eight nine"};
  std::vector<std::vector<float>> solo;
  for (const auto& t : texts) {
    auto r = EmbedTexts({t});
    ASSERT_TRUE(r.ok()) << r.status();
    solo.push_back(Values(r->results(0).embedding()));
  }
  const std::string before = testing::HttpGet(server_->metrics_port(), "/metrics");
  constexpr int kThreads = 16;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      const size_t k = i % texts.size();
      auto r = EmbedTexts({texts[k]});
      if (!r.ok() || MaxAbsDiff(Values(r->results(0).embedding()), solo[k]) > 1e-5) failures++;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  // Some forward pass must have carried more than one row: the batch-rows histogram has an observation > 1.
  const std::string metrics = testing::HttpGet(server_->metrics_port(), "/metrics");
  EXPECT_THAT(metrics, HasSubstr("deltaserve_batch_rows_bucket{le=\"1\"}"));
  auto count_of = [](const std::string& text, const std::string& key) {
    size_t pos = text.find(key);
    return pos == std::string::npos ? -1.0 : std::stod(text.substr(pos + key.size()));
  };
  const double singles = count_of(metrics, "deltaserve_batch_rows_bucket{le=\"1\"} ") -
                         count_of(before, "deltaserve_batch_rows_bucket{le=\"1\"} ");
  const double batches = count_of(metrics, "deltaserve_batch_rows_count ") -
                         count_of(before, "deltaserve_batch_rows_count ");
  EXPECT_LT(singles, batches) << "no batch had more than one row";
}

TEST_F(ServerIntegrationTest, RejectsAnEmptyRequest) {
  auto r = client_->Embed(pb::EmbedRequest());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("no inputs"));
}

TEST_F(ServerIntegrationTest, RejectsTextsAndTokenIdsTogether) {
  pb::EmbedRequest request;
  request.add_texts("x");
  request.add_token_ids()->add_ids(5);
  auto r = client_->Embed(request);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("not both"));
}

TEST_F(ServerIntegrationTest, RejectsOutOfRangeAndNegativeTokenIds) {
  for (int64_t bad : {int64_t{1} << 40, int64_t{-1}, int64_t{8002}}) {
    pb::EmbedRequest request;
    auto* ids = request.add_token_ids();
    ids->add_ids(5);
    ids->add_ids(bad);
    auto r = client_->Embed(request);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(r.status().message(), HasSubstr("token_ids[0][1]")) << bad;
  }
}

TEST_F(ServerIntegrationTest, RejectsAnEmptyTokenIdList) {
  pb::EmbedRequest request;
  request.add_token_ids();
  auto r = client_->Embed(request);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("token_ids[0] is empty"));
}

TEST_F(ServerIntegrationTest, RejectsAnEmptyText) {
  // (Whitespace is not empty for use-lite: like upstream, it encodes to "▁" pieces.)
  auto r = EmbedTexts({"fine", ""});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("texts[1] has no tokens"));
}

TEST_F(ServerIntegrationTest, RejectsTooManyInputs) {
  auto r = EmbedTexts(std::vector<std::string>(65, "hi"));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("at most 64"));
}

TEST_F(ServerIntegrationTest, TruncatesAnOverLongInputByDefaultAndRejectsItOnRequest) {
  auto info = client_->GetModelInfo();
  ASSERT_TRUE(info.ok());
  const int64_t max_len = info->model().max_sequence_length();
  std::string text;
  for (int64_t i = 0; i < max_len + 50; ++i) absl::StrAppend(&text, "word ");
  auto truncated = EmbedTexts({text});
  ASSERT_TRUE(truncated.ok()) << truncated.status();
  EXPECT_TRUE(truncated->results(0).truncated());
  EXPECT_EQ(truncated->results(0).num_tokens(), max_len);

  pb::EmbedRequest strict;
  strict.add_texts(text);
  strict.set_truncation(pb::TRUNCATION_ERROR);
  auto rejected = client_->Embed(strict);
  EXPECT_EQ(rejected.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(rejected.status().message(), HasSubstr("at most"));
}

TEST_F(ServerIntegrationTest, RejectsATextOverTheByteLimit) {
  auto r = EmbedTexts({std::string(200001, 'a')});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("bytes"));
}

TEST_F(ServerIntegrationTest, RejectsAnOversizedMessageWithResourceExhausted) {
  auto r = EmbedTexts({std::string(2 << 20, 'a')});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
}

TEST_F(ServerIntegrationTest, RejectsInvalidUtf8) {
  auto r = EmbedTexts({std::string("bad \xff\xfe bytes")});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("invalid UTF-8"));
  EXPECT_EQ(*client_->Health(), "SERVING");
}

TEST_F(ServerIntegrationTest, AnswersNotFoundForATaskNoPackWasPushedTo) {
  pb::EmbedRequest request;
  request.add_texts("hello");
  request.mutable_task()->set_task("sentiment");
  request.mutable_task()->set_label("prod");
  auto r = client_->Embed(request);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(r.status().message(), HasSubstr("default/sentiment has no versions"));
}

TEST_F(ServerIntegrationTest, ServesPrometheusMetricsThatPromtoolAccepts) {
  ASSERT_TRUE(EmbedTexts({"count me"}).ok());
  const std::string response = testing::HttpGet(server_->metrics_port(), "/metrics");
  ASSERT_THAT(response, HasSubstr("200 OK"));
  const std::string body = response.substr(response.find("\r\n\r\n") + 4);
  EXPECT_THAT(body, HasSubstr("deltaserve_requests_total{code=\"OK\",rpc=\"Embed\"}"));
  EXPECT_THAT(body, HasSubstr("deltaserve_request_duration_seconds_bucket"));
  EXPECT_THAT(body, HasSubstr("deltaserve_batch_rows_bucket"));
  EXPECT_THAT(body, HasSubstr("deltaserve_model_load_seconds"));
  if (::access("/usr/bin/promtool", X_OK) != 0) {
    GTEST_SKIP() << "promtool not installed (apt-get install prometheus); format check skipped";
  }
  auto check = testing::RunCommand({"/usr/bin/promtool", "check", "metrics"}, body);
  EXPECT_EQ(check.exit_code, 0) << check.out << check.err;
}

TEST_F(ServerIntegrationTest, DeltactlPrintsHealthInfoAndEmbeddingsAsJson) {
  const std::string server = "--server=" + server_->address();
  auto health = testing::RunCommand({testing::DeltactlBinary(), server, "health"});
  EXPECT_EQ(health.exit_code, 0) << health.err;
  EXPECT_EQ(nlohmann::json::parse(health.out)["status"], "SERVING");

  auto info = testing::RunCommand({testing::DeltactlBinary(), server, "info"});
  ASSERT_EQ(info.exit_code, 0) << info.err;
  EXPECT_EQ(nlohmann::json::parse(info.out)["model"]["family"], "use-lite");

  auto embed = testing::RunCommand({testing::DeltactlBinary(), server, "embed", "--ids", "hello world", "I love this movie."});
  ASSERT_EQ(embed.exit_code, 0) << embed.err;
  auto out = nlohmann::json::parse(embed.out);
  ASSERT_EQ(out["results"].size(), 2u);
  EXPECT_EQ(out["results"][0]["embedding"].size(), 512u);
  EXPECT_EQ(out["results"][0]["token_ids"], nlohmann::json({2002, 102, 311}));

  auto from_stdin = testing::RunCommand({testing::DeltactlBinary(), server, "embed"}, "first line\nsecond line\n");
  ASSERT_EQ(from_stdin.exit_code, 0) << from_stdin.err;
  EXPECT_EQ(nlohmann::json::parse(from_stdin.out)["results"].size(), 2u);
}

TEST_F(ServerIntegrationTest, DeltactlReportsServerErrorsWithTheirCode) {
  auto r = testing::RunCommand({testing::DeltactlBinary(), "--server=" + server_->address(), "embed", ""});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("INVALID_ARGUMENT"));
  auto usage = testing::RunCommand({testing::DeltactlBinary(), "frobnicate"});
  EXPECT_EQ(usage.exit_code, 2);
  auto down = testing::RunCommand({testing::DeltactlBinary(), "--server=127.0.0.1:1", "--timeout_s=2", "health"});
  EXPECT_EQ(down.exit_code, 1);
  EXPECT_THAT(down.err, HasSubstr("UNAVAILABLE"));
}

// Lifecycle: each test starts its own server.
TEST(ServerLifecycleTest, SigtermDrainsInFlightCallsAndExitsZero) {
  const std::string model_dir = testing::UseLiteModelDir();
  if (model_dir.empty()) GTEST_SKIP() << "no converted use-lite model: run `bash scripts/setup.sh build`";
  auto server = ServerProcess::Start({"--model_dir=" + model_dir, "--max_queue_delay_ms=200"});
  ASSERT_TRUE(server.ok()) << server.status();
  client::DeltaserveClient::Options options;
  options.target = (*server)->address();
  std::atomic<int> ok{0};
  std::vector<std::thread> callers;
  for (int i = 0; i < 4; ++i) {
    callers.emplace_back([&] {
      client::DeltaserveClient client(options);
      if (client.EmbedTexts({"drain me please"}).ok()) ok++;
    });
  }
  absl::SleepFor(absl::Milliseconds(50));  // the calls are queued (200 ms batch delay)
  EXPECT_EQ((*server)->Stop(SIGTERM), 0) << (*server)->Log();
  for (auto& t : callers) t.join();
  EXPECT_EQ(ok.load(), 4) << "in-flight calls must finish during the drain";
  EXPECT_THAT((*server)->Log(), HasSubstr("draining"));
}

// The health of a server's port for `service`: "SERVING", "NOT_SERVING", or the error.
std::string HealthOf(int port, const std::string& service) {
  client::DeltaserveClient::Options options;
  options.target = absl::StrCat("127.0.0.1:", port);
  options.timeout = absl::Seconds(2);
  client::DeltaserveClient client(options);
  absl::StatusOr<std::string> health = client.Health(service);
  return health.ok() ? *health : health.status().ToString();
}

// A TCP listener on 127.0.0.1 that accepts connections and never answers: a store registry that hangs.
class SilentListener {
 public:
  SilentListener() {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    if (::bind(fd_, reinterpret_cast<sockaddr*>(&addr), len) == 0 && ::listen(fd_, 4) == 0 &&
        ::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
      port_ = ntohs(addr.sin_port);
    }
  }
  ~SilentListener() {
    if (conn_ >= 0) ::close(conn_);
    if (fd_ >= 0) ::close(fd_);
  }
  int port() const { return port_; }
  // Waits up to `timeout` for a connection; true when one came.
  bool Accept(absl::Duration timeout) {
    pollfd p{fd_, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(absl::ToInt64Milliseconds(timeout))) != 1) return false;
    conn_ = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
    return conn_ >= 0;
  }
  // Closes the accepted connection and the listener: the caller's request fails.
  void Hangup() {
    if (conn_ >= 0) ::close(conn_);
    if (fd_ >= 0) ::close(fd_);
    conn_ = fd_ = -1;
  }

 private:
  int fd_ = -1;
  int conn_ = -1;
  int port_ = 0;
};

// The health-only port is up before the server can serve: alive, not ready. The server is held before ready by a
// shared-store registry that accepts the connection and does not answer (the store opens after the model loads).
TEST(ServerLifecycleTest, HealthPortIsLiveButNotReadyUntilTheServerCanServe) {
  const std::string model_dir = testing::UseLiteModelDir();
  if (model_dir.empty()) GTEST_SKIP() << "no converted use-lite model: run `bash scripts/setup.sh build`";
  SilentListener registry;
  ASSERT_GT(registry.port(), 0);
  const int health_port = testing::FreePort();
  auto server = ServerProcess::Launch({"--model_dir=" + model_dir, "--listen=127.0.0.1:0",
                                       "--metrics_listen=", absl::StrCat("--health_listen=127.0.0.1:", health_port),
                                       absl::StrCat("--store_url=http://127.0.0.1:", registry.port())});
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_TRUE(registry.Accept(absl::Seconds(120))) << (*server)->Log();
  // Now the server waits on the store: the model is loaded, the gRPC port not yet up.
  EXPECT_EQ(HealthOf(health_port, "liveness"), "SERVING") << (*server)->Log();
  EXPECT_EQ(HealthOf(health_port, "readiness"), "NOT_SERVING");
  EXPECT_EQ(HealthOf(health_port, ""), "NOT_SERVING");
  registry.Hangup();
  EXPECT_EQ((*server)->WaitExit(absl::Seconds(60)), 1) << (*server)->Log();
  EXPECT_THAT((*server)->Log(), HasSubstr("cannot start"));
}

// SIGUSR1 (the Kubernetes preStop hook) turns readiness off and keeps serving; SIGTERM then serves on for
// --drain_delay_s before it stops accepting calls, and exits 0. Liveness stays SERVING throughout.
TEST(ServerLifecycleTest, DrainTurnsReadinessOffWhileCallsAreStillServed) {
  const std::string model_dir = testing::UseLiteModelDir();
  if (model_dir.empty()) GTEST_SKIP() << "no converted use-lite model: run `bash scripts/setup.sh build`";
  auto server = ServerProcess::Start(
      {"--model_dir=" + model_dir, "--health_listen=127.0.0.1:0", "--drain_delay_s=3", "--drain_seconds=5"});
  ASSERT_TRUE(server.ok()) << server.status();
  const int health_port = (*server)->health_port();
  ASSERT_GT(health_port, 0);
  EXPECT_EQ(HealthOf(health_port, "readiness"), "SERVING");
  EXPECT_EQ(HealthOf(health_port, ""), "SERVING");
  EXPECT_EQ(HealthOf((*server)->port(), "readiness"), "SERVING");
  EXPECT_THAT(testing::HttpGet((*server)->metrics_port(), "/metrics"), HasSubstr("deltaserve_ready 1"));

  client::DeltaserveClient::Options options;
  options.target = (*server)->address();
  client::DeltaserveClient client(options);
  (*server)->Signal(SIGUSR1);
  const absl::Time end = absl::Now() + absl::Seconds(30);
  while (HealthOf(health_port, "readiness") != "NOT_SERVING" && absl::Now() < end) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_EQ(HealthOf(health_port, "readiness"), "NOT_SERVING");
  EXPECT_EQ(HealthOf(health_port, ""), "NOT_SERVING");
  EXPECT_EQ(HealthOf((*server)->port(), "readiness"), "NOT_SERVING");
  EXPECT_EQ(HealthOf(health_port, "liveness"), "SERVING");
  EXPECT_THAT(testing::HttpGet((*server)->metrics_port(), "/metrics"), HasSubstr("deltaserve_ready 0"));
  EXPECT_TRUE(client.EmbedTexts({"still served while draining"}).ok());
  // deltactl health as an exec probe: non-zero while not ready, zero for liveness.
  const std::string health_server = absl::StrCat("--server=127.0.0.1:", health_port);
  EXPECT_EQ(testing::RunCommand({testing::DeltactlBinary(), health_server, "health", "readiness"}).exit_code, 1);
  EXPECT_EQ(testing::RunCommand({testing::DeltactlBinary(), health_server, "health", "liveness"}).exit_code, 0);

  const absl::Time term = absl::Now();
  (*server)->Signal(SIGTERM);
  absl::SleepFor(absl::Milliseconds(500));
  EXPECT_TRUE(client.EmbedTexts({"still accepted during the drain delay"}).ok()) << (*server)->Log();
  EXPECT_EQ(HealthOf(health_port, "liveness"), "SERVING");
  EXPECT_EQ((*server)->WaitExit(absl::Seconds(60)), 0) << (*server)->Log();
  EXPECT_GE(absl::Now() - term, absl::Seconds(2.5)) << "the server must keep accepting calls for --drain_delay_s";
}

TEST(ServerLifecycleTest, RejectsBadDrainGcHealthAndBatchingFlagsWithAClearMessage) {
  auto delay = testing::RunCommand({testing::DeltaserveBinary(), "--drain_delay_s=-1"});
  EXPECT_EQ(delay.exit_code, 2);
  EXPECT_THAT(delay.err, HasSubstr("--drain_delay_s"));
  auto gc = testing::RunCommand({testing::DeltaserveBinary(), "--store_gc_grace_s=-5"});
  EXPECT_EQ(gc.exit_code, 2);
  EXPECT_THAT(gc.err, HasSubstr("--store_gc_grace_s"));
  for (const char* flag : {"--max_padding_ratio", "--packed_max_padding_ratio"}) {
    auto ratio = testing::RunCommand({testing::DeltaserveBinary(), std::string(flag) + "=-1"});
    EXPECT_EQ(ratio.exit_code, 2) << flag;
    EXPECT_THAT(ratio.err, HasSubstr(std::string(flag) + " must be >= 0")) << flag;
  }
  // bfloat16 runs in oneDNN, which crashes when batches run on several threads (docs/MODELS.md), unless its
  // primitive cache never evicts (the variable, not set here).
  ::unsetenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY");
  auto bf16 = testing::RunCommand({testing::DeltaserveBinary(), "--dtype=bfloat16", "--batch_threads=2"});
  EXPECT_EQ(bf16.exit_code, 2);
  EXPECT_THAT(bf16.err, HasSubstr("--batch_threads=2 cannot run with --dtype=bfloat16"));
  EXPECT_THAT(bf16.err, HasSubstr("ONEDNN_PRIMITIVE_CACHE_CAPACITY"));
  // The health port is bound before the model loads: a bad address fails fast, naming the flag.
  auto health = testing::RunCommand({testing::DeltaserveBinary(), "--listen=127.0.0.1:0", "--metrics_listen=",
                                     "--health_listen=not-an-address"});
  EXPECT_EQ(health.exit_code, 1);
  EXPECT_THAT(health.err, HasSubstr("--health_listen"));
}

TEST(ServerLifecycleTest, ServesBfloat16WithEmbeddingsCloseToTheReference) {
  const std::string model_dir = testing::UseLiteModelDir();
  if (model_dir.empty()) GTEST_SKIP() << "no converted use-lite model: run `bash scripts/setup.sh build`";
  nlohmann::json ref = LoadReference();
  ASSERT_FALSE(ref.is_null());
  auto server = ServerProcess::Start({"--model_dir=" + model_dir, "--dtype=bfloat16", "--blas=blis"});
  ASSERT_TRUE(server.ok()) << server.status();
  client::DeltaserveClient::Options options;
  options.target = (*server)->address();
  client::DeltaserveClient client(options);
  auto info = client.GetModelInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->model().dtype(), "bfloat16");
  if (::access("/usr/lib/x86_64-linux-gnu/blis-openmp/libblas.so.3", R_OK) == 0) {
    EXPECT_EQ(info->blas(), "blis-openmp");
  }
  auto embeddings = client.EmbedTexts(ref["sentences"].get<std::vector<std::string>>());
  ASSERT_TRUE(embeddings.ok()) << embeddings.status();
  for (size_t i = 0; i < embeddings->size(); ++i) {
    EXPECT_GE(Cosine((*embeddings)[i], ref["embeddings"][i].get<std::vector<float>>()), 0.99);
  }
}

TEST(ServerLifecycleTest, ExitsNonZeroWithOneClearLineForAMissingModelDirectory) {
  auto r = testing::RunCommand({testing::DeltaserveBinary(), "--model_dir=/nonexistent/model",
                                "--listen=127.0.0.1:0", "--metrics_listen="});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("cannot start: NOT_FOUND: model directory /nonexistent/model does not exist"));
}

TEST(ServerLifecycleTest, ExitsNonZeroForAMalformedModelDirectory) {
  const std::string dir = testing::MakeTempDir();
  std::ofstream(dir + "/config.json") << "{not json";
  auto r = testing::RunCommand({testing::DeltaserveBinary(), "--model_dir=" + dir, "--listen=127.0.0.1:0",
                                "--metrics_listen="});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("config.json is not a JSON object"));

  std::ofstream(dir + "/config.json", std::ios::trunc) << R"({"model_type": "gpt-17"})";
  r = testing::RunCommand({testing::DeltaserveBinary(), "--model_dir=" + dir, "--listen=127.0.0.1:0",
                           "--metrics_listen="});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("not supported"));

  std::ofstream(dir + "/config.json", std::ios::trunc) << R"({"model_type": "use-lite"})";
  r = testing::RunCommand({testing::DeltaserveBinary(), "--model_dir=" + dir, "--listen=127.0.0.1:0",
                           "--metrics_listen="});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("cannot start"));
}

TEST(ServerLifecycleTest, RejectsBadDeviceDtypeAndAddressFlagsWithOneClearLine) {
  const std::string model_dir = testing::UseLiteModelDir();
  if (model_dir.empty()) GTEST_SKIP() << "no converted use-lite model: run `bash scripts/setup.sh build`";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"--device=tpu", "unknown device \"tpu\""},
      {"--dtype=float16", "unsupported dtype \"float16\""},
      {"--metrics_listen=no-port", "metrics address 'no-port' is not host:port"},
  };
  for (const auto& [flag, message] : cases) {
    auto r = testing::RunCommand({testing::DeltaserveBinary(), "--model_dir=" + model_dir, "--listen=127.0.0.1:0",
                                  flag});
    EXPECT_EQ(r.exit_code, 1) << flag;
    EXPECT_THAT(r.err, HasSubstr("cannot start")) << flag;
    EXPECT_THAT(r.err, HasSubstr(message)) << flag;
  }
}

TEST(ServerLifecycleTest, RejectsAnUnknownBlasChoice) {
  auto r = testing::RunCommand({testing::DeltaserveBinary(), "--blas=fastest", "--model_dir=/x"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("--blas=fastest is not one of"));
}

}  // namespace
}  // namespace deltaserve
