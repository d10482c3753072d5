// Unit tests of the dynamic batcher's logic with fake runners (no model).
#include "server/batching/batcher.h"

#include <atomic>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace deltaserve {
namespace batching {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

RowInput Row(int64_t len, int64_t first = 1) {
  RowInput row;
  for (int64_t i = 0; i < len; ++i) row.ids.push_back(first + i);
  return row;
}

// A runner that records batch sizes and writes each row's first id into its embedding.
struct RecordingRunner {
  absl::Mutex mu;
  std::vector<int> sizes ABSL_GUARDED_BY(mu);
  std::vector<int64_t> padded ABSL_GUARDED_BY(mu);
  absl::Status Run(absl::Span<const BatchRow> rows) {
    int64_t longest = 0;
    for (const BatchRow& row : rows) {
      row.result->embedding = {static_cast<float>(row.input->ids[0])};
      longest = std::max<int64_t>(longest, row.input->ids.size());
    }
    absl::MutexLock lock(&mu);
    sizes.push_back(static_cast<int>(rows.size()));
    padded.push_back(longest * static_cast<int64_t>(rows.size()));
    return absl::OkStatus();
  }
};

TEST(BatcherTest, ReturnsOneResultPerRowInOrder) {
  RecordingRunner runner;
  Batcher batcher({}, [&](absl::Span<const BatchRow> rows) { return runner.Run(rows); }, nullptr);
  std::vector<RowInput> rows = {Row(3, 10), Row(1, 20), Row(2, 30)};
  auto results = batcher.Run(std::move(rows), absl::InfiniteFuture(), nullptr);
  ASSERT_TRUE(results.ok()) << results.status();
  ASSERT_EQ(results->size(), 3u);
  EXPECT_THAT((*results)[0].embedding, ElementsAre(10));
  EXPECT_THAT((*results)[1].embedding, ElementsAre(20));
  EXPECT_THAT((*results)[2].embedding, ElementsAre(30));
}

TEST(BatcherTest, GroupsConcurrentRequestsIntoBatchesOfAtMostMaxRows) {
  RecordingRunner runner;
  Batcher::Options options;
  options.max_batch_rows = 4;
  options.max_queue_delay = absl::Milliseconds(200);
  Batcher batcher(options, [&](absl::Span<const BatchRow> rows) { return runner.Run(rows); }, nullptr);
  std::vector<std::thread> callers;
  for (int i = 0; i < 8; ++i) {
    callers.emplace_back([&, i] {
      auto r = batcher.Run({Row(2, i + 1)}, absl::InfiniteFuture(), nullptr);
      ASSERT_TRUE(r.ok());
      EXPECT_THAT((*r)[0].embedding, ElementsAre(i + 1));
    });
  }
  for (auto& t : callers) t.join();
  absl::MutexLock lock(&runner.mu);
  int total = 0;
  for (int s : runner.sizes) {
    EXPECT_LE(s, 4);
    total += s;
  }
  EXPECT_EQ(total, 8);
  // With a long queue delay and 8 concurrent rows, the batcher must have formed full batches, not 8 singles.
  EXPECT_LT(runner.sizes.size(), 8u);
}

TEST(BatcherTest, KeepsPaddedTokensWithinBudget) {
  RecordingRunner runner;
  Batcher::Options options;
  options.max_batch_rows = 100;
  options.max_batch_tokens = 20;
  options.max_queue_delay = absl::Milliseconds(100);
  Batcher batcher(options, [&](absl::Span<const BatchRow> rows) { return runner.Run(rows); }, nullptr);
  std::vector<RowInput> rows;
  for (int i = 0; i < 10; ++i) rows.push_back(Row(5));
  ASSERT_TRUE(batcher.Run(std::move(rows), absl::InfiniteFuture(), nullptr).ok());
  absl::MutexLock lock(&runner.mu);
  for (int64_t p : runner.padded) EXPECT_LE(p, 20);
  EXPECT_THAT(runner.sizes, ElementsAre(4, 4, 2));
}

TEST(BatcherTest, RunsARowLongerThanTheTokenBudgetAlone) {
  RecordingRunner runner;
  Batcher::Options options;
  options.max_batch_tokens = 4;
  Batcher batcher(options, [&](absl::Span<const BatchRow> rows) { return runner.Run(rows); }, nullptr);
  auto r = batcher.Run({Row(9), Row(1)}, absl::InfiniteFuture(), nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  absl::MutexLock lock(&runner.mu);
  EXPECT_THAT(runner.sizes, ElementsAre(1, 1));
}

TEST(BatcherTest, RunsAPartialBatchAfterTheQueueDelay) {
  RecordingRunner runner;
  Batcher::Options options;
  options.max_batch_rows = 64;
  options.max_queue_delay = absl::Milliseconds(5);
  Batcher batcher(options, [&](absl::Span<const BatchRow> rows) { return runner.Run(rows); }, nullptr);
  auto r = batcher.Run({Row(1)}, absl::Now() + absl::Seconds(10), nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
}

TEST(BatcherTest, RejectsWithResourceExhaustedWhenTheQueueIsFull) {
  absl::Notification release;
  std::atomic<int> started{0};
  Batcher::Options options;
  options.max_batch_rows = 1;
  options.max_queued_rows = 2;
  options.max_queue_delay = absl::ZeroDuration();
  Batcher batcher(
      options,
      [&](absl::Span<const BatchRow> rows) {
        started++;
        release.WaitForNotification();
        for (const BatchRow& row : rows) row.result->embedding = {1};
        return absl::OkStatus();
      },
      nullptr);
  // One row runs (and blocks), two fill the queue.
  std::vector<std::thread> callers;
  callers.emplace_back([&] { ASSERT_TRUE(batcher.Run({Row(1)}, absl::InfiniteFuture(), nullptr).ok()); });
  while (started.load() == 0) absl::SleepFor(absl::Milliseconds(1));
  callers.emplace_back([&] { ASSERT_TRUE(batcher.Run({Row(1), Row(1)}, absl::InfiniteFuture(), nullptr).ok()); });
  absl::SleepFor(absl::Milliseconds(50));
  auto rejected = batcher.Run({Row(1)}, absl::InfiniteFuture(), nullptr);
  EXPECT_EQ(rejected.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(rejected.status().message(), HasSubstr("retry"));
  release.Notify();
  for (auto& t : callers) t.join();
}

TEST(BatcherTest, AnswersDeadlineExceededAndNeverComputesExpiredRows) {
  absl::Notification release;
  std::atomic<int> computed{0};
  Batcher::Options options;
  options.max_batch_rows = 1;
  options.max_queue_delay = absl::ZeroDuration();
  Batcher batcher(
      options,
      [&](absl::Span<const BatchRow> rows) {
        release.WaitForNotification();
        computed += static_cast<int>(rows.size());
        for (const BatchRow& row : rows) row.result->embedding = {1};
        return absl::OkStatus();
      },
      nullptr);
  std::thread blocker([&] { ASSERT_TRUE(batcher.Run({Row(1)}, absl::InfiniteFuture(), nullptr).ok()); });
  absl::SleepFor(absl::Milliseconds(20));
  auto late = batcher.Run({Row(1), Row(1), Row(1)}, absl::Now() + absl::Milliseconds(30), nullptr);
  EXPECT_EQ(late.status().code(), absl::StatusCode::kDeadlineExceeded);
  release.Notify();
  blocker.join();
  batcher.Stop();
  EXPECT_EQ(computed.load(), 1);  // only the blocker's row
}

TEST(BatcherTest, AnswersCancelledWhenTheCallerGoesAway) {
  absl::Notification release;
  Batcher::Options options;
  options.max_batch_rows = 1;
  options.max_queue_delay = absl::ZeroDuration();
  Batcher batcher(
      options,
      [&](absl::Span<const BatchRow> rows) {
        release.WaitForNotification();
        for (const BatchRow& row : rows) row.result->embedding = {1};
        return absl::OkStatus();
      },
      nullptr);
  std::thread blocker([&] { ASSERT_TRUE(batcher.Run({Row(1)}, absl::InfiniteFuture(), nullptr).ok()); });
  absl::SleepFor(absl::Milliseconds(20));
  std::atomic<bool> cancelled{false};
  std::thread canceller([&] {
    absl::SleepFor(absl::Milliseconds(30));
    cancelled = true;
  });
  auto r = batcher.Run({Row(1)}, absl::InfiniteFuture(), [&] { return cancelled.load(); });
  EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled);
  release.Notify();
  blocker.join();
  canceller.join();
}

TEST(BatcherTest, RunnerErrorFailsEveryRequestInTheBatch) {
  Batcher batcher({}, [](absl::Span<const BatchRow>) { return absl::InternalError("boom"); }, nullptr);
  auto r = batcher.Run({Row(1), Row(2)}, absl::InfiniteFuture(), nullptr);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInternal);
  EXPECT_THAT(r.status().message(), HasSubstr("boom"));
}

TEST(BatcherTest, StopFinishesQueuedRowsAndRejectsNewOnes) {
  RecordingRunner runner;
  Batcher::Options options;
  options.max_queue_delay = absl::Milliseconds(50);
  Batcher batcher(options, [&](absl::Span<const BatchRow> rows) { return runner.Run(rows); }, nullptr);
  std::thread caller([&] { EXPECT_TRUE(batcher.Run({Row(1)}, absl::InfiniteFuture(), nullptr).ok()); });
  absl::SleepFor(absl::Milliseconds(5));
  batcher.Stop();
  caller.join();
  auto r = batcher.Run({Row(1)}, absl::InfiniteFuture(), nullptr);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
}

TEST(BatcherTest, ReportsBatchesToTheObserver) {
  struct Observer : BatcherObserver {
    std::atomic<int> batches{0}, rows{0};
    void OnBatch(int r, int64_t, int64_t, absl::Duration) override {
      batches++;
      rows += r;
    }
  } observer;
  RecordingRunner runner;
  Batcher batcher({}, [&](absl::Span<const BatchRow> rows) { return runner.Run(rows); }, &observer);
  ASSERT_TRUE(batcher.Run({Row(1), Row(1), Row(1)}, absl::InfiniteFuture(), nullptr).ok());
  EXPECT_GE(observer.batches.load(), 1);
  EXPECT_EQ(observer.rows.load(), 3);
}

}  // namespace
}  // namespace batching
}  // namespace deltaserve
