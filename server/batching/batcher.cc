#include "server/batching/batcher.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <set>
#include <utility>

#include "absl/strings/cord.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"

namespace deltaserve {
namespace batching {
namespace {

constexpr int kHigh = static_cast<int>(Priority::kHigh);
constexpr int kNormal = static_cast<int>(Priority::kNormal);
constexpr int kLow = static_cast<int>(Priority::kLow);

int ClassOf(Priority priority) { return priority == Priority::kLow ? 1 : 0; }

// Longest retry hint: beyond it the estimate means little.
constexpr absl::Duration kMaxRetryDelay = absl::Seconds(60);

}  // namespace

const char* PriorityName(Priority priority) {
  switch (priority) {
    case Priority::kLow:
      return "low";
    case Priority::kNormal:
      return "normal";
    case Priority::kHigh:
      return "high";
  }
  return "normal";
}

const char* RejectReasonName(RejectReason reason) {
  switch (reason) {
    case RejectReason::kQueueFull:
      return "queue_full";
    case RejectReason::kTenantQueueFull:
      return "tenant_queue_full";
    case RejectReason::kTooLarge:
      return "request_too_large";
    case RejectReason::kShuttingDown:
      return "shutting_down";
  }
  return "queue_full";
}

absl::StatusOr<std::map<std::string, double>> ParseTenantWeights(absl::string_view spec) {
  std::map<std::string, double> weights;
  if (absl::StripAsciiWhitespace(spec).empty()) return weights;
  for (absl::string_view entry : absl::StrSplit(spec, ',')) {
    entry = absl::StripAsciiWhitespace(entry);
    const size_t eq = entry.find('=');
    if (eq == absl::string_view::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("tenant weight \"", entry, "\" is not of the form tenant=weight (e.g. acme=2)"));
    }
    const std::string name(absl::StripAsciiWhitespace(entry.substr(0, eq)));
    const absl::string_view number = absl::StripAsciiWhitespace(entry.substr(eq + 1));
    if (name.empty()) return absl::InvalidArgumentError(absl::StrCat("tenant weight \"", entry, "\" names no tenant"));
    double weight = 0;
    if (!absl::SimpleAtod(number, &weight) || !std::isfinite(weight) || weight <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("tenant weight \"", entry, "\": the weight must be a positive number"));
    }
    if (!weights.emplace(name, weight).second) {
      return absl::InvalidArgumentError(absl::StrCat("tenant \"", name, "\" is given a weight twice"));
    }
  }
  return weights;
}

// The shared state of one Run() call. The caller may return early (deadline, cancellation); its rows still
// queued are then removed, and rows already in a running batch write into `results`, which lives as long as any
// batch row holds the Request.
struct Batcher::Request {
  std::vector<RowInput> inputs;
  std::vector<RowResult> results;
  absl::Time deadline;
  std::string tenant;  // normalised ("" became the default tenant)
  Priority priority = Priority::kNormal;
  std::vector<std::string> delta_methods;
  std::atomic<bool> ended{false};  // the caller stopped waiting; drop what is still queued
  int queued = 0;                  // rows still in a queue; guarded by the Batcher's mu_

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

// One tenant's queues: one FIFO per priority, and its virtual time in each class.
struct Batcher::Tenant {
  std::string name;
  uint64_t seq = 0;  // arrival order: breaks ties between equal virtual times
  double weight = 1;
  std::deque<QueuedRow> rows[3];  // indexed by Priority
  double vtime[kNumClasses] = {0, 0};
  bool active[kNumClasses] = {false, false};  // in classes_[c].order
  int64_t queued_rows = 0;

