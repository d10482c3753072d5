// Unit tests of the scheduler's Prometheus metrics (ServerMetrics as a BatcherObserver): distinct deltas per
// batch, rows by method, per-tenant series with capped tenant labels, rejections by reason.
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/batching/batcher.h"
#include "server/metrics/metrics.h"

namespace deltaserve {
namespace metrics {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

TEST(SchedulerMetricsTest, RecordsDistinctDeltasAndRowsByMethod) {
  ServerMetrics metrics;
  metrics.OnBatchDeltas(2, {{"lora", 3}, {"bitfit", 1}, {"base", 2}, {"made_up", 1}});
  const std::string text = metrics.Serialize();
  EXPECT_THAT(text, HasSubstr("deltaserve_batch_distinct_deltas_count 1"));
  EXPECT_THAT(text, HasSubstr("deltaserve_batch_distinct_deltas_sum 2"));
  EXPECT_THAT(text, HasSubstr("deltaserve_batch_rows_by_method_total{method=\"lora\"} 3"));
  EXPECT_THAT(text, HasSubstr("deltaserve_batch_rows_by_method_total{method=\"bitfit\"} 1"));
  EXPECT_THAT(text, HasSubstr("deltaserve_batch_rows_by_method_total{method=\"base\"} 2"));
  EXPECT_THAT(text, HasSubstr("deltaserve_batch_rows_by_method_total{method=\"other\"} 1"));
  EXPECT_THAT(text, HasSubstr("deltaserve_batch_rows_by_method_total{method=\"prompt\"} 0"));
  EXPECT_THAT(text, Not(HasSubstr("made_up")));
}

TEST(SchedulerMetricsTest, CountsTenantRequestsQueuedRowsAndRejectionsByReason) {
  ServerMetrics metrics;
  metrics.OnRequestAdmitted("acme", batching::Priority::kHigh);
  metrics.OnTenantQueuedRows("acme", 5);
  metrics.OnTenantQueuedRows("acme", -2);
  metrics.OnRequestRejected("acme", batching::RejectReason::kTenantQueueFull);
  const std::string text = metrics.Serialize();
  EXPECT_THAT(text, HasSubstr("deltaserve_tenant_requests_total{priority=\"high\",tenant=\"acme\"} 1"));
  EXPECT_THAT(text, HasSubstr("deltaserve_tenant_queued_rows{tenant=\"acme\"} 3"));
  EXPECT_THAT(text, HasSubstr("deltaserve_queue_rejected_requests_total{reason=\"tenant_queue_full\"} 1"));
  EXPECT_THAT(text, HasSubstr("deltaserve_queue_rejected_requests_total{reason=\"queue_full\"} 0"));
}

TEST(SchedulerMetricsTest, LabelsTheFirst32ValidTenantsAndCountsTheRestAsOther) {
  ServerMetrics metrics;
  for (int i = 0; i < ServerMetrics::kMaxTenantLabels; ++i) {
    EXPECT_EQ(metrics.TenantLabel("t" + std::to_string(i)), "t" + std::to_string(i));
  }
  EXPECT_EQ(metrics.TenantLabel("late"), "other");
  EXPECT_EQ(metrics.TenantLabel("t3"), "t3");  // still its own
  ServerMetrics fresh;
  EXPECT_EQ(fresh.TenantLabel("Not-A-Store-Name"), "other");
  EXPECT_EQ(fresh.TenantLabel(std::string(65, 'a')), "other");
  EXPECT_EQ(fresh.TenantLabel("bad\xff"), "other");
  fresh.OnTenantQueuedRows("x y", 4);
  fresh.OnTenantQueuedRows("x\nz", 1);
  EXPECT_THAT(fresh.Serialize(), HasSubstr("deltaserve_tenant_queued_rows{tenant=\"other\"} 5"));
}

}  // namespace
}  // namespace metrics
}  // namespace deltaserve
