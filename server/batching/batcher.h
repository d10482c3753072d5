// Batcher: the scheduler. Concurrent requests enqueue rows (one row = one input sequence of token ids) for a
// tenant at a priority; worker threads form batches of at most `max_batch_rows` rows and `max_batch_tokens`
// padded tokens, waiting at most `max_queue_delay` after the oldest queued row for a batch to fill, and hand each
// batch to a BatchRunner (the model forward). A batch mixes rows of any tenants, tasks and delta methods: every
// row carries its own delta pack.
//
// Which rows go into a batch (docs/ARCHITECTURE.md, "Scheduling"):
// - Fair sharing between tenants: every tenant has its own queue, and the next row comes from the tenant with the
//   smallest virtual time (start-time fair queueing, the virtual-clock form of weighted deficit round robin). A
//   row costs its tokens; taking it advances its tenant's virtual time by tokens / weight (Options::
//   tenant_weights; tenants not listed weigh 1). A tenant whose queue was empty starts at the current virtual
//   time, so idle time banks no credit. Over any busy period each backlogged tenant gets tokens in proportion to
//   its weight, and a tenant that sends little waits about one batch, however much another tenant floods.
// - Priorities: within a tenant, high rows are taken before normal ones (FIFO within a priority). Low is a
//   background class across tenants: low rows (fairly shared among tenants in their own class) fill only the room
//   a batch has left once no tenant has high or normal rows waiting; they may wait until their deadline under
//   sustained load. A tenant cannot starve others by marking its rows high: high only reorders its own queue.
// - Backpressure: a global bound (`max_queued_rows`) and a per-tenant bound (`max_queued_rows_per_tenant`) on
//   queued rows; a request that does not fit is answered RESOURCE_EXHAUSTED at once, with a retry hint in the
//   message and as a status payload (SetRetryAfter / GetRetryAfter) estimated from the measured drain rate.
// - Rows of one request may land in different batches. A request whose deadline passes, or whose caller gives
//   up, while its rows are queued is answered DEADLINE_EXCEEDED / CANCELLED; its queued rows are removed at once
//   (freeing their slots in the bounds) and never computed.
//
// The Batcher owns its queues and worker threads; it does not know the model (the runner does), so its logic is
// unit-tested with fake runners. Thread-safe: Run() may be called from any number of threads.
#ifndef DELTASERVE_SERVER_BATCHING_BATCHER_H_
#define DELTASERVE_SERVER_BATCHING_BATCHER_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/common/retry_hint.h"
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

// A request's priority (see the file comment): high and normal share one class, fairly between tenants, with
// high first within a tenant; low is a background class that only fills spare room.
enum class Priority { kLow = 0, kNormal = 1, kHigh = 2 };
// "low", "normal", "high".
const char* PriorityName(Priority priority);

// Why Run() refused a request at admission.
enum class RejectReason {
  kQueueFull,        // the global bound (max_queued_rows) is reached
  kTenantQueueFull,  // the tenant's bound (max_queued_rows_per_tenant) is reached
  kTooLarge,         // the request alone has more rows than a bound: it can never be admitted
  kShuttingDown,     // Stop() was called
};
// "queue_full", "tenant_queue_full", "request_too_large", "shutting_down".
const char* RejectReasonName(RejectReason reason);

// Who a request is for and how it may end early.
struct RequestInfo {
  // The tenant whose queue the rows join ("" = Options::default_tenant).
  std::string tenant;
  Priority priority = Priority::kNormal;
  // The wait ends with DEADLINE_EXCEEDED at this time (absl::InfiniteFuture() = none).
  absl::Time deadline = absl::InfiniteFuture();
  // Polled while waiting; true ends the wait with CANCELLED. May be empty.
  std::function<bool()> is_cancelled;
  // For metrics only: the method names of the pack the rows run with ("lora", ...; empty = the base model).
  std::vector<std::string> delta_methods;
};

// Observes what the batcher does (metrics). Every method may be called from the worker threads or the callers'
// threads, some with the batcher's lock held: implementations must be quick and must not call the Batcher.
class BatcherObserver {
 public:
  virtual ~BatcherObserver() = default;
  virtual void OnBatch(int rows, int64_t padded_tokens, int64_t real_tokens, absl::Duration run_time) {}
  // The deltas of one batch: distinct packs among its rows (base-model rows not counted), and rows per method
  // name ("base" for rows without a pack; a row whose pack has several methods counts once under each).
  virtual void OnBatchDeltas(int distinct_deltas, const std::map<std::string, int>& rows_by_method) {}
  virtual void OnRowQueued(absl::Duration queue_time) {}
  virtual void OnQueueDepth(int64_t rows) {}
  virtual void OnRowsDropped(int rows, absl::StatusCode why) {}
  // A request was admitted to `tenant`'s queue (the tenant after "" became Options::default_tenant).
  virtual void OnRequestAdmitted(const std::string& tenant, Priority priority) {}
  // `tenant`'s queued rows changed by `delta`: + when admitted, - when taken into a batch, dropped or removed.
  virtual void OnTenantQueuedRows(const std::string& tenant, int64_t delta) {}
  // Run() refused a request of `tenant` at admission.
  virtual void OnRequestRejected(const std::string& tenant, RejectReason reason) {}
};

// The retry hint of a RESOURCE_EXHAUSTED answer: server/common/retry_hint.h (these names stay for callers).
using ::deltaserve::GetRetryAfter;
using ::deltaserve::SetRetryAfter;