  bool HasRows(int cls) const { return cls == 0 ? !rows[kHigh].empty() || !rows[kNormal].empty() : !rows[kLow].empty(); }
  // The priority whose front row is this tenant's next in class `cls`. REQUIRES: HasRows(cls).
  int HeadPriority(int cls) const { return cls == 0 ? (!rows[kHigh].empty() ? kHigh : kNormal) : kLow; }
};

absl::Status Batcher::ValidateOptions(const Options& options) {
  if (options.max_batch_rows < 1 || options.max_batch_tokens < 1) {
    return absl::InvalidArgumentError("max_batch_rows and max_batch_tokens must be at least 1");
  }
  if (options.max_queued_rows < 1) return absl::InvalidArgumentError("max_queued_rows must be at least 1");
  if (options.max_queued_rows_per_tenant < 0) {
    return absl::InvalidArgumentError("max_queued_rows_per_tenant must be >= 0 (0 = no per-tenant bound)");
  }
  if (options.max_queue_delay < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("max_queue_delay must not be negative");
  }
  for (const auto& [tenant, weight] : options.tenant_weights) {
    if (!std::isfinite(weight) || weight <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("the weight of tenant \"", tenant, "\" must be a positive number, not ", weight));
    }
  }
  return absl::OkStatus();
}

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

double Batcher::WeightOf(const std::string& tenant) const {
  auto it = options_.tenant_weights.find(tenant);
  return it == options_.tenant_weights.end() || !(it->second > 0) ? 1.0 : it->second;
}

absl::Duration Batcher::RetryDelayLocked(int64_t excess_rows, double share) const {
  const double threads = std::max(1, options_.num_threads);
  const double seconds = static_cast<double>(std::max<int64_t>(1, excess_rows)) * seconds_per_row_ / threads /
                         std::max(share, 1e-6);
  const absl::Duration floor = std::max(absl::Milliseconds(1), options_.max_queue_delay);
  return std::clamp(absl::Seconds(seconds), floor, kMaxRetryDelay);
}

absl::StatusOr<std::vector<RowResult>> Batcher::Run(std::vector<RowInput> rows, absl::Time deadline,
                                                    const std::function<bool()>& is_cancelled) {
  RequestInfo info;
  info.deadline = deadline;
  info.is_cancelled = is_cancelled;
  return Run(std::move(rows), info);
}

