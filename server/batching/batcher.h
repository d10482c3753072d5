// Batcher: the dynamic batcher. Concurrent requests enqueue rows (one row = one input sequence of token ids); a
// worker thread forms batches of at most `max_batch_rows` rows and `max_batch_tokens` padded tokens, waiting at
// most `max_queue_delay` after the oldest queued row for a batch to fill, and hands each batch to a BatchRunner
// (the model forward). This is the seed of the multi-task scheduler: a row will carry its delta handle.
//
// The Batcher owns its queue and worker threads; it does not know the model (the runner does), so its logic is
// unit-tested with fake runners. Thread-safe: Run() may be called from any number of threads.
//
// Rows of one request may land in different batches. A request whose deadline passes, or whose caller gives up,
// while its rows are queued is answered DEADLINE_EXCEEDED / CANCELLED and its queued rows are dropped without
// being computed. A full queue answers RESOURCE_EXHAUSTED at once (backpressure).
#ifndef DELTASERVE_SERVER_BATCHING_BATCHER_H_
#define DELTASERVE_SERVER_BATCHING_BATCHER_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"

namespace deltaserve {
namespace delta {
class DeltaPack;
}  // namespace delta
namespace batching {

// What a request asks of one row.
struct RowInput {
  std::vector<int64_t> ids;        // the full model input; non-empty
  bool want_token_states = false;  // also return the per-token states
  bool want_head = false;          // also run the pack's head on the sentence embedding
  // The delta pack this row runs with (null: the base model). Holding it pins the pack until the row is done.
  std::shared_ptr<const delta::DeltaPack> delta;
};

// What the runner produces for one row.
struct RowResult {
  std::vector<float> embedding;     // the sentence embedding
  std::vector<float> token_states;  // ids.size() x hidden, row-major; empty unless asked for
  std::vector<float> head_output;   // the head's logits (or value), when asked for
};

// One row of a batch as the runner sees it: the input and where its result goes.
struct BatchRow {
  const RowInput* input = nullptr;
  RowResult* result = nullptr;
};

// Runs one batch: fills every row's result, or returns an error that fails every request in the batch.
using BatchRunner = std::function<absl::Status(absl::Span<const BatchRow> rows)>;

// Observes what the batcher does (metrics). All methods may be called from the worker threads.
class BatcherObserver {
 public:
  virtual ~BatcherObserver() = default;
  virtual void OnBatch(int rows, int64_t padded_tokens, int64_t real_tokens, absl::Duration run_time) {}
  virtual void OnRowQueued(absl::Duration queue_time) {}
  virtual void OnQueueDepth(int64_t rows) {}
  virtual void OnRowsDropped(int rows, absl::StatusCode why) {}
};

class Batcher {
 public:
  struct Options {
    // Most rows in one batch.
    int max_batch_rows = 32;
    // Most padded tokens (rows x longest row) in one batch; a single longer row still runs, alone.
    int64_t max_batch_tokens = 16384;
    // How long the oldest queued row waits for a batch to fill before the batch runs anyway.
    absl::Duration max_queue_delay = absl::Milliseconds(2);
    // Most rows waiting in the queue; beyond it Run() answers RESOURCE_EXHAUSTED.
    int64_t max_queued_rows = 4096;
    // Worker threads running batches. One is right on CPU: each batch already uses every core (intra-op).
    int num_threads = 1;
    // How often a waiting caller checks its cancellation callback.
    absl::Duration cancel_poll_interval = absl::Milliseconds(20);
  };

  // REQUIRES: runner is callable from the worker threads; observer (may be null) outlives the Batcher.
  Batcher(const Options& options, BatchRunner runner, BatcherObserver* observer);
  // Stops accepting rows, finishes every queued row, joins the workers.
  ~Batcher();
  Batcher(const Batcher&) = delete;
  Batcher& operator=(const Batcher&) = delete;

  // Queues `rows`, waits for all of them, and returns their results in order. Blocks the calling thread.
  // `deadline` (absl::InfiniteFuture() for none) and `is_cancelled` (may be empty) end the wait early.
  // Errors: RESOURCE_EXHAUSTED (queue full), DEADLINE_EXCEEDED, CANCELLED, UNAVAILABLE (shutting down), or the
  // runner's error. REQUIRES: every row has non-empty ids.
  absl::StatusOr<std::vector<RowResult>> Run(std::vector<RowInput> rows, absl::Time deadline,
                                             const std::function<bool()>& is_cancelled);

  // Stops accepting new rows (Run answers UNAVAILABLE) and finishes the queued ones. Idempotent.
  void Stop();

  const Options& options() const { return options_; }

 private:
  struct Request;
  struct QueuedRow {
    std::shared_ptr<Request> request;
    int index = 0;
    absl::Time enqueued;
  };

  void WorkerLoop();
  bool BatchReadyLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Pops the next batch from the queue (dropping rows of requests that already ended).
  std::vector<QueuedRow> TakeBatchLocked(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RunBatch(std::vector<QueuedRow> batch, absl::Time now);

  const Options options_;
  const BatchRunner runner_;
  BatcherObserver* const observer_;

  absl::Mutex mu_;
  std::deque<QueuedRow> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> workers_;
};

}  // namespace batching
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_BATCHING_BATCHER_H_
