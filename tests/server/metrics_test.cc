// Unit tests of the metrics registry and the metrics HTTP endpoint.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/metrics/http_server.h"
#include "server/metrics/metrics.h"

namespace deltaserve {
namespace metrics {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

std::string HttpGet(int port, const std::string& request) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd);
    return "connect failed";
  }
  ::send(fd, request.data(), request.size(), 0);
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = ::recv(fd, buf, sizeof(buf), 0)) > 0) out.append(buf, n);
  ::close(fd);
  return out;
}

TEST(ServerMetricsTest, CountsRequestsByRpcAndCodeName) {
  ServerMetrics metrics;
  metrics.RecordRequest("Embed", absl::StatusCode::kOk, absl::Milliseconds(3));
  metrics.RecordRequest("Embed", absl::StatusCode::kInvalidArgument, absl::Milliseconds(1));
  const std::string text = metrics.Serialize();
  EXPECT_THAT(text, HasSubstr("deltaserve_requests_total{code=\"OK\",rpc=\"Embed\"} 1"));
  EXPECT_THAT(text, HasSubstr("deltaserve_requests_total{code=\"INVALID_ARGUMENT\",rpc=\"Embed\"} 1"));
  EXPECT_THAT(text, HasSubstr("deltaserve_request_duration_seconds_bucket"));
}

TEST(ServerMetricsTest, ExportsDeltaCacheActivityByTier) {
  ServerMetrics metrics;
  // Every cache series exists before the first event.
  EXPECT_THAT(metrics.Serialize(), HasSubstr("deltaserve_delta_cache_lookups_total{tier=\"host\"} 0"));
  metrics.OnCacheLookup(deltas::CacheTier::kDevice);
  metrics.OnCacheLookup(deltas::CacheTier::kDevice);
  metrics.OnCacheLookup(deltas::CacheTier::kStore);
  metrics.OnCacheLoad(deltas::CacheTier::kStore, true, absl::Milliseconds(20));
  metrics.OnCacheLoad(deltas::CacheTier::kHost, false, absl::Milliseconds(1));
  metrics.OnCacheEviction(deltas::CacheTier::kDevice);
  metrics.OnCacheResidency(deltas::CacheTier::kDevice, 4096, 2);
  metrics.OnCacheResidency(deltas::CacheTier::kHost, 1000, 1);
  const std::string text = metrics.Serialize();
  EXPECT_THAT(text, HasSubstr("deltaserve_delta_cache_lookups_total{tier=\"device\"} 2"));
  EXPECT_THAT(text, HasSubstr("deltaserve_delta_cache_lookups_total{tier=\"store\"} 1"));
  EXPECT_THAT(text, HasSubstr("deltaserve_delta_loads_total{outcome=\"ok\",source=\"store\"} 1"));
  EXPECT_THAT(text, HasSubstr("deltaserve_delta_loads_total{outcome=\"error\",source=\"host\"} 1"));
  EXPECT_THAT(text, HasSubstr("deltaserve_delta_load_seconds_count{source=\"store\"} 1"));
  EXPECT_THAT(text, HasSubstr("deltaserve_delta_cache_evictions_total{tier=\"device\"} 1"));
  EXPECT_THAT(text, HasSubstr("deltaserve_delta_cache_resident_bytes{tier=\"device\"} 4096"));
  EXPECT_THAT(text, HasSubstr("deltaserve_delta_cache_resident_packs{tier=\"host\"} 1"));
}

