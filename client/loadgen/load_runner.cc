#include "client/loadgen/load_runner.h"

#include <algorithm>
#include <atomic>
#include <deque>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"

namespace deltaserve {
namespace loadgen {
namespace {

constexpr int kMaxConcurrency = 4096;

// Each worker's engine: distinct, reproducible streams.
uint64_t WorkerSeed(uint64_t seed, int worker) { return seed * 0x9E3779B97F4A7C15ull + 7919ull * (worker + 1); }

absl::Status Validate(const RunOptions& o) {
  if (o.concurrency < 1 || o.concurrency > kMaxConcurrency) {
    return absl::InvalidArgumentError(
        absl::StrCat("concurrency must be in [1, ", kMaxConcurrency, "], got ", o.concurrency));
  }
  if (o.mode == LoopMode::kOpen && !(o.qps > 0 && o.qps <= 1e6)) {
    return absl::InvalidArgumentError(absl::StrCat("an open loop needs a target rate in (0, 1e6] req/s, got ", o.qps));
  }
  if (o.duration <= absl::ZeroDuration()) return absl::InvalidArgumentError("the duration must be positive");
  if (o.warmup < absl::ZeroDuration()) return absl::InvalidArgumentError("the warm-up must not be negative");
  if (o.max_requests < 0) return absl::InvalidArgumentError("max_requests must not be negative");
  return absl::OkStatus();
}

struct Worker {
  LoadRecorder recorder;
  absl::Time last_done = absl::InfinitePast();
};

void RecordOutcome(const absl::StatusOr<int64_t>& outcome, absl::Duration latency, int64_t task, Worker* w) {
  w->recorder.Record(latency, outcome.status().code(), outcome.ok() ? *outcome : 0, task);
  w->last_done = absl::Now();
}

RunResult Finish(std::vector<Worker>& workers, absl::Time window_start) {
  RunResult result;
  absl::Time last = absl::InfinitePast();
  for (Worker& w : workers) {
    result.recorder.Merge(w.recorder);
    last = std::max(last, w.last_done);
  }
  result.seconds = last > window_start ? absl::ToDoubleSeconds(last - window_start) : 0;
  return result;
}

RunResult RunClosed(const RunOptions& o, const TaskPicker& pick_task, const RequestFn& send) {
  const absl::Time start = absl::Now();
  const absl::Time warm_end = start + o.warmup;
  const absl::Time end = warm_end + o.duration;
  std::atomic<int64_t> measured_started{0};
  std::vector<Worker> workers(static_cast<size_t>(o.concurrency));
  std::vector<std::thread> threads;
  for (int i = 0; i < o.concurrency; ++i) {
    threads.emplace_back([&, i] {
      std::mt19937_64 rng(WorkerSeed(o.seed, i));
      Worker& w = workers[static_cast<size_t>(i)];
      while (true) {
        const absl::Time t0 = absl::Now();
        if (t0 >= end) break;
        const bool measured = t0 >= warm_end;
        if (measured && o.max_requests > 0 && measured_started.fetch_add(1) >= o.max_requests) break;
        const RequestSlot slot{i, pick_task ? pick_task(rng) : -1};
        const absl::StatusOr<int64_t> outcome = send(slot);
        if (measured) RecordOutcome(outcome, absl::Now() - t0, slot.task, &w);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  return Finish(workers, warm_end);
}

RunResult RunOpen(const RunOptions& o, const TaskPicker& pick_task, const RequestFn& send) {
  struct Arrival {
    absl::Time due;
    int64_t task = -1;
    bool measured = false;
  };
  absl::Mutex mu;
  absl::CondVar ready;
  std::deque<Arrival> queue;                        // guarded by mu
  bool done = false;                                // guarded by mu: no more arrivals will come
  absl::Time drain_until = absl::InfiniteFuture();  // guarded by mu: queued requests past this are not sent

  const absl::Time start = absl::Now();
  const absl::Time warm_end = start + o.warmup;
  const absl::Time end = warm_end + o.duration;
  // After the last arrival, queued requests still go out for this long; the rest count as not sent.
  const absl::Duration drain = std::max(absl::Seconds(1), o.duration / 10);

  std::vector<Worker> workers(static_cast<size_t>(o.concurrency));
  std::vector<std::thread> threads;
  for (int i = 0; i < o.concurrency; ++i) {
    threads.emplace_back([&, i] {
      Worker& w = workers[static_cast<size_t>(i)];
      while (true) {
        Arrival a;
        {
          absl::MutexLock lock(&mu);
          while (queue.empty() && !done) ready.Wait(&mu);
          if (queue.empty()) return;  // done and drained
          if (absl::Now() > drain_until) {
            for (const Arrival& left : queue) {
              if (left.measured) w.recorder.RecordNotSent();
            }
            queue.clear();
            return;
          }
          a = queue.front();
          queue.pop_front();
        }
        const absl::Time started = absl::Now();
        const absl::StatusOr<int64_t> outcome = send(RequestSlot{i, a.task});
        if (a.measured) {
          w.recorder.RecordStartLag(started - a.due);
          RecordOutcome(outcome, absl::Now() - a.due, a.task, &w);
        }
      }
    });
  }

  // The dispatcher: this thread.
  absl::StatusOr<ArrivalProcess> arrivals = ArrivalProcess::Create(o.qps, o.arrivals, WorkerSeed(o.seed, -1));
  std::mt19937_64 rng(WorkerSeed(o.seed, -2));
  int64_t measured = 0;
  absl::Time due = start;
  while (true) {
    due += arrivals->NextGap();
    if (due >= end) break;
    const bool is_measured = due >= warm_end;
    if (is_measured && o.max_requests > 0 && measured >= o.max_requests) break;
    measured += is_measured ? 1 : 0;
    const int64_t task = pick_task ? pick_task(rng) : -1;
    const absl::Duration wait = due - absl::Now();
    if (wait > absl::ZeroDuration()) absl::SleepFor(wait);
    absl::MutexLock lock(&mu);
    queue.push_back(Arrival{due, task, is_measured});
    ready.Signal();
  }
  {
    absl::MutexLock lock(&mu);
    done = true;
    drain_until = absl::Now() + drain;
    ready.SignalAll();
  }
  for (std::thread& t : threads) t.join();
  return Finish(workers, warm_end);
}

}  // namespace

absl::StatusOr<LoopMode> ParseLoopMode(const std::string& text) {
  if (text == "closed") return LoopMode::kClosed;
  if (text == "open") return LoopMode::kOpen;
  return absl::InvalidArgumentError(absl::StrCat("unknown loop mode \"", text, "\" (closed or open)"));
}

absl::StatusOr<Arrivals> ParseArrivals(const std::string& text) {
  if (text == "poisson") return Arrivals::kPoisson;
  if (text == "uniform") return Arrivals::kUniform;
  return absl::InvalidArgumentError(absl::StrCat("unknown arrival process \"", text, "\" (poisson or uniform)"));
}

absl::StatusOr<ArrivalProcess> ArrivalProcess::Create(double qps, Arrivals kind, uint64_t seed) {
  if (!(qps > 0 && qps <= 1e6)) {
    return absl::InvalidArgumentError(absl::StrCat("the arrival rate must be in (0, 1e6] req/s, got ", qps));
  }
  return ArrivalProcess(qps, kind, seed);
}

absl::Duration ArrivalProcess::NextGap() {
  if (kind_ == Arrivals::kUniform) return absl::Seconds(1.0 / qps_);
  return absl::Seconds(std::exponential_distribution<double>(qps_)(rng_));
}

absl::StatusOr<RunResult> RunLoad(const RunOptions& options, const TaskPicker& pick_task, const RequestFn& send) {
  if (absl::Status st = Validate(options); !st.ok()) return st;
  if (!send) return absl::InvalidArgumentError("no request function");
  return options.mode == LoopMode::kClosed ? RunClosed(options, pick_task, send) : RunOpen(options, pick_task, send);
}

}  // namespace loadgen
}  // namespace deltaserve