// Parses --tenant_weights: "tenant=weight,tenant=weight,..." (weights > 0, finite; "" = none). INVALID_ARGUMENT
// naming the bad entry otherwise (no '=', an empty name, a bad or non-positive number, a tenant named twice).
absl::StatusOr<std::map<std::string, double>> ParseTenantWeights(absl::string_view spec);

class Batcher {
 public:
  struct Options {
    // Most rows in one batch.
    int max_batch_rows = 32;
    // Most padded tokens (rows x longest row) in one batch; a single longer row still runs, alone.
    int64_t max_batch_tokens = 16384;
    // How long the oldest queued row waits for a batch to fill before the batch runs anyway.
    absl::Duration max_queue_delay = absl::Milliseconds(2);
    // Most rows waiting in all queues together; beyond it Run() answers RESOURCE_EXHAUSTED.
    int64_t max_queued_rows = 4096;
    // Most rows one tenant may have waiting (0 = only the global bound). Keep it well under max_queued_rows, so
    // that a flooding tenant meets its own bound before the global one refuses everybody.
    int64_t max_queued_rows_per_tenant = 1024;
    // Fair-share weights by tenant name; tenants not listed weigh 1. A tenant of weight 2 gets twice the tokens
    // of a tenant of weight 1 while both have rows waiting.
    std::map<std::string, double> tenant_weights;
    // The tenant a request with an empty tenant is scheduled (and counted) as; keep it equal to the delta store's
    // default tenant.
    std::string default_tenant = "default";
    // Worker threads running batches. One is right on CPU: each batch already uses every core (intra-op).
    int num_threads = 1;
    // How often a waiting caller checks its cancellation callback.
    absl::Duration cancel_poll_interval = absl::Milliseconds(20);
  };

  // OK, or INVALID_ARGUMENT naming the bad field (rows, tokens or the global bound < 1, a negative per-tenant
  // bound or queue delay, a weight that is not a positive finite number).
  static absl::Status ValidateOptions(const Options& options);

  // REQUIRES: ValidateOptions(options) is OK; runner is callable from the worker threads; observer (may be null)
  // outlives the Batcher.
  Batcher(const Options& options, BatchRunner runner, BatcherObserver* observer);
  // Stops accepting rows, finishes every queued row, joins the workers.
  ~Batcher();
  Batcher(const Batcher&) = delete;
  Batcher& operator=(const Batcher&) = delete;

  // Queues `rows` for `info.tenant` at `info.priority`, waits for all of them, and returns their results in
  // order. Blocks the calling thread; `info.deadline` and `info.is_cancelled` end the wait early.
  // Errors: RESOURCE_EXHAUSTED (a bound is reached: carries a retry hint, see SetRetryAfter; or the request alone
  // exceeds a bound: no hint, split it), DEADLINE_EXCEEDED, CANCELLED, UNAVAILABLE (shutting down), or the
  // runner's error. REQUIRES: every row has non-empty ids.
  absl::StatusOr<std::vector<RowResult>> Run(std::vector<RowInput> rows, const RequestInfo& info);
  // The same for the default tenant at normal priority.
  absl::StatusOr<std::vector<RowResult>> Run(std::vector<RowInput> rows, absl::Time deadline,
                                             const std::function<bool()>& is_cancelled);

  // Stops accepting new rows (Run answers UNAVAILABLE) and finishes the queued ones. Idempotent.
  void Stop();

  const Options& options() const { return options_; }

 private:
  struct Request;
  struct Tenant;
  struct QueuedRow {
    std::shared_ptr<Request> request;
    int index = 0;
    absl::Time enqueued;
  };
  // One fair-queueing class (0: high and normal rows, 1: low rows): the tenants with rows in it, ordered by
  // (virtual time, arrival order of the tenant), and the class's virtual clock (the start time of the row taken
  // last).
  struct FairClass {
    double virtual_time = 0;
    std::set<std::tuple<double, uint64_t, Tenant*>> order;
  };
  static constexpr int kNumClasses = 2;

  void WorkerLoop();
  bool BatchReadyLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Time OldestEnqueuedLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Pops the next batch from the queues (dropping rows of requests that already ended).
  std::vector<QueuedRow> TakeBatchLocked(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Removes the front row of `tenant`'s queue `priority`, charging `cost` virtual time; erases the tenant when it
  // has no rows left. Returns the row.
  QueuedRow PopLocked(Tenant* tenant, int priority, double cost) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Takes the rows of an ended request out of its tenant's queue.
  void RemoveRequestLocked(Request& request, absl::StatusCode why) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  double WeightOf(const std::string& tenant) const;
  // How long until `excess_rows` rows have drained at `share` of the measured throughput.
  absl::Duration RetryDelayLocked(int64_t excess_rows, double share) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Runs one batch; returns how long the runner took.
  absl::Duration RunBatch(std::vector<QueuedRow> batch, absl::Time now);

  const Options options_;
  const BatchRunner runner_;
  BatcherObserver* const observer_;

  absl::Mutex mu_;
  std::map<std::string, std::unique_ptr<Tenant>> tenants_ ABSL_GUARDED_BY(mu_);  // tenants with queued rows
  FairClass classes_[kNumClasses] ABSL_GUARDED_BY(mu_);
  uint64_t next_tenant_seq_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t queued_rows_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t queued_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  // Moving average of runner time per row (seconds), for retry hints.
  double seconds_per_row_ ABSL_GUARDED_BY(mu_) = 1e-3;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> workers_;
};

}  // namespace batching
}  // namespace deltaserve

#endif  // DELTASERVE_SERVER_BATCHING_BATCHER_H_