TEST(ServerMetricsTest, ExportsStoreOperationsByOpAndCodeAndReadiness) {
  ServerMetrics metrics;
  // The OK series of every operation exist from the start; the server is not ready until it says so.
  EXPECT_THAT(metrics.Serialize(), HasSubstr("deltaserve_store_operations_total{code=\"OK\",op=\"resolve\"} 0"));
  EXPECT_THAT(metrics.Serialize(), HasSubstr("deltaserve_ready 0"));
  metrics.OnStoreOperation(store::StoreOp::kResolve, absl::StatusCode::kOk, absl::Milliseconds(2));
  metrics.OnStoreOperation(store::StoreOp::kGet, absl::StatusCode::kUnavailable, absl::Milliseconds(50));
  metrics.SetReady(true);
  const std::string text = metrics.Serialize();
  EXPECT_THAT(text, HasSubstr("deltaserve_store_operations_total{code=\"OK\",op=\"resolve\"} 1"));
  EXPECT_THAT(text, HasSubstr("deltaserve_store_operations_total{code=\"UNAVAILABLE\",op=\"get\"} 1"));
  EXPECT_THAT(text, HasSubstr("deltaserve_store_operation_duration_seconds_count{op=\"get\"} 1"));
  EXPECT_THAT(text, HasSubstr("deltaserve_ready 1"));
}

TEST(ServerMetricsTest, RecordsBatchShapes) {
  ServerMetrics metrics;
  metrics.OnBatch(8, 128, 100, absl::Milliseconds(10));
  metrics.OnRowQueued(absl::Milliseconds(1));
  const std::string text = metrics.Serialize();
  EXPECT_THAT(text, HasSubstr("deltaserve_batch_rows_count 1"));
  EXPECT_THAT(text, HasSubstr("deltaserve_batch_padded_tokens_total 128"));
  EXPECT_THAT(text, HasSubstr("deltaserve_batch_real_tokens_total 100"));
  EXPECT_THAT(text, HasSubstr("deltaserve_queue_duration_seconds_count 1"));
}

TEST(MetricsHttpServerTest, ServesMetricsTextOnGetMetrics) {
  MetricsHttpServer server({"127.0.0.1:0"}, [] { return std::string("deltaserve_up 1\n"); });
  ASSERT_TRUE(server.Start().ok());
  ASSERT_GT(server.port(), 0);
  const std::string response = HttpGet(server.port(), "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_THAT(response, HasSubstr("HTTP/1.1 200 OK"));
  EXPECT_THAT(response, HasSubstr("text/plain; version=0.0.4"));
  EXPECT_THAT(response, HasSubstr("deltaserve_up 1"));
}

TEST(MetricsHttpServerTest, AnswersNotFoundForOtherPathsAndMethodNotAllowedForPost) {
  MetricsHttpServer server({"127.0.0.1:0"}, [] { return std::string("x 1\n"); });
  ASSERT_TRUE(server.Start().ok());
  EXPECT_THAT(HttpGet(server.port(), "GET /nope HTTP/1.1\r\n\r\n"), HasSubstr("404"));
  EXPECT_THAT(HttpGet(server.port(), "POST /metrics HTTP/1.1\r\n\r\n"), HasSubstr("405"));
  EXPECT_THAT(HttpGet(server.port(), "garbage\r\n\r\n"), HasSubstr("400"));
}

TEST(MetricsHttpServerTest, RejectsAnOversizedRequestHead) {
  MetricsHttpServer::Options options{"127.0.0.1:0"};
  options.max_request_bytes = 100;
  MetricsHttpServer server(options, [] { return std::string("x 1\n"); });
  ASSERT_TRUE(server.Start().ok());
  EXPECT_THAT(HttpGet(server.port(), "GET /metrics HTTP/1.1\r\nX: " + std::string(500, 'a') + "\r\n\r\n"),
              HasSubstr("431"));
}

TEST(MetricsHttpServerTest, RejectsAMalformedListenAddress) {
  MetricsHttpServer server({"no-port-here"}, [] { return std::string(); });
  absl::Status st = server.Start();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("host:port"));
}

TEST(MetricsHttpServerTest, ReportsAPortInUseAsUnavailable) {
  MetricsHttpServer first({"127.0.0.1:0"}, [] { return std::string(); });
  ASSERT_TRUE(first.Start().ok());
  MetricsHttpServer second({"127.0.0.1:" + std::to_string(first.port())}, [] { return std::string(); });
  EXPECT_EQ(second.Start().code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace metrics
}  // namespace deltaserve
