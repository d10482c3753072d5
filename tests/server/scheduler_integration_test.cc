// Integration test of the scheduler through a real deltaserve process over real gRPC: the per-tenant queue bound
// answers RESOURCE_EXHAUSTED with the `retry-after-ms` trailing metadata while other tenants are admitted, the
// priority field is accepted, and the scheduler's metrics appear on /metrics.
#include <memory>
#include <string>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/time/clock.h"
#include "deltaserve/v1/inference.grpc.pb.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "tests/server/server_process.h"

namespace deltaserve {
namespace {

using ::deltaserve::testing::ServerProcess;
using ::testing::HasSubstr;
namespace pb = ::deltaserve::v1;

pb::EmbedRequest Request(const std::string& tenant, int inputs, pb::Priority priority = pb::PRIORITY_UNSPECIFIED) {
  pb::EmbedRequest request;
  request.set_tenant(tenant);
  request.set_priority(priority);
  for (int i = 0; i < inputs; ++i) request.add_texts("the scheduler keeps tenants apart");
  return request;
}

TEST(SchedulerIntegrationTest, RefusesATenantOverItsBoundWithARetryAfterHintAndAdmitsOthers) {
  const std::string model_dir = testing::UseLiteModelDir();
  if (model_dir.empty()) GTEST_SKIP() << "no converted use-lite model: run `bash scripts/setup.sh build`";
  // A long queue delay keeps the first request's inputs queued (its batch never fills) while the test probes.
  auto server = ServerProcess::Start({"--model_dir=" + model_dir, "--threads=2", "--max_queue_delay_ms=3000",
                                      "--max_batch_rows=64", "--max_queued_rows_per_tenant=2",
                                      "--tenant_weights=acme=2"});
  ASSERT_TRUE(server.ok()) << server.status();
  auto channel = grpc::CreateChannel((*server)->address(), grpc::InsecureChannelCredentials());
  std::unique_ptr<pb::InferenceService::Stub> stub = pb::InferenceService::NewStub(channel);

  std::thread first([&] {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    pb::EmbedResponse response;
    grpc::Status status = stub->Embed(&context, Request("acme", 2), &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
  });
  // Wait until acme's two inputs are queued.
  const absl::Time give_up = absl::Now() + absl::Seconds(30);
  while (testing::HttpGet((*server)->metrics_port(), "/metrics")
                 .find("deltaserve_tenant_queued_rows{tenant=\"acme\"} 2") == std::string::npos &&
         absl::Now() < give_up) {
    absl::SleepFor(absl::Milliseconds(20));
  }

  {
    grpc::ClientContext context;
    pb::EmbedResponse response;
    grpc::Status status = stub->Embed(&context, Request("acme", 1), &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
    EXPECT_THAT(status.error_message(), HasSubstr("retry after about"));
    const auto& trailers = context.GetServerTrailingMetadata();
    auto hint = trailers.find("retry-after-ms");
    ASSERT_NE(hint, trailers.end()) << "no retry-after-ms trailing metadata";
    int64_t ms = 0;
    EXPECT_TRUE(absl::SimpleAtoi(std::string(hint->second.data(), hint->second.size()), &ms));
    EXPECT_GE(ms, 1);
  }
  {
    grpc::ClientContext context;
    pb::EmbedResponse response;
    grpc::Status status = stub->Embed(&context, Request("acme", 3), &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
    EXPECT_THAT(status.error_message(), HasSubstr("split it"));
    EXPECT_EQ(context.GetServerTrailingMetadata().count("retry-after-ms"), 0u);
  }
  {
    // Another tenant has its own bound; a high priority request is accepted.
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    pb::EmbedResponse response;
    grpc::Status status = stub->Embed(&context, Request("beta", 2, pb::PRIORITY_HIGH), &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    EXPECT_EQ(response.results_size(), 2);
  }
  first.join();

  const std::string metrics = testing::HttpGet((*server)->metrics_port(), "/metrics");
  EXPECT_THAT(metrics, HasSubstr("deltaserve_queue_rejected_requests_total{reason=\"tenant_queue_full\"} 1"));
  EXPECT_THAT(metrics, HasSubstr("deltaserve_queue_rejected_requests_total{reason=\"request_too_large\"} 1"));
  EXPECT_THAT(metrics, HasSubstr("deltaserve_tenant_requests_total{priority=\"normal\",tenant=\"acme\"} 1"));
  EXPECT_THAT(metrics, HasSubstr("deltaserve_tenant_requests_total{priority=\"high\",tenant=\"beta\"} 1"));
  EXPECT_THAT(metrics, HasSubstr("deltaserve_batch_rows_by_method_total{method=\"base\"} 4"));
  EXPECT_THAT(metrics, HasSubstr("deltaserve_batch_distinct_deltas_count"));
}

TEST(SchedulerIntegrationTest, RejectsMalformedTenantWeightsAtStart) {
  const std::string model_dir = testing::UseLiteModelDir();
  if (model_dir.empty()) GTEST_SKIP() << "no converted use-lite model";
  testing::CommandResult result = testing::RunCommand(
      {testing::DeltaserveBinary(), "--model_dir=" + model_dir, "--tenant_weights=acme=0", "--listen=127.0.0.1:0",
       "--metrics_listen="});
  EXPECT_EQ(result.exit_code, 2);
  EXPECT_THAT(result.err, HasSubstr("--tenant_weights"));
}

}  // namespace
}  // namespace deltaserve