absl::StatusOr<std::vector<RowResult>> Batcher::Run(std::vector<RowInput> rows, const RequestInfo& info) {
  if (rows.empty()) return std::vector<RowResult>();
  auto request = std::make_shared<Request>();
  request->inputs = std::move(rows);
  request->results.resize(request->inputs.size());
  request->deadline = info.deadline;
  request->tenant = info.tenant.empty() ? options_.default_tenant : info.tenant;
  request->priority = info.priority;
  request->delta_methods = info.delta_methods;
  const int n = static_cast<int>(request->inputs.size());
  int64_t tokens = 0;
  for (const RowInput& row : request->inputs) tokens += static_cast<int64_t>(row.ids.size());
  {
    absl::MutexLock lock(&request->mu);
    request->remaining = n;
  }

  // Admission.
  absl::Status refused;
  RejectReason reason = RejectReason::kQueueFull;
  int64_t depth = 0;
  {
    absl::MutexLock lock(&mu_);
    const int64_t per_tenant = options_.max_queued_rows_per_tenant;
    auto it = tenants_.find(request->tenant);
    const int64_t tenant_rows = it == tenants_.end() ? 0 : it->second->queued_rows;
    if (stopping_) {
      reason = RejectReason::kShuttingDown;
      refused = absl::UnavailableError("the server is shutting down; retry on another replica");
    } else if (n > options_.max_queued_rows || (per_tenant > 0 && n > per_tenant)) {
      reason = RejectReason::kTooLarge;
      refused = absl::ResourceExhaustedError(absl::StrCat(
          "the request has ", n, " inputs, more than the server ever queues for one tenant (",
          per_tenant > 0 ? std::min(per_tenant, options_.max_queued_rows) : options_.max_queued_rows,
          "): split it into smaller requests"));
    } else if (per_tenant > 0 && tenant_rows + n > per_tenant) {
      // The tenant drains at its fair share of the throughput.
      double active_weight = 0;
      for (const auto& [name, tenant] : tenants_) {
        if (tenant->HasRows(0) || name == request->tenant) active_weight += tenant->weight;
      }
      if (it == tenants_.end()) active_weight += WeightOf(request->tenant);
      const double share = WeightOf(request->tenant) / std::max(active_weight, 1e-9);
      const absl::Duration delay = RetryDelayLocked(tenant_rows + n - per_tenant, share);
      reason = RejectReason::kTenantQueueFull;
      refused = absl::ResourceExhaustedError(absl::StrCat(
          "tenant \"", request->tenant, "\" has ", tenant_rows, " of its ", per_tenant,
          " queued inputs waiting; retry after about ", absl::FormatDuration(delay),
          " (or send fewer concurrent requests)"));
      SetRetryAfter(refused, delay);
    } else if (queued_rows_ + n > options_.max_queued_rows) {
      const absl::Duration delay = RetryDelayLocked(queued_rows_ + n - options_.max_queued_rows, 1.0);
      reason = RejectReason::kQueueFull;
      refused = absl::ResourceExhaustedError(absl::StrCat(
          "the batch queue is full (", queued_rows_, " of ", options_.max_queued_rows,
          " inputs waiting); retry after about ", absl::FormatDuration(delay)));
      SetRetryAfter(refused, delay);
    } else {
      Tenant* tenant = nullptr;
      if (it != tenants_.end()) {
        tenant = it->second.get();
      } else {
        auto fresh = std::make_unique<Tenant>();
        fresh->name = request->tenant;
        fresh->seq = next_tenant_seq_++;
        fresh->weight = WeightOf(request->tenant);
        // A new tenant starts at the classes' current virtual times (no banked credit).
        for (int c = 0; c < kNumClasses; ++c) fresh->vtime[c] = classes_[c].virtual_time;
        tenant = fresh.get();
        tenants_.emplace(request->tenant, std::move(fresh));
      }
      const int cls = ClassOf(request->priority);
      if (!tenant->active[cls]) {
        tenant->vtime[cls] = std::max(tenant->vtime[cls], classes_[cls].virtual_time);
        classes_[cls].order.emplace(tenant->vtime[cls], tenant->seq, tenant);
        tenant->active[cls] = true;
      }
      const absl::Time now = absl::Now();
      std::deque<QueuedRow>& queue = tenant->rows[static_cast<int>(request->priority)];
      for (int i = 0; i < n; ++i) queue.push_back(QueuedRow{request, i, now});
      tenant->queued_rows += n;
      request->queued = n;
      queued_rows_ += n;
      queued_tokens_ += tokens;
      depth = queued_rows_;
      if (observer_ != nullptr) {
        observer_->OnRequestAdmitted(request->tenant, request->priority);
        observer_->OnTenantQueuedRows(request->tenant, n);
      }
    }
  }
  if (!refused.ok()) {
    if (observer_ != nullptr) observer_->OnRequestRejected(request->tenant, reason);
    return refused;
  }
  if (observer_ != nullptr) observer_->OnQueueDepth(depth);

  // Wait, checking the deadline and the caller's cancellation now and then.
  while (!request->done.HasBeenNotified()) {
    const absl::Time now = absl::Now();
    absl::Status early;
    if (now >= request->deadline) {
      early = absl::DeadlineExceededError("the request's deadline passed before its inputs were computed");
    } else if (info.is_cancelled && info.is_cancelled()) {
      early = absl::CancelledError("the client cancelled the request");
    }
    if (!early.ok()) {
      request->ended.store(true);
      absl::MutexLock lock(&mu_);
      RemoveRequestLocked(*request, early.code());
      return early;
    }
    request->done.WaitForNotificationWithDeadline(
        std::min(request->deadline, now + options_.cancel_poll_interval));
  }
  absl::Status status;
  {
    absl::MutexLock lock(&request->mu);
    status = request->status;
  }
  if (!status.ok()) return status;
  return std::move(request->results);
}

