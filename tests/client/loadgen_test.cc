// Unit tests of the load generator's logic (client/loadgen): Zipf draws, percentiles, the report and its
// verdict, arrival pacing, the closed and open loops (with fake request functions), /metrics parsing.
#include <atomic>
#include <cmath>
#include <fstream>
#include <set>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "client/loadgen/load_report.h"
#include "client/loadgen/load_runner.h"
#include "client/loadgen/metrics_scrape.h"
#include "client/loadgen/workload.h"
#include "client/loadgen/zipf.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace deltaserve {
namespace loadgen {
namespace {

using ::testing::HasSubstr;

TEST(ZipfSamplerTest, RejectsBadParameters) {
  EXPECT_EQ(ZipfSampler::Create(0, 1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ZipfSampler::Create(10, -1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ZipfSampler::Create(10, NAN).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(ZipfSampler::Create(10, 11).status().message()), HasSubstr("exponent"));
}

TEST(ZipfSamplerTest, ProbabilitiesFollowThePowerLaw) {
  absl::StatusOr<ZipfSampler> z = ZipfSampler::Create(1000, 1.0);
  ASSERT_TRUE(z.ok());
  double sum = 0;
  for (int64_t k = 0; k < 1000; ++k) sum += z->Probability(k);
  EXPECT_NEAR(sum, 1.0, 1e-9);
  EXPECT_NEAR(z->Probability(0) / z->Probability(1), 2.0, 1e-9);
  EXPECT_NEAR(z->Probability(0) / z->Probability(9), 10.0, 1e-9);
  EXPECT_EQ(z->Probability(-1), 0);
  EXPECT_EQ(z->Probability(1000), 0);
}

TEST(ZipfSamplerTest, SampleFrequenciesMatchProbabilities) {
  absl::StatusOr<ZipfSampler> z = ZipfSampler::Create(50, 1.0);
  ASSERT_TRUE(z.ok());
  std::mt19937_64 rng(7);
  std::vector<int64_t> counts(50);
  const int n = 200000;
  for (int i = 0; i < n; ++i) {
    const int64_t k = z->Sample(rng);
    ASSERT_GE(k, 0);
    ASSERT_LT(k, 50);
    ++counts[static_cast<size_t>(k)];
  }
  for (int64_t k : {0, 1, 5, 49}) {
    const double p = z->Probability(k);
    const double sigma = std::sqrt(n * p * (1 - p));
    EXPECT_NEAR(counts[static_cast<size_t>(k)], n * p, 5 * sigma) << "k=" << k;
  }
}

TEST(ZipfSamplerTest, ExponentZeroIsUniform) {
  absl::StatusOr<ZipfSampler> z = ZipfSampler::Create(4, 0.0);
  ASSERT_TRUE(z.ok());
  for (int64_t k = 0; k < 4; ++k) EXPECT_NEAR(z->Probability(k), 0.25, 1e-12);
  EXPECT_EQ(z->HeadCovering(0.5), 2);
  EXPECT_EQ(z->HeadCovering(1.0), 4);
}

TEST(ZipfSamplerTest, OneTaskAlwaysDrawsIt) {
  absl::StatusOr<ZipfSampler> z = ZipfSampler::Create(1, 1.0);
  ASSERT_TRUE(z.ok());
  std::mt19937_64 rng(1);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(z->Sample(rng), 0);
}

TEST(PercentileTest, NearestRank) {
  std::vector<double> v;
  for (int i = 1; i <= 100; ++i) v.push_back(i);
  EXPECT_EQ(Percentile(v, 50), 50);
  EXPECT_EQ(Percentile(v, 95), 95);
  EXPECT_EQ(Percentile(v, 99), 99);
  EXPECT_EQ(Percentile(v, 100), 100);
  EXPECT_EQ(Percentile(v, 0), 1);
  EXPECT_EQ(Percentile({3.5}, 99), 3.5);
  EXPECT_EQ(Percentile({}, 50), 0);
  EXPECT_EQ(Percentile({1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, 99), 10);  // rank ceil(9.9) = 10
}

RunShape Closed(int concurrency, double seconds, int64_t tasks = 10) {
  RunShape s;
  s.mode = "closed";
  s.concurrency = concurrency;
  s.seconds = seconds;
  s.num_tasks = tasks;
  return s;
}

TEST(LoadReportTest, SummarizesThroughputLatencyErrorsAndTasks) {
  LoadRecorder a, b;
  for (int i = 1; i <= 50; ++i) a.Record(absl::Milliseconds(i), absl::StatusCode::kOk, 2, i % 3);
  for (int i = 51; i <= 100; ++i) b.Record(absl::Milliseconds(i), absl::StatusCode::kOk, 2, 7);
  b.Record(absl::Milliseconds(1), absl::StatusCode::kResourceExhausted, 2, 8);
  a.Merge(b);
  const LoadReport r = Summarize(a, Closed(4, 10), VerdictRules{0, 0.5, 0.95});
  EXPECT_EQ(r.requests, 101);
  EXPECT_EQ(r.ok, 100);
  EXPECT_EQ(r.errors, 1);
  EXPECT_DOUBLE_EQ(r.requests_per_second, 10);
  EXPECT_DOUBLE_EQ(r.inputs_per_second, 20);
  EXPECT_NEAR(r.p50_ms, 50, 1e-9);
  EXPECT_NEAR(r.p99_ms, 99, 1e-9);
  EXPECT_NEAR(r.max_ms, 100, 1e-9);
  EXPECT_EQ(r.errors_by_code.at("RESOURCE_EXHAUSTED"), 1);
  EXPECT_EQ(r.distinct_tasks, 5);  // 0, 1, 2, 7, 8
  EXPECT_EQ(r.verdict, "OK");
  const nlohmann::json j = ToJson(r);
  EXPECT_EQ(j["errors_by_code"]["RESOURCE_EXHAUSTED"], 1);
  EXPECT_DOUBLE_EQ(j["latency_ms"]["p99"].get<double>(), 99);
}

TEST(LoadReportTest, VerdictFailsOnErrorsAndSaysWhatToDo) {
  LoadRecorder rec;
  for (int i = 0; i < 90; ++i) rec.Record(absl::Milliseconds(5), absl::StatusCode::kOk, 1, 0);
  for (int i = 0; i < 10; ++i) rec.Record(absl::Milliseconds(5), absl::StatusCode::kResourceExhausted, 1, 0);
  const LoadReport r = Summarize(rec, Closed(64, 1), VerdictRules{});
  EXPECT_EQ(r.verdict, "FAIL");
  EXPECT_THAT(r.verdict_line, HasSubstr("10.00 %"));
  EXPECT_THAT(r.verdict_line, HasSubstr("RESOURCE_EXHAUSTED"));
  EXPECT_THAT(r.verdict_line, HasSubstr("queue is full"));
  EXPECT_THAT(FormatErrors(r), HasSubstr("RESOURCE_EXHAUSTED 10"));
}

TEST(LoadReportTest, VerdictFailsWhenNothingSucceeded) {
  LoadRecorder rec;
  rec.Record(absl::Milliseconds(1), absl::StatusCode::kUnavailable, 1, 0);
  const LoadReport r = Summarize(rec, Closed(1, 1), VerdictRules{});
  EXPECT_EQ(r.verdict, "FAIL");
  EXPECT_THAT(r.verdict_line, HasSubstr("UNAVAILABLE"));
}

TEST(LoadReportTest, OpenLoopBelowTargetIsSaturated) {
  LoadRecorder rec;
  for (int i = 0; i < 50; ++i) rec.Record(absl::Milliseconds(5), absl::StatusCode::kOk, 1, 0);
  RunShape shape;
  shape.mode = "open";
  shape.target_qps = 100;
  shape.concurrency = 8;
  shape.seconds = 1;
  const LoadReport r = Summarize(rec, shape, VerdictRules{});
  EXPECT_EQ(r.verdict, "SATURATED");
  EXPECT_THAT(r.verdict_line, HasSubstr("50.0 req/s achieved of 100.0"));
}

TEST(LoadReportTest, RequestsTheClientCouldNotSendMeanSaturationNotErrors) {
  LoadRecorder rec;
  for (int i = 0; i < 98; ++i) rec.Record(absl::Milliseconds(900), absl::StatusCode::kOk, 1, 0);
  for (int i = 0; i < 30; ++i) rec.RecordNotSent();
  for (int i = 0; i < 98; ++i) rec.RecordStartLag(absl::Milliseconds(800));
  RunShape shape;
  shape.mode = "open";
  shape.target_qps = 100;
  shape.concurrency = 16;
  shape.seconds = 1;
  const LoadReport r = Summarize(rec, shape, VerdictRules{});
  EXPECT_EQ(r.errors, 0);
  EXPECT_EQ(r.not_sent, 30);
  EXPECT_EQ(r.verdict, "SATURATED");
  EXPECT_THAT(r.verdict_line, HasSubstr("30 due requests never sent"));
  EXPECT_THAT(r.verdict_line, HasSubstr("16 in-flight slots"));
  EXPECT_THAT(FormatErrors(r), HasSubstr("not sent: 30"));
}

TEST(LoadReportTest, SloMissIsReported) {
  LoadRecorder rec;
  for (int i = 1; i <= 100; ++i) rec.Record(absl::Milliseconds(i), absl::StatusCode::kOk, 1, 0);
  EXPECT_EQ(Summarize(rec, Closed(4, 1), VerdictRules{50, 0.001, 0.95}).verdict, "MISSES_SLO");
  const LoadReport ok = Summarize(rec, Closed(4, 1), VerdictRules{200, 0.001, 0.95});
  EXPECT_EQ(ok.verdict, "OK");
  EXPECT_THAT(ok.verdict_line, HasSubstr("SLO p99 <= 200.0 ms met"));
}

TEST(LoadReportTest, TableHasOneLinePerStep) {
  LoadRecorder rec;
  rec.Record(absl::Milliseconds(3), absl::StatusCode::kOk, 1, 0);
  const std::string table =
      FormatTable({Summarize(rec, Closed(1, 1), {}), Summarize(rec, Closed(8, 1), {})});
  EXPECT_THAT(table, HasSubstr("p99 ms"));
  EXPECT_THAT(table, HasSubstr("1 clients"));
  EXPECT_THAT(table, HasSubstr("8 clients"));
  EXPECT_THAT(table, HasSubstr("1/10"));
}

TEST(ArrivalProcessTest, PoissonGapsHaveTheTargetMean) {
  absl::StatusOr<ArrivalProcess> p = ArrivalProcess::Create(200, Arrivals::kPoisson, 3);
  ASSERT_TRUE(p.ok());
  double sum = 0, sum2 = 0;
  const int n = 100000;
  for (int i = 0; i < n; ++i) {
    const double g = absl::ToDoubleSeconds(p->NextGap());
    sum += g;
    sum2 += g * g;
  }
  const double mean = sum / n;
  const double sd = std::sqrt(sum2 / n - mean * mean);
  EXPECT_NEAR(mean, 1.0 / 200, 0.02 / 200);
  EXPECT_NEAR(sd / mean, 1.0, 0.03);  // exponential: coefficient of variation 1
}

TEST(ArrivalProcessTest, UniformGapsAreEven) {
  absl::StatusOr<ArrivalProcess> p = ArrivalProcess::Create(50, Arrivals::kUniform, 3);
  ASSERT_TRUE(p.ok());
  for (int i = 0; i < 10; ++i) EXPECT_EQ(p->NextGap(), absl::Milliseconds(20));
  EXPECT_FALSE(ArrivalProcess::Create(0, Arrivals::kUniform, 1).ok());
}

TEST(ParseTest, LoopModesAndArrivals) {
  EXPECT_EQ(*ParseLoopMode("open"), LoopMode::kOpen);
  EXPECT_EQ(*ParseLoopMode("closed"), LoopMode::kClosed);
  EXPECT_THAT(std::string(ParseLoopMode("half").status().message()), HasSubstr("closed or open"));
  EXPECT_EQ(*ParseArrivals("uniform"), Arrivals::kUniform);
  EXPECT_FALSE(ParseArrivals("bursty").ok());
}

TEST(RunLoadTest, RejectsBadOptions) {
  auto send = [](const RequestSlot&) -> absl::StatusOr<int64_t> { return 1; };
  RunOptions o;
  o.concurrency = 0;
  EXPECT_EQ(RunLoad(o, nullptr, send).status().code(), absl::StatusCode::kInvalidArgument);
  o = RunOptions();
  o.mode = LoopMode::kOpen;
  o.qps = 0;
  EXPECT_THAT(std::string(RunLoad(o, nullptr, send).status().message()), HasSubstr("target rate"));
  o = RunOptions();
  o.duration = absl::ZeroDuration();
  EXPECT_FALSE(RunLoad(o, nullptr, send).ok());
  EXPECT_FALSE(RunLoad(RunOptions(), nullptr, nullptr).ok());
}

TEST(RunLoadTest, ClosedLoopUsesEveryClientAndNeverExceedsConcurrency) {
  constexpr int kClients = 4;
  std::atomic<int> in_flight{0}, max_in_flight{0}, arrived{0};
  absl::Mutex mu;
  std::set<int> workers;
  auto send = [&](const RequestSlot& slot) -> absl::StatusOr<int64_t> {
    const int now = ++in_flight;
    int seen = max_in_flight.load();
    while (now > seen && !max_in_flight.compare_exchange_weak(seen, now)) {
    }
    {
      absl::MutexLock lock(&mu);
      workers.insert(slot.worker);
    }
    // The first requests wait for each other (bounded), so every client is seen however threads are scheduled.
    if (arrived.fetch_add(1) < kClients) {
      const absl::Time until = absl::Now() + absl::Seconds(10);
      while (arrived.load() < kClients && absl::Now() < until) absl::SleepFor(absl::Microseconds(100));
    }
    --in_flight;
    return 3;
  };
  RunOptions o;
  o.concurrency = kClients;
  o.warmup = absl::ZeroDuration();
  o.duration = absl::Seconds(60);
  o.max_requests = 200;
  absl::StatusOr<RunResult> run = RunLoad(o, [](std::mt19937_64& rng) { return int64_t(rng() % 5); }, send);
  ASSERT_TRUE(run.ok()) << run.status();
  EXPECT_EQ(run->recorder.requests(), 200);
  EXPECT_EQ(run->recorder.ok_inputs(), 600);
  EXPECT_LE(max_in_flight.load(), kClients);
  EXPECT_EQ(workers.size(), static_cast<size_t>(kClients));
  EXPECT_GT(run->seconds, 0);
  EXPECT_EQ(run->recorder.requests_by_task().size(), 5u);
}

TEST(RunLoadTest, ClosedLoopRecordsErrorsByCode) {
  auto send = [](const RequestSlot& slot) -> absl::StatusOr<int64_t> {
    if (slot.task % 2 == 1) return absl::DeadlineExceededError("late");
    return 1;
  };
  RunOptions o;
  o.concurrency = 2;
  o.warmup = absl::ZeroDuration();
  o.max_requests = 100;
  std::atomic<int64_t> next{0};
  absl::StatusOr<RunResult> run = RunLoad(o, [&](std::mt19937_64&) { return next++; }, send);
  ASSERT_TRUE(run.ok());
  EXPECT_EQ(run->recorder.requests(), 100);
  EXPECT_EQ(run->recorder.errors(), 50);
  EXPECT_EQ(run->recorder.errors_by_code().at(absl::StatusCode::kDeadlineExceeded), 50);
}

TEST(RunLoadTest, WarmupRequestsAreNotRecorded) {
  std::atomic<int> sent{0};
  auto send = [&](const RequestSlot&) -> absl::StatusOr<int64_t> {
    ++sent;
    absl::SleepFor(absl::Milliseconds(5));
    return 1;
  };
  RunOptions o;
  o.concurrency = 1;
  o.warmup = absl::Milliseconds(100);
  o.max_requests = 5;
  absl::StatusOr<RunResult> run = RunLoad(o, nullptr, send);
  ASSERT_TRUE(run.ok());
  EXPECT_EQ(run->recorder.requests(), 5);
  EXPECT_GT(sent.load(), 5);  // at least one request went out during the 100 ms warm-up
}

TEST(RunLoadTest, OpenLoopCountsLatencyFromTheScheduledArrival) {
  // One in-flight slot, arrivals every 1 ms, requests that take 5 ms: each waits for the slot, and the wait counts.
  auto send = [](const RequestSlot&) -> absl::StatusOr<int64_t> {
    absl::SleepFor(absl::Milliseconds(5));
    return 1;
  };
  RunOptions o;
  o.mode = LoopMode::kOpen;
  o.qps = 1000;
  o.arrivals = Arrivals::kUniform;
  o.concurrency = 1;
  o.warmup = absl::ZeroDuration();
  o.duration = absl::Seconds(30);
  o.max_requests = 20;
  absl::StatusOr<RunResult> run = RunLoad(o, nullptr, send);
  ASSERT_TRUE(run.ok()) << run.status();
  EXPECT_EQ(run->recorder.requests(), 20);
  std::vector<double> lat = run->recorder.ok_latencies_ms();
  std::sort(lat.begin(), lat.end());
  // The 20th request is due at 20 ms but starts after the 19 before it (>= 95 ms): >= 75 ms late.
  EXPECT_GE(lat.back(), 75);
  EXPECT_EQ(run->recorder.start_lags_ms().size(), 20u);
}

TEST(RunLoadTest, OpenLoopSendsEveryArrivalWhenTheServerKeepsUp) {
  std::atomic<int> sent{0};
  auto send = [&](const RequestSlot&) -> absl::StatusOr<int64_t> {
    ++sent;
    return 1;
  };
  RunOptions o;
  o.mode = LoopMode::kOpen;
  o.qps = 500;
  o.concurrency = 4;
  o.warmup = absl::ZeroDuration();
  o.max_requests = 50;
  absl::StatusOr<RunResult> run = RunLoad(o, nullptr, send);
  ASSERT_TRUE(run.ok());
  EXPECT_EQ(sent.load(), 50);
  EXPECT_EQ(run->recorder.requests(), 50);
  EXPECT_EQ(run->recorder.not_sent(), 0);
}

TEST(WorkloadTest, LoadsTheFirstColumnAndSkipsTheHeader) {
  const std::string path = ::testing::TempDir() + "/loadgen_texts.tsv";
  {
    std::ofstream out(path);
    out << "sentence\tlabel\nit is good .\t1\n\nbad movie\t0\r\n";
  }
  absl::StatusOr<std::vector<std::string>> texts = LoadTexts(path);
  ASSERT_TRUE(texts.ok());
  EXPECT_THAT(*texts, ::testing::ElementsAre("it is good .", "bad movie"));
  EXPECT_EQ(LoadTexts(path, 1)->size(), 1u);
  EXPECT_EQ(LoadTexts("/nonexistent/texts").status().code(), absl::StatusCode::kNotFound);
  {
    std::ofstream out(path);
    out << "sentence\n\n";
  }
  EXPECT_EQ(LoadTexts(path).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_GE(BuiltinTexts().size(), 10u);
}

TEST(WorkloadTest, TaskNamesAndTenants) {
  EXPECT_EQ(NameTask("lg-", 42, 0).task, "lg-task-00042");
  EXPECT_EQ(NameTask("lg-", 42, 0).tenant, "");
  EXPECT_EQ(NameTask("lg-", 42, 4).tenant, "lg-tenant-2");
}

TEST(MetricsScrapeTest, ParsesSeriesAndSumsByName) {
  const std::string text =
      "# HELP deltaserve_requests_total Requests.\n"
      "# TYPE deltaserve_requests_total counter\n"
      "deltaserve_requests_total{rpc=\"Embed\",code=\"OK\"} 10\n"
      "deltaserve_requests_total{rpc=\"Embed\",code=\"NOT_FOUND\"} 2\n"
      "deltaserve_batch_rows_sum 30.5\n"
      "deltaserve_batch_rows_count 4\n"
      "deltaserve_batch_rows_bucket{le=\"+Inf\"} 4\n"
      "deltaserve_odd{label=\"a b}\"} 1 1700000000\n"
      "deltaserve_inf +Inf\n";
  absl::StatusOr<std::map<std::string, double>> m = ParsePrometheusText(text);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(SumMetric(*m, "deltaserve_requests_total"), 12);
  EXPECT_EQ(SumMetricWithLabel(*m, "deltaserve_requests_total", "code=\"OK\""), 10);
  EXPECT_EQ(SumMetric(*m, "deltaserve_batch_rows_sum"), 30.5);
  EXPECT_EQ(SumMetric(*m, "deltaserve_batch_rows"), 0);  // only _sum/_count/_bucket exist
  EXPECT_EQ(SumMetric(*m, "deltaserve_odd"), 1);
  EXPECT_TRUE(std::isinf(SumMetric(*m, "deltaserve_inf")));
  EXPECT_EQ(SumMetric(*m, "absent"), 0);
}

TEST(MetricsScrapeTest, RejectsMalformedLines) {
  EXPECT_THAT(std::string(ParsePrometheusText("a_metric\n").status().message()), HasSubstr("line 1"));
  EXPECT_FALSE(ParsePrometheusText("a{b=\"c\" 1\n").ok());
  EXPECT_FALSE(ParsePrometheusText("a one\n").ok());
  EXPECT_EQ(ScrapeMetrics("no-port").status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace loadgen
}  // namespace deltaserve
