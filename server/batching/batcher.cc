#include "server/batching/batcher.h"

#include <algorithm>
#include <atomic>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"

namespace deltaserve {
namespace batching {

// The shared state of one Run() call. The caller may return early (deadline, cancellation); the rows still
// queued then see `ended` and are dropped, and rows already in a running batch write into `results`, which lives
// as long as any queued row holds the Request.
struct Batcher::Request {
  std::vector<RowInput> inputs;
  std::vector<RowResult> results;
  absl::Time deadline;
  std::atomic<bool> ended{false};  // the caller stopped waiting; drop what is still queued

  absl::Mutex mu;
  absl::Status status ABSL_GUARDED_BY(mu);
  int remaining ABSL_GUARDED_BY(mu) = 0;
  absl::Notification done;

  // Records that `n` rows finished (with `st` as their outcome); notifies the caller after the last one.
  void Finish(int n, const absl::Status& st) {
    bool last = false;
    {
      absl::MutexLock lock(&mu);
      if (!st.ok() && status.ok()) status = st;
      remaining -= n;
      last = remaining == 0;
    }
    if (last) done.Notify();
  }
};

Batcher::Batcher(const Options& options, BatchRunner runner, BatcherObserver* observer)
    : options_(options), runner_(std::move(runner)), observer_(observer) {
  const int threads = std::max(1, options_.num_threads);
  workers_.reserve(threads);
  for (int i = 0; i < threads; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

Batcher::~Batcher() {
  Stop();
  for (std::thread& t : workers_) t.join();
}

void Batcher::Stop() {
  absl::MutexLock lock(&mu_);
  stopping_ = true;
}

absl::StatusOr<std::vector<RowResult>> Batcher::Run(std::vector<RowInput> rows, absl::Time deadline,
                                                    const std::function<bool()>& is_cancelled) {
  if (rows.empty()) return std::vector<RowResult>();
  auto request = std::make_shared<Request>();
  request->inputs = std::move(rows);
  request->results.resize(request->inputs.size());
  request->deadline = deadline;
  const int n = static_cast<int>(request->inputs.size());
  {
    absl::MutexLock lock(&request->mu);
    request->remaining = n;
  }
  int64_t depth = 0;
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return absl::UnavailableError("the server is shutting down; retry on another replica");
    if (static_cast<int64_t>(queue_.size()) + n > options_.max_queued_rows) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "the batch queue is full (", queue_.size(), " of ", options_.max_queued_rows,
          " rows waiting); retry after a short backoff (about ",
          absl::FormatDuration(options_.max_queue_delay * 10), ")"));
    }
    const absl::Time now = absl::Now();
    for (int i = 0; i < n; ++i) queue_.push_back(QueuedRow{request, i, now});
    depth = static_cast<int64_t>(queue_.size());
  }
  if (observer_ != nullptr) observer_->OnQueueDepth(depth);

  // Wait, checking the deadline and the caller's cancellation now and then.
  while (!request->done.HasBeenNotified()) {
    const absl::Time now = absl::Now();
    if (now >= deadline) {
      request->ended.store(true);
      return absl::DeadlineExceededError("the request's deadline passed before its inputs were computed");
    }
    if (is_cancelled && is_cancelled()) {
      request->ended.store(true);
      return absl::CancelledError("the client cancelled the request");
    }
    request->done.WaitForNotificationWithDeadline(std::min(deadline, now + options_.cancel_poll_interval));
  }
  absl::Status status;
  {
    absl::MutexLock lock(&request->mu);
    status = request->status;
  }
  if (!status.ok()) return status;
  return std::move(request->results);
}

bool Batcher::BatchReadyLocked() const {
  if (stopping_) return true;
  if (static_cast<int>(queue_.size()) >= options_.max_batch_rows) return true;
  int64_t longest = 0;
  int rows = 0;
  for (const QueuedRow& row : queue_) {
    longest = std::max<int64_t>(longest, row.request->inputs[row.index].ids.size());
    ++rows;
    if (longest * rows >= options_.max_batch_tokens) return true;
  }
  return false;
}

std::vector<Batcher::QueuedRow> Batcher::TakeBatchLocked(absl::Time now) {
  std::vector<QueuedRow> batch;
  int64_t longest = 0;
  while (!queue_.empty() && static_cast<int>(batch.size()) < options_.max_batch_rows) {
    QueuedRow& front = queue_.front();
    Request& request = *front.request;
    if (request.ended.load() || now >= request.deadline) {
      // The caller has gone (or is about to time out): drop the row without computing it.
      const absl::StatusCode why =
          request.ended.load() ? absl::StatusCode::kCancelled : absl::StatusCode::kDeadlineExceeded;
      request.Finish(1, absl::Status(why, "dropped from the queue"));
      if (observer_ != nullptr) observer_->OnRowsDropped(1, why);
      queue_.pop_front();
      continue;
    }
    const int64_t len = static_cast<int64_t>(request.inputs[front.index].ids.size());
    const int64_t new_longest = std::max(longest, len);
    if (!batch.empty() && new_longest * static_cast<int64_t>(batch.size() + 1) > options_.max_batch_tokens) break;
    longest = new_longest;
    batch.push_back(std::move(front));
    queue_.pop_front();
  }
  return batch;
}

void Batcher::WorkerLoop() {
  mu_.Lock();
  while (true) {
    mu_.Await(absl::Condition(
        +[](Batcher* b) ABSL_NO_THREAD_SAFETY_ANALYSIS { return b->stopping_ || !b->queue_.empty(); }, this));
    if (queue_.empty()) break;  // stopping and drained
    const absl::Time fire = queue_.front().enqueued + options_.max_queue_delay;
    mu_.AwaitWithDeadline(
        absl::Condition(+[](Batcher* b) ABSL_NO_THREAD_SAFETY_ANALYSIS { return b->BatchReadyLocked(); }, this),
        fire);
    const absl::Time now = absl::Now();
    std::vector<QueuedRow> batch = TakeBatchLocked(now);
    const int64_t depth = static_cast<int64_t>(queue_.size());
    mu_.Unlock();
    if (observer_ != nullptr) observer_->OnQueueDepth(depth);
    if (!batch.empty()) RunBatch(std::move(batch), now);
    mu_.Lock();
  }
  mu_.Unlock();
}

void Batcher::RunBatch(std::vector<QueuedRow> batch, absl::Time now) {
  std::vector<BatchRow> rows;
  rows.reserve(batch.size());
  int64_t longest = 0, real = 0;
  for (QueuedRow& row : batch) {
    Request& request = *row.request;
    rows.push_back(BatchRow{&request.inputs[row.index], &request.results[row.index]});
    const int64_t len = static_cast<int64_t>(request.inputs[row.index].ids.size());
    longest = std::max(longest, len);
    real += len;
    if (observer_ != nullptr) observer_->OnRowQueued(now - row.enqueued);
  }
  const absl::Time start = absl::Now();
  absl::Status status = runner_(rows);
  if (observer_ != nullptr) {
    observer_->OnBatch(static_cast<int>(rows.size()), longest * static_cast<int64_t>(rows.size()), real,
                       absl::Now() - start);
  }
  for (QueuedRow& row : batch) row.request->Finish(1, status);
}

}  // namespace batching
}  // namespace deltaserve