void Batcher::RemoveRequestLocked(Request& request, absl::StatusCode why) {
  if (request.queued == 0) return;
  auto it = tenants_.find(request.tenant);
  if (it == tenants_.end()) return;  // cannot happen: queued rows keep their tenant
  Tenant* tenant = it->second.get();
  std::deque<QueuedRow>& queue = tenant->rows[static_cast<int>(request.priority)];
  int removed = 0;
  int64_t tokens = 0;
  for (auto row = queue.begin(); row != queue.end();) {
    if (row->request.get() == &request) {
      tokens += static_cast<int64_t>(request.inputs[row->index].ids.size());
      row = queue.erase(row);
      ++removed;
    } else {
      ++row;
    }
  }
  request.queued -= removed;
  tenant->queued_rows -= removed;
  queued_rows_ -= removed;
  queued_tokens_ -= tokens;
  if (removed > 0) request.Finish(removed, absl::Status(why, "removed from the queue"));
  if (observer_ != nullptr && removed > 0) {
    observer_->OnRowsDropped(removed, why);
    observer_->OnTenantQueuedRows(tenant->name, -removed);
  }
  const int cls = ClassOf(request.priority);
  if (tenant->active[cls] && !tenant->HasRows(cls)) {
    classes_[cls].order.erase({tenant->vtime[cls], tenant->seq, tenant});
    tenant->active[cls] = false;
  }
  if (tenant->queued_rows == 0) tenants_.erase(it);
  if (tenants_.empty()) {
    for (FairClass& c : classes_) c.virtual_time = 0;
  }
}

bool Batcher::BatchReadyLocked() const {
  return stopping_ || queued_rows_ >= options_.max_batch_rows || queued_tokens_ >= options_.max_batch_tokens;
}

absl::Time Batcher::OldestEnqueuedLocked() const {
  absl::Time oldest = absl::InfiniteFuture();
  for (const auto& [name, tenant] : tenants_) {
    for (const std::deque<QueuedRow>& queue : tenant->rows) {
      if (!queue.empty()) oldest = std::min(oldest, queue.front().enqueued);
    }
  }
  return oldest;
}

Batcher::QueuedRow Batcher::PopLocked(Tenant* tenant, int priority, double cost) {
  const int cls = priority == kLow ? 1 : 0;
  FairClass& fair = classes_[cls];
  fair.order.erase({tenant->vtime[cls], tenant->seq, tenant});
  std::deque<QueuedRow>& queue = tenant->rows[priority];
  QueuedRow row = std::move(queue.front());
  queue.pop_front();
  tenant->vtime[cls] += cost;
  if (tenant->HasRows(cls)) {
    fair.order.emplace(tenant->vtime[cls], tenant->seq, tenant);
  } else {
    tenant->active[cls] = false;
  }
  row.request->queued -= 1;
  tenant->queued_rows -= 1;
  queued_rows_ -= 1;
  queued_tokens_ -= static_cast<int64_t>(row.request->inputs[row.index].ids.size());
  if (observer_ != nullptr) observer_->OnTenantQueuedRows(tenant->name, -1);
  if (tenant->queued_rows == 0) tenants_.erase(tenants_.find(tenant->name));  // `tenant` is gone now
  if (tenants_.empty()) {
    for (FairClass& c : classes_) c.virtual_time = 0;
  }
  return row;
}

std::vector<Batcher::QueuedRow> Batcher::TakeBatchLocked(absl::Time now) {
  std::vector<QueuedRow> batch;
  int64_t longest = 0;
  bool full = false;
  for (int cls = 0; cls < kNumClasses && !full; ++cls) {
    FairClass& fair = classes_[cls];
    while (!fair.order.empty()) {
      if (static_cast<int>(batch.size()) >= options_.max_batch_rows) {
        full = true;
        break;
      }
      Tenant* tenant = std::get<2>(*fair.order.begin());
      const int priority = tenant->HeadPriority(cls);
      const QueuedRow& front = tenant->rows[priority].front();
      Request& request = *front.request;
      if (request.ended.load() || now >= request.deadline) {
        // The caller has gone (or is about to time out): drop the row without computing it or charging for it.
        const absl::StatusCode why =
            request.ended.load() ? absl::StatusCode::kCancelled : absl::StatusCode::kDeadlineExceeded;
        QueuedRow dropped = PopLocked(tenant, priority, 0);
        dropped.request->Finish(1, absl::Status(why, "dropped from the queue"));
        if (observer_ != nullptr) observer_->OnRowsDropped(1, why);
        continue;
      }
      const int64_t len = static_cast<int64_t>(request.inputs[front.index].ids.size());
      const int64_t new_longest = std::max(longest, len);
      if (!batch.empty() && new_longest * static_cast<int64_t>(batch.size() + 1) > options_.max_batch_tokens) {
        full = true;  // this row starts the next batch: it keeps its place
        break;
      }
      longest = new_longest;
      fair.virtual_time = tenant->vtime[cls];
      batch.push_back(PopLocked(tenant, priority, static_cast<double>(len) / tenant->weight));
    }
  }
  return batch;
}

void Batcher::WorkerLoop() {
  mu_.Lock();
  while (true) {
    mu_.Await(absl::Condition(
        +[](Batcher* b) ABSL_NO_THREAD_SAFETY_ANALYSIS { return b->stopping_ || b->queued_rows_ > 0; }, this));
    if (queued_rows_ == 0) break;  // stopping and drained
    const absl::Time fire = OldestEnqueuedLocked() + options_.max_queue_delay;
    mu_.AwaitWithDeadline(
        absl::Condition(+[](Batcher* b) ABSL_NO_THREAD_SAFETY_ANALYSIS { return b->BatchReadyLocked(); }, this),
        fire);
    const absl::Time now = absl::Now();
    std::vector<QueuedRow> batch = TakeBatchLocked(now);
    const int64_t depth = queued_rows_;
    mu_.Unlock();
    if (observer_ != nullptr) observer_->OnQueueDepth(depth);
    const int rows = static_cast<int>(batch.size());
    absl::Duration run_time;
    if (rows > 0) run_time = RunBatch(std::move(batch), now);
    mu_.Lock();
    if (rows > 0) {
      const double per_row = absl::ToDoubleSeconds(run_time) / rows;
      seconds_per_row_ = 0.8 * seconds_per_row_ + 0.2 * per_row;
    }
  }
  mu_.Unlock();
}

absl::Duration Batcher::RunBatch(std::vector<QueuedRow> batch, absl::Time now) {
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
  if (observer_ != nullptr) {
    std::set<const delta::DeltaPack*> packs;
    std::map<std::string, int> by_method;
    for (QueuedRow& row : batch) {
      const Request& request = *row.request;
      if (const delta::DeltaPack* pack = request.inputs[row.index].delta.get()) packs.insert(pack);
      if (request.delta_methods.empty()) {
        by_method["base"] += 1;
      } else {
        for (const std::string& method : request.delta_methods) by_method[method] += 1;
      }
    }
    observer_->OnBatchDeltas(static_cast<int>(packs.size()), by_method);
  }
  const absl::Time start = absl::Now();
  absl::Status status = runner_(rows);
  const absl::Duration run_time = absl::Now() - start;
  if (observer_ != nullptr) {
    observer_->OnBatch(static_cast<int>(rows.size()), longest * static_cast<int64_t>(rows.size()), real, run_time);
  }
  for (QueuedRow& row : batch) row.request->Finish(1, status);
  return run_time;
}

}  // namespace batching
}  // namespace deltaserve
